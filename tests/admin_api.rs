//! The admin API (issue 4; design problems 2 and 3, invariants I4 and I5) end to end over
//! HTTP against an in-process server: bearer-token auth, purge of one repository or of
//! everything (true counts, nothing left of it, refetched afterwards), purge with deletes
//! off (every blob deferred, collected once deletes are on), the jobs API (filters, bad
//! input, cancel), the repositories API and resumable repository deletion, and a job that
//! keeps failing ending `failed` after `max_attempts`. Every wait polls with a deadline.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::app::{error_code, TestApp};
use common::data_dir::blob_path;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::wait_until_async;
use regcache::config::{Config, Duration as CfgDuration, Secret};
use reqwest::header::{AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Deadline of every wait for a job (a purge waits up to 30 s for its deletes; a busy
/// 2-core machine runs debug builds).
const DEADLINE: Duration = Duration::from_secs(60);
const TOKEN: &str = "admin-token-for-tests-0123456789";
const TERMINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

// ----- helpers ------------------------------------------------------------------------

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn with_token(c: &mut Config) {
    c.admin.token = Some(Secret::new(TOKEN));
}

/// An admin API answer: status, headers and the body as JSON (`Null` if it is not JSON).
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    fn expect(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{self:#?}");
        &self.body
    }

    /// An error answer: `{"error": "<message>"}` with a non-empty message.
    fn error(&self, status: u16) -> &str {
        self.expect(status);
        let msg = self.body["error"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "error without a message: {self:#?}");
        msg
    }
}

async fn send(app: &TestApp, method: Method, path: &str, auth: Option<&str>) -> Answer {
    let mut req = app.client.request(method, app.url(path));
    if let Some(a) = auth {
        req = req.header(AUTHORIZATION, a);
    }
    let resp = req.send().await.expect("request to regcache");
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

/// An authenticated admin request.
async fn admin(app: &TestApp, method: Method, path: &str) -> Answer {
    send(app, method, path, Some(&format!("Bearer {TOKEN}"))).await
}

/// Expects `202 Accepted` with `{"job": id, "location": ...}` and the same `Location`
/// header; returns the job id.
fn accepted(a: &Answer) -> i64 {
    let body = a.expect(202);
    let id = body["job"]
        .as_i64()
        .unwrap_or_else(|| panic!("no job id: {a:#?}"));
    let location = format!("/api/v1/jobs/{id}");
    assert_eq!(body["location"], json!(location), "{a:#?}");
    assert_eq!(
        a.headers.get(LOCATION).and_then(|v| v.to_str().ok()),
        Some(location.as_str()),
        "{a:#?}"
    );
    id
}

async fn job(app: &TestApp, id: i64) -> Value {
    admin(app, Method::GET, &format!("/api/v1/jobs/{id}"))
        .await
        .expect(200)
        .clone()
}

/// Polls job `id` until it is in a terminal state; returns it.
async fn wait_job(app: &TestApp, id: i64) -> Value {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let last = job(app, id).await;
        if TERMINAL.contains(&last["state"].as_str().unwrap_or_default()) {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "job {id} not finished after {DEADLINE:?}: {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for job `id` and asserts it `succeeded` at its first run with no error.
async fn wait_succeeded(app: &TestApp, id: i64) -> Value {
    let j = wait_job(app, id).await;
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(j["error"], Value::Null, "{j:#}");
    assert_eq!(j["attempts"], 0, "no run ended in an error: {j:#}");
    assert!(j["finished_at"].as_i64().is_some(), "{j:#}");
    j
}

async fn pull(app: &TestApp, repo: &str, tag: &str, image: &Image) {
    app.pull(repo, tag, image).await;
}

fn digests<'a>(images: impl IntoIterator<Item = &'a Image>) -> BTreeSet<String> {
    images
        .into_iter()
        .flat_map(|i| i.blobs().map(|b| b.digest.clone()))
        .collect()
}

fn repo_id(app: &TestApp, name: &str) -> Option<i64> {
    use rusqlite::OptionalExtension as _;
    app.db()
        .query_row(
            "SELECT id FROM repositories WHERE upstream = 'fixture' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()
        .unwrap()
}

/// Rows that belong to repository `id`, per table; all zero once it is gone.
fn rows_of_repo(app: &TestApp, id: i64) -> Vec<(&'static str, i64)> {
    ["tags", "repo_manifests", "repo_blobs", "tag_lists", "referrers"]
        .into_iter()
        .map(|t| {
            (
                t,
                app.count(&format!("SELECT count(*) FROM {t} WHERE repo_id = {id}")),
            )
        })
        .collect()
}

fn has_row(app: &TestApp, table: &str, digest: &str) -> bool {
    app.db()
        .query_row(
            &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE digest = ?1)"),
            [digest],
            |r| r.get(0),
        )
        .unwrap()
}

/// GET requests the upstream received for `repo`.
fn upstream_gets(upstream: &FixtureUpstream, repo: &str) -> usize {
    upstream.requests(Method::GET, &format!("/v2/{repo}/"))
}

/// Asserts `f` stays true for `period`: for "nothing more happens" claims.
async fn holds_for<F, Fut>(what: &str, period: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < end {
        if let Err(e) = f().await {
            panic!("expected {what} for {period:?}, but: {e}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----- 1. authentication ----------------------------------------------------------------

/// Without a token configured every admin endpoint answers 403 saying how to enable it,
/// and nothing is queued.
#[tokio::test]
async fn without_a_token_the_admin_api_is_disabled_and_says_how_to_enable_it() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start(&upstream.url()).await;
    assert!(app.config.admin.token.is_none());
    for (method, path) in [
        (Method::GET, "/api/v1/jobs"),
        (Method::GET, "/api/v1/jobs/1"),
        (Method::DELETE, "/api/v1/cache"),
        (Method::DELETE, "/api/v1/cache/fixture/acme/app"),
        (Method::GET, "/api/v1/repositories"),
        (Method::DELETE, "/api/v1/repositories/fixture/acme/app"),
        (Method::GET, "/api/v1/no-such-endpoint"),
    ] {
        // Even a request carrying a token is refused: there is nothing to compare it with.
        for auth in [None, Some(format!("Bearer {TOKEN}"))] {
            let a = send(&app, method.clone(), path, auth.as_deref()).await;
            let msg = a.error(403);
            assert!(msg.contains("admin.token"), "{method} {path}: {a:#?}");
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM jobs"), 0, "nothing was queued");
}

/// With a token: no header or a wrong one (same length, other length, other scheme) is
/// 401 with `WWW-Authenticate`, and changes nothing; the right one is let in.
#[tokio::test]
async fn a_wrong_or_missing_token_is_401_and_the_right_one_is_let_in() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], with_token).await;
    let same_length: String = TOKEN
        .chars()
        .rev()
        .map(|c| if c == 'a' { 'b' } else { c })
        .collect();
    assert_eq!(same_length.len(), TOKEN.len());
    assert_ne!(same_length, TOKEN);
    let one_more = format!("{TOKEN}x");
    let prefix = &TOKEN[..TOKEN.len() - 1];
    let wrong: Vec<Option<String>> = vec![
        None,
        Some(format!("Bearer {same_length}")),
        Some(format!("Bearer {one_more}")),
        Some(format!("Bearer {prefix}")),
        Some("Bearer ".into()),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.into()),
    ];
    for (method, path) in [
        (Method::GET, "/api/v1/jobs"),
        (Method::DELETE, "/api/v1/cache"),
        (Method::GET, "/api/v1/repositories"),
        (Method::GET, "/api/v1/no-such-endpoint"),
    ] {
        for auth in &wrong {
            let a = send(&app, method.clone(), path, auth.as_deref()).await;
            a.error(401);
            let challenge = a
                .headers
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("401 without WWW-Authenticate: {auth:?} {a:#?}"));
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            assert!(!a.text.contains(TOKEN), "the answer shows the token: {a:#?}");
        }
    }
    assert_eq!(
        app.count("SELECT count(*) FROM jobs"),
        0,
        "a refused purge queued nothing"
    );

    let a = admin(&app, Method::GET, "/api/v1/jobs").await;
    assert_eq!(a.expect(200), &json!([]));
    let a = admin(&app, Method::GET, "/api/v1/repositories").await;
    assert_eq!(a.expect(200), &json!([]));
    // The scheme is case-insensitive (RFC 7235).
    let a = send(
        &app,
        Method::GET,
        "/api/v1/jobs",
        Some(&format!("bearer {TOKEN}")),
    )
    .await;
    a.expect(200);
    // Let in, an unknown endpoint is a JSON 404.
    admin(&app, Method::GET, "/api/v1/no-such-endpoint")
        .await
        .error(404);
}

// ----- 2. purge via the API -------------------------------------------------------------

/// Purge of one repository: 202 with the job's location; the job succeeds with true
/// counts; nothing of the repository is left in SQLite or the store while the repository
/// sharing a layer with it is untouched and served from the cache; pulling again refetches
/// from upstream. Then purge everything, and purge of a repository never cached.
#[tokio::test]
async fn purge_of_a_repository_removes_it_all_and_leaves_the_other_untouched() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    // acme/app:v1 shares its first layer with acme/other:latest; acme/app:v2 shares nothing.
    let v1 = Image::new("purge-shared", &[20_000, 7000], "2024-01-01T00:00:00Z");
    let v2 = Image::new("purge-app-v2", &[3000], "2024-03-01T00:00:00Z");
    let other = Image::new("purge-shared", &[20_000], "2024-06-01T00:00:00Z");
    let shared = v1.layers[0].digest.clone();
    assert_eq!(shared, other.layers[0].digest);
    upstream.add_image("acme/app", Some("v1"), &v1);
    upstream.add_image("acme/app", Some("v2"), &v2);
    upstream.add_image("acme/other", Some("latest"), &other);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], with_token).await;
    let dir = app.data_dir();

    pull(&app, "acme/app", "v1", &v1).await;
    pull(&app, "acme/app", "v2", &v2).await;
    pull(&app, "acme/other", "latest", &other).await;
    let app_blobs = digests([&v1, &v2]);
    let other_blobs = digests([&other]);
    let unshared: BTreeSet<String> = app_blobs.difference(&other_blobs).cloned().collect();
    assert_eq!(app_blobs.len(), 5);
    assert_eq!(unshared.len(), 4);
    assert_eq!(app.stored_blob_files().len(), 6);
    let app_id = repo_id(&app, "acme/app").expect("acme/app cached");
    let other_id = repo_id(&app, "acme/other").expect("acme/other cached");
    let other_rows = rows_of_repo(&app, other_id);

    let a = admin(&app, Method::DELETE, "/api/v1/cache/fixture/acme/app").await;
    let id = accepted(&a);
    let j = wait_succeeded(&app, id).await;
    assert_eq!(j["kind"], "purge");
    assert_eq!(
        j["args"],
        json!({"upstream": "fixture", "repository": "acme/app"})
    );
    let r = &j["result"];
    assert_eq!(
        r["unlinked"],
        json!({
            "repositories": 1,
            "tags": 2,
            "manifests": 2,
            "blob_links": 5,
            "blobs_handed_to_deletion": 4,
        }),
        "{j:#}"
    );
    assert_eq!(r["blobs"]["handed"], 4, "{j:#}");
    assert_eq!(r["blobs"]["deleted"], 4, "{j:#}");
    assert_eq!(r["blobs"]["deferred"], 0, "{j:#}");
    assert_eq!(r["blobs"]["pending"], 0, "{j:#}");
    assert_eq!(r["blobs"]["rescued"], 0, "{j:#}");
    assert_eq!(r["blobs"]["deferred_reason"], Value::Null, "{j:#}");
    for t in ["created_at", "started_at", "updated_at", "finished_at"] {
        assert!(j[t].as_i64().is_some_and(|v| v > 0), "{t}: {j:#}");
    }

    // Nothing of acme/app is left: no repository row, tags, links or manifests, and its
    // unshared blobs are gone from SQLite and the store.
    assert_eq!(repo_id(&app, "acme/app"), None);
    assert!(
        rows_of_repo(&app, app_id).iter().all(|(_, n)| *n == 0),
        "{:?}",
        rows_of_repo(&app, app_id)
    );
    for m in [&v1.manifest.digest, &v2.manifest.digest] {
        assert!(!has_row(&app, "manifests", m), "manifest {m} still stored");
    }
    for d in &unshared {
        assert!(!has_row(&app, "blobs", d), "blob row {d} left");
        assert!(!has_row(&app, "pending_deletes", d), "delete of {d} left");
        assert!(!blob_path(&dir, d).exists(), "blob file {d} left");
    }
    assert_eq!(app.count("SELECT count(*) FROM pending_deletes"), 0);
    // acme/other is untouched, shared layer included, and served without upstream GETs.
    assert_eq!(rows_of_repo(&app, other_id), other_rows);
    for d in &other_blobs {
        assert!(has_row(&app, "blobs", d), "blob row {d} of acme/other");
        assert!(blob_path(&dir, d).exists(), "blob file {d} of acme/other");
    }
    assert_eq!(app.stored_blob_files().len(), 2);
    upstream.reset_log();
    pull(&app, "acme/other", "latest", &other).await;
    assert_eq!(
        upstream_gets(&upstream, "acme/other"),
        0,
        "acme/other served from the cache: {:#?}",
        upstream.log()
    );

    // Pulling the purged repository again refetches it from upstream.
    upstream.reset_log();
    pull(&app, "acme/app", "v1", &v1).await;
    pull(&app, "acme/app", "v2", &v2).await;
    assert_eq!(upstream.manifest_gets("acme/app", "v1"), 1);
    assert_eq!(upstream.manifest_gets("acme/app", "v2"), 1);
    for d in &unshared {
        assert_eq!(upstream.blob_gets(d), 1, "{d} refetched");
        assert!(blob_path(&dir, d).exists(), "{d} stored again");
    }
    assert_eq!(app.stored_blob_files().len(), 6);

    // Purge everything.
    let a = admin(&app, Method::DELETE, "/api/v1/cache").await;
    let id = accepted(&a);
    let j = wait_succeeded(&app, id).await;
    assert_eq!(j["args"], json!({}));
    assert_eq!(
        j["result"]["unlinked"],
        json!({
            "repositories": 2,
            "tags": 3,
            "manifests": 3,
            "blob_links": 7,
            "blobs_handed_to_deletion": 6,
        }),
        "{j:#}"
    );
    assert_eq!(j["result"]["blobs"]["handed"], 6, "{j:#}");
    assert_eq!(j["result"]["blobs"]["deleted"], 6, "{j:#}");
    assert_eq!(j["result"]["blobs"]["deferred"], 0, "{j:#}");
    assert!(
        app.stored_blob_files().is_empty(),
        "{:?}",
        app.stored_blob_files()
    );
    for table in [
        "repositories",
        "tags",
        "repo_manifests",
        "repo_blobs",
        "manifests",
        "manifest_refs",
        "blobs",
        "pending_deletes",
    ] {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM {table}")),
            0,
            "{table} after purging everything"
        );
    }
    admin(&app, Method::GET, "/api/v1/repositories")
        .await
        .expect(200)
        .as_array()
        .filter(|a| a.is_empty())
        .expect("no repositories listed");

    // A purge with nothing to do succeeds, with zero counts (design problem 3).
    let a = admin(&app, Method::DELETE, "/api/v1/cache/fixture/never/cached").await;
    let id = accepted(&a);
    let j = wait_succeeded(&app, id).await;
    assert_eq!(
        j["result"]["unlinked"],
        json!({
            "repositories": 0,
            "tags": 0,
            "manifests": 0,
            "blob_links": 0,
            "blobs_handed_to_deletion": 0,
        }),
        "{j:#}"
    );
    assert_eq!(j["result"]["blobs"]["handed"], 0, "{j:#}");
    assert_eq!(j["runs"], 1, "ran once: {j:#}");
    // Bad purge targets are refused and queue nothing.
    let before = app.count("SELECT count(*) FROM jobs");
    let msg = admin(&app, Method::DELETE, "/api/v1/cache/nope/acme/app")
        .await
        .error(404)
        .to_owned();
    assert!(msg.contains("nope"), "{msg}");
    admin(&app, Method::DELETE, "/api/v1/cache/fixture/Bad..Name")
        .await
        .error(400);
    admin(&app, Method::DELETE, "/api/v1/cache/fixture")
        .await
        .error(400);
    assert_eq!(app.count("SELECT count(*) FROM jobs"), before);
}

