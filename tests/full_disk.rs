//! A full disk (I10): the data dir is a small tmpfs the test fills. Blobs are passed
//! through, verified, to every client already waiting on the one upstream transfer, and
//! manifests served, without caching anything or leaving a temporary file; `status` says
//! the disk is full; last-used times and jobs wait for space instead of being lost; and
//! caching resumes by itself once space is freed. (`e2e_full_disk.rs` pulls with skopeo
//! from docker-registry through the binary on a full disk and checks the log.)

mod common;

use common::app::{config_for, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{sha256_digest, Image};
use common::tmpfs::Tmpfs;
use common::wait_until_async;
use regcache::config::{Config, Duration as CfgDuration, Secret};
use reqwest::header::AUTHORIZATION;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Waits here include the 5 s tick that notices space is back, on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;
const TOKEN: &str = "admin-token-for-full-disk-tests-0123";

async fn start_on(disk: &Tmpfs, upstream: &FixtureUpstream, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = config_for(&[("fixture", &upstream.url())], disk.path());
    tweak(&mut config);
    TestApp::start_config(config, None).await
}

/// `regcache status --json` on the data dir, as an operator runs it beside the server.
async fn status(data_dir: &Path) -> Value {
    let config = data_dir.join("..").join("status.toml");
    std::fs::write(
        &config,
        format!("[server]\ndata_dir = {:?}\n", data_dir.display().to_string()),
    )
    .unwrap();
    let out = common::binary::run_ok_async(&["status", "--json", "--config", config.to_str().unwrap()]).await;
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

async fn disk_full(data_dir: &Path) -> bool {
    status(data_dir).await["disk"]["full"] == Value::Bool(true)
}

fn tmp_files(app: &TestApp) -> usize {
    app.tmp_files()
}

fn assert_nothing_cached(app: &TestApp) {
    for table in ["blobs", "repo_blobs", "manifests", "tags", "write_intents"] {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM {table}")),
            0,
            "nothing is recorded in {table}"
        );
    }
    assert!(app.stored_blob_files().is_empty(), "no blob is stored");
    assert_eq!(tmp_files(app), 0, "no temporary file is left");
}

/// The disk fills while one upstream transfer is under way with three clients waiting
/// (one for a range): each gets its complete bytes from that one transfer, nothing is
/// cached, no file is left, the server keeps serving, and once space is freed the next
/// request caches the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filling_up_mid_transfer_passes_the_blob_through_to_every_waiting_client() {
    let disk = Tmpfs::mount(32 * MIB as u64);
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("fills-up", &[12 * MIB], "2024-01-01T00:00:00Z");
    let small = Image::new("small", &[64 * 1024], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    upstream.add_image("s", Some("t"), &small);
    let layer = image.layers[0].clone();
    // About 1.5 s for the whole body: time to fill the disk while it is under way.
    upstream.slow_blob(&layer.digest, 256 * 1024, Duration::from_millis(30));
    let app = std::sync::Arc::new(start_on(&disk, &upstream, |_| {}).await);
    let path = format!("/v2/r/blobs/{}", layer.digest);

    // Every client has its answer's headers, so each is following the one transfer.
    let (first, second, ranged) = tokio::join!(
        app.get(&path),
        app.get(&path),
        app.get_range(&path, "bytes=100-199")
    );
    assert_eq!(ranged.status(), 206);
    let clients: Vec<_> = [first, second]
        .into_iter()
        .map(|resp| tokio::spawn(ok_bytes(resp)))
        .collect();
    let ranged = tokio::spawn(ok_bytes(ranged));
    wait_until_async("the transfer is writing its temporary file", DEADLINE, || async {
        app.largest_tmp_file() >= MIB as u64
    })
    .await;
    disk.fill("filler");

    for client in clients {
        let body = client.await.unwrap();
        assert_eq!(sha256_digest(&body), layer.digest, "complete, verified bytes");
    }
    assert_eq!(ranged.await.unwrap(), layer.bytes.slice(100..200));
    assert_eq!(
        upstream.blob_gets(&layer.digest),
        1,
        "one upstream transfer for all"
    );
    wait_until_async("the temporary file is gone", DEADLINE, || async {
        tmp_files(&app) == 0
    })
    .await;
    assert_nothing_cached(&app);
    assert!(disk_full(&app.data_dir()).await, "status says the disk is full");
    let recorded = status(&app.data_dir()).await;
    assert!(recorded["disk"]["full_since"].is_i64(), "{recorded}");
    // Still serving. (The temporary file's space was freed, so small content may even
    // be cached again.)
    app.pull("s", "t", &small).await;

    disk.free("filler");
    wait_until_async("status sees space again", DEADLINE, || async {
        !disk_full(&app.data_dir()).await
    })
    .await;
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes);
    let data_dir = app.data_dir();
    wait_until_async("the blob is cached now", DEADLINE, || async {
        common::data_dir::blob_rows(&data_dir).contains(&layer.digest)
    })
    .await;
    assert!(common::data_dir::blob_path(&data_dir, &layer.digest).is_file());
    assert_eq!(upstream.blob_gets(&layer.digest), 2);
}

