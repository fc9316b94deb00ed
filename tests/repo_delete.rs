//! Design problem 5: deleting a repository of 100 000 tags is resumable. The real binary
//! deletes it in bounded batches within a small time budget per run (several runs), is
//! killed with SIGKILL half-way, and after a restart the sweeper takes the job back and
//! the deletion completes: no tag, manifest link, blob link or repository row of it
//! remains, its own blobs are gone from storage and SQLite, and a second repository that
//! shares some of its blobs is untouched and still served from the cache.
//!
//! The big repository is seeded straight into SQLite (with real blob files whose content
//! matches their digests) while the server is stopped; the second repository is pulled
//! through regcache from the fixture upstream.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::app::{ok_bytes, pull_image};
use common::binary::Regcache;
use common::data_dir::{blob_path, db};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{sha256_digest, Blob, Image, ACCEPT_ALL_MANIFESTS, OCI_CONFIG, OCI_MANIFEST};
use rusqlite::params;
use serde_json::{json, Value};

/// Bound on start-up and on each short wait.
const DEADLINE: Duration = Duration::from_secs(30);
/// Bound on the whole deletion after the restart.
const DELETION_DEADLINE: Duration = Duration::from_secs(120);
const TOKEN: &str = "repo-delete-test-token-0123456789";

/// The big repository (upstream "fixture", the default).
const BIG: &str = "team/big";
/// The repository sharing some of its blobs.
const OTHER: &str = "team/other";
const TAGS: usize = 100_000;
const MANIFESTS: usize = 1_000;
/// Base layers only the big repository uses (each manifest names one).
const BASES: usize = 10;
/// The kill comes while at least this many tags remain. A run's budget is time (1 s), so
/// what it removes depends on the machine: with 20 tags per transaction (`start`) one run
/// removed about 30 000 on 2 cores; with 500 it removed over 90 000 and the job was nearly
/// done before a second run began.
const KILL_BEFORE: u64 = 90_000;

// ----- the regcache binary ----------------------------------------------------------------

/// Starts `regcache serve` on `data_dir` with the config every run of this test uses;
/// `run` names its log.
async fn start(dir: &Path, data_dir: &Path, upstream: &str, run: &str) -> Regcache {
    Regcache::start(dir, run, |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [storage.delete]\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
             [proxy]\nttl = \"1h\"\nread_timeout = \"10s\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\
             [admin]\ntoken = \"{TOKEN}\"\n\
             [jobs]\nmax_run_time = \"1s\"\ndelete_batch = 20\nsweep_interval = \"1s\"\nstale_after = \"3s\"\n\
             [[upstream]]\nname = \"fixture\"\nurl = \"{upstream}\"\ndefault = true\n",
            data_dir.display(),
        )
    })
    .await
}

