//! Issue 3's expiry with real parts: the CNCF registry (`docker-registry`) as the
//! upstream, seeded by `skopeo`, and `skopeo` pulling through regcache.
//! - The distribution 4249 scenario: with deletes off, an expired image is deferred, not
//!   forgotten, and still served with the upstream gone; once regcache restarts with
//!   deletes on, everything is collected at switch time + ttl: store empty, no rows left.
//! - Shared blobs: a layer two repositories share outlives the first one's expiry.
//! - Rescue: blobs whose deletes are pending (failed, kept, deferred) are pulled again by
//!   skopeo and served from the store, their deletes cancelled.
//! - ttl changes (I6): `0 -> T` on a cache full of entries schedules every one at restart
//!   time + T and collects all of it; `T -> 0` clears every due time and collects nothing.
//!
//! `tests/expiry.rs` runs these and their variations against the in-process fixture
//! upstream, faster and with failures injected.

mod common;

use common::app::{config_for, TestApp};
use common::data_dir::{all_deferred, blob_files, blob_path, count, entries, leftovers};
use common::external::{push_image, skopeo_pull, DockerRegistry};
use common::failing_store::FailingStore;
use common::images::Image;
use common::wait_until_async;
use regcache::config::Duration as CfgDuration;
use regcache::metadata::now_secs;
use std::path::Path;
use std::time::Duration;

/// Short, so the test waits seconds; the scheduler polls every second.
const TTL: i64 = 2;
/// Deadline of every wait for the scheduler (ttl + poll + use flush + a busy machine).
const DEADLINE: Duration = Duration::from_secs(30);

/// regcache in front of `registry` with `ttl`, deletes on or off.
async fn start(registry: &DockerRegistry, ttl: i64, deletes: bool) -> TestApp {
    let data = tempfile::tempdir().unwrap();
    let mut config = config_for(&[("cncf", &registry.url())], data.path());
    config.storage.delete.enabled = deletes;
    config.proxy.ttl = CfgDuration::from_secs(ttl as u64);
    TestApp::start_config(config, Some(data)).await
}

