//! Configuration errors in plain words: figment's and serde's errors become one sentence
//! naming the key (`upstream[0].url`, one spelling for list entries), the upstream it
//! belongs to, the environment variable or file that set it, what is wrong and how to fix
//! it. Suggestions for a mistyped key come from serde's list of the fields that exist, so
//! they follow the config types without a list kept by hand.

use super::load::ConfigError;
use figment::error::Kind;
use std::fmt;

/// What is said after the key: which upstream it belongs to, where its value came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyContext {
    /// The `name` of the `[[upstream]]` entry the key is in.
    pub upstream: Option<String>,
    /// The `REGCACHE_*` variable that set it.
    pub env_var: Option<String>,
    /// The config file that set it.
    pub file: Option<String>,
}

impl fmt::Display for KeyContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(name) = &self.upstream {
            parts.push(format!("upstream {name:?}"));
        }
        if let Some(var) = &self.env_var {
            parts.push(format!("set by environment variable {var}"));
        } else if let Some(file) = &self.file {
            parts.push(format!("in {file}"));
        }
        if parts.is_empty() {
            Ok(())
        } else {
            write!(f, " ({})", parts.join(", "))
        }
    }
}

/// Where the loaded values came from, to say so in an error.
#[derive(Debug, Clone, Default)]
pub(super) struct Sources {
    /// Each used `REGCACHE_*` variable with the key path it sets (`["proxy", "ttl"]`).
    pub(super) env: Vec<(Vec<String>, String)>,
    /// The config file, and the top-level sections it sets.
    pub(super) file: Option<(String, Vec<String>)>,
    /// The names of the `[[upstream]]` entries, by index (empty when one has none).
    pub(super) upstream_names: Vec<String>,
}

impl Sources {
    /// Fills in the context of a key error: the upstream it is in, and the variable or
    /// file that set it.
    pub(super) fn explain(&self, e: ConfigError) -> ConfigError {
        let ConfigError::Invalid { key, message, .. } = e else {
            return e;
        };
        let path = key_path(&key);
        let upstream = match path.as_slice() {
            [first, index, ..] if first == "upstream" => index
                .parse::<usize>()
                .ok()
                .and_then(|i| self.upstream_names.get(i))
                .filter(|n| !n.is_empty())
                .cloned(),
            _ => None,
        };
        // The longest variable path that is a prefix of the key: `REGCACHE_UPSTREAM` set
        // all of `upstream[0].url`. The environment wins over the file, so it is the source.
        // Or a variable below the key: `REGCACHE_STORAGE__DELET__ENABLED` made the unknown
        // key `storage.delet`.
        let env_var = self
            .env
            .iter()
            .filter(|(p, _)| path.starts_with(p))
            .max_by_key(|(p, _)| p.len())
            .or_else(|| self.env.iter().find(|(p, _)| p.starts_with(&path)))
            .map(|(_, var)| var.clone());
        let file = self
            .file
            .as_ref()
            .filter(|(_, sections)| path.first().is_some_and(|s| sections.contains(s)))
            .map(|(f, _)| f.clone());
        ConfigError::Invalid {
            key,
            message,
            context: KeyContext {
                upstream,
                env_var,
                file,
            },
        }
    }
}

