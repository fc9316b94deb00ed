//! Durable expiry and deletion (issue 3; invariants I2, I3, I6), end to end through the
//! registry API with short ttls: the CNCF distribution 4249 scenario (deletes off, then
//! on), ttl changes applied to what is already cached, shared blobs, pulls that extend
//! expiry, rescue of a blob whose delete is pending or running, `regcache status`, and the
//! size bound. Every wait polls its condition with a deadline; the ttl granularity is a
//! second and the scheduler polls every second, so the deadlines are generous.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::app::{config_for, ok_bytes, pull_image, TestApp};
use common::binary::run_ok_async;
use common::data_dir::{all_deferred, blob_files, blob_path, count, db, entries, leftovers, ENTRY_TABLES};
use common::failing_store::{FailingStore, INJECTED};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::held::HeldResponse;
use common::images::{sha256_digest, Image, Index, ACCEPT_ALL_MANIFESTS};
use common::wait_until_async;
use regcache::config::{Config, Duration as CfgDuration};
use reqwest::header::ACCEPT;
use reqwest::Method;

/// Deadline of every wait for the scheduler (ttl + poll + use flush + a busy machine).
const DEADLINE: Duration = Duration::from_secs(30);
// ----- helpers ------------------------------------------------------------------------

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ttl(secs: u64) -> CfgDuration {
    CfgDuration::from_secs(secs)
}

async fn get_blob(client: &reqwest::Client, base: &str, repo: &str, digest: &str) -> bytes::Bytes {
    let resp = client
        .get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .expect("blob request");
    ok_bytes(resp).await
}

fn has_blob_row(dir: &Path, digest: &str) -> bool {
    db(dir)
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)",
            [digest],
            |r| r.get(0),
        )
        .unwrap()
}

async fn wait_for_next_second(after: i64) {
    wait_until_async("the clock passes a second boundary", DEADLINE, || async {
        now_secs() > after
    })
    .await;
}

