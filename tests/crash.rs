//! Crashes (I2, I3): the regcache binary is killed with SIGKILL in the middle of a large
//! pull and in the middle of a deletion batch, then started again on the same data
//! directory. After the restart and one reconciliation, storage and SQLite agree exactly
//! (every object under `store/blobs` has its `blobs` row and every row its object, no
//! temporary file, no write intent, no pending delete) and every image still pulls
//! correctly. The large pull is killed twice: under the fixture upstream, which slows one
//! blob down to pin the moment, and with real parts (docker-registry as the upstream,
//! skopeo pulling an image of many layers). The deletion batch is killed with real parts:
//! skopeo caches the images from docker-registry and pulls them again after the restart,
//! the kept one with the registry gone. A crash between writing an object and
//! committing its row is reproduced in-process, where a store that hangs after the write
//! pins the window down.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::app::{config_for, ok_bytes, TestApp};
use common::binary::Regcache;
use common::data_dir::{blob_path, blob_rows, count, db};
use common::external::{push_image, skopeo_copy, skopeo_pull, DockerRegistry};
use common::failing_store::FailingStore;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{sha256_digest, Image, ACCEPT_ALL_MANIFESTS};
use common::wait_until_async;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use regcache::config::Duration as CfgDuration;

/// Bound on every wait: start-up, background work, a pull.
const DEADLINE: Duration = Duration::from_secs(30);

// ----- the regcache binary ----------------------------------------------------------------

/// What differs between the runs of one test.
#[derive(Clone, Copy)]
struct Settings<'a> {
    upstream: &'a str,
    /// `proxy.ttl`, which the default upstream "short" uses.
    ttl: &'a str,
    reconcile_grace: &'a str,
}

/// Starts `regcache serve` on `data_dir` with upstreams "short", the default, with `ttl`,
/// and "long" with ttl 1h, both at `s.upstream`.
async fn start(dir: &Path, data_dir: &Path, s: &Settings<'_>) -> Regcache {
    Regcache::start(dir, &ulid_like().to_string(), |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [storage]\nreconcile_grace = \"{}\"\n\
             [storage.delete]\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
             [proxy]\nttl = \"{}\"\nread_timeout = \"10s\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\
             [[upstream]]\nname = \"short\"\nurl = \"{}\"\ndefault = true\n\
             [[upstream]]\nname = \"long\"\nurl = \"{}\"\nttl = \"1h\"\n",
            data_dir.display(),
            s.reconcile_grace,
            s.ttl,
            s.upstream,
            s.upstream
        )
    })
    .await
}

/// A unique-enough suffix for log file names.
fn ulid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos()
}

// ----- what is stored and recorded ------------------------------------------------------

/// Every file under `store/`, as the digest its key names (`blobs/sha256/<2>/<64>`), or
/// the bare relative path for anything else (which then matches no row).
fn stored_objects(data_dir: &Path) -> BTreeSet<String> {
    let root = data_dir.join("store");
    let mut out = BTreeSet::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&root)
                .expect("under the store")
                .to_string_lossy()
                .into_owned();
            let parts: Vec<&str> = rel.split('/').collect();
            match parts.as_slice() {
                ["blobs", "sha256", shard, hex] if hex.len() == 64 && hex.starts_with(shard) => {
                    out.insert(format!("sha256:{hex}"));
                }
                _ => {
                    out.insert(rel);
                }
            }
        }
    }
    out
}

fn tmp_files(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("tmp")).map_or_else(
        |_| Vec::new(),
        |d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        },
    )
}

