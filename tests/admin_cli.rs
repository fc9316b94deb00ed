//! The admin side of the `regcache` binary (issue 4): the admin token never reaches the
//! logs, even at debug level, nor `check-config`'s output; and `purge`, `jobs`, `repos` and
//! `delete-repo` work against the data dir of a running server, which picks up the jobs
//! they queue in the shared SQLite. Every child runs with an empty environment (so no
//! `RUST_LOG` or `REGCACHE_*` leaks in) and every wait has a deadline.

mod common;

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::app::{pull_image, TestApp};
use common::binary::{self, write, ChildGuard, Output, BIN};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use regcache::config::Secret;
use reqwest::header::AUTHORIZATION;
use reqwest::Method;
use serde_json::{json, Value};

/// Generous: a debug binary on a busy 2-core machine; a purge waits for its deletes.
const DEADLINE: Duration = Duration::from_secs(60);
const TOKEN: &str = "cli-admin-token-4f9a2c7e1b8d";

// ----- helpers ------------------------------------------------------------------------

/// Runs the binary with `args` and an empty environment; panics after `DEADLINE`.
fn run(args: &[&str], cwd: &Path) -> Output {
    binary::run(args, &[], cwd, DEADLINE)
}

/// `run` off the async runtime, which keeps serving the in-process server meanwhile.
fn run_async(args: &[&str], cwd: &Path) -> impl std::future::Future<Output = Output> + 'static {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let cwd = cwd.to_owned();
    async move {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args, &cwd)
        })
        .await
        .expect("CLI runner")
    }
}

/// `GET {base}/api/v1/jobs/{id}` until the job is finished; returns it.
async fn wait_job(client: &reqwest::Client, base: &str, id: i64) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let resp = client
            .get(format!("{base}/api/v1/jobs/{id}"))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .send()
            .await
            .expect("job request");
        assert_eq!(resp.status(), 200, "job {id}");
        let j: Value = resp.json().await.expect("job JSON");
        if ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or_default()) {
            return j;
        }
        assert!(Instant::now() < end, "job {id} not finished: {j:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ----- 1. the token never reaches the logs ----------------------------------------------

/// `check-config` prints the admin token as `<redacted>`, whether given inline or in a file.
#[test]
fn check_config_redacts_the_admin_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let inline = write(
        dir.path(),
        "inline.toml",
        &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
    );
    let token_file = write(dir.path(), "token.txt", &format!("{TOKEN}\n"));
    let from_file = write(
        dir.path(),
        "file.toml",
        &format!("[admin]\ntoken_file = \"{token_file}\"\n"),
    );
    for config in [&inline, &from_file] {
        let out = run(&["check-config", "--config", config], dir.path()).ok();
        assert!(!out.stdout.contains(TOKEN), "token printed: {out:#?}");
        assert!(!out.stderr.contains(TOKEN), "token printed: {out:#?}");
        let printed: toml::Table = out.stdout.parse().expect("TOML");
        assert_eq!(
            printed["admin"]["token"].as_str(),
            Some("<redacted>"),
            "{config}: {printed}"
        );
    }
    // A token too short to be safe is refused, naming the key, without echoing it.
    let short = write(dir.path(), "short.toml", "[admin]\ntoken = \"tiny-secret\"\n");
    let out = run(&["check-config", "--config", &short], dir.path());
    out.assert_failure_naming(&["admin.token", "16"]);
    assert!(!out.stderr.contains("tiny-secret"), "{out:#?}");
}