/// Asserts `f` stays true for `period`, checking every 100 ms: for "nothing happens"
/// claims, whose only evidence is a bounded wait.
async fn holds_for(what: &str, period: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let end = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < end {
        if let Err(e) = f() {
            panic!("expected {what} for {period:?}, but: {e}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----- a store whose deletes fail or block on command ----------------------------------

/// regcache in-process over a `FailingStore` rooted at `data_dir/store` (the filesystem
/// backend's layout, which `blob_path` reads), so deletes can fail or block on command.
/// Restart it with `restart_with_store(store.as_dyn(), ..)` to keep the same store.
async fn flaky_app(upstream_url: &str, tweak: impl FnOnce(&mut Config)) -> (TestApp, Arc<FailingStore>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&[("fixture", upstream_url)], dir.path());
    tweak(&mut config);
    let store = FailingStore::on_dir(&config.server.data_dir.join("store"));
    let app = TestApp::start_with_store(config, store.as_dyn(), Some(dir)).await;
    (app, store)
}

/// (state, attempts, last_error) of each pending delete of `digests`.
fn pending_states(dir: &Path, digests: &[&str]) -> Vec<Option<(String, i64, Option<String>)>> {
    let conn = db(dir);
    digests
        .iter()
        .map(|d| {
            conn.query_row(
                "SELECT state, attempts, last_error FROM pending_deletes WHERE digest = ?1",
                [d],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .ok()
        })
        .collect()
}

// ----- the distribution 4249 scenario --------------------------------------------------

/// distribution#4249: with deletes off, an expired entry must not be forgotten. Entries
/// are deferred (content still served, from the cache alone), and once the server starts
/// with deletes on, every deferred entry is due at switch time + ttl and then collected:
/// store empty, no rows left.
#[tokio::test]
async fn deferred_entries_are_collected_at_switch_time_plus_ttl() {
    const TTL: i64 = 2;
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("issue-4249", &[3000, 50_000], "2024-02-03T04:05:06Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let mut app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.storage.delete.enabled = false;
        c.proxy.ttl = ttl(TTL as u64);
    })
    .await;
    let dir = app.data_dir();
    pull_image(&app.client, &app.base, "team/app", "v1", &image).await;
    assert_eq!(blob_files(&dir).len(), 3, "config and two layers stored");

    wait_until_async("every entry is deferred", DEADLINE, || async {
        all_deferred(&dir, (1, 1, 3))
    })
    .await;
    assert_eq!(count(&dir, "SELECT count(*) FROM pending_deletes"), 0);
    assert_eq!(count(&dir, "SELECT count(*) FROM manifests"), 1);
    assert_eq!(count(&dir, "SELECT count(*) FROM blobs"), 3);
    assert_eq!(blob_files(&dir).len(), 3, "deletes off: nothing removed");

    // Deferred content is still served, from the cache alone.
    upstream.stop().await;
    let used_at = now_secs();
    upstream.reset_log();
    pull_image(&app.client, &app.base, "team/app", "v1", &image).await;
    assert_eq!(upstream.log().len(), 0, "upstream is down; served from cache");
    // That pull is a use: at the next flush it un-defers what it used, which then
    // expires (and is deferred) again. Wait for both, so every entry is deferred at the
    // switch.
    wait_until_async("the pull's uses are recorded", DEADLINE, || async {
        count(&dir, "SELECT min(last_used_at) FROM repo_blobs") >= used_at
            && count(&dir, "SELECT min(last_used_at) FROM tags") >= used_at
    })
    .await;
    wait_until_async("every entry is deferred again", DEADLINE, || async {
        all_deferred(&dir, (1, 1, 3))
    })
    .await;

    let switch_from = now_secs();
    app.restart_with(|c| c.storage.delete.enabled = true).await;
    let switch_to = now_secs();
    assert_eq!(
        blob_files(&dir).len(),
        3,
        "right after the switch, nothing is gone"
    );
    let rows = entries(&dir);
    assert_eq!(rows.len(), 5);
    for (table, expires, _, deferred) in &rows {
        let e = expires.unwrap_or_else(|| panic!("{table}: deferred entry without a due time"));
        assert!(!deferred, "{table}: still deferred after the switch");
        assert!(
            (switch_from + TTL..=switch_to + TTL).contains(&e),
            "{table}: due at {e}, expected switch time + ttl in [{}, {}]",
            switch_from + TTL,
            switch_to + TTL
        );
    }

    wait_until_async("a blob is collected", DEADLINE, || async {
        blob_files(&dir).len() < 3
    })
    .await;
    let collected_at = now_secs();
    assert!(
        collected_at >= switch_from + TTL,
        "collected at {collected_at}, before switch time + ttl ({})",
        switch_from + TTL
    );
    wait_until_async(
        "the store and every content table are empty",
        DEADLINE,
        || async { leftovers(&dir).is_empty() },
    )
    .await;
}

// ----- ttl changes (I6) ----------------------------------------------------------------

/// Three images in two repositories, one Docker-flavoured.
fn three_images(upstream: &FixtureUpstream, seed: &str) -> Vec<(&'static str, &'static str, Image)> {
    let images = vec![
        (
            "one/app",
            "v1",
            Image::new(&format!("{seed}-a"), &[2000, 3000], "2024-01-01T00:00:00Z"),
        ),
        (
            "one/app",
            "v2",
            Image::new(&format!("{seed}-b"), &[4000], "2024-01-02T00:00:00Z"),
        ),
        (
            "two/tool",
            "latest",
            Image::docker(&format!("{seed}-c"), &[1500], "2024-01-03T00:00:00Z"),
        ),
    ];
    for (repo, tag, image) in &images {
        upstream.add_image(repo, Some(tag), image);
    }
    images
}

async fn pull_all(client: &reqwest::Client, base: &str, images: &[(&str, &str, Image)]) {
    for (repo, tag, image) in images {
        pull_image(client, base, repo, tag, image).await;
    }
}

/// ttl 0 -> T: everything cached without an expiry gets now + T at start-up, and is then
/// collected.
#[tokio::test]
async fn ttl_zero_to_t_schedules_every_entry_at_now_plus_t_and_collects_it() {
    const TTL: i64 = 2;
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let images = three_images(&upstream, "zero-to-t");
    let mut app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = CfgDuration::ZERO;
    })
    .await;
    let dir = app.data_dir();
    pull_all(&app.client, &app.base, &images).await;
    let rows = entries(&dir);
    // 3 tags, 3 manifest links, 3 + 2 + 2 blob links.
    assert_eq!(rows.len(), 13);
    assert!(
        rows.iter().all(|(_, e, _, _)| e.is_none()),
        "ttl 0: nothing has an expiry: {rows:?}"
    );
    assert_eq!(blob_files(&dir).len(), 7);

    // Let the clock pass the last use, so "now + T" and "last use + T" differ.
    let last_use = rows.iter().map(|r| r.2).max().unwrap();
    wait_for_next_second(last_use).await;
    let from = now_secs();
    app.restart_with(|c| c.proxy.ttl = ttl(TTL as u64)).await;
    let to = now_secs();
    for (table, expires, last_used, _) in entries(&dir) {
        let e = expires.unwrap_or_else(|| panic!("{table}: no expiry after ttl 0 -> {TTL}s"));
        assert!(
            (from + TTL..=to + TTL).contains(&e),
            "{table}: due at {e}, expected now + ttl in [{}, {}] (last used {last_used})",
            from + TTL,
            to + TTL
        );
    }
    assert_eq!(
        count(
            &dir,
            "SELECT ttl_secs FROM upstream_settings WHERE upstream = 'fixture'"
        ),
        TTL
    );
    wait_until_async("everything is collected", DEADLINE, || async {
        leftovers(&dir).is_empty()
    })
    .await;
}

/// ttl T -> 0: expiries are cleared at start-up and nothing is collected, even well past
/// the old due times.
#[tokio::test]
async fn ttl_t_to_zero_clears_expiries_and_collects_nothing() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let images = three_images(&upstream, "t-to-zero");
    let mut app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = ttl(3);
    })
    .await;
    let dir = app.data_dir();
    pull_all(&app.client, &app.base, &images).await;
    let before = entries(&dir);
    assert_eq!(before.len(), 13);
    assert!(before.iter().all(|(_, e, _, _)| e.is_some()), "{before:?}");
    let last_due = before.iter().filter_map(|r| r.1).max().unwrap();

    app.restart_with(|c| c.proxy.ttl = CfgDuration::ZERO).await;
    let after = entries(&dir);
    assert_eq!(after.len(), 13, "restarted before anything expired");
    assert!(
        after.iter().all(|(_, e, _, _)| e.is_none()),
        "ttl 0: expiries cleared: {after:?}"
    );

    let wait = Duration::from_secs(u64::try_from(last_due + 2 - now_secs()).unwrap_or(0));
    holds_for("nothing collected past the old due times", wait, || {
        let n = entries(&dir).len();
        let files = blob_files(&dir).len();
        let pending = count(&dir, "SELECT count(*) FROM pending_deletes");
        if n == 13 && files == 7 && pending == 0 {
            Ok(())
        } else {
            Err(format!("{n} entries, {files} files, {pending} pending deletes"))
        }
    })
    .await;
    assert!(now_secs() > last_due + 1);
    upstream.reset_log();
    pull_all(&app.client, &app.base, &images).await;
    assert_eq!(upstream.requests(Method::GET, "/blobs/"), 0);
}

