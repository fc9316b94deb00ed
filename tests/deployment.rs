//! Deployment traps: a second `regcache serve` on a data directory in use refuses to start
//! and names the first one's pid (CLI commands keep working beside it, and a SIGKILLed
//! holder does not block a restart); two data directories on one bucket prefix (moto as
//! S3) never delete each other's blobs, and the second is told to use its own prefix.

mod common;

use common::app::{config_for, TestApp};
use common::binary::{run, write, Regcache, SERVE_DEADLINE};
use common::data_dir::count;
use common::external::{MotoS3, MOTO_ACCESS_KEY, MOTO_REGION, MOTO_SECRET_KEY};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::wait_until_async;
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use regcache::config::{Backend, S3Config, Secret};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const CREATED: &str = "2024-09-01T00:00:00Z";

#[tokio::test]
async fn a_second_server_on_one_data_dir_refuses_to_start_and_names_the_first() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let config = |port: u16| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [log]\nformat = \"json\"\n\
             [[upstream]]\nname = \"fixture\"\nurl = \"{}\"\ndefault = true\n",
            data_dir.display(),
            upstream.url()
        )
    };
    let mut first = Regcache::start(dir.path(), "first", config).await;
    // The second one gets the same data directory and a port of its own.
    let second_config = write(dir.path(), "second.toml", &config(common::external::free_port()));

    let refused = run(
        &["serve", "--config", &second_config],
        &[],
        dir.path(),
        SERVE_DEADLINE,
    );
    refused.assert_failure_naming(&[
        "locked by another regcache process",
        &format!("(pid {})", first.pid()),
        "server.data_dir",
    ]);
    // The first one was not disturbed, and commands meant to run beside it still do.
    let v2 = reqwest::get(format!("{}/v2/", first.base))
        .await
        .expect("GET /v2/");
    assert!(v2.status().is_success());
    let config_path = first.config.to_str().expect("UTF-8 path").to_owned();
    for args in [
        vec!["status", "--json"],
        vec!["fsck", "--json"],
        vec!["jobs", "--json"],
        vec!["repos", "--json"],
    ] {
        let args: Vec<&str> = args.into_iter().chain(["--config", &config_path]).collect();
        run(&args, &[], dir.path(), SERVE_DEADLINE).ok();
    }

    // A holder killed with SIGKILL leaves no lock behind.
    first.sigkill();
    let second = Regcache::start(dir.path(), "second", config).await;
    let v2 = reqwest::get(format!("{}/v2/", second.base))
        .await
        .expect("GET /v2/");
    assert!(v2.status().is_success());
}

// ----- one bucket prefix, two data directories ---------------------------------------------

const PREFIX: &str = "regcache";

fn s3_config(moto: &MotoS3, c: &mut regcache::config::Config) {
    c.storage.backend = Backend::S3;
    c.storage.s3 = Some(S3Config {
        bucket: moto.bucket().to_owned(),
        region: MOTO_REGION.into(),
        endpoint: Some(moto.endpoint()),
        allow_http: true,
        access_key_id: Some(MOTO_ACCESS_KEY.into()),
        secret_access_key: Some(Secret::new(MOTO_SECRET_KEY)),
        secret_access_key_file: None,
        prefix: PREFIX.into(),
    });
}

/// A config file for `regcache fsck` (or `serve`) on `data_dir`, the moto bucket under
/// `PREFIX`, with no grace for orphans, logging JSON.
fn s3_toml(dir: &Path, name: &str, moto: &MotoS3, data_dir: &Path, upstream: &str, port: u16) -> String {
    write(
        dir,
        name,
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [storage]\nbackend = \"s3\"\nreconcile_grace = \"0\"\n\
             [storage.s3]\nbucket = \"{}\"\nregion = \"{MOTO_REGION}\"\nendpoint = \"{}\"\nprefix = \"{PREFIX}\"\n\
             allow_http = true\naccess_key_id = \"{MOTO_ACCESS_KEY}\"\nsecret_access_key = \"{MOTO_SECRET_KEY}\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\
             [[upstream]]\nname = \"fixture\"\nurl = \"{upstream}\"\ndefault = true\n",
            data_dir.display(),
            moto.bucket(),
            moto.endpoint(),
        ),
    )
}

/// A client of the moto bucket, our own.
fn s3(moto: &MotoS3) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(moto.bucket())
        .with_region(MOTO_REGION)
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_access_key_id(MOTO_ACCESS_KEY)
        .with_secret_access_key(MOTO_SECRET_KEY)
        .build()
        .expect("S3 client")
}

/// Blob keys in the bucket.
async fn blob_keys(moto: &MotoS3) -> BTreeSet<String> {
    let s3 = s3(moto);
    let mut keys = BTreeSet::new();
    let mut listing = s3.list(None);
    while let Some(meta) = listing.next().await {
        let key = meta.expect("listing").location.to_string();
        if key.contains("/blobs/") {
            keys.insert(key);
        }
    }
    keys
}

fn fsck(config: &str, dir: &Path) -> serde_json::Value {
    run(&["fsck", "--json", "--config", config], &[], dir, SERVE_DEADLINE)
        .ok()
        .json()
}

