//! Failing storage (I3, I4): deletes that fail are kept as rows with their error, retried
//! with capped exponential backoff, survive a restart, and finish once storage heals;
//! nothing else is lost. `regcache status` names the oldest failing delete. The same on S3
//! with the S3 server (moto) stopped for a while. A write that fails stores nothing (I2).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::app::{config_for, ok_bytes, TestApp};
use common::binary::{run_ok_async, Regcache};
use common::data_dir::{blob_rows, count, db};
use common::external::{
    push_image, skopeo_copy, skopeo_pull, DockerRegistry, MotoS3, MOTO_ACCESS_KEY, MOTO_REGION,
    MOTO_SECRET_KEY,
};
use common::failing_store::{FailingStore, INJECTED};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{sha256_digest, Image};
use common::wait_until_async;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use regcache::config::{Backend, Config, Duration as CfgDuration, S3Config, Secret};

/// Bound on every wait for background work (expiry, deletes, retries).
const DEADLINE: Duration = Duration::from_secs(30);

/// The store key of a blob, as regcache names it (no prefix).
fn blob_key(digest: &str) -> ObjectPath {
    let hex = digest.trim_start_matches("sha256:");
    ObjectPath::from(format!("blobs/sha256/{}/{hex}", &hex[..2]))
}

async fn pull_image(app: &TestApp, repo: &str, image: &Image) {
    app.pull(repo, "v1", image).await;
}

/// A `pending_deletes` row.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Row {
    digest: String,
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    last_error: Option<String>,
}

fn pending_rows(app: &TestApp) -> Vec<Row> {
    let db = app.db();
    let mut stmt = db
        .prepare("SELECT digest, state, attempts, next_attempt_at, last_error FROM pending_deletes ORDER BY digest")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            Ok(Row {
                digest: r.get(0)?,
                state: r.get(1)?,
                attempts: r.get(2)?,
                next_attempt_at: r.get(3)?,
                last_error: r.get(4)?,
            })
        })
        .expect("query pending_deletes");
    rows.collect::<Result<_, _>>().expect("pending_deletes rows")
}

fn digests_in(app: &TestApp, sql: &str) -> BTreeSet<String> {
    let db = app.db();
    let mut stmt = db.prepare(sql).expect(sql);
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).expect(sql);
    rows.collect::<Result<_, _>>().expect(sql)
}

fn unix_secs(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs()).expect("fits")
}

fn keys_of(image: &Image) -> BTreeSet<ObjectPath> {
    image.blobs().map(|b| blob_key(&b.digest)).collect()
}

/// Each object fails this many deletes, then its next attempt goes through.
const FAILURES: usize = 4;
/// The delay regcache must wait after failure `k` (0-based): retry_initial = 1 s doubling,
/// capped at retry_max = 4 s (the fourth is 4 s, not 8 s).
const BACKOFF_SECS: [i64; FAILURES] = [1, 2, 4, 4];