/// ttl T1 -> T2: expiries are recomputed from each entry's last use, not from now; and a
/// T2 under the time already elapsed collects at once.
#[tokio::test]
async fn ttl_t1_to_t2_recomputes_from_last_use() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let images = three_images(&upstream, "t1-to-t2");
    let mut app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = ttl(3600);
    })
    .await;
    let dir = app.data_dir();
    pull_all(&app.client, &app.base, &images).await;
    let rows = entries(&dir);
    assert_eq!(rows.len(), 13);
    for (table, expires, last_used, _) in &rows {
        assert_eq!(*expires, Some(last_used + 3600), "{table}");
    }
    let last_use = rows.iter().map(|r| r.2).max().unwrap();
    wait_for_next_second(last_use).await;

    app.restart_with(|c| c.proxy.ttl = ttl(7200)).await;
    let now = now_secs();
    for (table, expires, last_used, _) in entries(&dir) {
        assert!(now + 7200 > last_used + 7200, "clock moved past the last use");
        assert_eq!(expires, Some(last_used + 7200), "{table}: last use + T2");
    }

    // T2 shorter than the time since the last use: everything is due now.
    wait_until_async("last use is more than 2s ago", DEADLINE, || async {
        now_secs() >= last_use + 3
    })
    .await;
    app.restart_with(|c| c.proxy.ttl = ttl(2)).await;
    for (table, expires, last_used, _) in entries(&dir) {
        assert_eq!(expires, Some(last_used + 2), "{table}: last use + T2");
    }
    wait_until_async("everything is collected", DEADLINE, || async {
        leftovers(&dir).is_empty()
    })
    .await;
}

/// A per-upstream `ttl` beats `proxy.ttl`: two upstream names over one fixture, one with
/// a short override. The short one's content goes; blobs it shares with the other stay.
#[tokio::test]
async fn per_upstream_ttl_overrides_proxy_ttl() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let shared = Image::new("override-shared", &[2000, 3000], "2024-01-01T00:00:00Z");
    let solo = Image::new("override-solo", &[5000], "2024-01-01T00:00:00Z");
    upstream.add_image("app", Some("v1"), &shared);
    upstream.add_image("solo", Some("v1"), &solo);
    let url = upstream.url();
    let app = TestApp::start_with(&[("fixture", &url), ("short", &url)], |c| {
        c.proxy.ttl = ttl(3600);
        c.upstream[1].ttl = Some(ttl(2));
    })
    .await;
    let dir = app.data_dir();
    pull_image(&app.client, &app.base, "app", "v1", &shared).await;
    pull_image(&app.client, &app.base, "short/app", "v1", &shared).await;
    pull_image(&app.client, &app.base, "short/solo", "v1", &solo).await;

    let applied: Vec<(String, i64)> = {
        let conn = db(&dir);
        let mut stmt = conn
            .prepare("SELECT upstream, ttl_secs FROM upstream_settings ORDER BY upstream")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert_eq!(
        applied,
        vec![("fixture".to_owned(), 3600), ("short".to_owned(), 2)]
    );
    // Every entry is due at last use + its upstream's ttl.
    for table in ENTRY_TABLES {
        let wrong = count(
            &dir,
            &format!(
                "SELECT count(*) FROM {table} t JOIN repositories r ON r.id = t.repo_id
                  WHERE t.expires_at IS NOT t.last_used_at + CASE r.upstream WHEN 'short' THEN 2 ELSE 3600 END"
            ),
        );
        assert_eq!(wrong, 0, "{table}: expiry not last use + the upstream's ttl");
    }

    let short_rows = "SELECT (SELECT count(*) FROM tags t JOIN repositories r ON r.id = t.repo_id WHERE r.upstream = 'short')
                           + (SELECT count(*) FROM repo_manifests t JOIN repositories r ON r.id = t.repo_id WHERE r.upstream = 'short')
                           + (SELECT count(*) FROM repo_blobs t JOIN repositories r ON r.id = t.repo_id WHERE r.upstream = 'short')";
    // Files go before their pending-delete rows (the row is removed once storage confirmed
    // the delete), so wait for both.
    wait_until_async("the short upstream's entries expire", DEADLINE, || async {
        count(&dir, short_rows) == 0
            && solo.blobs().all(|b| !blob_path(&dir, &b.digest).exists())
            && count(&dir, "SELECT count(*) FROM pending_deletes") == 0
    })
    .await;
    // The long upstream's entries and the blobs they share are untouched.
    assert_eq!(
        count(&dir, "SELECT count(*) FROM tags"),
        1,
        "the fixture upstream's tag stays"
    );
    for b in shared.blobs() {
        assert!(blob_path(&dir, &b.digest).exists(), "shared blob kept");
    }
    upstream.reset_log();
    pull_image(&app.client, &app.base, "app", "v1", &shared).await;
    assert_eq!(upstream.requests(Method::GET, "/blobs/"), 0);
}