/// The admin API of this test's server.
impl Regcache {
    async fn admin(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::Response {
        client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("admin request")
    }

    async fn job(&self, client: &reqwest::Client, id: i64) -> Value {
        let resp = self
            .admin(client, reqwest::Method::GET, &format!("/api/v1/jobs/{id}"))
            .await;
        assert_eq!(resp.status(), 200, "GET job {id}");
        resp.json().await.expect("job JSON")
    }
}

// ----- SQLite and storage -------------------------------------------------------------------

fn count(data_dir: &Path, sql: &str, p: impl rusqlite::Params) -> i64 {
    db(data_dir).query_row(sql, p, |r| r.get(0)).expect(sql)
}

fn repo_id(data_dir: &Path, name: &str) -> Option<i64> {
    db(data_dir)
        .query_row(
            "SELECT id FROM repositories WHERE upstream = 'fixture' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .ok()
}

/// Every row that belongs to repository `id`, per table.
fn rows_of(data_dir: &Path, id: i64) -> [i64; 4] {
    [
        count(data_dir, "SELECT count(*) FROM tags WHERE repo_id = ?1", [id]),
        count(
            data_dir,
            "SELECT count(*) FROM repo_manifests WHERE repo_id = ?1",
            [id],
        ),
        count(
            data_dir,
            "SELECT count(*) FROM repo_blobs WHERE repo_id = ?1",
            [id],
        ),
        count(data_dir, "SELECT count(*) FROM repositories WHERE id = ?1", [id]),
    ]
}

/// A snapshot of the other repository: its rows with their digests and times.
fn snapshot(data_dir: &Path, id: i64) -> Vec<String> {
    let db = db(data_dir);
    let mut out = Vec::new();
    for sql in [
        "SELECT 'tag ' || name || ' ' || digest || ' ' || cached_at FROM tags WHERE repo_id = ?1",
        "SELECT 'manifest ' || digest || ' ' || cached_at FROM repo_manifests WHERE repo_id = ?1",
        "SELECT 'blob ' || digest || ' ' || cached_at FROM repo_blobs WHERE repo_id = ?1",
        "SELECT 'repo ' || name || ' ' || state FROM repositories WHERE id = ?1",
    ] {
        let mut stmt = db.prepare(sql).expect(sql);
        let rows = stmt.query_map([id], |r| r.get::<_, String>(0)).expect(sql);
        out.extend(rows.map(|r| r.expect(sql)));
    }
    out.sort();
    out
}

/// What the seeding put in: the blobs only the big repository has, and those it shares.
struct Seeded {
    id: i64,
    own_blobs: BTreeSet<String>,
    shared_blobs: BTreeSet<String>,
    manifests: BTreeSet<String>,
}

/// Seeds `team/big` in one transaction while the server is stopped: 100 000 tags over
/// 1 000 image manifests; each manifest names its own config and layer, one of 10 base
/// layers only this repository has, and one layer of `team/other` (shared). Every blob is
/// linked to the repository, has its row and a real file whose content matches its digest;
/// nothing expires.
fn seed_big_repository(data_dir: &Path, other: &Image) -> Seeded {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let bases: Vec<Blob> = (0..BASES)
        .map(|i| Blob::random(&format!("big/base/{i}"), 1024))
        .collect();
    let mut own: Vec<Blob> = bases.clone();
    let mut manifests = Vec::with_capacity(MANIFESTS);
    for j in 0..MANIFESTS {
        let config = Blob::new(
            OCI_CONFIG,
            serde_json::to_vec(&json!({
                "created": "2024-05-01T00:00:00Z",
                "architecture": "amd64",
                "os": "linux",
                "rootfs": { "type": "layers", "diff_ids": [] },
                "config": { "Labels": { "build": j } },
            }))
            .expect("config JSON"),
        );
        let layer = Blob::random(&format!("big/layer/{j}"), 300 + j % 200);
        let base = &bases[j % BASES];
        let shared = &other.layers[j % other.layers.len()];
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [base.descriptor(), shared.descriptor(), layer.descriptor()],
        }))
        .expect("manifest JSON");
        let digest = sha256_digest(&body);
        let refs = vec![
            config.digest.clone(),
            base.digest.clone(),
            shared.digest.clone(),
            layer.digest.clone(),
        ];
        manifests.push((digest, body, config.digest.clone(), refs));
        own.push(config);
        own.push(layer);
    }
    let shared: Vec<&Blob> = other.layers.iter().collect();

    for blob in &own {
        let path = blob_path(data_dir, &blob.digest);
        std::fs::create_dir_all(path.parent().expect("shard dir")).expect("shard dir");
        std::fs::write(&path, &blob.bytes).expect("writing a blob file");
    }

    let mut conn = rusqlite::Connection::open(data_dir.join("regcache.db")).expect("open regcache.db");
    conn.pragma_update(None, "foreign_keys", "ON")
        .expect("foreign keys");
    let tx = conn.transaction().expect("transaction");
    let id: i64 = tx
        .query_row(
            "INSERT INTO repositories (upstream, name, created_at, last_used_at) VALUES ('fixture', ?1, ?2, ?2)
             RETURNING id",
            params![BIG, now],
            |r| r.get(0),
        )
        .expect("repository row");
    {
        let mut blob = tx
            .prepare(
                "INSERT INTO blobs (digest, size_bytes, cached_at, last_used_at) VALUES (?1, ?2, ?3, ?3)",
            )
            .expect("prepare");
        let mut link = tx
            .prepare(
                "INSERT INTO repo_blobs (repo_id, digest, cached_at, last_used_at, expires_at) VALUES (?1, ?2, ?3, ?3, NULL)",
            )
            .expect("prepare");
        for b in &own {
            blob.execute(params![b.digest, b.len() as i64, now])
                .expect("blob row");
            link.execute(params![id, b.digest, now]).expect("blob link");
        }
        for b in &shared {
            link.execute(params![id, b.digest, now])
                .expect("shared blob link");
        }
        let mut manifest = tx
            .prepare(
                "INSERT INTO manifests (digest, media_type, size_bytes, body, config_digest, created, cached_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .expect("prepare");
        let mut manifest_ref = tx
            .prepare("INSERT INTO manifest_refs (manifest_digest, ref_digest, kind) VALUES (?1, ?2, 'blob')")
            .expect("prepare");
        let mut manifest_link = tx
            .prepare(
                "INSERT INTO repo_manifests (repo_id, digest, cached_at, last_used_at, expires_at) VALUES (?1, ?2, ?3, ?3, NULL)",
            )
            .expect("prepare");
        for (digest, body, config, refs) in &manifests {
            manifest
                .execute(params![
                    digest,
                    OCI_MANIFEST,
                    body.len() as i64,
                    body,
                    config,
                    1_714_521_600_i64,
                    now
                ])
                .expect("manifest row");
            for r in refs {
                manifest_ref.execute(params![digest, r]).expect("manifest ref");
            }
            manifest_link
                .execute(params![id, digest, now])
                .expect("manifest link");
        }
        let mut tag = tx
            .prepare(
                "INSERT INTO tags (repo_id, name, digest, cached_at, last_used_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?4, NULL)",
            )
            .expect("prepare");
        for i in 0..TAGS {
            let (digest, ..) = &manifests[i % MANIFESTS];
            tag.execute(params![id, format!("t{i:06}"), digest, now])
                .expect("tag row");
        }
    }
    tx.commit().expect("commit the seed");
    Seeded {
        id,
        own_blobs: own.iter().map(|b| b.digest.clone()).collect(),
        shared_blobs: shared.iter().map(|b| b.digest.clone()).collect(),
        manifests: manifests.into_iter().map(|m| m.0).collect(),
    }
}