// ----- 3. purge with deletes disabled ------------------------------------------------------

/// With `storage.delete.enabled = false` the purge still succeeds, counting every blob it
/// handed over as deferred and why; the files stay. Restarted with deletes on, the
/// deferred deletes are collected and the job still shows what it did.
#[tokio::test]
async fn purge_with_deletes_disabled_defers_then_collects_once_enabled() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("purge-deferred", &[9000, 4000], "2024-01-01T00:00:00Z");
    upstream.add_image("acme/app", Some("v1"), &image);
    let mut app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        with_token(c);
        c.storage.delete.enabled = false;
    })
    .await;
    let dir = app.data_dir();
    pull(&app, "acme/app", "v1", &image).await;
    let blobs = digests([&image]);
    assert_eq!(blobs.len(), 3);

    let id = accepted(&admin(&app, Method::DELETE, "/api/v1/cache/fixture/acme/app").await);
    let j = wait_succeeded(&app, id).await;
    let result = j["result"].clone();
    assert_eq!(result["unlinked"]["tags"], 1, "{j:#}");
    assert_eq!(result["unlinked"]["manifests"], 1, "{j:#}");
    assert_eq!(result["unlinked"]["blob_links"], 3, "{j:#}");
    assert_eq!(result["unlinked"]["blobs_handed_to_deletion"], 3, "{j:#}");
    assert_eq!(
        result["blobs"],
        json!({
            "handed": 3,
            "deleted": 0,
            "deferred": 3,
            "deferred_reason": "storage.delete.enabled=false",
            "pending": 0,
            "last_error": null,
            "rescued": 0,
        }),
        "{j:#}"
    );
    // Unlinked (no longer served) but the files stay, each with a durable deferred delete.
    assert_eq!(repo_id(&app, "acme/app"), None);
    for d in &blobs {
        assert!(blob_path(&dir, d).exists(), "{d} deleted with deletes off");
    }
    assert_eq!(
        app.count(
            "SELECT count(*) FROM pending_deletes WHERE state = 'deferred' \
             AND deferred_reason = 'storage.delete.enabled=false'"
        ),
        3
    );

    app.restart_with(|c| c.storage.delete.enabled = true).await;
    wait_until_async("the deferred deletes are collected", DEADLINE, || async {
        blobs.iter().all(|d| !blob_path(&dir, d).exists())
            && app.count("SELECT count(*) FROM pending_deletes") == 0
    })
    .await;
    assert!(app.stored_blob_files().is_empty());
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 0);
    // The job's record is what it did when it ran; it did not run again.
    let after = job(&app, id).await;
    assert_eq!(after["state"], "succeeded");
    assert_eq!(after["result"], result, "{after:#}");
    assert_eq!(after["runs"], 1, "{after:#}");
}