#[tokio::test]
async fn failed_deletes_back_off_survive_a_restart_and_finish_once_storage_heals() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let gone = Image::new(
        "delete-failures-gone",
        &[3_000, 40_000, 300_000],
        "2024-02-01T00:00:00Z",
    );
    let keep = Image::new("delete-failures-keep", &[5_000, 70_000], "2024-02-02T00:00:00Z");
    upstream.add_image("team/gone", Some("v1"), &gone);
    upstream.add_image("team/keep", Some("v1"), &keep);

    let dir = tempfile::tempdir().expect("temp dir");
    let store = FailingStore::on_dir(&dir.path().join("objects"));
    store.fail_deletes(FAILURES);
    // "short" (the default) expires after 1 s; "long" is the same upstream kept for an hour.
    let url = upstream.url();
    let mut config = config_for(&[("short", &url), ("long", &url)], &dir.path().join("data"));
    config.proxy.ttl = CfgDuration::from_secs(1);
    config.upstream[1].ttl = Some(CfgDuration::from_secs(3600));
    config.storage.delete.retry_initial = CfgDuration::from_secs(1);
    config.storage.delete.retry_max = CfgDuration::from_secs(4);
    let mut app = TestApp::start_with_store(config, store.as_dyn(), Some(dir)).await;

    pull_image(&app, "team/gone", &gone).await;
    pull_image(&app, "long/team/keep", &keep).await;
    let all_keys: BTreeSet<ObjectPath> = keys_of(&gone).union(&keys_of(&keep)).cloned().collect();
    let stored: BTreeSet<ObjectPath> = store.objects().await.into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        stored, all_keys,
        "both images are stored through the injected store"
    );
    let keep_gets: usize = keep.blobs().map(|b| upstream.blob_gets(&b.digest)).sum();

    // Watch the queue: the first snapshot of each (digest, attempts). A restart comes
    // once every blob of `gone` has failed twice.
    let gone_digests: BTreeSet<String> = gone.blobs().map(|b| b.digest.clone()).collect();
    let mut seen: BTreeMap<(String, i64), Row> = BTreeMap::new();
    let mut restarted = false;
    let end = Instant::now() + DEADLINE;
    loop {
        let rows = pending_rows(&app);
        for row in &rows {
            assert!(
                gone_digests.contains(&row.digest),
                "only blobs of the expired image are queued for deletion: {row:?}"
            );
            seen.entry((row.digest.clone(), row.attempts))
                .or_insert_with(|| row.clone());
        }
        let failed_twice = rows.len() == gone_digests.len() && rows.iter().all(|r| r.attempts >= 2);
        if !restarted && failed_twice {
            app.restart_with_store(store.as_dyn(), |_| {}).await;
            restarted = true;
            let after = pending_rows(&app);
            assert_eq!(
                after.iter().map(|r| r.digest.clone()).collect::<BTreeSet<_>>(),
                gone_digests,
                "every failing delete survives the restart"
            );
            for row in &after {
                assert!(row.attempts >= 2, "attempts are kept across the restart: {row:?}");
                let error = row.last_error.as_deref().unwrap_or_default();
                assert!(error.contains(INJECTED), "the last error is kept: {row:?}");
            }
        }
        let gone_blob_rows = app.count(&format!(
            "SELECT count(*) FROM blobs WHERE digest IN ({})",
            gone_digests
                .iter()
                .map(|d| format!("'{d}'"))
                .collect::<Vec<_>>()
                .join(",")
        ));
        if restarted && rows.is_empty() && gone_blob_rows == 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "deletes did not finish within {DEADLINE:?}; queue: {rows:#?}; attempts seen: {}",
            store.delete_attempts()
        );
        tokio::time::sleep(common::POLL_INTERVAL).await;
    }

    for digest in &gone_digests {
        let key = blob_key(digest);
        let attempts = store.attempts_of(&key);
        assert_eq!(
            attempts.len(),
            FAILURES + 1,
            "{digest}: {FAILURES} failed attempts, then one that worked: {attempts:?}"
        );
        assert!(attempts[..FAILURES].iter().all(|a| a.failed) && !attempts[FAILURES].failed);
        for (k, backoff) in BACKOFF_SECS.iter().enumerate() {
            let attempts_after = i64::try_from(k + 1).expect("small");
            let row = seen
                .get(&(digest.clone(), attempts_after))
                .unwrap_or_else(|| panic!("{digest}: no snapshot after failure {attempts_after}: {seen:#?}"));
            let error = row.last_error.as_deref().unwrap_or_default();
            assert!(
                error.contains(INJECTED) && error.contains(digest.trim_start_matches("sha256:")),
                "{digest}: the row keeps the error of failure {attempts_after}: {row:?}"
            );
            // next_attempt_at = (second of the failure) + backoff; the failure is recorded
            // just after the attempt, possibly in the next second.
            let delay = row.next_attempt_at - unix_secs(attempts[k].at_unix);
            assert!(
                (*backoff..=backoff + 1).contains(&delay),
                "{digest}: after failure {attempts_after} the next attempt is due {delay} s later, \
                 expected {backoff} s (1 s doubling, capped at 4 s): {row:?}"
            );
            // And the store saw the retry no earlier than that (second granularity) and not
            // much later (the deletion loop looks every second; one restart in between).
            let gap = attempts[k + 1].at.duration_since(attempts[k].at).as_secs_f64();
            let backoff = *backoff as f64;
            assert!(
                gap > backoff - 1.0 && gap < backoff + 3.0,
                "{digest}: retry {attempts_after} came {gap:.2} s after the failure, backoff {backoff} s"
            );
        }
    }

    // Everything of `gone` went, everything of `keep` stayed and is served from the cache.
    let stored: BTreeSet<ObjectPath> = store.objects().await.into_iter().map(|(p, _)| p).collect();
    assert_eq!(stored, keys_of(&keep), "the store holds exactly the kept image");
    let keep_digests: BTreeSet<String> = keep.blobs().map(|b| b.digest.clone()).collect();
    assert_eq!(digests_in(&app, "SELECT digest FROM blobs"), keep_digests);
    assert_eq!(app.count("SELECT count(*) FROM pending_deletes"), 0);
    assert_eq!(app.count("SELECT count(*) FROM write_intents"), 0);
    assert_eq!(
        digests_in(&app, "SELECT digest FROM manifests"),
        BTreeSet::from([keep.manifest.digest.clone()]),
        "the expired manifest went, the kept one stayed"
    );
    for digest in &keep_digests {
        assert!(
            store.attempts_of(&blob_key(digest)).is_empty(),
            "no delete was ever attempted on a kept blob ({digest})"
        );
    }
    pull_image(&app, "long/team/keep", &keep).await;
    let keep_gets_after: usize = keep.blobs().map(|b| upstream.blob_gets(&b.digest)).sum();
    assert_eq!(
        keep_gets_after, keep_gets,
        "the kept image is served from the cache"
    );
    // The expired image is fetched again on demand.
    pull_image(&app, "team/gone", &gone).await;
    app.stop().await;
}