/// `upstream[0].url` → `["upstream", "0", "url"]`.
fn key_path(key: &str) -> Vec<String> {
    key.split(['.', '['])
        .map(|s| s.trim_end_matches(']').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `["upstream", "0", "url"]` → `upstream[0].url`, the one spelling of list entries.
pub(super) fn key_name<S: AsRef<str>>(path: &[S]) -> String {
    let mut out = String::new();
    for segment in path {
        let segment = segment.as_ref();
        if segment.parse::<usize>().is_ok() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// How the table holding a key is written in TOML: `[proxy]`, `[[upstream]]`, or the top
/// level.
fn table_name(path: &[String]) -> String {
    match path {
        [] => "the top level".to_owned(),
        [.., last] if last.parse::<usize>().is_ok() => {
            format!("[[{}]]", key_name(&path[..path.len() - 1]))
        }
        _ => format!("[{}]", key_name(path)),
    }
}

/// Turns figment's errors into one [`ConfigError`]: the first error's key, and each error
/// said in plain words.
pub(super) fn from_figment(err: figment::Error) -> ConfigError {
    let mut first_key = None;
    let mut messages = Vec::new();
    for e in err {
        let (key, message) = describe(&e.path, &e.kind);
        if first_key.is_none() {
            first_key = Some(key);
            messages.push(message);
        } else {
            messages.push(format!("also `{key}`: {message}"));
        }
    }
    ConfigError::Invalid {
        key: first_key.unwrap_or_else(|| "(top level)".to_owned()),
        message: messages.join("; "),
        context: KeyContext::default(),
    }
}

fn describe(path: &[String], kind: &Kind) -> (String, String) {
    match kind {
        Kind::UnknownField(found, expected) => {
            let table = path.get(..path.len().saturating_sub(1)).unwrap_or_default();
            let suggestion = match closest(found, expected) {
                Some(near) => format!("; did you mean `{near}`?"),
                None => ".".to_owned(),
            };
            let known = if table.is_empty() {
                format!("The sections are: {}", expected.join(", "))
            } else {
                format!("{} has: {}", table_name(table), expected.join(", "))
            };
            (
                key_name(path),
                format!("unknown key `{found}`{suggestion} {known}"),
            )
        }
        Kind::UnknownVariant(found, expected) => {
            let mut message = format!("{found:?} is not one of {}", quoted_list(expected));
            if let Some(near) = closest(found, expected) {
                message.push_str(&format!("; did you mean {near:?}?"));
            }
            (key_name(path), message)
        }
        Kind::MissingField(field) => {
            let mut full = path.to_vec();
            full.push(field.to_string());
            let message = format!(
                "missing: every {} needs one; add `{field} = …` to it",
                table_name(path)
            );
            (key_name(&full), message)
        }
        Kind::InvalidType(actual, expected) => {
            (key_name(path), format!("expected {expected}, found {actual}"))
        }
        other => (key_name(path), other.to_string()),
    }
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The expected name nearest to `found`, when it is near enough to be a typo: at most one
/// edit for short names, about one per three characters for longer ones.
pub(super) fn closest<'a>(found: &str, expected: &[&'a str]) -> Option<&'a str> {
    let found = found.to_ascii_lowercase().replace('-', "_");
    let limit = (found.chars().count() / 3).max(1);
    expected
        .iter()
        .map(|e| (edit_distance(&found, e), *e))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::super::load::{load, load_report};
    use super::*;
    use std::io::Write;

    fn load_err(toml: &str, vars: &[(&str, &str)]) -> (String, String, KeyContext) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let e = load(Some(f.path()), vars).unwrap_err();
        let text = e.to_string();
        match e {
            ConfigError::Invalid { key, context, .. } => (key, text, context),
            other => panic!("unexpected {other}"),
        }
    }

    fn assert_names(text: &str, needles: &[&str]) {
        for needle in needles {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
        assert!(
            !text.contains("``") && !text.contains("`one of"),
            "broken quoting: {text}"
        );
    }

    #[test]
    fn an_unknown_key_suggests_the_nearest_real_one() {
        let (key, text, context) = load_err("[proxy]\nttll = \"1d\"\n", &[]);
        assert_eq!(key, "proxy.ttll");
        assert_names(&text, &["did you mean `ttl`?", "[proxy] has: ttl, offline"]);
        assert!(context.file.is_some(), "{text}");
        let (key, text, _) = load_err("[server]\ndata-dir = \"/x\"\n", &[]);
        assert_eq!(key, "server.data-dir");
        assert_names(&text, &["did you mean `data_dir`?"]);
        let (key, text, _) = load_err("colour = \"blue\"\n", &[]);
        assert_eq!(key, "colour");
        assert_names(
            &text,
            &["unknown key `colour`.", "The sections are: server, storage"],
        );
        let (key, text, _) = load_err(
            "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\npasword = \"x\"\n",
            &[],
        );
        assert_eq!(key, "upstream[0].pasword");
        assert_names(
            &text,
            &["upstream \"a\"", "did you mean `password`?", "[[upstream]] has:"],
        );
    }

    #[test]
    fn an_unknown_choice_lists_the_choices() {
        let (key, text, context) = load_err("", &[("REGCACHE_STORAGE__BACKEND", "s4")]);
        assert_eq!(key, "storage.backend");
        assert_names(
            &text,
            &[
                "\"s4\" is not one of \"filesystem\", \"s3\"",
                "did you mean \"s3\"?",
            ],
        );
        assert_eq!(context.env_var.as_deref(), Some("REGCACHE_STORAGE__BACKEND"));
    }

    #[test]
    fn an_upstream_error_names_the_upstream_with_one_spelling_of_the_key() {
        let (key, text, context) = load_err("[[upstream]]\nname = \"local\"\n", &[]);
        assert_eq!(key, "upstream[0].url");
        assert_eq!(context.upstream.as_deref(), Some("local"));
        assert_names(&text, &["upstream[0].url", "upstream \"local\"", "add `url = …`"]);
        for url in ["registry.local", "localhost:5000"] {
            let (key, text, _) = load_err(&format!("[[upstream]]\nname = \"local\"\nurl = \"{url}\"\n"), &[]);
            assert_eq!(key, "upstream[0].url");
            assert_names(
                &text,
                &[
                    "upstream \"local\"",
                    "needs http:// or https://",
                    &format!("\"https://{url}\""),
                ],
            );
            assert!(!text.contains("relative URL without a base"), "{text}");
        }
        // The same from the environment names the variable.
        let (key, text, context) =
            load_err("", &[("REGCACHE_UPSTREAM", r#"[{name = "x", url = "ftp://x"}]"#)]);
        assert_eq!(key, "upstream[0].url");
        assert_eq!(context.env_var.as_deref(), Some("REGCACHE_UPSTREAM"));
        assert_names(
            &text,
            &["upstream \"x\"", "set by environment variable REGCACHE_UPSTREAM"],
        );
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        let (key, text, _) = load_err("", &[("REGCACHE_SERVER__LISTEN", "nowhere")]);
        assert_eq!(key, "server.listen");
        assert_names(&text, &["REGCACHE_SERVER__LISTEN", "host:port"]);
        // From the file, the file is named and no variable.
        let (_, text, context) = load_err(
            "[server]\nlisten = \"nowhere\"\n",
            &[("REGCACHE_PROXY__TTL", "1d")],
        );
        assert!(context.env_var.is_none() && context.file.is_some(), "{text}");
        // The explanation is also there for later checks (the data dir).
        let loaded = load_report(None, [("REGCACHE_SERVER__DATA_DIR".to_owned(), "/x".to_owned())]).unwrap();
        let e = loaded.explain(super::super::load::invalid("server.data_dir", "unusable"));
        assert!(e.to_string().contains("REGCACHE_SERVER__DATA_DIR"), "{e}");
    }

    #[test]
    fn near_names_are_suggested_and_far_ones_not() {
        let fields = ["ttl", "offline", "revalidate_after", "connect_timeout"];
        assert_eq!(closest("ttll", &fields), Some("ttl"));
        assert_eq!(closest("TTL", &fields), Some("ttl"));
        assert_eq!(closest("ofline", &fields), Some("offline"));
        assert_eq!(closest("connect-timeout", &fields), Some("connect_timeout"));
        assert_eq!(closest("revalidate_afer", &fields), Some("revalidate_after"));
        assert_eq!(closest("bogus_key", &fields), None);
        assert_eq!(closest("port", &["server", "storage", "proxy"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn list_entries_have_one_spelling() {
        assert_eq!(key_name(&["upstream", "0", "url"]), "upstream[0].url");
        assert_eq!(
            key_name(&["cleanup", "policy", "2", "name"]),
            "cleanup.policy[2].name"
        );
        assert_eq!(
            key_path("cleanup.policy[2].name"),
            ["cleanup", "policy", "2", "name"]
        );
        assert_eq!(table_name(&["upstream".into(), "0".into()]), "[[upstream]]");
        assert_eq!(
            table_name(&["storage".into(), "delete".into()]),
            "[storage.delete]"
        );
    }
}
