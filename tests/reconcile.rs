//! Reconciliation (I2): `regcache fsck` beside a running server, and the server's own
//! start-up pass. An object with no row (a crash leftover) is deleted through the
//! pipeline, a row whose object is missing is repaired so the next pull refetches, stale
//! temporary files go, and `--verify` quarantines a blob whose bytes no longer match its
//! digest. `--dry-run` reports the same findings and changes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::app::TestApp;
use common::data_dir::blob_path;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{sha256_digest, Blob, Image};
use common::wait_until_async;
use regcache::config::Duration as CfgDuration;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

async fn pull(app: &TestApp, repo: &str, reference: &str, image: &Image) {
    app.pull(repo, reference, image).await;
}

fn quarantine_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("store/quarantine/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Writes `blob` where the filesystem store keeps it, with no row: a crash leftover.
fn plant_orphan(dir: &Path, blob: &Blob) {
    let path = blob_path(dir, &blob.digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &blob.bytes).unwrap();
}

/// A temporary download file, last modified `age` ago.
fn plant_temp(dir: &Path, name: &str, age: Duration) -> PathBuf {
    let path = dir.join("tmp").join(name);
    std::fs::write(&path, b"partial download").unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
    path
}

/// (blob rows, repository links) of `digest`.
fn rows_of(app: &TestApp, digest: &str) -> (i64, i64) {
    let q = |table: &str| -> i64 {
        app.db()
            .query_row(
                &format!("SELECT count(*) FROM {table} WHERE digest = ?1"),
                [digest],
                |r| r.get(0),
            )
            .unwrap()
    };
    (q("blobs"), q("repo_blobs"))
}

fn write_cli_config(dir: &Path) -> PathBuf {
    let path = dir.join("fsck.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\ndata_dir = {:?}\n\n[storage]\nreconcile_grace = \"0\"\n",
            dir.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// Runs the regcache binary (empty environment); returns stdout, panicking on failure.
async fn regcache(args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
        .env_clear()
        .output()
        .await
        .expect("run regcache");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "regcache {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn fsck_json(config: &Path, flags: &[&str]) -> Value {
    let mut args = vec!["fsck", "--json", "--config", config.to_str().unwrap()];
    args.extend_from_slice(flags);
    let out = regcache(&args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("fsck --json printed no JSON ({e}): {out}"))
}

/// Asserts the named numeric fields of an fsck report.
fn assert_report(report: &Value, expected: &[(&str, i64)]) {
    for (key, value) in expected {
        assert_eq!(report[*key], *value, "{key} in {report:#}");
    }
}

/// `fsck --dry-run` finds one orphan object, one row without its object and one stale
/// temporary file and changes nothing; `fsck` then deletes the orphan through the
/// pipeline, repairs the row (the next pull refetches the blob: one more upstream GET)
/// and removes the stale file, leaving a young temporary file alone.
#[tokio::test]
async fn fsck_reports_on_dry_run_then_deletes_orphans_and_repairs_rows() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("fsck", &[3000, 5000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let dir = app.data_dir();
    pull(&app, "team/app", "v1", &image).await;

    let orphan = Blob::random("fsck-orphan", 4096);
    plant_orphan(&dir, &orphan);
    let missing = &image.layers[1];
    std::fs::remove_file(blob_path(&dir, &missing.digest)).unwrap();
    let stale = plant_temp(&dir, "stale.part", Duration::from_secs(2 * 3600));
    let young = plant_temp(&dir, "young.part", Duration::ZERO);
    let config = write_cli_config(&dir);

    let text = regcache(&["fsck", "--dry-run", "--config", config.to_str().unwrap()]).await;
    for needle in [
        "orphan objects           1",
        "would be queued for deletion",
        "rows without object      1; 1 would be repaired",
        "temporary files          1 stale; 1 would be removed",
    ] {
        assert!(text.contains(needle), "fsck --dry-run lacks {needle:?}:\n{text}");
    }
    let dry = fsck_json(&config, &["--dry-run"]).await;
    assert_eq!(dry["dry_run"], true);
    assert_report(
        &dry,
        &[
            ("objects_scanned", 3),
            ("rows_scanned", 3),
            ("orphan_objects", 1),
            ("orphan_bytes", 4096),
            ("orphans_queued", 0),
            ("missing_objects", 1),
            ("rows_repaired", 0),
            ("temp_files_stale", 1),
            ("temp_files_removed", 0),
            ("blobs_deleted", 0),
        ],
    );
    assert!(
        blob_path(&dir, &orphan.digest).exists(),
        "dry run deletes nothing"
    );
    assert_eq!(rows_of(&app, &missing.digest), (1, 1), "dry run repairs nothing");
    assert!(stale.exists() && young.exists());
    assert_eq!(app.count("SELECT count(*) FROM pending_deletes"), 0);

    let report = fsck_json(&config, &[]).await;
    assert_eq!(report["dry_run"], false);
    assert_report(
        &report,
        &[
            ("orphan_objects", 1),
            ("orphans_queued", 1),
            ("blobs_deleted", 1),
            ("deletes_failed", 0),
            ("missing_objects", 1),
            ("rows_repaired", 1),
            ("temp_files_stale", 1),
            ("temp_files_removed", 1),
        ],
    );
    assert!(!blob_path(&dir, &orphan.digest).exists(), "orphan deleted");
    assert_eq!(app.count("SELECT count(*) FROM pending_deletes"), 0);
    assert_eq!(rows_of(&app, &missing.digest), (0, 0), "row repaired");
    assert!(!stale.exists(), "stale temporary file removed");
    assert!(young.exists(), "a young temporary file may be a live transfer's");
    for blob in [&image.config, &image.layers[0]] {
        assert_eq!(rows_of(&app, &blob.digest), (1, 1), "healthy blobs untouched");
        assert!(blob_path(&dir, &blob.digest).exists());
    }

    upstream.reset_log();
    pull(&app, "team/app", "v1", &image).await;
    assert_eq!(
        upstream.blob_gets(&missing.digest),
        1,
        "the repaired blob is refetched"
    );
    assert_eq!(upstream.blob_gets(&image.config.digest), 0);
    assert_eq!(upstream.blob_gets(&image.layers[0].digest), 0);
    assert!(blob_path(&dir, &missing.digest).exists());
    assert_eq!(rows_of(&app, &missing.digest), (1, 1));

    let clean = fsck_json(&config, &[]).await;
    assert_report(
        &clean,
        &[
            ("objects_scanned", 3),
            ("orphan_objects", 0),
            ("missing_objects", 0),
            ("temp_files_removed", 0),
            ("blobs_deleted", 0),
        ],
    );
}

/// A blob whose delete is in flight (claimed by a worker, object already unlinked, rows
/// not yet finished) is not "missing": fsck leaves it to the worker, neither counting nor
/// "repairing" it, and the claim survives. Repairing it dropped the claim, so a refetch
/// could write the object again just before the worker's unlink removed it.
#[tokio::test]
async fn fsck_leaves_a_blob_whose_delete_is_in_flight_to_its_worker() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("fsck-in-flight", &[3000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let dir = app.data_dir();
    pull(&app, "team/app", "v1", &image).await;
    let going = &image.layers[0];
    // What a deletion worker leaves between its unlink and its finishing transaction.
    rusqlite::Connection::open(dir.join("regcache.db"))
        .unwrap()
        .execute(
            "INSERT INTO pending_deletes (digest, size_bytes, reason, state, next_attempt_at, lease_until, created_at)
             VALUES (?1, 3000, 'expired', 'deleting', 0, unixepoch() + 3600, unixepoch())",
            [&going.digest],
        )
        .unwrap();
    std::fs::remove_file(blob_path(&dir, &going.digest)).unwrap();
    let config = write_cli_config(&dir);

    let report = fsck_json(&config, &[]).await;
    assert_report(&report, &[("missing_objects", 0), ("rows_repaired", 0)]);
    let state: String = app
        .db()
        .query_row(
            "SELECT state FROM pending_deletes WHERE digest = ?1",
            [&going.digest],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(state, "deleting", "the worker's claim is kept");
    assert_eq!(rows_of(&app, &going.digest).0, 1, "the worker finishes the row");
}

/// `fsck --verify` re-hashes stored blobs: one overwritten with same-length garbage is
/// reported (dry run: only reported), then quarantined under `store/quarantine/sha256/`
/// with its row gone; the next pull refetches it.
#[tokio::test]
async fn fsck_verify_quarantines_a_corrupt_blob() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("verify", &[3000, 5000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let dir = app.data_dir();
    pull(&app, "team/app", "v1", &image).await;
    let config = write_cli_config(&dir);

    let bad = &image.layers[0];
    let garbage = vec![0x5a_u8; bad.len()];
    std::fs::write(blob_path(&dir, &bad.digest), &garbage).unwrap();

    let dry = fsck_json(&config, &["--verify", "--dry-run"]).await;
    assert_report(
        &dry,
        &[
            ("blobs_verified", 3),
            ("blobs_corrupt", 1),
            ("blobs_quarantined", 0),
            ("orphan_objects", 0),
            ("missing_objects", 0),
        ],
    );
    assert!(blob_path(&dir, &bad.digest).exists());
    assert!(!quarantine_path(&dir, &bad.digest).exists());
    assert_eq!(rows_of(&app, &bad.digest), (1, 1));

    let report = fsck_json(&config, &["--verify"]).await;
    assert_report(
        &report,
        &[
            ("blobs_verified", 3),
            ("blobs_corrupt", 1),
            ("blobs_quarantined", 1),
        ],
    );
    assert!(!blob_path(&dir, &bad.digest).exists(), "moved out of the store");
    assert_eq!(
        std::fs::read(quarantine_path(&dir, &bad.digest)).expect("quarantined copy"),
        garbage
    );
    assert_eq!(rows_of(&app, &bad.digest), (0, 0), "row gone");

    upstream.reset_log();
    pull(&app, "team/app", "v1", &image).await;
    assert_eq!(upstream.blob_gets(&bad.digest), 1, "refetched");
    let stored = std::fs::read(blob_path(&dir, &bad.digest)).unwrap();
    assert_eq!(sha256_digest(&stored), bad.digest, "stored intact again");

    let clean = fsck_json(&config, &["--verify"]).await;
    assert_report(&clean, &[("blobs_verified", 3), ("blobs_corrupt", 0)]);
}

/// The server reconciles at start-up by itself: with deletes off the orphan's delete is
/// queued as deferred (and the object kept), the row without object is repaired at once;
/// after a restart with deletes on, the orphan is deleted. Temporary files left by the
/// previous process are gone.
#[tokio::test]
async fn startup_reconciliation_repairs_storage_and_metadata() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("startup-fsck", &[3000, 5000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let mut app = TestApp::start(&upstream.url()).await;
    let dir = app.data_dir();
    pull(&app, "team/app", "v1", &image).await;

    let orphan = Blob::random("startup-orphan", 2048);
    plant_orphan(&dir, &orphan);
    let missing = &image.layers[0];
    std::fs::remove_file(blob_path(&dir, &missing.digest)).unwrap();
    let leftover = plant_temp(&dir, "leftover.part", Duration::ZERO);

    app.restart_with(|c| {
        c.storage.reconcile_grace = CfgDuration::ZERO;
        c.storage.delete.enabled = false;
    })
    .await;
    assert!(!leftover.exists(), "start-up empties the temporary directory");
    let orphan_state = format!(
        "SELECT count(*) FROM pending_deletes WHERE digest = '{}' AND state = 'deferred' AND reason = 'orphan'",
        orphan.digest
    );
    wait_until_async("start-up reconciliation ran", DEADLINE, || async {
        app.count(&orphan_state) == 1 && rows_of(&app, &missing.digest) == (0, 0)
    })
    .await;
    assert!(
        blob_path(&dir, &orphan.digest).exists(),
        "deletes off: the orphan waits"
    );

    app.restart_with(|c| c.storage.delete.enabled = true).await;
    wait_until_async("the deferred orphan delete ran", DEADLINE, || async {
        !blob_path(&dir, &orphan.digest).exists() && app.count("SELECT count(*) FROM pending_deletes") == 0
    })
    .await;

    upstream.reset_log();
    pull(&app, "team/app", "v1", &image).await;
    assert_eq!(
        upstream.blob_gets(&missing.digest),
        1,
        "the repaired blob is refetched"
    );
    assert_eq!(upstream.blob_gets(&image.config.digest), 0);
    assert_eq!(upstream.blob_gets(&image.layers[1].digest), 0);
    assert!(blob_path(&dir, &missing.digest).exists());
}

/// `regcache fsck` follows the delete switch the server applied (recorded in SQLite), not
/// its own config: with the server's deletes on, an fsck whose file says "off" still
/// deletes; with the server's deletes off, an fsck whose file says "on" only defers, and
/// the server collects the deferred delete once it starts with deletes on.
#[tokio::test]
async fn fsck_follows_the_applied_delete_switch_not_its_own_config() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let mut app = TestApp::start(&upstream.url()).await;
    let dir = app.data_dir();
    let fsck_config = |name: &str, enabled: bool| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "[server]\ndata_dir = {:?}\n\n[storage]\nreconcile_grace = \"0\"\n\n[storage.delete]\nenabled = {enabled}\n",
                dir.display().to_string()
            ),
        )
        .unwrap();
        path
    };

    // The server applied deletes = on; fsck's own "off" does not matter.
    let first = Blob::random("fsck-applied-on", 1024);
    plant_orphan(&dir, &first);
    let report = fsck_json(&fsck_config("off.toml", false), &[]).await;
    assert_report(
        &report,
        &[("orphan_objects", 1), ("orphans_queued", 1), ("blobs_deleted", 1)],
    );
    assert!(
        !blob_path(&dir, &first.digest).exists(),
        "deleted under the applied switch"
    );

    // The server applied deletes = off; fsck's own "on" only defers.
    app.restart_with(|c| c.storage.delete.enabled = false).await;
    let second = Blob::random("fsck-applied-off", 1024);
    plant_orphan(&dir, &second);
    let report = fsck_json(&fsck_config("on.toml", true), &[]).await;
    assert_report(
        &report,
        &[("orphan_objects", 1), ("orphans_queued", 1), ("blobs_deleted", 0)],
    );
    assert!(
        blob_path(&dir, &second.digest).exists(),
        "nothing deleted while the server's deletes are off"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM pending_deletes WHERE state = 'deferred'"),
        1
    );

    app.restart_with(|c| c.storage.delete.enabled = true).await;
    wait_until_async("the server runs the deferred delete", DEADLINE, || async {
        !blob_path(&dir, &second.digest).exists() && app.count("SELECT count(*) FROM pending_deletes") == 0
    })
    .await;
}