#[tokio::test]
async fn two_data_dirs_on_one_bucket_prefix_never_delete_each_others_blobs() {
    let moto = MotoS3::start("regcache-shared-prefix").await;
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("shared-prefix", &[3000, 500], CREATED);
    upstream.add_image("team/app", Some("v1"), &image);
    let dir = tempfile::tempdir().expect("temp dir");

    // The first instance caches an image: its blobs are under the prefix, which it marks.
    let first_dir = dir.path().join("first");
    let mut config = config_for(&[("fixture", &upstream.url())], &first_dir);
    s3_config(&moto, &mut config);
    let first = TestApp::start_config(config, None).await;
    first.pull("team/app", "v1", &image).await;
    let cached = blob_keys(&moto).await;
    assert_eq!(cached.len(), image.blobs().count(), "{cached:?}");

    // Another data directory on the same prefix: every blob there is an orphan to it,
    // and none may go. A server on it says so at start-up, and its reconciliation (at
    // start-up, then `regcache fsck` beside it) deletes nothing.
    let second_dir = dir.path().join("second");
    let server = Regcache::start(dir.path(), "second", |port| {
        let path = s3_toml(
            dir.path(),
            "second.toml",
            &moto,
            &second_dir,
            &upstream.url(),
            port,
        );
        std::fs::read_to_string(path).expect("config")
    })
    .await;
    wait_until_async("the second server's start-up reconciliation", Duration::from_secs(30), || async {
        !server
            .log_events("the storage prefix belongs to another regcache instance: its objects were not deleted; give each instance its own prefix")
            .is_empty()
    })
    .await;
    let said = server.log_events(
        "the storage prefix belongs to another regcache instance (another data directory); reconciliation will delete nothing there. Give each instance its own storage.s3.prefix (or storage.gcs.prefix)",
    );
    assert_eq!(said.len(), 1, "{}", server.log());
    assert_eq!(
        said[0]["owner.data_dir"],
        first_dir.display().to_string(),
        "{:#}",
        said[0]
    );
    let report = fsck(server.config.to_str().expect("UTF-8 path"), dir.path());
    assert_eq!(report["orphan_objects"], cached.len(), "{report:#}");
    assert_eq!(report["orphans_queued"], 0, "{report:#}");
    assert!(report["prefix_owner"].is_string(), "{report:#}");
    assert_eq!(count(&second_dir, "SELECT count(*) FROM pending_deletes"), 0);
    assert_eq!(blob_keys(&moto).await, cached);

    // The owner still deletes real orphans under its own prefix.
    let stray = bytes::Bytes::from_static(b"left by a crash");
    let hex = common::images::sha256_digest(&stray)
        .trim_start_matches("sha256:")
        .to_owned();
    let stray_key = format!("{PREFIX}/blobs/sha256/{}/{hex}", &hex[..2]);
    s3(&moto)
        .put(&stray_key.as_str().into(), stray.into())
        .await
        .expect("putting a stray blob");
    let first_config = s3_toml(dir.path(), "first.toml", &moto, &first_dir, &upstream.url(), 0);
    let report = fsck(&first_config, dir.path());
    assert_eq!(report["prefix_owner"], serde_json::Value::Null, "{report:#}");
    assert_eq!(report["orphans_queued"], 1, "{report:#}");
    assert_eq!(
        blob_keys(&moto).await,
        cached,
        "the stray blob went, the cached ones stay"
    );
}

/// Two instances starting at once on one unclaimed prefix: each reads "no marker", and
/// the second writes its claim after the first. The claim is a create-only put, so the
/// first marker stands and the second instance learns that the prefix is not its own
/// (with a plain put, each read back its own marker and both deleted "orphans").
#[tokio::test]
async fn of_two_instances_claiming_one_prefix_at_once_only_the_first_owns_it() {
    use common::failing_store::FailingStore;
    use regcache::storage::{BlobStore, PrefixOwner, OWNER_MARKER};
    let store = FailingStore::in_memory();
    let blobs = BlobStore::new(store.as_dyn(), "cache".into(), None, false).shared();
    let marker = object_store::path::Path::from(format!("cache/{OWNER_MARKER}"));
    let theirs = serde_json::json!({"instance": "first-instance", "data_dir": "/srv/first", "claimed_at": 1});
    store.put_first(marker, serde_json::to_vec(&theirs).expect("json").into());
    let owner = blobs
        .claim_prefix("second-instance", "/srv/second", 2)
        .await
        .expect("claiming");
    assert_eq!(
        owner,
        PrefixOwner::Other {
            instance: "first-instance".into(),
            data_dir: "/srv/first".into()
        }
    );
    assert_eq!(
        blobs
            .prefix_owner("first-instance")
            .await
            .expect("reading the marker"),
        PrefixOwner::Ours,
        "the first claim stands"
    );
    // Unraced, a claim on a fresh prefix is the claimer's.
    let fresh = BlobStore::new(FailingStore::in_memory().as_dyn(), "cache".into(), None, false).shared();
    assert_eq!(
        fresh
            .claim_prefix("second-instance", "/srv/second", 3)
            .await
            .expect("claiming"),
        PrefixOwner::Ours
    );
}