/// An index, its child manifests and their blobs are all collected: children stay while
/// the index that lists them is linked, and go once it is.
#[tokio::test]
async fn an_index_and_its_children_are_collected() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let index = Index::new("expiring-index", &["amd64", "arm64"]);
    upstream.add_index("team/multi", Some("v1"), &index);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| c.proxy.ttl = ttl(2)).await;
    let dir = app.data_dir();
    let resp = app.get_manifest("/v2/team/multi/manifests/v1").await;
    assert_eq!(ok_bytes(resp).await, index.manifest.bytes);
    for (_, image) in &index.images {
        pull_image(
            &app.client,
            &app.base,
            "team/multi",
            &image.manifest.digest,
            image,
        )
        .await;
    }
    assert_eq!(count(&dir, "SELECT count(*) FROM manifests"), 3);
    assert!(!blob_files(&dir).is_empty());
    wait_until_async("the index and its children are collected", DEADLINE, || async {
        leftovers(&dir).is_empty()
    })
    .await;
}

// ----- shared blobs, pulls, rescue ------------------------------------------------------

/// Two repositories share a layer. Expiring the first keeps the layer (file, row, and the
/// second repository serves it without the upstream); the second's expiry removes it.
#[tokio::test]
async fn shared_layer_outlives_one_repositorys_expiry() {
    const TTL: i64 = 5;
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    // Same seed, same first layer size: the first layer is byte-identical.
    let a = Image::new("shared-layer", &[20_000, 7000], "2024-01-01T00:00:00Z");
    let b = Image::new("shared-layer", &[20_000], "2024-06-01T00:00:00Z");
    let shared = a.layers[0].clone();
    assert_eq!(shared.digest, b.layers[0].digest);
    upstream.add_image("team/a", Some("v1"), &a);
    upstream.add_image("team/b", Some("v1"), &b);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = ttl(TTL as u64);
    })
    .await;
    let dir = app.data_dir();

    pull_image(&app.client, &app.base, "team/a", "v1", &a).await;
    let pulled_a = now_secs();
    // B later, so it is due at least 3 s after A.
    wait_until_async("3 s after A's pull", DEADLINE, || async {
        now_secs() >= pulled_a + 3
    })
    .await;
    pull_image(&app.client, &app.base, "team/b", "v1", &b).await;
    assert_eq!(upstream.blob_gets(&shared.digest), 1, "B reuses A's stored layer");
    assert_eq!(blob_files(&dir).len(), 4);

    let a_only = [a.config.digest.clone(), a.layers[1].digest.clone()];
    wait_until_async("A's own blobs are collected", DEADLINE, || async {
        a_only
            .iter()
            .all(|d| !blob_path(&dir, d).exists() && !has_blob_row(&dir, d))
    })
    .await;
    assert!(blob_path(&dir, &shared.digest).exists(), "shared layer file kept");
    assert!(has_blob_row(&dir, &shared.digest), "shared layer row kept");
    assert_eq!(
        count(
            &dir,
            &format!(
                "SELECT count(*) FROM pending_deletes WHERE digest = '{}'",
                shared.digest
            )
        ),
        0,
        "shared layer never queued for deletion"
    );
    assert_eq!(
        count(
            &dir,
            "SELECT count(*) FROM tags t JOIN repositories r ON r.id = t.repo_id WHERE r.name = 'team/a'"
        ),
        0
    );
    upstream.reset_log();
    let body = get_blob(&app.client, &app.base, "team/b", &shared.digest).await;
    assert_eq!(body, shared.bytes);
    assert_eq!(
        upstream.blob_gets(&shared.digest),
        0,
        "served to B from the store"
    );

    wait_until_async("B expires and the store is empty", DEADLINE, || async {
        leftovers(&dir).is_empty()
    })
    .await;
}

/// An image `team/app:v1` (a config and two layers) on a fixture upstream, pulled once
/// through regcache running with `ttl_secs`.
async fn pulled_image(name: &str, ttl_secs: i64) -> (FixtureUpstream, Image, TestApp) {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new(name, &[4000, 9000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = ttl(ttl_secs as u64);
    })
    .await;
    pull_image(&app.client, &app.base, "team/app", "v1", &image).await;
    (upstream, image, app)
}

