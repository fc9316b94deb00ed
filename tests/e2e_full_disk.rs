//! A full disk end to end (I10): `regcache serve` (the binary) on a small tmpfs that is
//! full, docker-registry as the upstream, skopeo pulling an image through it. The pull
//! succeeds with every digest checked, nothing is cached or left behind, the server keeps
//! serving, `regcache status` and the log say the disk is full (the log once, however
//! many requests met it), and caching resumes by itself once space is freed.

mod common;

use common::binary::{run_ok_async, Regcache};
use common::data_dir::{blob_files, count};
use common::external::{push_image, skopeo_pull, DockerRegistry};
use common::images::Image;
use common::tmpfs::Tmpfs;
use common::wait_until_async;
use std::path::Path;
use std::time::Duration;

/// The 5 s tick that notices space is back, and skopeo pulls on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);
const MIB: usize = 1024 * 1024;
const FULL: &str =
    "data dir disk is full: blobs are passed through and manifests served without caching until space is freed";
const RESUMED: &str = "data dir disk has space again; caching resumes";

async fn status(rc: &Regcache) -> String {
    // Spaces squeezed: the columns are as wide as the widest label.
    let out = run_ok_async(&["status", "--config", rc.config.to_str().unwrap()]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn cached(data_dir: &Path) -> (i64, i64) {
    (
        count(data_dir, "SELECT count(*) FROM manifests"),
        count(data_dir, "SELECT count(*) FROM blobs"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_a_full_disk_and_caching_resumes_once_space_is_freed() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new(
        "e2e-full-disk",
        &[6 * MIB, 2 * MIB, 300_000],
        "2024-01-01T00:00:00Z",
    );
    push_image(&registry, work.path(), "app/full", &image).await;
    let disk = Tmpfs::mount(32 * MIB as u64);
    let data_dir = disk.path().to_owned();
    let rc = Regcache::start(work.path(), "full-disk", |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\
             [[upstream]]\nname = \"origin\"\nurl = \"{}\"\ndefault = true\n",
            data_dir.display(),
            registry.url()
        )
    })
    .await;
    assert!(status(&rc).await.contains("disk full no"));
    disk.fill("filler");

    skopeo_pull(&rc.base, "app/full", &image, &work.path().join("pull-1")).await;
    skopeo_pull(&rc.base, "app/full", &image, &work.path().join("pull-2")).await;
    assert_eq!(cached(&data_dir), (0, 0), "nothing was cached");
    assert!(blob_files(&data_dir).is_empty(), "no blob was stored");
    let tmp: Vec<_> = std::fs::read_dir(data_dir.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no temporary file is left: {tmp:?}");
    let v2 = reqwest::get(format!("{}/v2/", rc.base)).await.unwrap();
    assert_eq!(v2.status(), 200, "the server keeps serving");
    let full = status(&rc).await;
    assert!(full.contains("disk full YES"), "{full}");
    assert_eq!(
        rc.log_events(FULL).len(),
        1,
        "logged once for the episode, not per request:\n{}",
        rc.log()
    );

    disk.free("filler");
    wait_until_async("the server notices space is back", DEADLINE, || async {
        rc.log_events(RESUMED).len() == 1
    })
    .await;
    assert!(status(&rc).await.contains("disk full no"));
    skopeo_pull(&rc.base, "app/full", &image, &work.path().join("pull-3")).await;
    wait_until_async("the image is cached", DEADLINE, || async {
        cached(&data_dir) == (1, 4)
    })
    .await;
    assert_eq!(blob_files(&data_dir).len(), 4);
}