/// Pulls `image` under `repo` by tag `v1` (manifest and every blob), checking every byte.
async fn pull(client: &reqwest::Client, base: &str, repo: &str, image: &Image) {
    pull_image(client, base, repo, "v1", image).await;
}

// ----- the test -----------------------------------------------------------------------------

#[tokio::test]
async fn deleting_100k_tags_resumes_after_sigkill_and_leaves_shared_blobs() {
    let started = Instant::now();
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let other = Image::new(
        "repo-delete-other",
        &[3_000, 5_000, 7_000],
        "2024-04-01T00:00:00Z",
    );
    upstream.add_image(OTHER, Some("v1"), &other);
    // The upstream also has the big repository's first tag (another image), so serving it
    // during the deletion would answer 200: the 404 below is the cache refusing it.
    let upstream_big = Image::new("repo-delete-upstream-big", &[2_000], "2024-04-02T00:00:00Z");
    upstream.add_image(BIG, Some("t000000"), &upstream_big);
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let client = reqwest::Client::new();

    // Run 1: creates the schema and caches the other repository through the fixture.
    let mut server = start(dir.path(), &data_dir, &upstream.url(), "1").await;
    pull(&client, &server.base, OTHER, &other).await;
    server.stop().await;
    let other_id = repo_id(&data_dir, OTHER).expect("the other repository is cached");
    let seed_started = Instant::now();
    let seeded = seed_big_repository(&data_dir, &other);
    eprintln!("seeded {TAGS} tags in {:?}", seed_started.elapsed());
    assert_eq!(
        rows_of(&data_dir, seeded.id),
        [
            TAGS as i64,
            MANIFESTS as i64,
            (seeded.own_blobs.len() + seeded.shared_blobs.len()) as i64,
            1
        ]
    );
    let other_before = snapshot(&data_dir, other_id);
    assert_eq!(
        count(
            &data_dir,
            "SELECT count(*) FROM tags WHERE repo_id = ?1",
            [other_id]
        ),
        1,
        "{other_before:?}"
    );

    // Run 2: request the deletion; it is no longer served at once.
    let mut server = start(dir.path(), &data_dir, &upstream.url(), "2").await;
    let resp = server
        .admin(
            &client,
            reqwest::Method::DELETE,
            &format!("/api/v1/repositories/fixture/{BIG}"),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("Location header");
    let body: Value = resp.json().await.expect("202 body");
    let job_id = body["job"].as_i64().expect("job id");
    assert_eq!(location, format!("/api/v1/jobs/{job_id}"));
    upstream.reset_log();
    let resp = client
        .get(format!("{}/v2/{BIG}/manifests/t000000", server.base))
        .header(reqwest::header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("manifest request");
    assert_eq!(resp.status(), 404, "a repository being deleted is not served");
    let err: Value = resp.json().await.expect("error JSON");
    assert_eq!(err["errors"][0]["code"], "NAME_UNKNOWN", "{err}");
    assert!(
        err["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("being deleted")),
        "{err}"
    );
    assert!(
        upstream.log().iter().all(|r| !r.path.contains(BIG)),
        "nothing is fetched for a repository being deleted: {:?}",
        upstream.log().iter().map(|r| r.path.clone()).collect::<Vec<_>>()
    );
    assert!(
        count(
            &data_dir,
            "SELECT count(*) FROM tags WHERE repo_id = ?1",
            [seeded.id]
        ) > 0,
        "the refusal above happened while tags remained"
    );

    // Wait until the job has run several times with growing progress, then SIGKILL it
    // half-way.
    let mut seen_tags = BTreeSet::new();
    let end = Instant::now() + DEADLINE;
    let (runs_at_kill, removed_at_kill) = loop {
        let job = server.job(&client, job_id).await;
        assert!(
            job["error"].is_null(),
            "the deletion failed a run: {job:#}\n{}",
            server.log()
        );
        assert_ne!(
            job["state"], "succeeded",
            "finished before it could be killed: {job:#}"
        );
        let runs = job["runs"].as_i64().unwrap_or(0);
        let removed = job["progress"]["removed"]["tags"].as_u64().unwrap_or(0);
        if removed > 0 {
            seen_tags.insert(removed);
        }
        if runs > 1 && seen_tags.len() >= 3 && removed < KILL_BEFORE {
            server.sigkill();
            break (runs, removed);
        }
        assert!(
            removed < KILL_BEFORE,
            "{removed} tags deleted before the job was seen in several runs: {job:#}"
        );
        assert!(
            Instant::now() < end,
            "no progress in several runs: {job:#}\n{}",
            server.log()
        );
        tokio::time::sleep(common::POLL_INTERVAL).await;
    };
    let killed = rows_of(&data_dir, seeded.id);
    eprintln!(
        "killed in run {runs_at_kill} after {removed_at_kill}+ tags (progress seen: {seen_tags:?}); rows left {killed:?}"
    );
    assert!(killed[0] > 0, "tags remain after the kill: {killed:?}");
    assert_eq!(killed[3], 1, "the repository row goes last");
    let (state_at_kill, job_state_at_kill): (String, String) = db(&data_dir)
        .query_row(
            "SELECT r.state, j.state FROM repositories r, jobs j WHERE r.id = ?1 AND j.id = ?2",
            params![seeded.id, job_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("states after the kill");
    assert_eq!(state_at_kill, "delete_ongoing");
    assert_eq!(
        job_state_at_kill, "running",
        "the dead worker's lease is still held"
    );

    // Run 3: the sweeper takes the job back once its lease lapses; the deletion completes.
    let restarted = Instant::now();
    let server = start(dir.path(), &data_dir, &upstream.url(), "3").await;
    let end = Instant::now() + DELETION_DEADLINE;
    let job = loop {
        let job = server.job(&client, job_id).await;
        assert!(
            job["error"].is_null(),
            "the deletion failed a run: {job:#}\n{}",
            server.log()
        );
        if job["state"] == "succeeded" {
            break job;
        }
        assert!(
            Instant::now() < end,
            "deletion not finished: {job:#}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("deletion finished {:?} after the restart", restarted.elapsed());
    let requeued: Vec<Value> = server
        .log_events("sweeper ran")
        .into_iter()
        .filter(|f| {
            f["jobs.requeued"].as_u64().unwrap_or(0) > 0 || f["repositories.reset"].as_u64().unwrap_or(0) > 0
        })
        .collect();
    eprintln!("sweeps that took work back: {requeued:?}");
    assert!(
        requeued.iter().any(|f| f["jobs.requeued"].as_u64() >= Some(1)),
        "the sweeper took the dead worker's job back: {requeued:?}\n{}",
        server.log()
    );

    // The job's record: every run, true counts, no error.
    assert_eq!(job["attempts"], 0, "{job:#}");
    assert!(job["runs"].as_i64() > Some(runs_at_kill), "{job:#}");
    let removed = &job["result"]["removed"];
    assert_eq!(removed["tags"], TAGS, "{job:#}");
    assert_eq!(removed["manifests"], MANIFESTS, "{job:#}");
    assert_eq!(
        removed["blob_links"],
        seeded.own_blobs.len() + seeded.shared_blobs.len(),
        "{job:#}"
    );
    assert_eq!(removed["repositories"], 1, "{job:#}");
    assert_eq!(
        removed["blobs_handed_to_deletion"],
        seeded.own_blobs.len(),
        "{job:#}"
    );
    assert_eq!(
        job["result"]["blobs"]["handed"],
        seeded.own_blobs.len(),
        "{job:#}"
    );

    // Nothing of the big repository remains in SQLite.
    assert_eq!(rows_of(&data_dir, seeded.id), [0, 0, 0, 0]);
    assert_eq!(repo_id(&data_dir, BIG), None);
    let db_conn = db(&data_dir);
    for m in &seeded.manifests {
        let left: i64 = db_conn
            .query_row(
                "SELECT (SELECT count(*) FROM manifests WHERE digest = ?1) + (SELECT count(*) FROM manifest_refs WHERE manifest_digest = ?1)",
                [m],
                |r| r.get(0),
            )
            .expect("manifest rows");
        assert_eq!(left, 0, "manifest {m} of the deleted repository is gone");
    }
    drop(db_conn);

    // Its own blobs leave storage and SQLite through the deletion pipeline.
    let end = Instant::now() + DEADLINE;
    loop {
        let files = seeded
            .own_blobs
            .iter()
            .filter(|d| blob_path(&data_dir, d).exists())
            .count();
        let db_conn = db(&data_dir);
        let rows = seeded
            .own_blobs
            .iter()
            .filter(|d| {
                db_conn
                    .query_row(
                        "SELECT (SELECT count(*) FROM blobs WHERE digest = ?1) + (SELECT count(*) FROM pending_deletes WHERE digest = ?1)",
                        [d],
                        |r| r.get::<_, i64>(0),
                    )
                    .expect("blob rows")
                    > 0
            })
            .count();
        if files == 0 && rows == 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "{files} files and {rows} rows of the deleted repository's blobs remain\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The other repository is untouched and still served from the cache.
    assert_eq!(snapshot(&data_dir, other_id), other_before);
    for d in &seeded.shared_blobs {
        assert!(
            blob_path(&data_dir, d).exists(),
            "shared blob {d} is still stored"
        );
        assert_eq!(
            count(&data_dir, "SELECT count(*) FROM blobs WHERE digest = ?1", [d]),
            1,
            "shared blob {d} keeps its row"
        );
    }
    assert_eq!(
        count(&data_dir, "SELECT count(*) FROM pending_deletes", []),
        0,
        "nothing else was handed to deletion"
    );
    let gets_before: usize = other.blobs().map(|b| upstream.blob_gets(&b.digest)).sum();
    pull(&client, &server.base, OTHER, &other).await;
    let gets_after: usize = other.blobs().map(|b| upstream.blob_gets(&b.digest)).sum();
    assert_eq!(
        gets_before, gets_after,
        "the other repository's blobs came from the cache"
    );

    // Once deleted, the repository is served again: refetched from the upstream.
    let resp = client
        .get(format!("{}/v2/{BIG}/manifests/t000000", server.base))
        .header(reqwest::header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("manifest request");
    assert_eq!(ok_bytes(resp).await, upstream_big.manifest.bytes);
    eprintln!("total {:?}", started.elapsed());
}