async fn status_json(config_file: &str) -> serde_json::Value {
    let out = run_ok_async(&["status", "--json", "--config", config_file]).await;
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json prints JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn status_names_the_oldest_failing_delete_with_its_error() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("delete-failures-status", &[2_000, 9_000], "2024-02-03T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let store = FailingStore::in_memory();
    store.fail_deletes_forever();
    let mut config = config_for(&[("fixture", &upstream.url())], &data_dir);
    config.proxy.ttl = CfgDuration::from_secs(1);
    config.storage.delete.retry_initial = CfgDuration::from_secs(1);
    config.storage.delete.retry_max = CfgDuration::from_secs(1);
    let config_file = dir.path().join("regcache.toml");
    std::fs::write(
        &config_file,
        format!("[server]\ndata_dir = \"{}\"\n", data_dir.display()),
    )
    .expect("writing the config");
    let config_file = config_file.display().to_string();
    let app = TestApp::start_with_store(config, store.as_dyn(), Some(dir)).await;
    pull_image(&app, "team/app", &image).await;
    let digests: BTreeSet<String> = image.blobs().map(|b| b.digest.clone()).collect();

    // Blob links expire one by one (each a second after its own last use).
    wait_until_async(
        "every blob queued, a delete failed with its error recorded",
        DEADLINE,
        || async {
            let rows = pending_rows(&app);
            rows.len() == digests.len() && rows.iter().any(|r| r.last_error.is_some())
        },
    )
    .await;
    let status = status_json(&config_file).await;
    let failing = &status["oldest_failing_delete"];
    let digest = failing["digest"].as_str().unwrap_or_default();
    assert!(digests.contains(digest), "a blob of the image: {status:#}");
    assert!(failing["attempts"].as_i64().unwrap_or(0) >= 1, "{status:#}");
    let error = failing["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(INJECTED) && error.contains(digest.trim_start_matches("sha256:")),
        "the storage's error, naming the object: {status:#}"
    );
    assert!(failing["next_attempt_at"].as_i64().is_some(), "{status:#}");
    assert_eq!(status["pending_deletes"]["count"], digests.len(), "{status:#}");
    let text = run_ok_async(&["status", "--config", &config_file]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("oldest failing delete") && text.contains(digest) && text.contains(INJECTED),
        "the table names it too:\n{text}"
    );

    store.heal();
    wait_until_async("the healed store took every delete", DEADLINE, || async {
        app.count("SELECT count(*) FROM pending_deletes") == 0
    })
    .await;
    let status = status_json(&config_file).await;
    assert!(status["oldest_failing_delete"].is_null(), "{status:#}");
    assert_eq!(status["pending_deletes"]["count"], 0, "{status:#}");
    assert_eq!(status["blobs"]["count"], 0, "{status:#}");
    assert!(store.objects().await.is_empty(), "the store is empty");
}

#[tokio::test]
async fn a_failed_write_stores_nothing_and_the_next_pull_caches_the_blob() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("delete-failures-write", &[120_000], "2024-02-04T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FailingStore::on_dir(&dir.path().join("objects"));
    let config = config_for(&[("fixture", &upstream.url())], &dir.path().join("data"));
    let app = TestApp::start_with_store(config, store.as_dyn(), Some(dir)).await;
    let layer = &image.layers[0];
    let path = format!("/v2/team/app/blobs/{}", layer.digest);

    store.fail_puts(1);
    let resp = app.get(&path).await;
    let served = if resp.status().is_success() {
        resp.bytes().await.ok()
    } else {
        None
    };
    assert!(
        served.is_none_or(|b| sha256_digest(&b) != layer.digest),
        "a blob whose write failed is not served as complete"
    );
    assert_eq!(store.puts_failed(), 1);
    wait_until_async("the failed transfer cleaned up", DEADLINE, || async {
        app.tmp_files() == 0
    })
    .await;
    assert!(store.objects().await.is_empty(), "nothing stored");
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 0, "no row");
    assert_eq!(app.count("SELECT count(*) FROM repo_blobs"), 0, "no link");
    assert_eq!(
        app.count("SELECT count(*) FROM write_intents"),
        0,
        "intent withdrawn"
    );

    let body = ok_bytes(app.get(&path).await).await;
    assert_eq!(sha256_digest(&body), layer.digest);
    assert_eq!(
        store.objects().await,
        vec![(blob_key(&layer.digest), layer.len() as u64)]
    );
    assert_eq!(
        digests_in(&app, "SELECT digest FROM blobs"),
        BTreeSet::from([layer.digest.clone()])
    );
}