/// A pull extends the expiry of what it used: pulling every second keeps an image cached
/// well past its first due time (no upstream GET again), and its expiry moves forward.
/// Uses reach SQLite every 5 s, so the ttl (8 s) is longer than a flush interval.
#[tokio::test]
async fn pulls_extend_expiry() {
    const TTL: i64 = 8;
    let (upstream, image, app) = pulled_image("extend", TTL).await;
    let dir = app.data_dir();
    let first = entries(&dir);
    assert_eq!(first.len(), 5);
    let first_due = first.iter().filter_map(|r| r.1).max().unwrap();

    // Pull once a second until well past the first due time.
    while now_secs() <= first_due + 4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pull_image(&app.client, &app.base, "team/app", "v1", &image).await;
    }
    for blob in image.blobs() {
        assert_eq!(upstream.blob_gets(&blob.digest), 1, "never refetched");
    }
    assert_eq!(upstream.manifest_gets("team/app", "v1"), 1, "tag never expired");
    let later = entries(&dir);
    assert_eq!(later.len(), 5);
    for (table, expires, last_used, _) in &later {
        let e = expires.unwrap();
        assert!(e > first_due + 2, "{table}: due {e}, first due {first_due}");
        assert_eq!(e, last_used + TTL, "{table}: last use + ttl");
    }

    // Once the pulls stop, it expires.
    wait_until_async("the unused image is collected", DEADLINE, || async {
        leftovers(&dir).is_empty()
    })
    .await;
}

