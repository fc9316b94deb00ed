//! The access log of the real binary: one line per request at info with method, path,
//! status, bytes, duration, upstream, cache result and client address, in the text and
//! the JSON format; never a credential (headers and query strings are not logged);
//! nothing at all with `log.access = false`.

mod common;

use common::binary::Regcache;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Image, ACCEPT_ALL_MANIFESTS};
use common::wait_until_async;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use serde_json::Value;
use std::time::Duration;

const REPO: &str = "team/app";
/// Must never reach the log.
const PASSWORD: &str = "hunter2-access-log-secret";
const QUERY_SECRET: &str = "querytoken-access-log-secret";

fn config(port: u16, data_dir: &std::path::Path, upstream: &str, log: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
         [[upstream]]\nname = \"fixture\"\nurl = \"{upstream}\"\ndefault = true\n\
         [log]\n{log}\n",
        data_dir.display()
    )
}

/// Requests every test makes: a cold manifest (miss) and blob (miss), the same again
/// (revalidated, hit), a 404, and a request carrying credentials in a header and the
/// query string.
async fn traffic(base: &str, image: &Image) {
    let client = reqwest::Client::new();
    let layer = &image.layers[0];
    for _ in 0..2 {
        let m = client
            .get(format!("{base}/v2/{REPO}/manifests/v1"))
            .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
            .send()
            .await
            .unwrap();
        assert_eq!(m.status(), 200);
        m.bytes().await.unwrap();
        let b = client
            .get(format!("{base}/v2/{REPO}/blobs/{}", layer.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(b.bytes().await.unwrap(), layer.bytes);
    }
    let missing = client
        .get(format!("{base}/v2/{REPO}/manifests/missing?token={QUERY_SECRET}"))
        .basic_auth("someone", Some(PASSWORD))
        .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    missing.bytes().await.unwrap();
    let authed = client
        .get(format!("{base}/v2/"))
        .header(AUTHORIZATION, format!("Bearer {PASSWORD}"))
        .send()
        .await
        .unwrap();
    assert_eq!(authed.status(), 200);
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn setup(seed: &str) -> (FixtureUpstream, Image, tempfile::TempDir) {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new(seed, &[40_000], "2024-01-01T00:00:00Z");
    upstream.add_image(REPO, Some("v1"), &image);
    (upstream, image, tempfile::tempdir().unwrap())
}

#[tokio::test]
async fn text_lines_carry_every_field_and_no_credential() {
    let (upstream, image, dir) = setup("access-text").await;
    let data = dir.path().join("data");
    let mut server = Regcache::start(dir.path(), "text", |port| {
        config(
            port,
            &data,
            &upstream.url(),
            "level = \"warn,regcache::access=info\"",
        )
    })
    .await;
    traffic(&server.base, &image).await;
    let lines = || {
        strip_ansi(&server.log())
            .lines()
            .filter(|l| l.contains("regcache::access") && l.contains(" request "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let lines_for = |path: &str| {
        lines()
            .into_iter()
            .filter(|l| l.contains(&format!("http.path={path} ")))
            .collect::<Vec<_>>()
    };
    let manifest = format!("/v2/{REPO}/manifests/v1");
    // Lines are written by the log writer after their body is done: wait for the last
    // request's (the second `/v2/`: the start-up probe asked it first).
    wait_until_async("the last request is logged", Duration::from_secs(10), || async {
        lines().iter().filter(|l| l.contains("http.path=/v2/ ")).count() >= 2
    })
    .await;
    let m = lines_for(&manifest);
    assert_eq!(m.len(), 2, "{m:#?}");
    let size = image.manifest.len();
    for (line, result) in m.iter().zip(["miss", "revalidated"]) {
        for field in [
            "http.method=GET".to_owned(),
            "http.status=200".to_owned(),
            format!("size_bytes={size} "),
            "upstream=fixture".to_owned(),
            format!("cache.result={result}"),
            "client.addr=127.0.0.1:".to_owned(),
            "duration_ms=".to_owned(),
        ] {
            assert!(line.contains(&field), "{field:?} in {line}");
        }
        assert!(line.contains(" INFO "), "{line}");
    }
    let blob = lines_for(&format!("/v2/{REPO}/blobs/{}", image.layers[0].digest));
    assert_eq!(blob.len(), 2);
    assert!(blob[0].contains("cache.result=miss") && blob[1].contains("cache.result=hit"));
    assert!(blob[1].contains(&format!("size_bytes={} ", image.layers[0].len())));
    let missing = lines_for(&format!("/v2/{REPO}/manifests/missing"));
    assert_eq!(missing.len(), 1);
    assert!(missing[0].contains("http.status=404") && missing[0].contains("cache.result=error"));
    let log = server.log();
    for secret in [PASSWORD, QUERY_SECRET, "token="] {
        assert!(!log.contains(secret), "{secret:?} reached the log:\n{log}");
    }
    server.stop().await;
}

#[tokio::test]
async fn json_lines_carry_every_field() {
    let (upstream, image, dir) = setup("access-json").await;
    let data = dir.path().join("data");
    let mut server = Regcache::start(dir.path(), "json", |port| {
        config(
            port,
            &data,
            &upstream.url(),
            "level = \"info\"\nformat = \"json\"",
        )
    })
    .await;
    traffic(&server.base, &image).await;
    let base_path = "/v2/";
    // The last request's line (the start-up probe asked `/v2/` first).
    wait_until_async("the last request is logged", Duration::from_secs(10), || async {
        server
            .log_events("request")
            .iter()
            .filter(|f| f["http.path"] == base_path)
            .count()
            >= 2
    })
    .await;
    let events: Vec<Value> = server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "regcache::access")
        .collect();
    assert!(events.iter().all(|e| e["level"] == "INFO"));
    let manifest = format!("/v2/{REPO}/manifests/v1");
    let m: Vec<&Value> = events
        .iter()
        .map(|e| &e["fields"])
        .filter(|f| f["http.path"] == manifest.as_str())
        .collect();
    assert_eq!(m.len(), 2, "{events:#?}");
    assert_eq!(m[0]["cache.result"], "miss");
    assert_eq!(m[1]["cache.result"], "revalidated");
    for f in &m {
        assert_eq!(f["message"], "request");
        assert_eq!(f["http.method"], "GET");
        assert_eq!(f["http.status"], 200);
        assert_eq!(f["size_bytes"], image.manifest.len());
        assert_eq!(f["upstream"], "fixture");
        assert!(f["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{f}");
        assert!(
            f["client.addr"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{f}"
        );
    }
    let log = server.log();
    for secret in [PASSWORD, QUERY_SECRET] {
        assert!(!log.contains(secret), "{secret:?} reached the log");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_switch_turns_the_access_log_off() {
    no_access_lines_with(
        "access-off",
        "level = \"info\"\nformat = \"json\"\naccess = false",
    )
    .await;
}

#[tokio::test]
async fn the_log_level_filters_the_access_log_like_any_other_target() {
    // The lines are written without `tracing`'s formatter; the filter still decides.
    no_access_lines_with(
        "access-filtered",
        "level = \"info,regcache::access=warn\"\nformat = \"json\"",
    )
    .await;
}

/// Runs the traffic with `log` as the `[log]` section, and checks that info lines are
/// written but no access line is.
async fn no_access_lines_with(seed: &str, log: &str) {
    let (upstream, image, dir) = setup(seed).await;
    let data = dir.path().join("data");
    let mut server =
        Regcache::start(dir.path(), seed, |port| config(port, &data, &upstream.url(), log)).await;
    traffic(&server.base, &image).await;
    // Requests are answered in order on fresh connections; the last one's answer came,
    // so any line it would have written is there (written before its body ended).
    server.stop().await;
    let log = server.log();
    assert!(
        log.contains("\"message\":\"blob cached\""),
        "info lines are still written:\n{log}"
    );
    assert!(!log.contains("regcache::access"), "no access line:\n{log}");
    // The server's last line before exit is in the log (lines leave through a writer
    // thread, written out at exit).
    assert!(
        log.contains("\"message\":\"shutting down\""),
        "lines queued at exit are written:\n{log}"
    );
}