/// Why storage and metadata do not agree exactly yet, or `None` when they do.
fn disagreement(data_dir: &Path) -> Option<String> {
    let objects = stored_objects(data_dir);
    let rows = blob_rows(data_dir);
    let mut why = Vec::new();
    let orphans: Vec<_> = objects.difference(&rows).collect();
    if !orphans.is_empty() {
        why.push(format!("{} objects without a row: {orphans:?}", orphans.len()));
    }
    let ghosts: Vec<_> = rows.difference(&objects).collect();
    if !ghosts.is_empty() {
        why.push(format!("{} rows without an object: {ghosts:?}", ghosts.len()));
    }
    let tmp = tmp_files(data_dir);
    if !tmp.is_empty() {
        why.push(format!("temporary files left: {tmp:?}"));
    }
    for table in ["write_intents", "pending_deletes"] {
        let n = count(data_dir, &format!("SELECT count(*) FROM {table}"));
        if n > 0 {
            why.push(format!("{n} rows in {table}"));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

async fn wait_for_agreement(data_dir: &Path, server: &Regcache) {
    let end = Instant::now() + DEADLINE;
    loop {
        let Some(why) = disagreement(data_dir) else {
            return;
        };
        assert!(
            Instant::now() < end,
            "storage and SQLite still disagree after {DEADLINE:?}: {why}\nserver log:\n{}",
            server.log()
        );
        tokio::time::sleep(common::POLL_INTERVAL).await;
    }
}

/// fsck beside the settled server finds nothing to repair and nothing fails.
fn assert_fsck_clean(report: &serde_json::Value) {
    for key in [
        "orphan_objects",
        "orphans_too_young",
        "missing_objects",
        "rows_repaired",
        "deletes_failed",
    ] {
        assert_eq!(report[key], 0, "fsck {key}: {report:#}");
    }
}

/// Hands `server` to a blocking watcher that polls `ready` every `every` and SIGKILLs the
/// server the moment it returns `Some`, without a hop back to the runtime (dropping the
/// server on a panic kills it too). Fails the test with `what` after `DEADLINE`.
async fn kill_when<T: Send + 'static>(
    mut server: Regcache,
    what: &'static str,
    every: Duration,
    mut ready: impl FnMut(Instant) -> Option<T> + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(seen) = ready(end) {
                server.sigkill();
                return seen;
            }
            assert!(Instant::now() < end, "never saw {what}");
            std::thread::sleep(every);
        }
    })
    .await
    .expect("watcher")
}

/// Starts the server again on `data_dir` after a crash, with reconciliation taking
/// anything younger too (grace 0), runs fsck, and waits until storage and SQLite agree;
/// a second fsck then finds nothing to do.
async fn restart_and_reconcile(dir: &Path, data_dir: &Path, settings: &Settings<'_>) -> Regcache {
    let settings = Settings {
        reconcile_grace: "0",
        ..*settings
    };
    let server = start(dir, data_dir, &settings).await;
    let report = server.fsck().await;
    assert_eq!(report["deletes_failed"], 0, "{report:#}");
    wait_for_agreement(data_dir, &server).await;
    assert_fsck_clean(&server.fsck().await);
    server
}

// ----- pulling ------------------------------------------------------------------------------