// ----- 5. jobs API --------------------------------------------------------------------------

/// Enqueues a `cleanup` job whose policy is malformed, through the library, beside the
/// running server (like the CLI does). It fails at every run.
async fn enqueue_broken_cleanup(dir: &Path, max_attempts: i64) -> i64 {
    let path = dir.join("regcache.db");
    let meta = tokio::task::spawn_blocking(move || regcache::metadata::Metadata::open(&path))
        .await
        .unwrap()
        .expect("open the metadata");
    let (id, new) = meta
        .enqueue_job(
            "cleanup",
            json!({"upstream": "fixture", "repository": "x", "policy": "not-an-object"}),
            None,
            max_attempts,
            now_secs(),
        )
        .await
        .expect("enqueue");
    assert!(new);
    id
}

fn ids(list: &Value) -> Vec<i64> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|j| j["id"].as_i64().expect("id"))
        .collect()
}

/// Listing filters by state and bounds by limit (newest first); bad filters are 400 with a
/// clear message. A job queued for its retry (backing off) is cancelled: 200, `cancelled`,
/// and it never runs again. Finished jobs cannot be cancelled (409); unknown ids are 404
/// and ids that are not numbers 400.
#[tokio::test]
async fn jobs_are_listed_filtered_and_a_queued_one_is_cancelled() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        with_token(c);
        // A job that failed once waits an hour for its retry: queued, deterministically.
        c.jobs.retry_initial = CfgDuration::from_secs(3600);
        c.jobs.retry_max = CfgDuration::from_secs(3600);
    })
    .await;

    let done = accepted(&admin(&app, Method::DELETE, "/api/v1/cache").await);
    wait_succeeded(&app, done).await;
    let waiting = enqueue_broken_cleanup(&app.data_dir(), 3).await;
    wait_until_async("the broken job failed once", DEADLINE, || async {
        job(&app, waiting).await["attempts"] == 1
    })
    .await;
    let j = job(&app, waiting).await;
    assert_eq!(j["state"], "queued", "{j:#}");
    assert_eq!(j["runs"], 1, "{j:#}");
    assert!(
        j["error"].as_str().is_some_and(|e| e.contains("policy")),
        "the error of the failed run is recorded: {j:#}"
    );
    // It backs off: the retry is an hour (retry_initial) after the failure.
    let failed_at = j["updated_at"].as_i64().unwrap();
    assert!(j["run_after"].as_i64().unwrap() >= failed_at + 3600, "{j:#}");

    let all = admin(&app, Method::GET, "/api/v1/jobs").await;
    assert_eq!(ids(all.expect(200)), vec![waiting, done], "newest first");
    let q = admin(&app, Method::GET, "/api/v1/jobs?state=queued").await;
    assert_eq!(ids(q.expect(200)), vec![waiting]);
    let s = admin(&app, Method::GET, "/api/v1/jobs?state=succeeded").await;
    assert_eq!(ids(s.expect(200)), vec![done]);
    let f = admin(&app, Method::GET, "/api/v1/jobs?state=failed").await;
    assert_eq!(ids(f.expect(200)), Vec::<i64>::new());
    let l = admin(&app, Method::GET, "/api/v1/jobs?limit=1").await;
    assert_eq!(ids(l.expect(200)), vec![waiting]);
    let sl = admin(&app, Method::GET, "/api/v1/jobs?state=succeeded&limit=1").await;
    assert_eq!(ids(sl.expect(200)), vec![done]);
    for (query, needles) in [
        ("state=done", &["state", "done", "queued", "succeeded"][..]),
        ("state=", &["state", "queued"][..]),
        ("state=QUEUED", &["state", "QUEUED"][..]),
        ("limit=0", &["limit", "1000"][..]),
        ("limit=1001", &["limit", "1001"][..]),
        ("limit=-1", &["limit"][..]),
        ("limit=abc", &["limit", "abc"][..]),
    ] {
        let a = admin(&app, Method::GET, &format!("/api/v1/jobs?{query}")).await;
        let msg = a.error(400);
        for n in needles {
            assert!(msg.contains(n), "{query}: {msg:?} does not name {n:?}");
        }
    }

    // Cancel the queued job.
    let a = admin(&app, Method::DELETE, &format!("/api/v1/jobs/{waiting}")).await;
    let c = a.expect(200);
    assert_eq!(c["id"], waiting);
    assert_eq!(c["state"], "cancelled", "{c:#}");
    assert!(c["finished_at"].as_i64().is_some(), "{c:#}");
    let c = job(&app, waiting).await;
    assert_eq!(c["state"], "cancelled");
    let c2 = admin(&app, Method::GET, "/api/v1/jobs?state=cancelled").await;
    assert_eq!(ids(c2.expect(200)), vec![waiting]);
    // Cancelling again, or cancelling a finished job, is a conflict naming its state.
    for (id, state) in [(waiting, "cancelled"), (done, "succeeded")] {
        let a = admin(&app, Method::DELETE, &format!("/api/v1/jobs/{id}")).await;
        let msg = a.error(409);
        assert!(msg.contains(state), "{msg}");
        assert_eq!(job(&app, id).await["state"], state);
    }
    let msg = admin(&app, Method::DELETE, "/api/v1/jobs/999999")
        .await
        .error(404)
        .to_owned();
    assert!(msg.contains("999999"), "{msg}");
    admin(&app, Method::GET, "/api/v1/jobs/999999").await.error(404);
    for bad in ["abc", "1.5", "-", "%20"] {
        let msg = admin(&app, Method::DELETE, &format!("/api/v1/jobs/{bad}"))
            .await
            .error(400)
            .to_owned();
        assert!(msg.contains("not a number"), "{bad}: {msg}");
        admin(&app, Method::GET, &format!("/api/v1/jobs/{bad}"))
            .await
            .error(400);
    }

    // The cancelled job never runs again, though the server keeps polling for work.
    holds_for(
        "the cancelled job to stay cancelled, not run",
        Duration::from_secs(3),
        || {
            let app = &app;
            async move {
                let j = job(app, waiting).await;
                if j["state"] == "cancelled" && j["runs"] == 1 && j["attempts"] == 1 {
                    Ok(())
                } else {
                    Err(format!("{j:#}"))
                }
            }
        },
    )
    .await;
}