// ----- S3 ---------------------------------------------------------------------------------

fn s3_config(moto: &MotoS3, c: &mut Config) {
    c.storage.backend = Backend::S3;
    c.storage.s3 = Some(S3Config {
        bucket: moto.bucket().to_owned(),
        region: MOTO_REGION.into(),
        endpoint: Some(moto.endpoint()),
        allow_http: true,
        access_key_id: Some(MOTO_ACCESS_KEY.into()),
        secret_access_key: Some(Secret::new(MOTO_SECRET_KEY)),
        secret_access_key_file: None,
        prefix: String::new(),
    });
}

/// Keys in the bucket, read with a client of our own that does not retry.
async fn bucket_keys(moto: &MotoS3) -> Result<BTreeSet<String>, object_store::Error> {
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(moto.bucket())
        .with_region(MOTO_REGION)
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_access_key_id(MOTO_ACCESS_KEY)
        .with_secret_access_key(MOTO_SECRET_KEY)
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..object_store::RetryConfig::default()
        })
        .build()?;
    let mut keys = BTreeSet::new();
    let mut listing = s3.list(None);
    while let Some(meta) = listing.next().await {
        let key = meta?.location.to_string();
        // The owner marker regcache puts on a shared prefix is not a blob.
        if key != regcache::storage::OWNER_MARKER {
            keys.insert(key);
        }
    }
    Ok(keys)
}