/// Pulls `image` from `base` under `repo` (manifest by tag `v1`, then every blob, `parallel`
/// at a time) and checks every byte by sha256.
async fn pull(client: &reqwest::Client, base: &str, repo: &str, image: &Image, parallel: usize) {
    let resp = client
        .get(format!("{base}/v2/{repo}/manifests/v1"))
        .header(reqwest::header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("manifest request");
    assert_eq!(ok_bytes(resp).await, image.manifest.bytes, "manifest of {repo}");
    let blobs: Vec<_> = image.blobs().collect();
    futures::stream::iter(blobs)
        .for_each_concurrent(parallel, |blob| async move {
            let resp = client
                .get(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
                .send()
                .await
                .expect("blob request");
            let body = ok_bytes(resp).await;
            assert_eq!(sha256_digest(&body), blob.digest, "blob of {repo} is intact");
        })
        .await;
}

// ----- the tests ----------------------------------------------------------------------------

/// Size of the blob being pulled when the server dies.
const BIG: usize = 32 * 1024 * 1024;

#[tokio::test]
async fn sigkill_in_the_middle_of_a_large_pull() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let small = Image::new("crash-pull-small", &[2_000, 300_000], "2024-03-01T00:00:00Z");
    let big = Image::new("crash-pull-big", &[BIG], "2024-03-02T00:00:00Z");
    upstream.add_image("team/small", Some("v1"), &small);
    upstream.add_image("team/big", Some("v1"), &big);
    let layer = big.layers[0].clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let client = reqwest::Client::new();

    let settings = Settings {
        upstream: &upstream.url(),
        ttl: "1h",
        reconcile_grace: "1h",
    };
    let mut server = start(dir.path(), &data_dir, &settings).await;
    pull(&client, &server.base, "team/small", &small, 2).await;
    // The big image's manifest and config are cached; its layer comes slowly (~3 s).
    let resp = client
        .get(format!("{}/v2/team/big/manifests/v1", server.base))
        .header(reqwest::header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("manifest");
    assert_eq!(ok_bytes(resp).await, big.manifest.bytes);
    let config = client
        .get(format!("{}/v2/team/big/blobs/{}", server.base, big.config.digest))
        .send()
        .await
        .expect("config");
    assert_eq!(ok_bytes(config).await, big.config.bytes);
    upstream.slow_blob(&layer.digest, 256 * 1024, Duration::from_millis(20));
    let pulling = tokio::spawn({
        let url = format!("{}/v2/team/big/blobs/{}", server.base, layer.digest);
        let client = client.clone();
        async move {
            let mut received = 0usize;
            if let Ok(resp) = client.get(url).send().await {
                let mut body = resp.bytes_stream();
                while let Some(Ok(chunk)) = body.next().await {
                    received += chunk.len();
                }
            }
            received
        }
    });

    // Kill once the download is well under way: its .part file holds over 1 MiB.
    let part_size = |data_dir: &Path| part_files(data_dir).into_iter().max();
    wait_until_async("the large blob is part-way downloaded", DEADLINE, || async {
        part_size(&data_dir).is_some_and(|n| n >= 1024 * 1024)
    })
    .await;
    server.sigkill();
    let received = pulling.await.expect("client task");
    let left = part_size(&data_dir).expect("the crash leaves the .part file behind");
    eprintln!("killed with {left} of {BIG} bytes downloaded; the client got {received}");
    assert!(left < BIG as u64, "killed in the middle of the pull");
    assert!(received < BIG, "the client never saw the whole blob");
    assert!(
        !blob_rows(&data_dir).contains(&layer.digest),
        "nothing recorded for the interrupted blob"
    );
    assert!(!stored_objects(&data_dir).contains(&layer.digest));

    // Restart on the same data dir.
    upstream.heal_blob(&layer.digest);
    let server = restart_and_reconcile(dir.path(), &data_dir, &settings).await;
    let expected: BTreeSet<String> = small
        .blobs()
        .chain([&big.config])
        .map(|b| b.digest.clone())
        .collect();
    assert_eq!(
        blob_rows(&data_dir),
        expected,
        "what was committed before the crash is kept"
    );

    pull(&client, &server.base, "team/small", &small, 2).await;
    pull(&client, &server.base, "team/big", &big, 2).await;
    wait_for_agreement(&data_dir, &server).await;
    assert!(blob_rows(&data_dir).contains(&layer.digest));
    assert_eq!(
        upstream.blob_gets(&small.layers[1].digest),
        1,
        "the small image was served from the cache after the crash"
    );
}

/// The `.part` files of downloads in flight, with their sizes.
fn part_files(data_dir: &Path) -> Vec<u64> {
    std::fs::read_dir(data_dir.join("tmp")).map_or_else(
        |_| Vec::new(),
        |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .collect()
        },
    )
}

/// Layers of the image skopeo pulls when the server dies: skopeo fetches several at once,
/// and each is big enough that one is mid-download most of the time.
const E2E_LAYERS: usize = 40;
const E2E_LAYER: usize = 1024 * 1024;

/// The large-pull crash with real parts: docker-registry is the upstream and skopeo pulls
/// an image of many layers through the regcache binary, which is killed once a quarter
/// of the layers are stored and another one is being downloaded.
#[tokio::test]
async fn sigkill_during_a_skopeo_pull_from_docker_registry() {
    let registry = DockerRegistry::start().await;
    let image = Image::new("crash-e2e", &vec![E2E_LAYER; E2E_LAYERS], "2024-03-05T00:00:00Z");
    let dir = tempfile::tempdir().expect("temp dir");
    push_image(&registry, dir.path(), "team/big", &image).await;
    let reference = |host: &str| format!("docker://{host}/team/big:v1");
    let data_dir = dir.path().join("data");
    let settings = Settings {
        upstream: &registry.url(),
        ttl: "1h",
        reconcile_grace: "1h",
    };
    let server = start(dir.path(), &data_dir, &settings).await;
    let src = reference(server.base.trim_start_matches("http://"));
    let pulling = tokio::spawn({
        let (src, dst) = (
            src.clone(),
            format!("oci:{}:v1", dir.path().join("first").display()),
        );
        async move { skopeo_copy(&src, &dst, &[]).await }
    });

    let watched = data_dir.clone();
    let (stored_at_kill, parts_at_kill) = kill_when(
        server,
        "a quarter of the layers stored and a download in flight",
        Duration::from_micros(500),
        move |_| {
            let stored = stored_objects(&watched).len();
            let parts = part_files(&watched);
            (stored >= E2E_LAYERS / 4 && !parts.is_empty()).then_some((stored, parts))
        },
    )
    .await;
    let pulled = pulling.await.expect("skopeo task");
    assert!(
        pulled.is_err(),
        "skopeo finished although the server died mid-pull"
    );
    let committed = blob_rows(&data_dir);
    eprintln!(
        "killed with {stored_at_kill} objects stored, downloads in flight {parts_at_kill:?}, {} rows",
        committed.len()
    );
    assert!(
        committed.len() < E2E_LAYERS + 1,
        "killed in the middle of the pull"
    );

    let server = restart_and_reconcile(dir.path(), &data_dir, &settings).await;
    let after = blob_rows(&data_dir);
    assert!(
        committed.is_subset(&after),
        "what was committed before the crash is kept"
    );

    skopeo_pull(&server.base, "team/big", &image, &dir.path().join("second")).await;
    wait_for_agreement(&data_dir, &server).await;
    let all: BTreeSet<String> = image.blobs().map(|b| b.digest.clone()).collect();
    assert_eq!(
        blob_rows(&data_dir),
        all,
        "every blob of the image is cached once"
    );
}

/// Pulls every `(repo, image)` from `base` with skopeo, all at once, each into its own
/// OCI layout under `out`, checked.
async fn skopeo_pull_all(base: &str, images: &[(String, Image)], out: &Path) {
    std::fs::create_dir_all(out).expect("creating the layouts' directory");
    let pulls = images.iter().map(|(repo, image)| async move {
        skopeo_pull(base, repo, image, &out.join(repo.replace('/', "-"))).await;
    });
    futures::future::join_all(pulls).await;
}

/// Layers of the images whose deletion is interrupted: enough that the pipeline needs
/// several claim batches (the first is 256), so there is a middle to kill it in.
const MANY: usize = 700;
/// The layers are spread over this many images, pushed and pulled in parallel: skopeo
/// pushes one image's layers to docker-registry at about 25 a second.
const MANY_IMAGES: usize = 4;

/// The deletion crash with real parts: docker-registry is the upstream and skopeo pulls
/// through the regcache binary, before the kill and after it.
#[tokio::test]
async fn sigkill_in_the_middle_of_a_deletion_batch() {
    let registry = DockerRegistry::start().await;
    // 8 bytes each: layers differ between the images too (one byte would collide).
    let sizes = vec![8; MANY / MANY_IMAGES];
    let many: Vec<(String, Image)> = (0..MANY_IMAGES)
        .map(|i| {
            let image = Image::new(&format!("crash-delete-many-{i}"), &sizes, "2024-03-03T00:00:00Z");
            (format!("team/many-{i}"), image)
        })
        .collect();
    let keep = Image::new("crash-delete-keep", &[3_000, 50_000], "2024-03-04T00:00:00Z");
    let dir = tempfile::tempdir().expect("temp dir");
    let pushes = many
        .iter()
        .map(|(repo, image)| push_image(&registry, dir.path(), repo, image));
    futures::future::join_all(pushes).await;
    push_image(&registry, dir.path(), "team/keep", &keep).await;
    let data_dir = dir.path().join("data");
    let url = registry.url();

    // Cache everything with a long ttl, then stop cleanly.
    let settings = Settings {
        upstream: &url,
        ttl: "1h",
        reconcile_grace: "1h",
    };
    let mut server = start(dir.path(), &data_dir, &settings).await;
    let started = Instant::now();
    skopeo_pull_all(&server.base, &many, &dir.path().join("many")).await;
    skopeo_pull(&server.base, "long/team/keep", &keep, &dir.path().join("keep")).await;
    let cached = blob_rows(&data_dir);
    eprintln!(
        "cached {} blobs in {:.1} s",
        cached.len(),
        started.elapsed().as_secs_f64()
    );
    server.stop().await;
    assert_eq!(cached.len(), MANY + MANY_IMAGES + 3, "layers and configs");
    assert_eq!(stored_objects(&data_dir), cached);

    let settings = Settings {
        ttl: "1s",
        ..settings
    };
    let server = start(dir.path(), &data_dir, &settings).await;
    let watched = data_dir.clone();
    let pid = server.pid();
    let queue = db(&watched);
    let mut max = 0i64;
    let seen = kill_when(
        server,
        "a deletion batch in progress",
        Duration::from_micros(200),
        move |end| {
            let (queued, deleting): (i64, i64) = queue
                .query_row(
                    "SELECT count(*), coalesce(sum(state = 'deleting'), 0) FROM pending_deletes",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .expect("reading the queue");
            max = max.max(queued);
            // A first batch is done (the queue shrank) and the next one is claimed: kill
            // as soon as its first objects are gone from storage, before the rows go.
            if deleting == 0 || queued >= max {
                return None;
            }
            let claimed: Vec<PathBuf> = {
                let mut stmt = queue
                    .prepare("SELECT digest FROM pending_deletes WHERE state = 'deleting'")
                    .expect("prepare");
                let rows = stmt.query_map([], |r| r.get::<_, String>(0)).expect("query");
                rows.map(|d| blob_path(&watched, &d.expect("digest"))).collect()
            };
            while claimed.iter().all(|f| f.exists()) && Instant::now() < end {
                std::hint::spin_loop();
            }
            Some((max, queued, deleting))
        },
    )
    .await;
    let (peak, at_kill, deleting_at_kill) = seen;
    let queued = count(&data_dir, "SELECT count(*) FROM pending_deletes");
    let claimed = count(
        &data_dir,
        "SELECT count(*) FROM pending_deletes WHERE state = 'deleting'",
    );
    let objects = stored_objects(&data_dir);
    let gone_with_row = {
        let db = db(&data_dir);
        let mut stmt = db.prepare("SELECT digest FROM pending_deletes").expect("prepare");
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        rows.iter().filter(|d| !objects.contains(*d)).count()
    };
    eprintln!(
        "killed regcache (pid {pid}): queue peaked at {peak}, {at_kill} left when seen \
         ({deleting_at_kill} claimed); after the kill {queued} left, {claimed} claimed by the \
         dead process, {gone_with_row} already gone from storage but still queued"
    );
    assert_eq!(
        peak,
        i64::try_from(MANY + MANY_IMAGES).expect("small"),
        "config and layers queued"
    );
    assert!(
        queued > 0 && queued < peak,
        "the kill landed in the middle of the deletion: {queued} of {peak} left"
    );
    assert!(
        claimed > 0 && gone_with_row > 0,
        "the kill landed inside a batch, between deleting objects and removing their rows"
    );

    // Start again: claims of the dead process lapse, the rest is deleted (objects already
    // gone count as deleted), and reconciliation finds nothing else to do.
    let settings = Settings {
        reconcile_grace: "0",
        ..settings
    };
    let server = start(dir.path(), &data_dir, &settings).await;
    wait_for_agreement(&data_dir, &server).await;
    assert_fsck_clean(&server.fsck().await);
    let keep_digests: BTreeSet<String> = keep.blobs().map(|b| b.digest.clone()).collect();
    assert_eq!(
        blob_rows(&data_dir),
        keep_digests,
        "only the long-lived image is left"
    );
    assert_eq!(count(&data_dir, "SELECT count(*) FROM manifests"), 1);

    // The deleted image is fetched again; the kept one is served with the upstream gone.
    skopeo_pull_all(&server.base, &many, &dir.path().join("many-again")).await;
    drop(registry);
    skopeo_pull(
        &server.base,
        "long/team/keep",
        &keep,
        &dir.path().join("keep-offline"),
    )
    .await;
}

/// The window between writing an object and committing its row, pinned down in-process:
/// the store writes the object and then never answers, so the transfer is stopped right
/// there by the server's shutdown, which drops it exactly as a crash would (the object is
/// stored, the write intent committed, no row). A real SIGKILL cannot be aimed at this
/// window deterministically; the state it would leave is the same.
#[tokio::test]
async fn crash_between_object_write_and_row_commit() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let first = Image::new("crash-window-first", &[4_000], "2024-03-05T00:00:00Z");
    let second = Image::new("crash-window-second", &[6_000], "2024-03-06T00:00:00Z");
    upstream.add_image("team/first", Some("v1"), &first);
    upstream.add_image("team/second", Some("v1"), &second);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FailingStore::on_dir(&dir.path().join("objects"));
    let config = config_for(&[("fixture", &upstream.url())], &dir.path().join("data"));
    let mut app = TestApp::start_with_store(config, store.as_dyn(), Some(dir)).await;
    let key = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        ObjectPath::from(format!("blobs/sha256/{}/{hex}", &hex[..2]))
    };

    let pull_app = |app: &TestApp, repo: &'static str, image: &Image| {
        let (base, client, image) = (app.base.clone(), app.client.clone(), image.clone());
        async move { pull(&client, &base, repo, &image, 1).await }
    };
    pull_app(&app, "team/first", &first).await;
    let layer = second.layers[0].clone();
    store.hang_after_put();
    let request = tokio::spawn({
        let url = app.url(&format!("/v2/team/second/blobs/{}", layer.digest));
        let client = app.client.clone();
        async move {
            match client.get(url).send().await {
                Ok(resp) => resp.bytes().await.ok(),
                Err(_) => None,
            }
        }
    });
    wait_until_async(
        "the object is written and its commit pending",
        DEADLINE,
        || async { store.hung_puts() == 1 },
    )
    .await;
    let objects = || async {
        store
            .objects()
            .await
            .into_iter()
            .map(|(p, _)| p)
            .collect::<BTreeSet<_>>()
    };
    assert!(objects().await.contains(&key(&layer.digest)), "object written");
    assert_eq!(
        app.count("SELECT count(*) FROM write_intents"),
        1,
        "intent committed"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM blobs WHERE digest = '{}'",
            layer.digest
        )),
        0,
        "row not committed"
    );

    // "Crash": the transfer is dropped where it hangs.
    app.stop().await;
    store.release_puts();
    let served = request.await.expect("client task");
    assert!(
        served.is_none_or(|b| sha256_digest(&b) != layer.digest),
        "the client never got the blob whole"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM write_intents"),
        1,
        "the intent outlived the process"
    );
    assert!(objects().await.contains(&key(&layer.digest)), "so did the object");

    app.restart_with_store(store.as_dyn(), |c| {
        c.storage.reconcile_grace = CfgDuration::from_secs(0);
    })
    .await;
    wait_until_async("the orphan object is reconciled away", DEADLINE, || async {
        let rows = app.count("SELECT count(*) FROM blobs");
        let intents = app.count("SELECT count(*) FROM write_intents");
        let pending = app.count("SELECT count(*) FROM pending_deletes");
        objects().await.len() == usize::try_from(rows).unwrap_or(0) && intents == 0 && pending == 0
    })
    .await;
    let expected: BTreeSet<ObjectPath> = first.blobs().map(|b| key(&b.digest)).collect();
    assert_eq!(objects().await, expected, "only committed blobs are stored");
    assert_eq!(
        store.attempts_of(&key(&layer.digest)).len(),
        1,
        "the orphan was deleted through the pipeline"
    );

    pull_app(&app, "team/first", &first).await;
    pull_app(&app, "team/second", &second).await;
    let expected: BTreeSet<ObjectPath> = first
        .blobs()
        .chain(second.blobs())
        .map(|b| key(&b.digest))
        .collect();
    assert_eq!(objects().await, expected);
    assert_eq!(
        app.count("SELECT count(*) FROM blobs"),
        i64::try_from(expected.len()).expect("small")
    );
    assert_eq!(app.count("SELECT count(*) FROM write_intents"), 0);
    app.stop().await;
}