// ----- 6. repositories API and repository deletion ----------------------------------------

/// Adds `n` more tags to `repo` (copies of its tag `v1`) directly in SQLite, so that a
/// deletion of it in batches of one tag takes a while. Setup only: the server's own code
/// paths are exercised by everything that follows.
fn add_bulk_tags(app: &TestApp, repo: &str, n: i64) {
    let conn = rusqlite::Connection::open(app.data_dir().join("regcache.db")).expect("open db");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let added = conn
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO tags (repo_id, name, digest, cached_at, last_used_at, expires_at, deferred)
             SELECT t.repo_id, 'bulk-' || n.i, t.digest, t.cached_at, t.last_used_at, t.expires_at, 0
               FROM n, tags t JOIN repositories r ON r.id = t.repo_id
              WHERE r.upstream = 'fixture' AND r.name = ?2 AND t.name = 'v1'",
            rusqlite::params![n, repo],
        )
        .expect("insert tags");
    assert_eq!(added as i64, n);
}

/// The repositories API lists what is cached with counts, bytes, last pull and state, and
/// shows one repository's tags. `DELETE` answers 202 and the repository stops being served
/// at once — while its deletion job is still queued behind another deletion (one delete
/// worker) — then the job removes it and it is 404. A queued deletion can be cancelled:
/// the repository is served again and the job never runs. Bad names are refused.
#[tokio::test]
async fn repositories_are_listed_and_a_deleted_one_stops_being_served_at_once() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app_image = Image::new("repos-app", &[12_000, 5000], "2024-01-01T00:00:00Z");
    let app_v2 = Image::new("repos-app-v2", &[2000], "2024-06-01T00:00:00Z");
    let keep = Image::new("repos-keep", &[3000], "2024-03-01T00:00:00Z");
    let big = Image::new("repos-big", &[1000], "2024-03-01T00:00:00Z");
    upstream.add_image("acme/app", Some("v1"), &app_image);
    upstream.add_image("acme/app", Some("v2"), &app_v2);
    upstream.add_image("acme/keep", Some("v1"), &keep);
    upstream.add_image("blocker/big", Some("v1"), &big);
    let started = now_secs();
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        with_token(c);
        // One deletion at a time, one tag per transaction: the big repository keeps the
        // only delete worker busy for a while.
        c.jobs.delete_workers = 1;
        c.jobs.delete_batch = 1;
        c.jobs.max_run_time = CfgDuration::from_secs(5);
    })
    .await;
    let dir = app.data_dir();
    pull(&app, "acme/app", "v1", &app_image).await;
    pull(&app, "acme/app", "v2", &app_v2).await;
    pull(&app, "acme/keep", "v1", &keep).await;
    pull(&app, "blocker/big", "v1", &big).await;
    // About 1 ms per batch here: far more work than the 5 s budget of one run.
    const BULK: i64 = 100_000;
    add_bulk_tags(&app, "blocker/big", BULK);

    // The list.
    let list = admin(&app, Method::GET, "/api/v1/repositories").await;
    let list = list.expect(200).as_array().expect("a list").clone();
    let names: Vec<&str> = list.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme/app", "acme/keep", "blocker/big"], "{list:#?}");
    let r = &list[0];
    assert_eq!(r["upstream"], "fixture");
    assert_eq!(r["state"], "active");
    assert_eq!(r["tag_count"], 2);
    assert_eq!(r["manifest_count"], 2);
    assert_eq!(r["blob_count"], 5);
    let app_bytes: usize = app_image.blobs().chain(app_v2.blobs()).map(|b| b.len()).sum();
    assert_eq!(r["bytes"], app_bytes, "{r:#}");
    let last = r["last_pulled"].as_i64().expect("last_pulled");
    assert!(last >= started && last <= now_secs(), "{r:#}");
    assert_eq!(list[2]["tag_count"], BULK + 1);

    // One repository with its tags.
    let detail = admin(&app, Method::GET, "/api/v1/repositories/fixture/acme/app").await;
    let d = detail.expect(200);
    assert_eq!(d["name"], "acme/app");
    assert_eq!(d["tag_count"], 2);
    let tags = d["tags"].as_array().expect("tags");
    assert_eq!(tags.len(), 2, "{d:#}");
    for (t, name, image, created) in [
        (&tags[0], "v1", &app_image, 1_704_067_200),
        (&tags[1], "v2", &app_v2, 1_717_200_000),
    ] {
        assert_eq!(t["name"], name, "{t:#}");
        assert_eq!(t["digest"], image.manifest.digest.as_str(), "{t:#}");
        assert_eq!(t["size"], image.total_size(), "{t:#}");
        assert_eq!(t["created"], created, "{t:#}");
        let pulled = t["last_pulled"].as_i64().expect("last_pulled");
        assert!(pulled >= started && pulled <= now_secs(), "{t:#}");
    }

    // Occupy the only delete worker.
    let blocker = accepted(&admin(&app, Method::DELETE, "/api/v1/repositories/fixture/blocker/big").await);
    wait_until_async("the big deletion is running", DEADLINE, || async {
        let j = job(&app, blocker).await;
        j["state"] == "running" && j["progress"]["removed"]["tags"].as_i64().unwrap_or(0) > 0
    })
    .await;

    // Delete acme/app: no longer served at once, before its job has started.
    let gets_before = upstream_gets(&upstream, "acme/app");
    let a = admin(&app, Method::DELETE, "/api/v1/repositories/fixture/acme/app").await;
    let deletion = accepted(&a);
    assert_eq!(a.body["state"], "delete_scheduled", "{a:#?}");
    assert_eq!(a.body["repository"], "fixture/acme/app", "{a:#?}");
    let resp = app.get_manifest("/v2/acme/app/manifests/v1").await;
    let status = resp.status();
    let body: Value = resp.json().await.expect("error body");
    assert_eq!(status, 404, "{body:#}");
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{body:#}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("being deleted"), "{message}");
    let (status, code) = error_code(
        app.get(&format!("/v2/acme/app/blobs/{}", app_image.layers[0].digest))
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));
    let (status, code) = error_code(app.get_manifest("/v2/acme/app/manifests/v2").await).await;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));
    // Those answers came before the deletion job did anything: it is still queued, and
    // nothing was fetched from upstream into the repository on its way out.
    let j = job(&app, deletion).await;
    assert_eq!(j["state"], "queued", "the deletion has not started: {j:#}");
    assert_eq!(j["runs"], 0, "{j:#}");
    assert_eq!(upstream_gets(&upstream, "acme/app"), gets_before);
    let d = admin(&app, Method::GET, "/api/v1/repositories/fixture/acme/app").await;
    assert_eq!(d.expect(200)["state"], "delete_scheduled");
    // Asking again returns the same job.
    let again = admin(&app, Method::DELETE, "/api/v1/repositories/fixture/acme/app").await;
    assert_eq!(accepted(&again), deletion);

    // A running job cannot be cancelled.
    let msg = admin(&app, Method::DELETE, &format!("/api/v1/jobs/{blocker}"))
        .await
        .error(409)
        .to_owned();
    assert!(msg.contains("running"), "{msg}");

    // A queued deletion is cancelled: the repository is served again, from the cache.
    let cancelled = accepted(&admin(&app, Method::DELETE, "/api/v1/repositories/fixture/acme/keep").await);
    let (status, _) = error_code(app.get_manifest("/v2/acme/keep/manifests/v1").await).await;
    assert_eq!(status, 404);
    let c = admin(&app, Method::DELETE, &format!("/api/v1/jobs/{cancelled}")).await;
    assert_eq!(c.expect(200)["state"], "cancelled");
    let keep_gets = upstream_gets(&upstream, "acme/keep");
    pull(&app, "acme/keep", "v1", &keep).await;
    assert_eq!(upstream_gets(&upstream, "acme/keep"), keep_gets);
    let d = admin(&app, Method::GET, "/api/v1/repositories/fixture/acme/keep").await;
    assert_eq!(d.expect(200)["state"], "active");

    // The deletion runs once the worker is free, and the repository is gone.
    let j = wait_succeeded(&app, deletion).await;
    assert_eq!(j["kind"], "delete_repository");
    assert_eq!(
        j["result"]["removed"],
        json!({
            "repositories": 1,
            "tags": 2,
            "manifests": 2,
            "blob_links": 5,
            "blobs_handed_to_deletion": 5,
        }),
        "{j:#}"
    );
    assert_eq!(j["result"]["blobs"]["handed"], 5, "{j:#}");
    let d = admin(&app, Method::GET, "/api/v1/repositories/fixture/acme/app").await;
    let msg = d.error(404);
    assert!(msg.contains("acme/app"), "{msg}");
    assert_eq!(repo_id(&app, "acme/app"), None);
    let listed = admin(&app, Method::GET, "/api/v1/repositories").await;
    let names: Vec<String> = listed
        .expect(200)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.contains(&"acme/app".to_owned()), "{names:?}");
    wait_until_async("acme/app's blobs are deleted", DEADLINE, || async {
        digests([&app_image, &app_v2])
            .iter()
            .all(|d| !blob_path(&dir, d).exists())
    })
    .await;
    // Once deleted it is an ordinary miss: fetched from upstream again.
    pull(&app, "acme/app", "v1", &app_image).await;
    assert_eq!(upstream.manifest_gets("acme/app", "v1"), 2);

    // The blocker was put back in the queue when its time budget ran out (that is how
    // the deletion got the worker) and resumes; the cancelled deletion never ran.
    wait_until_async("the big deletion resumes in a later run", DEADLINE, || async {
        job(&app, blocker).await["runs"].as_i64().unwrap_or(0) >= 2
    })
    .await;
    let c = job(&app, cancelled).await;
    assert_eq!(c["state"], "cancelled", "{c:#}");
    assert_eq!(c["runs"], 0, "{c:#}");

    // Unknown repository, unknown upstream, invalid names.
    for method in [Method::GET, Method::DELETE] {
        let msg = admin(&app, method.clone(), "/api/v1/repositories/fixture/no/such")
            .await
            .error(404)
            .to_owned();
        assert!(msg.contains("no/such"), "{msg}");
        let msg = admin(&app, method.clone(), "/api/v1/repositories/nope/acme/app")
            .await
            .error(404)
            .to_owned();
        assert!(msg.contains("nope"), "{msg}");
        for bad in ["fixture/Acme/App", "fixture/acme/-app", "fixture/a..b", "fixture"] {
            admin(&app, method.clone(), &format!("/api/v1/repositories/{bad}"))
                .await
                .error(400);
        }
    }
    // acme/keep was untouched by all this.
    let d = admin(&app, Method::GET, "/api/v1/repositories/fixture/acme/keep").await;
    assert_eq!(d.expect(200)["tag_count"], 1);
}

