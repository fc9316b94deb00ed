//! What the log tells an operator, read from the real binary's JSON log: why clients get
//! 503 when an upstream is down (once per upstream and cause, not once per request), no
//! "settings changed" line on the first start of an empty data dir but one on a real
//! change, and no empty fields.

mod common;

use std::path::Path;
use std::time::Duration;

use common::binary::Regcache;
use common::external::free_port;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);
const UNREACHABLE: &str = "upstream cannot be reached: clients get 503 UNAVAILABLE for what is not cached";
const SETTINGS: &str = "applied changed settings to the stored schedule";

/// Every JSON log line whose message is `message`, whole (level and fields).
fn events(server: &Regcache, message: &str) -> Vec<Value> {
    server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

/// A config with two upstreams on ports nothing listens on, and `ttl`.
fn config(dir: &Path, port: u16, dead: [u16; 2], ttl: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n[proxy]\nttl = \"{ttl}\"\n\
         [[upstream]]\nname = \"local\"\nurl = \"http://127.0.0.1:{}\"\ndefault = true\n\
         [[upstream]]\nname = \"other\"\nurl = \"http://127.0.0.1:{}\"\n",
        dir.join("data").display(),
        dead[0],
        dead[1]
    )
}

#[tokio::test]
async fn an_unreachable_upstream_is_warned_about_once_per_upstream_and_cause() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dead = [free_port(), free_port()];
    let mut server = Regcache::start(dir.path(), "down", |port| config(dir.path(), port, dead, "7d")).await;
    let client = reqwest::Client::new();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let mut paths = Vec::new();
    for i in 0..4 {
        paths.push(format!("/v2/acme/app{i}/manifests/v1"));
        paths.push(format!("/v2/acme/app{i}/blobs/{digest}"));
        paths.push(format!("/v2/other/acme/app{i}/manifests/v1"));
    }
    for path in &paths {
        let resp = client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 503, "{path}");
        let body: Value = resp.json().await.expect("an OCI error body");
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{path}: {body}");
    }
    server.stop().await;

    let warned = events(&server, UNREACHABLE);
    let mut upstreams: Vec<&str> = warned
        .iter()
        .map(|e| e["fields"]["upstream.name"].as_str().unwrap_or_default())
        .collect();
    upstreams.sort_unstable();
    assert_eq!(
        upstreams,
        ["local", "other"],
        "one line per upstream for {} failed requests:\n{}",
        paths.len(),
        server.log()
    );
    let warnings = server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "WARN")
        .count();
    assert_eq!(warnings, 2, "nothing else warns per request:\n{}", server.log());
    for e in &warned {
        assert_eq!(e["level"], "WARN", "{e}");
        let cause = e["fields"]["error.cause"].as_str().unwrap_or_default();
        assert!(cause.starts_with("unreachable: "), "{e}");
        assert!(cause.contains("refused"), "{e}");
        assert_eq!(e["fields"]["requests.failed"], 1, "{e}");
    }
}

#[tokio::test]
async fn the_first_start_logs_no_settings_change_and_a_real_change_is_logged_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dead = [free_port(), free_port()];
    let mut server = Regcache::start(dir.path(), "first", |port| config(dir.path(), port, dead, "7d")).await;
    common::wait_until_async("the sweeper ran", DEADLINE, || {
        let seen = !events(&server, "sweeper ran").is_empty();
        async move { seen }
    })
    .await;
    server.stop().await;
    assert_eq!(events(&server, SETTINGS), Vec::<Value>::new(), "{}", server.log());
    let sweep = &events(&server, "sweeper ran")[0]["fields"];
    assert_eq!(sweep["jobs.by_state"], "none", "no empty field: {sweep}");
    // No field of any line is empty.
    for line in server.log().lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for (k, f) in v["fields"].as_object().expect("fields") {
            assert!(f.as_str() != Some(""), "empty field {k}: {line}");
        }
    }

    let mut server = Regcache::start(dir.path(), "again", |port| config(dir.path(), port, dead, "7d")).await;
    server.stop().await;
    assert!(
        events(&server, SETTINGS).is_empty(),
        "nothing changed:\n{}",
        server.log()
    );

    let mut server =
        Regcache::start(dir.path(), "changed", |port| config(dir.path(), port, dead, "1d")).await;
    server.stop().await;
    let changed = events(&server, SETTINGS);
    assert_eq!(changed.len(), 1, "{}", server.log());
    let change = changed[0]["fields"]["change"].as_str().unwrap_or_default();
    assert!(
        change.contains("upstream local ttl 604800s -> 86400s") && change.contains("upstream other"),
        "{change}"
    );
}