/// With the disk full before the pull, an image (manifest by tag, config, layers) is
/// served whole and nothing is cached; every pull goes upstream until space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_disk_full_an_image_is_served_and_nothing_is_cached() {
    let disk = Tmpfs::mount(16 * MIB as u64);
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("full", &[MIB, 300_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let app = start_on(&disk, &upstream, |_| {}).await;
    disk.fill("filler");

    app.pull("r", "t", &image).await;
    app.pull("r", "t", &image).await;
    assert_eq!(upstream.manifest_gets("r", "t"), 2, "the manifest was not cached");
    assert_eq!(upstream.blob_gets(&image.layers[0].digest), 2);
    assert_nothing_cached(&app);
    let s = status(&app.data_dir()).await;
    assert_eq!(s["disk"]["full"], Value::Bool(true), "{s}");

    disk.free("filler");
    wait_until_async("status sees space again", DEADLINE, || async {
        !disk_full(&app.data_dir()).await
    })
    .await;
    app.pull("r", "t", &image).await;
    wait_until_async("the image is cached now", DEADLINE, || async {
        app.count("SELECT count(*) FROM blobs") == 3 && app.count("SELECT count(*) FROM manifests") == 1
    })
    .await;
    upstream.reset_log();
    app.pull("r", "t", &image).await;
    assert_eq!(
        upstream.blob_gets(&image.layers[0].digest),
        0,
        "served from the cache"
    );
}

/// Passing through does not skip verification: a corrupt or truncated body still never
/// reaches a client whole, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_through_bytes_are_verified_before_the_last_one() {
    let disk = Tmpfs::mount(16 * MIB as u64);
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("verify", &[2 * MIB, 2 * MIB], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let (corrupt, truncated) = (&image.layers[0], &image.layers[1]);
    upstream.corrupt_blob(&corrupt.digest);
    upstream.truncate_blob(&truncated.digest, MIB);
    let app = start_on(&disk, &upstream, |_| {}).await;
    disk.fill("filler");

    for blob in [corrupt, truncated] {
        let resp = app.get(&format!("/v2/r/blobs/{}", blob.digest)).await;
        let status = resp.status().as_u16();
        let body = resp.bytes().await;
        if status == 200 {
            assert!(body.is_err(), "a body that failed verification breaks off");
        } else {
            assert!(body.is_ok_and(|b| b != blob.bytes));
        }
    }
    assert_nothing_cached(&app);
}

/// Uses recorded while the disk is full are kept through failing flushes and written once
/// space is back: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_used_times_wait_for_space_instead_of_being_lost() {
    let disk = Tmpfs::mount(16 * MIB as u64);
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("used", &[100_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let mut app = start_on(&disk, &upstream, |_| {}).await;
    app.pull("r", "t", &image).await;
    // A restart flushes what the pull recorded: the buffer starts empty.
    app.restart_with(|_| {}).await;
    let last_used = |app: &TestApp| app.count("SELECT max(last_used_at) FROM repo_blobs");
    let before = last_used(&app);
    let later = before + 2;
    wait_until_async("a later second", DEADLINE, || async { now_secs() >= later }).await;

    disk.fill("filler");
    let layer = &image.layers[0];
    assert_eq!(
        ok_bytes(app.get(&format!("/v2/r/blobs/{}", layer.digest)).await).await,
        layer.bytes
    );
    // The hit wrote nothing; only the flush of its use can make the server record it.
    wait_until_async("a flush fails for lack of space", DEADLINE, || async {
        status(&app.data_dir()).await["disk"]["full_since"].is_i64()
    })
    .await;
    assert_eq!(last_used(&app), before, "nothing could be written");

    disk.free("filler");
    wait_until_async("the kept use is written", DEADLINE, || async {
        last_used(&app) >= later
    })
    .await;
}

/// A purge that meets a full disk errors, is retried with backoff while the disk stays
/// full, and succeeds once space is freed: nothing it was asked to do is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_meeting_a_full_disk_is_retried_and_completes_once_space_is_freed() {
    let disk = Tmpfs::mount(16 * MIB as u64);
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let images: Vec<Image> = (0..40)
        .map(|i| Image::new(&format!("job-{i}"), &[1000], "2024-01-01T00:00:00Z"))
        .collect();
    for (i, image) in images.iter().enumerate() {
        upstream.add_image(&format!("r{i}"), Some("t"), image);
    }
    let mut app = start_on(&disk, &upstream, |c| {
        c.admin.token = Some(Secret::new(TOKEN));
        c.jobs.retry_initial = CfgDuration::from_secs(1);
        c.jobs.retry_max = CfgDuration::from_secs(2);
        c.jobs.max_attempts = 100;
        // A run whose outcome cannot be recorded either (SQLite's log cannot grow) is
        // handed out again once its lease lapses.
        c.jobs.stale_after = CfgDuration::from_secs(3);
        c.jobs.sweep_interval = CfgDuration::from_secs(1);
    })
    .await;
    for (i, image) in images.iter().enumerate() {
        app.pull(&format!("r{i}"), "t", image).await;
    }
    app.restart_with(|_| {}).await;
    // Room for queueing the job (a few pages of SQLite's log), not for the purge.
    disk.fill("filler");
    disk.shrink("filler", 48 * 1024);

    let resp = app
        .client
        .delete(app.url("/api/v1/cache"))
        .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["job"].as_i64().unwrap();
    let job = |app: &TestApp| {
        app.db()
            .query_row(
                "SELECT state, attempts, coalesce(last_error, '') FROM jobs WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .unwrap()
    };
    wait_until_async("the job has met the full disk and said so", DEADLINE, || async {
        let (_, attempts, error) = job(&app);
        attempts >= 1 && error.contains("full")
    })
    .await;
    let (state, _, error) = job(&app);
    assert_ne!(state, "failed");
    assert!(error.contains("full"), "the job's error says why: {error}");
    assert_eq!(
        app.count("SELECT count(*) FROM manifests"),
        40,
        "nothing half done"
    );

    disk.free("filler");
    wait_until_async("the job succeeds", DEADLINE, || async {
        job(&app).0 == "succeeded"
    })
    .await;
    wait_until_async("everything was purged", DEADLINE, || async {
        common::data_dir::leftovers(&app.data_dir()).is_empty()
    })
    .await;
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