/// A repository whose tags outnumber `jobs.delete_batch` — here three tags on one image,
/// as with `latest`, `v1` and `v1.2` — is deleted in several batches and nothing of it
/// remains. (Before a091713 each batch dropped the manifest's link, and then the manifest
/// row, while tags of the same repository still named it: a foreign-key error rolled every
/// batch back, so the deletion could never finish and ended `failed`.)
#[tokio::test]
async fn a_repository_with_more_tags_than_a_batch_is_deleted_completely() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("batched-delete", &[4000, 2500], "2024-01-01T00:00:00Z");
    let other = Image::new("batched-delete-other", &[1500], "2024-02-01T00:00:00Z");
    for tag in ["latest", "v1", "v1.2"] {
        upstream.add_image("acme/app", Some(tag), &image);
    }
    upstream.add_image("acme/app", Some("v0"), &other);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        with_token(c);
        c.jobs.delete_batch = 1;
        // A run that ends in an error is final here, so a broken batch shows at once.
        c.jobs.max_attempts = 1;
    })
    .await;
    for tag in ["latest", "v1", "v1.2"] {
        pull(&app, "acme/app", tag, &image).await;
    }
    pull(&app, "acme/app", "v0", &other).await;
    let id = repo_id(&app, "acme/app").expect("cached");
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM tags WHERE repo_id = {id}")),
        4
    );

    let job_id = accepted(&admin(&app, Method::DELETE, "/api/v1/repositories/fixture/acme/app").await);
    let j = wait_job(&app, job_id).await;
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(
        j["result"]["removed"],
        json!({
            "repositories": 1,
            "tags": 4,
            "manifests": 2,
            "blob_links": 5,
            "blobs_handed_to_deletion": 5,
        }),
        "{j:#}"
    );
    assert_eq!(repo_id(&app, "acme/app"), None);
    assert!(
        rows_of_repo(&app, id).iter().all(|(_, n)| *n == 0),
        "{:?}",
        rows_of_repo(&app, id)
    );
    assert_eq!(app.count("SELECT count(*) FROM manifests"), 0);
    wait_until_async("every blob of it is deleted", DEADLINE, || async {
        app.stored_blob_files().is_empty() && app.count("SELECT count(*) FROM blobs") == 0
    })
    .await;
    admin(&app, Method::GET, "/api/v1/repositories/fixture/acme/app")
        .await
        .error(404);
}