#[tokio::test]
async fn s3_deletes_fail_while_the_server_is_down_and_finish_when_it_is_back() {
    let mut moto = MotoS3::start("regcache-deletes").await;
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("delete-failures-s3", &[4_000, 30_000], "2024-02-05T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        s3_config(&moto, c);
        c.proxy.ttl = CfgDuration::from_secs(1);
        c.storage.delete.retry_initial = CfgDuration::from_secs(1);
        c.storage.delete.retry_max = CfgDuration::from_secs(2);
    })
    .await;
    pull_image(&app, "team/app", &image).await;
    let keys: BTreeSet<String> = keys_of(&image).iter().map(ToString::to_string).collect();
    assert_eq!(bucket_keys(&moto).await.expect("listing"), keys);

    let stopped = Instant::now();
    moto.stop();
    let digests: BTreeSet<String> = image.blobs().map(|b| b.digest.clone()).collect();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = pending_rows(&app);
        // Two failed attempts each: the row was kept and retried.
        if rows.len() == digests.len() && rows.iter().all(|r| r.attempts >= 2) {
            for r in &rows {
                assert!(digests.contains(&r.digest), "{r:?}");
                assert!(
                    r.last_error.as_deref().is_some_and(|e| !e.is_empty()),
                    "the storage error is recorded: {r:?}"
                );
            }
            eprintln!(
                "deletes failed against the stopped S3 server after {:.1} s: {}",
                stopped.elapsed().as_secs_f64(),
                rows[0].last_error.as_deref().unwrap_or_default()
            );
            break;
        }
        assert!(
            Instant::now() < end,
            "no failed delete recorded with S3 down: {rows:#?}"
        );
        tokio::time::sleep(common::POLL_INTERVAL).await;
    }
    assert_eq!(
        digests_in(&app, "SELECT digest FROM blobs"),
        digests,
        "blob rows stay until storage confirms"
    );

    // Back, empty: a missing object counts as deleted.
    moto.start_again().await;
    wait_until_async(
        "the deletes finished against the restarted S3 server",
        Duration::from_secs(60),
        || async { app.count("SELECT count(*) FROM pending_deletes") == 0 },
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 0);
    assert!(bucket_keys(&moto).await.expect("listing").is_empty());
    // And the cache works on the new bucket.
    pull_image(&app, "team/app", &image).await;
}

/// Multipart uploads in progress in the bucket (`ListMultipartUploads`; moto answers
/// unsigned requests).
async fn open_uploads(moto: &MotoS3) -> usize {
    let url = format!("{}/{}?uploads", moto.endpoint(), moto.bucket());
    let resp = reqwest::get(&url).await.expect("ListMultipartUploads");
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let xml = resp.text().await.expect("ListMultipartUploads body");
    xml.matches("<Upload>").count()
}

