//! The `regcache` binary as a user runs it: `check-config` prints the effective config
//! with secrets redacted or an error naming the bad key; `serve` refuses a bad config
//! before touching the disk, and with a good one serves and stops cleanly on SIGTERM.
//! Every child runs with an empty environment so the host's `REGCACHE_*` cannot leak in.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::app::ok_bytes;
use common::binary::{self, write, ChildGuard, Output, BIN};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Image, ACCEPT_ALL_MANIFESTS};

/// Generous: a debug binary on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// Runs the binary in `cwd` with only `env` set; panics after `DEADLINE`.
fn run(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    binary::run(args, env, cwd, DEADLINE)
}

fn get<'a>(table: &'a toml::Table, dotted: &str) -> &'a toml::Value {
    let mut parts = dotted.split('.');
    let first = parts.next().expect("key");
    let mut value = table
        .get(first)
        .unwrap_or_else(|| panic!("no {dotted} in {table}"));
    for part in parts {
        value = match part.parse::<usize>() {
            Ok(i) => value.get(i),
            Err(_) => value.get(part),
        }
        .unwrap_or_else(|| panic!("no {dotted} in {table}"));
    }
    value
}

fn str_at<'a>(table: &'a toml::Table, dotted: &str) -> &'a str {
    get(table, dotted)
        .as_str()
        .unwrap_or_else(|| panic!("{dotted} is not a string in {table}"))
}

#[test]
fn help_lists_the_subcommands() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(&["--help"], &[], dir.path());
    out.assert_success();
    assert!(out.stdout.contains("serve"), "{out:#?}");
    assert!(out.stdout.contains("check-config"), "{out:#?}");
    for sub in ["serve", "check-config"] {
        let out = run(&[sub, "--help"], &[], dir.path());
        out.assert_success();
        assert!(out.stdout.contains("--config"), "{sub}: {out:#?}");
    }
}

#[test]
fn check_config_without_a_file_prints_the_defaults() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(&["check-config"], &[], dir.path());
    let config = out.assert_success().config();
    assert_eq!(str_at(&config, "server.listen"), "127.0.0.1:5000");
    assert_eq!(str_at(&config, "server.data_dir"), "./regcache-data");
    assert_eq!(str_at(&config, "storage.backend"), "filesystem");
    assert_eq!(get(&config, "storage.delete.enabled").as_bool(), Some(true));
    assert_eq!(str_at(&config, "proxy.ttl"), "7d");
    assert_eq!(get(&config, "proxy.offline").as_bool(), Some(false));
    let upstreams = get(&config, "upstream").as_array().expect("upstream array");
    assert_eq!(upstreams.len(), 1, "{config}");
    assert_eq!(str_at(&config, "upstream.0.url"), "https://registry-1.docker.io");
    assert_eq!(get(&config, "upstream.0.default").as_bool(), Some(true));
    assert!(
        std::fs::read_dir(dir.path()).expect("read cwd").next().is_none(),
        "check-config created something in the working directory"
    );
}

#[test]
fn check_config_redacts_every_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secrets = [
        "hunter2-inline-password",
        "file-password-42",
        "aws-secret-key-xyz",
    ];
    let password_file = write(dir.path(), "password.txt", &format!("{}\n", secrets[1]));
    let config = write(
        dir.path(),
        "regcache.toml",
        &format!(
            r#"
[server]
listen = "0.0.0.0:5000"
data_dir = "/var/lib/regcache"
[storage]
backend = "s3"
[storage.s3]
bucket = "cache"
endpoint = "http://127.0.0.1:9000"
allow_http = true
access_key_id = "AKIDEXAMPLE"
secret_access_key = "{}"
[proxy]
ttl = "7d"
[[upstream]]
name = "internal"
url = "http://registry.internal:5000"
default = true
username = "robot"
password = "{}"
[[upstream]]
name = "ghcr"
url = "https://ghcr.io"
username = "bot"
password_file = "{password_file}"
"#,
            secrets[2], secrets[0]
        ),
    );
    let out = run(&["check-config", "--config", &config], &[], dir.path());
    let printed = out.assert_success().config();
    for secret in secrets {
        assert!(!out.stdout.contains(secret), "{secret} printed: {out:#?}");
        assert!(!out.stderr.contains(secret), "{secret} printed: {out:#?}");
    }
    assert_eq!(str_at(&printed, "upstream.0.password"), "<redacted>");
    assert_eq!(str_at(&printed, "upstream.1.password"), "<redacted>");
    assert_eq!(str_at(&printed, "storage.s3.secret_access_key"), "<redacted>");
    // What is not secret is shown as given.
    assert_eq!(str_at(&printed, "upstream.0.username"), "robot");
    assert_eq!(str_at(&printed, "server.listen"), "0.0.0.0:5000");
    assert_eq!(
        str_at(&printed, "upstream.0.url"),
        "http://registry.internal:5000"
    );

    // The same through REGCACHE_CONFIG.
    let out = run(&["check-config"], &[("REGCACHE_CONFIG", &config)], dir.path());
    out.assert_success();
    assert!(secrets.iter().all(|s| !out.stdout.contains(s)), "{out:#?}");
    assert!(out.stdout.contains("<redacted>"), "{out:#?}");
}