#[tokio::test]
async fn deferred_entries_are_served_then_collected_at_switch_time_plus_ttl() {
    let registry = DockerRegistry::start().await;
    let image = Image::new("e2e-4249", &[3000, 50_000], "2024-02-03T04:05:06Z");
    let work = tempfile::tempdir().unwrap();
    push_image(&registry, work.path(), "test/app", &image).await;
    let mut app = start(&registry, TTL, false).await;
    let dir = app.data_dir();

    skopeo_pull(&app.base, "test/app", &image, &work.path().join("first")).await;
    assert_eq!(blob_files(&dir).len(), 3, "config and two layers stored");

    wait_until_async("every entry is deferred", DEADLINE, || async {
        all_deferred(&dir, (1, 1, 3))
    })
    .await;
    assert_eq!(count(&dir, "SELECT count(*) FROM pending_deletes"), 0);
    assert_eq!(blob_files(&dir).len(), 3, "deletes off: nothing removed");

    // Deferred content is still served, with the upstream gone.
    drop(registry);
    let used_at = now_secs();
    skopeo_pull(&app.base, "test/app", &image, &work.path().join("offline")).await;
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

/// Two repositories share a layer. The first one's expiry takes its own blobs and keeps
/// the shared layer (file and row, never queued), which the second serves with the
/// registry gone; the second one's expiry then empties the store.
#[tokio::test]
async fn a_shared_layer_outlives_one_repositorys_expiry() {
    // B is pulled 5 s after A: A's expiry is checked and B pulled again offline well
    // before B falls due, even on a busy machine.
    const SHARED_TTL: i64 = 8;
    const GAP: i64 = 5;
    let registry = DockerRegistry::start().await;
    // Same seed, same first layer size: the first layer is byte-identical.
    let a = Image::new("e2e-shared", &[20_000, 7000], "2024-01-01T00:00:00Z");
    let b = Image::new("e2e-shared", &[20_000], "2024-06-01T00:00:00Z");
    let shared = b.layers[0].digest.clone();
    assert_eq!(a.layers[0].digest, shared);
    let work = tempfile::tempdir().unwrap();
    push_image(&registry, work.path(), "team/a", &a).await;
    push_image(&registry, work.path(), "team/b", &b).await;
    let app = start(&registry, SHARED_TTL, true).await;
    let dir = app.data_dir();

    skopeo_pull(&app.base, "team/a", &a, &work.path().join("a")).await;
    let pulled_a = now_secs();
    wait_until_async("the gap after A's pull", DEADLINE, || async {
        now_secs() >= pulled_a + GAP
    })
    .await;
    skopeo_pull(&app.base, "team/b", &b, &work.path().join("b")).await;
    assert_eq!(blob_files(&dir).len(), 4, "A's config and layers, B's config");

    let rows = |digest: &str, table: &str| {
        count(
            &dir,
            &format!("SELECT count(*) FROM {table} WHERE digest = '{digest}'"),
        )
    };
    let a_only = [a.config.digest.as_str(), a.layers[1].digest.as_str()];
    wait_until_async("A's own blobs are collected", DEADLINE, || async {
        a_only
            .iter()
            .all(|d| !blob_path(&dir, d).exists() && rows(d, "blobs") == 0)
    })
    .await;
    assert!(blob_path(&dir, &shared).exists(), "shared layer file kept");
    assert_eq!(rows(&shared, "blobs"), 1, "shared layer row kept");
    assert_eq!(rows(&shared, "pending_deletes"), 0, "shared layer never queued");

    drop(registry);
    skopeo_pull(&app.base, "team/b", &b, &work.path().join("b-offline")).await;

    wait_until_async("B expires and the store is empty", DEADLINE, || async {
        leftovers(&dir).is_empty()
    })
    .await;
}

/// (expires_at, deferred) of every entry, as a check that all of them fit `ok`.
fn every_entry(dir: &Path, what: &str, ok: impl Fn(Option<i64>) -> bool) {
    let rows = entries(dir);
    assert_eq!(
        rows.len(),
        2 * 5,
        "two images: tag, manifest link, 3 blob links each"
    );
    for (table, expires, _, deferred) in rows {
        assert!(!deferred, "{table}: deferred");
        assert!(ok(expires), "{table}: due at {expires:?}, expected {what}");
    }
}

/// Two images seeded into a fresh registry as `team/a:v1` and `team/b:v1` (`name` makes
/// them unique), then pulled through a fresh regcache with `ttl`.
async fn two_images_cached(
    name: &str,
    ttl: i64,
) -> (
    DockerRegistry,
    tempfile::TempDir,
    [(&'static str, Image); 2],
    TestApp,
) {
    let registry = DockerRegistry::start().await;
    let images = [
        (
            "team/a",
            Image::new(&format!("{name}-a"), &[4000, 9000], "2024-03-01T00:00:00Z"),
        ),
        (
            "team/b",
            Image::new(&format!("{name}-b"), &[5000, 6000], "2024-03-02T00:00:00Z"),
        ),
    ];
    let work = tempfile::tempdir().unwrap();
    for (repo, image) in &images {
        push_image(&registry, work.path(), repo, image).await;
    }
    let app = start(&registry, ttl, true).await;
    for (repo, image) in &images {
        skopeo_pull(&app.base, repo, image, &work.path().join(repo.replace('/', "-"))).await;
    }
    (registry, work, images, app)
}

/// Two images cached with ttl 0 (never expire); regcache restarts with ttl T: every entry
/// is due at restart time + T, nothing goes before, and then everything does.
#[tokio::test]
async fn ttl_zero_to_t_collects_every_cached_entry_after_t() {
    const T: i64 = 4;
    let (_registry, _work, _images, mut app) = two_images_cached("e2e-ttl-up", 0).await;
    let dir = app.data_dir();
    every_entry(&dir, "never (ttl 0)", |e| e.is_none());

    let switch_from = now_secs();
    app.restart_with(|c| c.proxy.ttl = CfgDuration::from_secs(T as u64))
        .await;
    let switch_to = now_secs();
    let due = switch_from + T..=switch_to + T;
    every_entry(&dir, &format!("restart time + ttl, {due:?}"), |e| {
        e.is_some_and(|e| due.contains(&e))
    });
    assert_eq!(blob_files(&dir).len(), 6, "nothing goes before it is due");

    wait_until_async(
        "the store and every content table are empty",
        DEADLINE,
        || async { leftovers(&dir).is_empty() },
    )
    .await;
    assert!(
        now_secs() >= switch_from + T,
        "collected before restart time + ttl"
    );
}

/// Two images cached with ttl T; regcache restarts with ttl 0 before they are due: every due
/// time is cleared, and well past T (several scheduler passes) everything is still stored
/// and served with the registry gone.
#[tokio::test]
async fn ttl_t_to_zero_clears_due_times_and_collects_nothing() {
    const T: i64 = 6;
    let (registry, work, images, mut app) = two_images_cached("e2e-ttl-down", T).await;
    let dir = app.data_dir();
    let pulled = now_secs();
    every_entry(&dir, "a due time", |e| e.is_some());

    app.restart_with(|c| c.proxy.ttl = CfgDuration::from_secs(0))
        .await;
    assert!(
        now_secs() < pulled + T,
        "the restart outlasted the ttl; the test proves nothing"
    );
    every_entry(&dir, "never (ttl 0)", |e| e.is_none());

    // Past the old due time, by more than the scheduler's 1 s poll a few times over.
    wait_until_async("the old due time has long passed", DEADLINE, || async {
        now_secs() >= pulled + T + 3
    })
    .await;
    assert_eq!(blob_files(&dir).len(), 6, "nothing collected");
    assert_eq!(count(&dir, "SELECT count(*) FROM pending_deletes"), 0);
    every_entry(&dir, "never (ttl 0)", |e| e.is_none());

    drop(registry);
    for (repo, image) in &images {
        skopeo_pull(
            &app.base,
            repo,
            image,
            &work.path().join(format!("offline-{}", repo.replace('/', "-"))),
        )
        .await;
    }
}

/// Rescue with real parts around the failure-injecting store: two images are pulled from
/// docker-registry by skopeo and expire while every delete fails, so their blobs' deletes
/// stay pending (failed, kept); regcache restarts with deletes off (they wait as
/// deferred) and skopeo pulls image A again. A's deletes are cancelled and its stored
/// files served as they were (same inodes: not fetched and written again). With deletes
/// back on and the store healed, B, the control, is deleted and A stays.
#[tokio::test]
async fn blobs_pulled_again_while_their_deletes_are_pending_are_rescued() {
    use std::os::unix::fs::MetadataExt;
    let registry = DockerRegistry::start().await;
    let a = Image::new("e2e-rescue-a", &[30_000, 40_000], "2024-05-01T00:00:00Z");
    let b = Image::new("e2e-rescue-b", &[20_000], "2024-05-02T00:00:00Z");
    let work = tempfile::tempdir().unwrap();
    push_image(&registry, work.path(), "team/a", &a).await;
    push_image(&registry, work.path(), "team/b", &b).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = config_for(&[("cncf", &registry.url())], data.path());
    config.proxy.ttl = CfgDuration::from_secs(TTL as u64);
    config.storage.delete.retry_initial = CfgDuration::from_secs(3600);
    config.storage.delete.retry_max = CfgDuration::from_secs(3600);
    let store = FailingStore::on_dir(&config.server.data_dir.join("store"));
    let mut app = TestApp::start_with_store(config, store.as_dyn(), Some(data)).await;
    let dir = app.data_dir();
    skopeo_pull(&app.base, "team/a", &a, &work.path().join("a")).await;
    skopeo_pull(&app.base, "team/b", &b, &work.path().join("b")).await;
    store.fail_deletes_forever();
    let inodes = |image: &Image| -> Vec<u64> {
        image
            .blobs()
            .map(|blob| {
                std::fs::metadata(blob_path(&dir, &blob.digest))
                    .unwrap_or_else(|e| panic!("{} is stored: {e}", blob.digest))
                    .ino()
            })
            .collect()
    };
    let a_inodes = inodes(&a);

    let all = (a.blobs().count() + b.blobs().count()) as i64;
    wait_until_async("every blob's delete failed and is kept", DEADLINE, || async {
        count(
            &dir,
            "SELECT count(*) FROM pending_deletes WHERE state = 'pending' AND attempts >= 1 AND last_error IS NOT NULL",
        ) == all
    })
    .await;
    assert_eq!(
        blob_files(&dir).len() as i64,
        all,
        "a failed delete removes nothing"
    );

    app.restart_with_store(store.as_dyn(), |c| {
        c.storage.delete.enabled = false;
        c.proxy.ttl = CfgDuration::from_secs(3600);
    })
    .await;
    wait_until_async("the pending deletes wait as deferred", DEADLINE, || async {
        count(
            &dir,
            "SELECT count(*) FROM pending_deletes WHERE state = 'deferred'",
        ) == all
    })
    .await;

    skopeo_pull(&app.base, "team/a", &a, &work.path().join("a-again")).await;
    let pending = |image: &Image| -> i64 {
        image
            .blobs()
            .map(|blob| {
                count(
                    &dir,
                    &format!(
                        "SELECT count(*) FROM pending_deletes WHERE digest = '{}'",
                        blob.digest
                    ),
                )
            })
            .sum()
    };
    assert_eq!(pending(&a), 0, "the pull cancelled A's deletes");
    assert_eq!(pending(&b), b.blobs().count() as i64, "B's deletes still wait");
    assert_eq!(
        inodes(&a),
        a_inodes,
        "A's blobs were served from the store as they were"
    );

    store.heal();
    app.restart_with_store(store.as_dyn(), |c| c.storage.delete.enabled = true)
        .await;
    wait_until_async("B, the control, is deleted", DEADLINE, || async {
        pending(&b) == 0 && b.blobs().all(|blob| !blob_path(&dir, &blob.digest).exists())
    })
    .await;
    assert_eq!(inodes(&a), a_inodes, "A's blobs are still stored");
    assert_eq!(pending(&a), 0);
}