/// A client that has the layers pulls only the manifest: the tag and the manifest link
/// stay live while the blob links fall due, held by the manifest. Expiry postpones them to
/// the manifest link's due time rather than finding them due, and held, on every pass. Once
/// the pulls stop, everything is collected.
#[tokio::test]
async fn blob_links_held_by_a_live_manifest_are_postponed() {
    // Longer than the 5 s between flushes of recorded uses, so the pulls keep the
    // manifest link live.
    const TTL: i64 = 8;
    let (upstream, image, app) = pulled_image("held", TTL).await;
    let dir = app.data_dir();
    let blob_links = || -> Vec<(Option<i64>, i64)> {
        let conn = db(&dir);
        let mut stmt = conn
            .prepare("SELECT expires_at, last_used_at FROM repo_blobs")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let linked = image.blobs().count();
    assert_eq!(blob_links().len(), linked, "config and layers linked");

    // Manifest-only pulls until every blob link was moved past its own due time (last use
    // + ttl), which only expiry's postponement does.
    let manifest_url = format!("{}/v2/team/app/manifests/v1", app.base);
    wait_until_async("the held blob links are postponed", DEADLINE, || async {
        let resp = app
            .client
            .get(&manifest_url)
            .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
            .send()
            .await
            .expect("manifest request");
        ok_bytes(resp).await;
        let links = blob_links();
        links.len() == linked
            && links
                .iter()
                .all(|(due, used)| due.is_some_and(|d| d > used + TTL))
    })
    .await;
    for blob in image.blobs() {
        assert_eq!(upstream.blob_gets(&blob.digest), 1, "the blobs were kept");
    }

    // Once the pulls stop, the manifest link falls due, then the blob links it held.
    wait_until_async("the unused image is collected", DEADLINE, || async {
        leftovers(&dir).is_empty()
    })
    .await;
}

/// Rescue: blobs whose delete is pending (failed, kept, then deferred across a restart
/// with deletes off) are pulled again; the pull cancels the delete and serves the stored
/// blob intact. A blob not pulled again is the control: once deletes are back on, the
/// workers delete it, and leave the rescued ones alone.
#[tokio::test]
async fn blob_pulled_again_while_its_delete_is_pending_is_rescued() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("rescue", &[30_000, 40_000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let (mut app, store) = flaky_app(&upstream.url(), |c| {
        c.proxy.ttl = ttl(2);
        c.storage.delete.retry_initial = ttl(3600);
        c.storage.delete.retry_max = ttl(3600);
    })
    .await;
    let dir = app.data_dir();
    pull_image(&app.client, &app.base, "team/app", "v1", &image).await;
    store.fail_deletes_forever();

    let digests: Vec<&str> = image.blobs().map(|b| b.digest.as_str()).collect();
    wait_until_async("every blob's delete failed and is kept", DEADLINE, || async {
        pending_states(&dir, &digests).iter().all(|s| {
            matches!(s, Some((state, attempts, Some(e))) if state == "pending" && *attempts >= 1 && e.contains("injected"))
        })
    })
    .await;
    for d in &digests {
        assert!(blob_path(&dir, d).exists(), "a failed delete removed nothing");
        assert!(
            has_blob_row(&dir, d),
            "the blob row stays until the delete is confirmed"
        );
    }

    // Deletes off (and a long ttl): the pending deletes wait as deferred, across the restart.
    app.restart_with_store(store.as_dyn(), |c| {
        c.storage.delete.enabled = false;
        c.proxy.ttl = ttl(3600);
    })
    .await;
    wait_until_async("pending deletes are deferred", DEADLINE, || async {
        count(
            &dir,
            "SELECT count(*) FROM pending_deletes WHERE state = 'deferred' AND deferred_reason IS NOT NULL",
        ) == 3
    })
    .await;

    // Pull again, except the second layer: config and first layer are rescued.
    upstream.reset_log();
    let resp = app
        .client
        .get(format!("{}/v2/team/app/manifests/v1", app.base))
        .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    assert_eq!(ok_bytes(resp).await, image.manifest.bytes);
    let rescued = [&image.config, &image.layers[0]];
    let control = &image.layers[1];
    for blob in rescued {
        let body = get_blob(&app.client, &app.base, "team/app", &blob.digest).await;
        assert_eq!(sha256_digest(&body), blob.digest, "served intact");
    }
    assert_eq!(
        upstream.requests(Method::GET, "/blobs/"),
        0,
        "rescued blobs come from the store"
    );
    let states = pending_states(&dir, &digests);
    assert_eq!(states[0], None, "config's delete cancelled");
    assert_eq!(states[1], None, "first layer's delete cancelled");
    assert!(states[2].is_some(), "the control's delete still pending");
    for blob in rescued {
        assert_eq!(
            count(
                &dir,
                &format!("SELECT count(*) FROM repo_blobs WHERE digest = '{}'", blob.digest)
            ),
            1,
            "linked again"
        );
    }

    // Deletes back on, store healthy: the deferred delete resumes at once.
    store.heal();
    app.restart_with_store(store.as_dyn(), |c| c.storage.delete.enabled = true)
        .await;
    wait_until_async("the control blob is deleted", DEADLINE, || async {
        !blob_path(&dir, &control.digest).exists() && count(&dir, "SELECT count(*) FROM pending_deletes") == 0
    })
    .await;
    for blob in rescued {
        let stored = std::fs::read(blob_path(&dir, &blob.digest)).expect("rescued object kept");
        assert_eq!(sha256_digest(&stored), blob.digest);
        assert!(has_blob_row(&dir, &blob.digest));
    }
    upstream.reset_log();
    pull_image(&app.client, &app.base, "team/app", "v1", &image).await;
    assert_eq!(upstream.blob_gets(&image.config.digest), 0);
    assert_eq!(upstream.blob_gets(&image.layers[0].digest), 0);
    assert_eq!(
        upstream.blob_gets(&control.digest),
        1,
        "the deleted one is refetched"
    );
    app.stop().await;
}

/// A blob pulled while its object is being deleted is not served from the half-deleted
/// store: it comes from the upstream, intact, without being cached or linked (the delete
/// goes on); the next pull caches it again.
#[tokio::test]
async fn blob_pulled_while_being_deleted_is_served_from_upstream_uncached() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("deleting", &[30_000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let (mut app, store) = flaky_app(&upstream.url(), |c| c.proxy.ttl = ttl(3)).await;
    let dir = app.data_dir();
    pull_image(&app.client, &app.base, "team/app", "v1", &image).await;
    store.block_deletes();

    // The first delete claimed blocks at the gate (and the worker with it); expiry may
    // queue the blobs in different passes, so whichever is in flight is the subject.
    let digests: Vec<&str> = image.blobs().map(|b| b.digest.as_str()).collect();
    let mut subject = None;
    wait_until_async("a delete is claimed and in flight", DEADLINE, || {
        let states = pending_states(&dir, &digests);
        let deleting = digests
            .iter()
            .zip(states)
            .find(|(_, s)| matches!(s, Some((state, _, _)) if state == "deleting"))
            .map(|(d, _)| d.to_string());
        let found = deleting.is_some();
        subject = deleting;
        async move { found }
    })
    .await;
    let subject = subject.unwrap();
    let blob = image.blobs().find(|b| b.digest == subject).unwrap();
    assert!(
        blob_path(&dir, &subject).exists(),
        "held at the gate: not deleted yet"
    );

    upstream.reset_log();
    let resp = app
        .client
        .get(format!("{}/v2/team/app/manifests/v1", app.base))
        .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    assert_eq!(ok_bytes(resp).await, image.manifest.bytes);
    let body = get_blob(&app.client, &app.base, "team/app", &subject).await;
    assert_eq!(body, blob.bytes, "served intact");
    assert_eq!(
        upstream.blob_gets(&subject),
        1,
        "from the upstream, not the store"
    );
    assert_eq!(
        count(
            &dir,
            &format!("SELECT count(*) FROM repo_blobs WHERE digest = '{subject}'")
        ),
        0,
        "not linked while being deleted"
    );
    assert_eq!(
        pending_states(&dir, &[subject.as_str()])[0]
            .as_ref()
            .map(|s| s.0.as_str()),
        Some("deleting"),
        "the delete goes on"
    );

    store.unblock_deletes();
    wait_until_async("the deletes finish", DEADLINE, || async {
        count(&dir, "SELECT count(*) FROM pending_deletes") == 0
            && !blob_path(&dir, &subject).exists()
            && !has_blob_row(&dir, &subject)
    })
    .await;

    upstream.reset_log();
    let body = get_blob(&app.client, &app.base, "team/app", &subject).await;
    assert_eq!(body, blob.bytes);
    assert_eq!(upstream.blob_gets(&subject), 1);
    assert!(blob_path(&dir, &subject).exists(), "cached again");
    assert!(has_blob_row(&dir, &subject));
    app.stop().await;
}

// ----- regcache status ------------------------------------------------------------------

async fn run_cli(args: &[&str]) -> (String, String) {
    let out = run_ok_async(args).await;
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_cli_config(dir: &Path) -> PathBuf {
    let path = dir.join("cli.toml");
    std::fs::write(
        &path,
        format!("[server]\ndata_dir = {:?}\n", dir.display().to_string()),
    )
    .unwrap();
    path
}

/// `regcache status` beside a running server: counts and bytes match SQLite, the oldest
/// failing delete carries its error, deferred deletes and entries are counted, and the
/// applied settings are shown; `--json` parses.
#[tokio::test]
async fn status_reports_counts_queue_and_applied_settings() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let first = Image::new("status-1", &[3000, 6000], "2024-01-01T00:00:00Z");
    let second = Image::new("status-2", &[5000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &first);
    upstream.add_image("team/tool", Some("v2"), &second);
    // The second image comes through "long", an upstream name over the same fixture whose
    // ttl keeps it cached while the first one's deletes fail.
    let url = upstream.url();
    let (mut app, store) = flaky_app(&url, |c| {
        c.upstream = config_for(&[("fixture", &url), ("long", &url)], &c.server.data_dir).upstream;
        c.upstream[1].ttl = Some(ttl(3600));
        c.proxy.ttl = ttl(2);
        c.storage.delete.retry_initial = ttl(3600);
        c.storage.delete.retry_max = ttl(3600);
    })
    .await;
    let dir = app.data_dir();
    let cli_config = write_cli_config(&dir);
    let cfg = cli_config.to_str().unwrap();
    store.fail_deletes_forever();
    pull_image(&app.client, &app.base, "team/app", "v1", &first).await;
    wait_until_async("the deletes failed", DEADLINE, || async {
        count(
            &dir,
            "SELECT count(*) FROM pending_deletes WHERE last_error IS NOT NULL",
        ) == 3
    })
    .await;
    pull_image(&app.client, &app.base, "long/team/tool", "v2", &second).await;

    let (text, _) = run_cli(&["status", "--config", cfg]).await;
    let (json, _) = run_cli(&["status", "--json", "--config", cfg]).await;
    let s: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    let sql = |q: &str| count(&dir, q);
    assert_eq!(s["repositories"], sql("SELECT count(*) FROM repositories"));
    assert_eq!(s["tags"], sql("SELECT count(*) FROM tags"));
    assert_eq!(s["tags"], 1);
    assert_eq!(s["manifests"]["count"], sql("SELECT count(*) FROM manifests"));
    assert_eq!(
        s["manifests"]["bytes"],
        sql("SELECT sum(size_bytes) FROM manifests")
    );
    assert_eq!(s["manifests"]["bytes"], second.manifest.len() as i64);
    assert_eq!(s["blobs"]["count"], 5, "the first image's 3 (delete failing) + 2");
    assert_eq!(
        s["blobs"]["bytes"],
        (first
            .blobs()
            .chain(second.blobs())
            .map(|b| b.len())
            .sum::<usize>()) as i64
    );
    assert_eq!(s["pending_deletes"]["count"], 3);
    assert_eq!(
        s["pending_deletes"]["bytes"],
        first.blobs().map(|b| b.len()).sum::<usize>() as i64
    );
    assert_eq!(s["deferred_deletes"]["count"], 0);
    assert_eq!(s["deferred_entries"], 0);
    let failing = &s["oldest_failing_delete"];
    let digest = failing["digest"].as_str().expect("a failing delete");
    assert!(first.blobs().any(|b| b.digest == digest), "{failing}");
    assert!(failing["attempts"].as_i64().unwrap() >= 1);
    assert!(failing["last_error"]
        .as_str()
        .unwrap()
        .contains(&format!("{INJECTED}: delete of")));
    assert_eq!(s["ttls"], serde_json::json!([["fixture", 2], ["long", 3600]]));
    assert_eq!(s["delete_enabled"], true);
    for needle in [
        "repositories        2",
        "tags                1",
        "blobs               5",
        "pending deletes     3",
        "deferred deletes    0",
        "oldest failing delete  sha256:",
        &format!("{INJECTED}: delete of"),
        "storage.delete.enabled = true",
        "ttl of upstream fixture = 2s",
        "ttl of upstream long = 1h",
    ] {
        assert!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }

    // Deletes off and a ttl the second image has outlived: the failed deletes wait as
    // deferred, and the second image's entries are deferred.
    app.restart_with_store(store.as_dyn(), |c| {
        c.storage.delete.enabled = false;
        c.upstream[1].ttl = Some(ttl(1));
    })
    .await;
    wait_until_async("deletes and entries deferred", DEADLINE, || async {
        count(
            &dir,
            "SELECT count(*) FROM pending_deletes WHERE state = 'deferred'",
        ) == 3
            && all_deferred(&dir, (1, 1, 2))
    })
    .await;
    let (json, _) = run_cli(&["status", "--json", "--config", cfg]).await;
    let s: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(s["pending_deletes"]["count"], 0);
    assert_eq!(s["deferred_deletes"]["count"], 3);
    assert_eq!(s["deferred_entries"], 4);
    assert_eq!(s["delete_enabled"], false);
    let (text, _) = run_cli(&["status", "--config", cfg]).await;
    for needle in [
        "deferred deletes    3",
        "deferred entries    4",
        "storage.delete.enabled = false",
        "ttl of upstream long = 1s",
    ] {
        assert!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }
    app.stop().await;
}

// ----- the size bound -------------------------------------------------------------------

/// Stored blob bytes not already queued for deletion (what the size bound counts).
fn stored_bytes(dir: &Path) -> i64 {
    count(
        dir,
        "SELECT coalesce(sum(size_bytes), 0) FROM blobs b
          WHERE NOT EXISTS (SELECT 1 FROM pending_deletes p WHERE p.digest = b.digest)",
    )
}

/// Past `storage.max_size` the least recently used image is evicted (blob, tag and
/// manifest) down to the low watermark; the more recently used ones stay and are served
/// without the upstream. Eviction checks every 10 s.
#[tokio::test]
async fn size_bound_evicts_least_recently_used_down_to_low_watermark() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    // Five single-layer images of ~700 KB: four fit under 3 MiB, five do not.
    let images: Vec<Image> = (0..5)
        .map(|i| Image::new(&format!("lru-{i}"), &[700_000], "2024-01-01T00:00:00Z"))
        .collect();
    for (i, image) in images.iter().enumerate() {
        upstream.add_image(&format!("lru/app{i}"), Some("v1"), image);
    }
    let max: regcache::config::ByteSize = "3MiB".parse().unwrap();
    let low = (max.as_u64() / 100 * 90) as i64;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = ttl(3600);
        c.storage.max_size = Some(max);
    })
    .await;
    let dir = app.data_dir();
    pull_image(&app.client, &app.base, "lru/app0", "v1", &images[0]).await;
    // The rest strictly later (last use has second granularity).
    wait_for_next_second(count(&dir, "SELECT max(last_used_at) FROM blobs")).await;
    for (i, image) in images.iter().enumerate().skip(1) {
        pull_image(&app.client, &app.base, &format!("lru/app{i}"), "v1", image).await;
    }
    let total: i64 = images.iter().flat_map(Image::blobs).map(|b| b.len() as i64).sum();
    assert!(total > max.as_u64() as i64, "the images exceed the bound");

    let oldest = &images[0].layers[0];
    wait_until_async("the least recently used layer is evicted", DEADLINE, || async {
        !blob_path(&dir, &oldest.digest).exists()
            && !has_blob_row(&dir, &oldest.digest)
            && stored_bytes(&dir) <= low
    })
    .await;
    assert_eq!(
        count(
            &dir,
            "SELECT count(*) FROM tags t JOIN repositories r ON r.id = t.repo_id WHERE r.name = 'lru/app0'"
        ),
        0,
        "the evicted image's tag goes with it"
    );
    for image in &images[1..] {
        assert!(
            blob_path(&dir, &image.layers[0].digest).exists(),
            "more recently used layers stay"
        );
    }
    upstream.reset_log();
    for (i, image) in images.iter().enumerate().skip(1) {
        pull_image(&app.client, &app.base, &format!("lru/app{i}"), "v1", image).await;
    }
    assert_eq!(
        upstream.requests(Method::GET, "/blobs/"),
        0,
        "recently used images served from the store"
    );
    pull_image(&app.client, &app.base, "lru/app0", "v1", &images[0]).await;
    assert_eq!(
        upstream.blob_gets(&oldest.digest),
        1,
        "the evicted layer is refetched"
    );
}

/// A blob being streamed to a client is never evicted, even when it is the least
/// recently used: a client holds a response of a large stored blob open without reading
/// (32 MiB: far more than the pinned receive buffer and the server's send buffer hold)
/// while newer images push the store over the bound; newer blobs are evicted instead, and
/// the held stream completes intact.
#[tokio::test]
async fn blob_being_served_is_not_evicted() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let big = Image::new("held", &[32 << 20], "2024-01-01T00:00:00Z");
    let fillers: Vec<Image> = (0..5)
        .map(|i| Image::new(&format!("filler-{i}"), &[2 << 20], "2024-01-01T00:00:00Z"))
        .collect();
    upstream.add_image("big/app", Some("v1"), &big);
    for (i, image) in fillers.iter().enumerate() {
        upstream.add_image(&format!("fill/app{i}"), Some("v1"), image);
    }
    let max: regcache::config::ByteSize = "40MiB".parse().unwrap();
    let low = (max.as_u64() / 100 * 90) as i64;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = ttl(3600);
        c.storage.max_size = Some(max);
    })
    .await;
    let dir = app.data_dir();
    pull_image(&app.client, &app.base, "big/app", "v1", &big).await;
    let layer = &big.layers[0];

    // A cache hit, held open: headers received, body not read.
    let held = HeldResponse::get(&app.base, &format!("/v2/big/app/blobs/{}", layer.digest)).await;
    assert_eq!(held.status, 200);
    let held_at = now_secs();
    // Newer content, strictly later than the held blob's use, over the bound.
    wait_for_next_second(held_at).await;
    for (i, image) in fillers.iter().enumerate() {
        pull_image(&app.client, &app.base, &format!("fill/app{i}"), "v1", image).await;
    }
    wait_until_async(
        "eviction brings the store under the low watermark and its deletes finish",
        DEADLINE,
        || async { stored_bytes(&dir) <= low && count(&dir, "SELECT count(*) FROM pending_deletes") == 0 },
    )
    .await;
    assert!(
        has_blob_row(&dir, &layer.digest) && blob_path(&dir, &layer.digest).exists(),
        "the blob being served was evicted"
    );
    assert!(
        fillers.iter().any(|f| !has_blob_row(&dir, &f.layers[0].digest)),
        "other blobs were evicted instead"
    );
    let body = held.body().await;
    assert_eq!(sha256_digest(&body), layer.digest, "held stream intact");
}