/// The real binary at `log.level = "debug"` (and no `RUST_LOG`), with an admin token:
/// authenticated and refused admin requests, a purge job, and a registry request carrying
/// the token; after it stops, neither the token nor the wrong ones tried appear anywhere
/// in what it wrote.
#[tokio::test]
async fn the_admin_token_never_appears_in_debug_logs() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("token-logs", &[3000], "2024-01-01T00:00:00Z");
    upstream.add_image("acme/app", Some("v1"), &image);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "regcache.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [log]\nformat = \"json\"\nlevel = \"debug\"\n\
             [admin]\ntoken = \"{TOKEN}\"\n\
             [[upstream]]\nname = \"fixture\"\nurl = \"{}\"\n",
            dir.path().join("data").display(),
            upstream.url()
        ),
    );
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &config])
        .env_clear()
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn regcache serve");
    // stderr line by line (the address is in the start-up line), stdout whole.
    let stderr = child.stderr.take().expect("stderr");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut guard = ChildGuard(Some(child));
    let (line_tx, line_rx) = mpsc::channel::<String>();
    let stderr_reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut all = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = line_tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let stdout_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let addr = tokio::task::spawn_blocking(move || {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = line_rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no start-up log line within {DEADLINE:?}"));
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(addr) = event["fields"]["listen.addr"].as_str() {
                return addr.to_owned();
            }
        }
    })
    .await
    .expect("log reader");
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let good = format!("Bearer {TOKEN}");
    let same_length: String = TOKEN.chars().rev().collect();
    let wrong = [
        format!("Bearer {same_length}"),
        format!("Bearer {TOKEN}-but-longer"),
        format!("Bearer {}", &TOKEN[..10]),
    ];
    let send = |method: Method, path: &str, auth: Option<&str>| {
        let mut req = client.request(method, format!("{base}{path}"));
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        req.send()
    };

    pull_image(&client, &base, "acme/app", "v1", &image).await;
    // A client that sends the admin token to the registry API too.
    let resp = send(Method::GET, "/v2/acme/app/manifests/v1", Some(&good))
        .await
        .expect("registry request");
    assert_eq!(resp.status(), 200);
    for (method, path, status) in [
        (Method::GET, "/api/v1/jobs", 200),
        (Method::GET, "/api/v1/repositories", 200),
        (Method::GET, "/api/v1/repositories/fixture/acme/app", 200),
        (Method::GET, "/api/v1/jobs?state=bogus", 400),
        (Method::DELETE, "/api/v1/jobs/999", 404),
    ] {
        let resp = send(method.clone(), path, Some(&good))
            .await
            .expect("admin request");
        assert_eq!(resp.status(), status, "{method} {path}");
        for auth in wrong.iter().map(|w| Some(w.as_str())).chain([None]) {
            let resp = send(method.clone(), path, auth).await.expect("admin request");
            assert_eq!(resp.status(), 401, "{method} {path} {auth:?}");
        }
    }
    let resp = send(Method::DELETE, "/api/v1/cache/fixture/acme/app", Some(&good))
        .await
        .expect("purge request");
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.expect("JSON")["job"]
        .as_i64()
        .expect("job id");
    let j = wait_job(&client, &base, id).await;
    assert_eq!(j["state"], "succeeded", "{j:#}");

    let pid = guard.0.as_ref().expect("child").id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let mut child = guard.0.take().expect("child");
    let status = tokio::task::spawn_blocking(move || {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > end {
                let _ = child.kill();
                panic!("regcache did not stop within {DEADLINE:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("waiter");
    assert!(status.success(), "{status:?}");
    let lines = stderr_reader.join().expect("stderr reader");
    let stdout = stdout_reader.join().expect("stdout reader");
    let all = format!("{}\n{stdout}", lines.join("\n"));

    // The logs were there to leak into: debug events, the requests and the job.
    let events: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.iter().any(|e| e["level"] == "DEBUG"),
        "debug logging was on: {all}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "job succeeded" && e["fields"]["job.id"] == id),
        "the job was logged: {all}"
    );
    for secret in
        std::iter::once(TOKEN.to_owned()).chain([same_length.clone(), format!("{TOKEN}-but-longer")])
    {
        assert!(
            !all.contains(&secret),
            "{secret:?} appears in the output:\n{}",
            all.lines()
                .filter(|l| l.contains(&secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ----- 4. purge, jobs, repos and delete-repo from the command line ------------------------

/// Against the data dir of a running server: `repos` shows counts and tags (with the
/// image's `created` as Unix seconds); `purge --json` prints `{"job": N}`, the server picks
/// the job up and it succeeds with true counts; `jobs N --json` and `jobs` show it;
/// `delete-repo` likewise. Bad arguments fail with a message naming the problem.
#[tokio::test]
async fn purge_jobs_repos_and_delete_repo_from_the_cli_reach_the_running_server() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let v1 = Image::new("cli-shared", &[6000, 2000], "2024-01-01T00:00:00Z");
    let other = Image::new("cli-shared", &[6000], "2024-06-01T00:00:00Z");
    assert_eq!(v1.layers[0].digest, other.layers[0].digest);
    upstream.add_image("acme/app", Some("v1"), &v1);
    upstream.add_image("acme/other", Some("latest"), &other);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.admin.token = Some(Secret::new(TOKEN));
    })
    .await;
    pull_image(&app.client, &app.base, "acme/app", "v1", &v1).await;
    pull_image(&app.client, &app.base, "acme/other", "latest", &other).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "regcache.toml",
        &format!(
            "[server]\ndata_dir = \"{}\"\n[[upstream]]\nname = \"fixture\"\nurl = \"{}\"\n",
            app.data_dir().display(),
            upstream.url()
        ),
    );
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", config.as_str()]);
        run_async(&all, dir.path())
    };

    // repos
    let list = cli(&["repos", "--json"]).await.ok().json();
    let list = list.as_array().expect("a list");
    let names: Vec<&str> = list.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme/app", "acme/other"], "{list:#?}");
    assert_eq!(list[0]["tag_count"], 1);
    assert_eq!(list[0]["manifest_count"], 1);
    assert_eq!(list[0]["blob_count"], 3);
    assert_eq!(list[0]["bytes"], v1.blobs().map(|b| b.len()).sum::<usize>());
    assert_eq!(list[0]["state"], "active");
    let table = cli(&["repos"]).await.ok().stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains("fixture/acme/app") && l.contains("active")),
        "{table}"
    );
    let detail = cli(&["repos", "fixture/acme/other", "--json"]).await.ok().json();
    assert_eq!(detail["tag_count"], 1, "{detail:#}");
    let tag = &detail["tags"][0];
    assert_eq!(tag["name"], "latest", "{detail:#}");
    assert_eq!(tag["digest"], other.manifest.digest.as_str());
    assert_eq!(tag["size"], other.total_size());
    assert_eq!(tag["created"], 1_717_200_000, "2024-06-01T00:00:00Z");
    assert!(tag["last_pulled"].as_i64().is_some_and(|t| t > 0), "{tag:#}");
    let table = cli(&["repos", "fixture/acme/other"]).await.ok().stdout;
    let row = table
        .lines()
        .find(|l| l.contains(&other.manifest.digest))
        .unwrap_or_else(|| panic!("no row for the tag: {table}"));
    // Times as ISO 8601 UTC in tables, Unix seconds in JSON.
    assert!(
        row.contains("latest") && row.contains("2024-06-01T00:00:00Z"),
        "{table}"
    );
    assert!(!table.contains("1717200000"), "{table}");
    // Without an upstream name, the default upstream's repository, as for a pull.
    let short = cli(&["repos", "acme/other", "--json"]).await.ok().json();
    assert_eq!(short, detail, "acme/other is fixture/acme/other");

    // purge
    let out = cli(&["purge", "fixture/acme/app", "--json"]).await.ok();
    let queued = out.json();
    let id = queued["job"].as_i64().unwrap_or_else(|| panic!("{out:#?}"));
    assert_eq!(queued, json!({ "job": id }), "only the job id: {out:#?}");
    let j = wait_job(&app.client, &app.base, id).await;
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(j["kind"], "purge");
    assert_eq!(
        j["result"]["unlinked"],
        json!({
            "repositories": 1,
            "tags": 1,
            "manifests": 1,
            "blob_links": 3,
            "blobs_handed_to_deletion": 2,
        }),
        "{j:#}"
    );
    assert_eq!(j["result"]["blobs"]["deleted"], 2, "{j:#}");
    let shown = cli(&["jobs", &id.to_string(), "--json"]).await.ok().json();
    assert_eq!(shown, j, "the CLI shows the job as the API does");
    let human = cli(&["jobs", &id.to_string()]).await.ok().stdout;
    assert!(human.contains("succeeded") && human.contains("purge"), "{human}");
    let table = cli(&["jobs"]).await.ok().stdout;
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("job {id} not listed: {table}"));
    assert!(row.contains("purge") && row.contains("succeeded"), "{row}");
    let listed = cli(&["jobs", "--json"]).await.ok().json();
    assert_eq!(listed[0]["id"], id, "{listed:#}");
    let list = cli(&["repos", "--json"]).await.ok().json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme/other"]);
    assert_eq!(app.count("SELECT count(*) FROM tags"), 1);
    assert_eq!(app.stored_blob_files().len(), 2, "acme/other's blobs stay");

    // delete-repo
    let out = cli(&["delete-repo", "fixture/acme/other", "--json"]).await.ok();
    let del = out.json()["job"].as_i64().unwrap_or_else(|| panic!("{out:#?}"));
    let j = wait_job(&app.client, &app.base, del).await;
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(j["kind"], "delete_repository");
    assert_eq!(j["result"]["removed"]["tags"], 1, "{j:#}");
    let list = cli(&["repos", "--json"]).await.ok().json();
    assert_eq!(list, json!([]));

    // Bad arguments name the problem.
    cli(&["repos", "fixture/acme/app"])
        .await
        .assert_failure_naming(&["fixture/acme/app", "not cached"]);
    cli(&["purge", "Not A Name"])
        .await
        .assert_failure_naming(&["Not A Name", "UPSTREAM/REPO"]);
    // status: every value starts in one column, the longest label's included.
    let status = cli(&["status"]).await.ok().stdout;
    let columns: std::collections::BTreeSet<usize> = status
        .lines()
        .map(|l| {
            let gap = l.find("  ").unwrap_or_else(|| panic!("no value column: {l:?}"));
            gap + l[gap..].find(|c: char| c != ' ').unwrap_or(0)
        })
        .collect();
    assert_eq!(columns.len(), 1, "values do not align:\n{status}");
    assert!(status.contains("oldest failing delete  none"), "{status}");
    // An empty list says so instead of printing a bare header.
    let table = cli(&["repos"]).await.ok().stdout;
    assert_eq!(table, "no repositories are cached\n");
    // A repository without an upstream name is the default upstream's.
    let out = cli(&["purge", "acme"]).await.ok();
    assert!(out.stdout.contains("purge fixture/acme "), "{out:#?}");
    cli(&["delete-repo", "fixture/acme/app"])
        .await
        .assert_failure_naming(&["not cached"]);
    cli(&["jobs", "999999"]).await.assert_failure_naming(&["999999"]);
    // A data dir where no server ran is refused, not created.
    let empty = write(
        dir.path(),
        "empty.toml",
        &format!(
            "[server]\ndata_dir = \"{}\"\n",
            dir.path().join("nothing").display()
        ),
    );
    run_async(&["jobs", "--config", &empty], dir.path())
        .await
        .assert_failure_naming(&["no regcache database", "--config", "regcache serve"]);
    assert!(!dir.path().join("nothing").exists());
}
