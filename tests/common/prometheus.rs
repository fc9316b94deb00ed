//! Reading a Prometheus text exposition in tests: samples parsed into (name, labels,
//! value) with lookups that fail loudly on a name that is not there, and `promtool check
//! metrics` run on the text. Written from the format's description, not from regcache's
//! renderer, so it checks the renderer rather than agreeing with it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use super::external::require_tool;

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_line(l).unwrap_or_else(|| panic!("unparseable sample line {l:?}")))
            .collect();
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the samples of `name` with `labels`; panics when none matches, so a
    /// renamed metric or label fails the test instead of reading as 0.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matched: Vec<&Sample> = self.matching(name, labels).collect();
        assert!(
            !matched.is_empty(),
            "no sample {name}{labels:?} in the exposition:\n{}",
            self.text
        );
        matched.iter().map(|s| s.value).sum()
    }

    /// `value` as an integer count.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self.value(name, labels);
        assert!(
            v >= 0.0 && v.fract() == 0.0,
            "{name}{labels:?} = {v} is not a count"
        );
        v as u64
    }

    /// The sum of the samples of `name` with `labels`, 0 when there is none.
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Every sample name, and every family named in a `# TYPE` line.
    pub fn names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.samples.iter().map(|s| s.name.clone()).collect();
        for l in self.text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    names.insert(name.to_owned());
                }
            }
        }
        names
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name_end, rest) = match line.find(['{', ' ']) {
        Some(i) => (i, &line[i..]),
        None => return None,
    };
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // key
            let key_start = chars.peek()?.0;
            let mut key_end = key_start;
            while let Some((i, c)) = chars.peek().copied() {
                if c == '=' {
                    key_end = i;
                    break;
                }
                if c == '}' {
                    end = Some(i);
                    break;
                }
                chars.next();
            }
            if end.is_some() {
                break;
            }
            let key = body[key_start..key_end].trim_start_matches(',').to_owned();
            chars.next(); // '='
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.peek()?.1 {
                ',' => {
                    chars.next();
                }
                '}' => {
                    end = Some(chars.peek()?.0);
                    break;
                }
                _ => return None,
            }
        }
        rest = &body[end? + 1..];
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// `GET url` and parse the body; panics on a non-200 answer.
pub async fn scrape(client: &reqwest::Client, url: &str) -> Scrape {
    let resp = client.get(url).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), 200, "GET {url}");
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "exposition content type: {content_type:?}"
    );
    Scrape::parse(&resp.text().await.expect("metrics body"))
}

/// Runs `promtool check metrics` on `text` (stdin) and panics with its complaints unless
/// it finds nothing wrong.
pub fn promtool_check_metrics(text: &str) {
    let promtool = require_tool("promtool");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("waiting for promtool");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics: {}\n{complaints}\n--- exposition ---\n{text}",
        out.status
    );
}