// ----- 7. a job that keeps failing ---------------------------------------------------------

/// A job failing at every run is retried with backoff until `max_attempts`, then ends
/// `failed` with its error, and is not retried again (design problem 3).
#[tokio::test]
async fn a_job_that_keeps_failing_ends_failed_after_max_attempts() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        with_token(c);
        c.jobs.max_attempts = 2;
        c.jobs.retry_initial = CfgDuration::from_secs(1);
        c.jobs.retry_max = CfgDuration::from_secs(1);
    })
    .await;
    let id = enqueue_broken_cleanup(&app.data_dir(), 2).await;
    let j = wait_job(&app, id).await;
    assert_eq!(j["state"], "failed", "{j:#}");
    assert_eq!(j["kind"], "cleanup");
    assert_eq!(j["attempts"], 2, "{j:#}");
    assert_eq!(j["runs"], 2, "{j:#}");
    assert_eq!(j["max_attempts"], 2, "{j:#}");
    assert_eq!(j["result"], Value::Null, "{j:#}");
    let error = j["error"].as_str().expect("the error is recorded");
    assert!(
        error.contains("policy") && error.contains("not-an-object"),
        "the error names the problem: {error}"
    );
    let finished = j["finished_at"].as_i64().expect("finished_at");
    // The second run came after the backoff, not at once.
    assert!(finished > j["created_at"].as_i64().unwrap(), "{j:#}");
    let listed = admin(&app, Method::GET, "/api/v1/jobs?state=failed").await;
    assert_eq!(ids(listed.expect(200)), vec![id]);

    holds_for("the failed job to stay failed", Duration::from_secs(4), || {
        let app = &app;
        let j = j.clone();
        async move {
            let now = job(app, id).await;
            if now == j {
                Ok(())
            } else {
                Err(format!("it changed: {now:#}"))
            }
        }
    })
    .await;
    // A failed job is not cancellable either.
    admin(&app, Method::DELETE, &format!("/api/v1/jobs/{id}"))
        .await
        .error(409);
}