#[tokio::test]
async fn a_failed_multipart_write_on_s3_is_aborted_not_left_open() {
    let moto = MotoS3::start("regcache-uploads").await;
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    // Over 8 MiB: regcache uploads it in 8 MiB parts, two in flight.
    let image = Image::new("delete-failures-multipart", &[20 << 20], "2024-02-06T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(moto.bucket())
        .with_region(MOTO_REGION)
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_access_key_id(MOTO_ACCESS_KEY)
        .with_secret_access_key(MOTO_SECRET_KEY)
        .build()
        .expect("S3 client for moto");
    let store = FailingStore::with_multipart(std::sync::Arc::new(s3));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_for(&[("fixture", &upstream.url())], &dir.path().join("data"));
    let app = TestApp::start_with_blob_store(config, store.blob_store(), Some(dir)).await;
    let layer = &image.layers[0];
    let path = format!("/v2/team/app/blobs/{}", layer.digest);

    store.fail_parts();
    let resp = app.get(&path).await;
    let served = if resp.status().is_success() {
        resp.bytes().await.ok()
    } else {
        None
    };
    assert!(
        served.is_none_or(|b| sha256_digest(&b) != layer.digest),
        "a blob whose upload failed is not served as complete"
    );
    wait_until_async("the failed transfer ended", DEADLINE, || async {
        app.tmp_files() == 0
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 0, "no row");
    assert_eq!(
        app.count("SELECT count(*) FROM write_intents"),
        0,
        "intent withdrawn"
    );
    let (started, completed, aborted) = store.multipart_uploads();
    assert_eq!((started, completed), (1, 0), "one upload, failed");
    assert_eq!(
        (aborted, open_uploads(&moto).await),
        (1, 0),
        "the failed upload was aborted, so its parts do not stay in the bucket (I2)"
    );

    store.heal();
    let body = ok_bytes(app.get(&path).await).await;
    assert_eq!(sha256_digest(&body), layer.digest);
    assert_eq!(store.multipart_uploads(), (2, 1, 1));
    assert_eq!(open_uploads(&moto).await, 0);
    assert_eq!(
        bucket_keys(&moto).await.expect("listing"),
        BTreeSet::from([blob_key(&layer.digest).to_string()])
    );
}

/// Layer of the image whose upload to S3 is cut by a SIGKILL: five 8 MiB parts.
const CRASH_LAYER: usize = 40 << 20;

/// A SIGKILL while a large blob is uploaded to S3 in parts (real parts: docker-registry as
/// the upstream, skopeo pulling through the regcache binary, moto as S3). The upload was
/// recorded before its first part, so after the restart reconciliation aborts it: no part
/// stays in the bucket (I2). The image then pulls, and bucket and rows agree.
#[tokio::test]
async fn a_multipart_upload_cut_by_sigkill_is_aborted_after_the_restart() {
    let moto = MotoS3::start("regcache-crash-uploads").await;
    let registry = DockerRegistry::start().await;
    let image = Image::new("crash-upload", &[CRASH_LAYER], "2024-02-07T00:00:00Z");
    let dir = tempfile::tempdir().expect("temp dir");
    push_image(&registry, dir.path(), "team/big", &image).await;
    let data_dir = dir.path().join("data");
    let config = |port: u16| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             [storage]\nbackend = \"s3\"\n\
             [storage.s3]\nbucket = \"{}\"\nregion = \"{MOTO_REGION}\"\nendpoint = \"{}\"\n\
             allow_http = true\naccess_key_id = \"{MOTO_ACCESS_KEY}\"\nsecret_access_key = \"{MOTO_SECRET_KEY}\"\n\
             [log]\nformat = \"json\"\n\
             [[upstream]]\nname = \"cncf\"\nurl = \"{}\"\ndefault = true\n",
            data_dir.display(),
            moto.bucket(),
            moto.endpoint(),
            registry.url()
        )
    };
    let mut server = Regcache::start(dir.path(), "first", config).await;
    let pulling = tokio::spawn({
        let (base, out) = (server.base.clone(), dir.path().join("cut"));
        async move {
            let src = format!("docker://{}/team/big:v1", base.trim_start_matches("http://"));
            skopeo_copy(&src, &format!("oci:{}:v1", out.display()), &[]).await
        }
    });
    // Killed once the upload is open in the bucket and on record in SQLite (a crash
    // between the two leaves an upload with no parts; ARCHITECTURE.md, Known limits).
    let recorded = "SELECT count(*) FROM write_intents WHERE upload_id IS NOT NULL";
    let deadline = Instant::now() + DEADLINE;
    while open_uploads(&moto).await == 0 || count(&data_dir, recorded) == 0 {
        assert!(Instant::now() < deadline, "no multipart upload was seen open");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.sigkill();
    assert!(
        pulling.await.expect("skopeo task").is_err(),
        "skopeo finished although the server died mid-upload"
    );
    assert_eq!(open_uploads(&moto).await, 1, "the crash left the upload open");
    let config_file = dir.path().join("regcache.toml");
    let status = status_json(&config_file.display().to_string()).await;
    assert_eq!(
        status["open_uploads"], 1,
        "the open upload is on record: {status:#}"
    );
    let cut = db(&data_dir)
        .query_row(
            "SELECT upload_key, upload_id FROM write_intents WHERE upload_id IS NOT NULL",
            [],
            |r| {
                Ok(regcache::storage::OpenUpload {
                    key: r.get(0)?,
                    id: r.get(1)?,
                })
            },
        )
        .expect("the upload's record");

    let server = Regcache::start(dir.path(), "again", config).await;
    wait_until_async(
        "reconciliation aborted the upload the crash left open",
        DEADLINE,
        || async {
            open_uploads(&moto).await == 0 && count(&data_dir, "SELECT count(*) FROM stale_uploads") == 0
        },
    )
    .await;
    skopeo_pull(&server.base, "team/big", &image, &dir.path().join("after")).await;
    let rows: BTreeSet<String> = blob_rows(&data_dir)
        .iter()
        .map(|d| blob_key(d).to_string())
        .collect();
    assert_eq!(
        bucket_keys(&moto).await.expect("listing"),
        rows,
        "bucket and rows agree"
    );
    assert_eq!(rows.len(), 2, "config and layer");
    assert_eq!(open_uploads(&moto).await, 0);
    let status = status_json(&config_file.display().to_string()).await;
    assert_eq!(status["open_uploads"], 0, "{status:#}");

    // Aborting it once more (as after a failed write whose own abort went through) finds
    // an upload S3 no longer knows, which counts as aborted.
    let mut c = config_for(&[("cncf", &registry.url())], &data_dir);
    s3_config(&moto, &mut c);
    let store = regcache::storage::build(&c.storage, &data_dir).expect("S3 store for moto");
    store
        .abort_upload(&cut)
        .await
        .expect("an upload already aborted counts as aborted");
}