#[test]
fn environment_overrides_are_applied_and_validated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(dir.path(), "regcache.toml", "[proxy]\nttl = \"1d\"\n");
    let out = run(
        &["check-config", "--config", &config],
        &[
            ("REGCACHE_PROXY__TTL", "45m"),
            ("REGCACHE_STORAGE__DELETE__ENABLED", "false"),
            ("REGCACHE_SERVER__LISTEN", "0.0.0.0:6000"),
        ],
        dir.path(),
    );
    let printed = out.assert_success().config();
    assert_eq!(
        str_at(&printed, "proxy.ttl"),
        "45m",
        "the environment wins over the file"
    );
    assert_eq!(get(&printed, "storage.delete.enabled").as_bool(), Some(false));
    assert_eq!(str_at(&printed, "server.listen"), "0.0.0.0:6000");

    let out = run(&["check-config"], &[("REGCACHE_PROXY__TTL", "soon")], dir.path());
    out.assert_failure_naming(&["proxy.ttl", "soon"]);
    assert!(out.stdout.is_empty(), "nothing printed on error: {out:#?}");
}

#[test]
fn unknown_keys_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "regcache.toml",
        "[proxy]\nttl = \"7d\"\nttl_typo = \"1d\"\n",
    );
    run(&["check-config", "--config", &config], &[], dir.path()).assert_failure_naming(&["ttl_typo"]);
    let config = write(dir.path(), "top.toml", "colour = \"blue\"\n");
    run(&["check-config", "--config", &config], &[], dir.path()).assert_failure_naming(&["colour"]);
    run(
        &["check-config"],
        &[("REGCACHE_PROXY__BOGUS_KEY", "1")],
        dir.path(),
    )
    .assert_failure_naming(&["bogus_key"]);
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope").join("regcache.toml");
    let missing = missing.to_str().expect("UTF-8 path");
    run(&["check-config", "--config", missing], &[], dir.path())
        .assert_failure_naming(&[missing, "no such file"]);
    run(&["check-config"], &[("REGCACHE_CONFIG", missing)], dir.path()).assert_failure_naming(&[missing]);
    run(&["serve", "--config", missing], &[], dir.path()).assert_failure_naming(&[missing]);
    assert!(!dir.path().join("regcache-data").exists());
}

#[test]
fn serve_with_a_bad_config_exits_without_creating_the_data_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let data = data_dir.to_str().expect("UTF-8 path");
    let bad_listen = write(
        dir.path(),
        "bad-listen.toml",
        &format!("[server]\nlisten = \"not-an-address\"\ndata_dir = \"{data}\"\n"),
    );
    let unknown_key = write(
        dir.path(),
        "unknown-key.toml",
        &format!("[server]\ndata_dir = \"{data}\"\nlisen = \"127.0.0.1:0\"\n"),
    );
    let good = write(
        dir.path(),
        "good.toml",
        &format!("[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\n"),
    );
    // (config file, environment, what the error must name)
    let cases = [
        (&bad_listen, None, "server.listen"),
        (&unknown_key, None, "lisen"),
        (&good, Some(("REGCACHE_PROXY__TTL", "soon")), "proxy.ttl"),
        (
            &good,
            Some(("REGCACHE_UPSTREAM", "[{name = \"x\", url = \"ftp://x\"}]")),
            "upstream[0].url",
        ),
    ];
    for (config, env, needle) in cases {
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        run(&["serve", "--config", config], &env, dir.path()).assert_failure_naming(&[needle]);
        assert!(!data_dir.exists(), "{config} {env:?} created the data dir");
        assert!(!dir.path().join("regcache-data").exists());
    }
}

/// Reads the JSON log lines of a running server from its stderr into a channel.
fn log_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test]
async fn serve_pulls_through_and_stops_cleanly_on_sigterm() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("cli-serve", &[1500], "2024-07-01T00:00:00Z");
    upstream.add_image("acme/app", Some("v1"), &image);
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let config = write(
        dir.path(),
        "regcache.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\
             [[upstream]]\nname = \"fixture\"\nurl = \"{}\"\n",
            data_dir.display(),
            upstream.url()
        ),
    );
    let child = Command::new(BIN)
        .args(["serve", "--config", &config])
        .env_clear()
        // What Kubernetes injects for a Service named `regcache`: ignored, not refused.
        .envs([
            ("REGCACHE_PORT", "tcp://10.0.0.1:5000"),
            ("REGCACHE_SERVICE_HOST", "10.0.0.1"),
            ("REGCACHE_PORT_5000_TCP_ADDR", "10.0.0.1"),
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn regcache serve");
    let mut guard = ChildGuard(Some(child));
    let child = guard.0.as_mut().expect("child");
    let lines = log_lines(child);

    // The listening address is in the start-up log line.
    let addr = tokio::task::spawn_blocking(move || {
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no start-up log line within {DEADLINE:?}"));
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(addr) = event["fields"]["listen.addr"].as_str() {
                return (addr.to_owned(), lines);
            }
        }
    })
    .await
    .expect("log reader");
    let (addr, _lines) = addr;

    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let resp = client.get(format!("{base}/v2/")).send().await.expect("GET /v2/");
    assert_eq!(resp.status(), 200);
    let manifest = client
        .get(format!("{base}/v2/acme/app/manifests/v1"))
        .header(reqwest::header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(ok_bytes(manifest).await, image.manifest.bytes);
    let layer = client
        .get(format!("{base}/v2/acme/app/blobs/{}", image.layers[0].digest))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(ok_bytes(layer).await, image.layers[0].bytes);
    assert!(data_dir.join("regcache.db").is_file());

    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let mut child = guard.0.take().expect("child");
    let status = tokio::task::spawn_blocking(move || {
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if std::time::Instant::now() > end {
                let _ = child.kill();
                panic!("regcache did not stop within {DEADLINE:?} of SIGTERM");
            }
            std::thread::sleep(common::POLL_INTERVAL);
        }
    })
    .await
    .expect("waiter");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}
