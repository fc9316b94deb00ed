//! Bundle imports that go wrong (issue 12, section 2): a corrupt byte in one blob, a
//! bundle cut short (inside an entry and between entries), and `regcache import` killed
//! with SIGKILL in the middle. Each fails with a message naming the blob or entry, links
//! nothing and leaves what was cached as it was; a second run completes without writing
//! again the blobs the first one committed; an import that is never run again is
//! abandoned by reconciliation, which deletes what only it held. Also: an import into the
//! data dir of a server that keeps serving. The bundles come from a cache that skopeo
//! filled from docker-registry.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::app::TestApp;
use common::binary::{Regcache, BIN};
use common::bundles::{
    bundle_blobs, corrupt_entry, inode, regcache_fails, regcache_ok, seed_image, tar_entries, truncate_copy,
    Site, TarEntry,
};
use common::data_dir::{blob_path, count, leftovers};
use common::external::{skopeo_copy, DockerRegistry};
use common::images::{assert_layout_has, Image};
use common::wait_until_async;

/// Bound on waiting for an import to reach the point where it is killed.
const DEADLINE: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;

/// Two images exported one bundle each from a cache skopeo filled from docker-registry.
struct Bundles {
    /// `127.0.0.1:PORT` of the (now stopped) registry: the images' HOST.
    host: String,
    /// Three layers of 5 MiB (above the 4 MiB up to which entries are read whole) and a
    /// small one.
    big: Image,
    big_bundle: PathBuf,
    small: Image,
    small_bundle: PathBuf,
    /// Both images, the small one first (its blobs come before the large one's).
    both_bundle: PathBuf,
    _source: Site,
}

async fn bundles() -> Bundles {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let big = Image::new(
        "fail-big",
        &[5 * MIB, 5 * MIB, 5 * MIB, 30_000],
        "2024-05-01T00:00:00Z",
    );
    let small = Image::new("fail-small", &[70_000], "2024-05-02T00:00:00Z");
    seed_image(&registry, work.path(), "test/big", "v1", &big).await;
    seed_image(&registry, work.path(), "test/small", "v1", &small).await;
    let host = registry.host_port();
    let source = Site::new(&registry.url(), false, "");
    let app = TestApp::start_config(source.config(), None).await;
    let mut paths = Vec::new();
    for repo in ["test/big", "test/small"] {
        skopeo_copy(
            &format!("docker://{}/{repo}:v1", app.base.trim_start_matches("http://")),
            &format!("oci:{}:v1", work.path().join(repo.replace('/', "-")).display()),
            &[],
        )
        .await
        .unwrap();
        let list = source.path(&format!("{}.toml", repo.replace('/', "-")));
        std::fs::write(&list, format!("[[image]]\nref = \"{host}/{repo}:v1\"\n")).unwrap();
        let bundle = source.path(&format!("{}.tar", repo.replace('/', "-")));
        regcache_ok(&[
            "export",
            "--config",
            source.config_arg(),
            list.to_str().unwrap(),
            "-o",
            bundle.to_str().unwrap(),
        ])
        .await;
        paths.push(bundle);
    }
    let list = source.path("both.toml");
    std::fs::write(
        &list,
        format!("[[image]]\nref = \"{host}/test/small:v1\"\n[[image]]\nref = \"{host}/test/big:v1\"\n"),
    )
    .unwrap();
    let both_bundle = source.path("both.tar");
    regcache_ok(&[
        "export",
        "--config",
        source.config_arg(),
        list.to_str().unwrap(),
        "-o",
        both_bundle.to_str().unwrap(),
    ])
    .await;
    let small_bundle = paths.pop().unwrap();
    let big_bundle = paths.pop().unwrap();
    Bundles {
        host,
        big,
        big_bundle,
        small,
        small_bundle,
        both_bundle,
        _source: source,
    }
}

/// An offline site whose upstream (the stopped registry) is gone.
fn offline_site(b: &Bundles) -> Site {
    Site::new(&format!("http://{}", b.host), true, "")
}

/// The last blob entry of a bundle larger than `min` bytes, and the blob entries before it.
fn last_blob_over(bundle: &Path, min: u64) -> (TarEntry, Vec<TarEntry>) {
    let blobs: Vec<TarEntry> = tar_entries(bundle)
        .into_iter()
        .filter(|e| e.path.starts_with("blobs/sha256/") && e.size > 0)
        .collect();
    let at = blobs.iter().rposition(|e| e.size > min).expect("a large blob");
    (blobs[at].clone(), blobs[..at].to_vec())
}

fn digest_of(e: &TarEntry) -> String {
    format!("sha256:{}", e.path.trim_start_matches("blobs/sha256/"))
}

/// Blob files the import committed (held, not linked yet), by digest.
fn held(data_dir: &Path) -> Vec<String> {
    let db = common::data_dir::db(data_dir);
    let mut stmt = db
        .prepare("SELECT DISTINCT digest FROM import_blobs ORDER BY digest")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn linked_nothing(data_dir: &Path) {
    for table in ["tags", "repo_manifests", "repo_blobs", "manifests"] {
        assert_eq!(
            count(data_dir, &format!("SELECT count(*) FROM {table}")),
            0,
            "{table}: nothing of the image is linked"
        );
    }
}

async fn serves(site: &Site, repo: &str, image: &Image) {
    let app = TestApp::start_config(site.config(), None).await;
    app.pull(repo, "v1", image).await;
    let mut app = app;
    app.stop().await;
}

#[tokio::test]
async fn a_corrupt_or_truncated_bundle_fails_naming_the_entry_and_a_rerun_completes() {
    let b = bundles().await;
    let good = b.big_bundle.to_str().unwrap();
    let (last, before) = last_blob_over(&b.big_bundle, 4 * MIB as u64);

    // One flipped byte in the last large blob.
    let site = offline_site(&b);
    let corrupt = site.path("corrupt.tar");
    corrupt_entry(&b.big_bundle, &corrupt, &last.path, last.size / 2);
    let err = regcache_fails(&["import", "--config", site.config_arg(), corrupt.to_str().unwrap()]).await;
    assert!(err.contains(&last.path) && err.contains("corrupt"), "{err}");
    linked_nothing(&site.data_dir());
    // Read as a stream (a pipe), the bundle goes through the other reading path.
    let err = import_streamed(&site, &corrupt).await;
    assert!(err.contains(&last.path) && err.contains("corrupt"), "{err}");
    linked_nothing(&site.data_dir());
    let committed = held(&site.data_dir());
    let mut expected: Vec<String> = before.iter().filter(|e| e.size > 4096).map(digest_of).collect();
    expected.sort();
    assert!(
        expected.iter().all(|d| committed.contains(d)) && !committed.contains(&digest_of(&last)),
        "the blobs before the corrupt one are committed and held: {committed:?}"
    );
    let inodes: Vec<u64> = committed
        .iter()
        .map(|d| inode(&blob_path(&site.data_dir(), d)))
        .collect();
    // The good bundle: the committed blobs are not written again.
    let done = regcache_ok(&["import", "--config", site.config_arg(), good, "--json"]).await;
    assert_eq!(done["blobs_reused"], committed.len(), "{done}");
    for (d, ino) in committed.iter().zip(&inodes) {
        assert_eq!(
            inode(&blob_path(&site.data_dir(), d)),
            *ino,
            "{d} was not written again"
        );
    }
    serves(&site, "test/big", &b.big).await;

    // A site with the small image; a bundle cut inside the large blob, then one cut
    // between entries: each fails, names what is missing, and the small image stays.
    let site = offline_site(&b);
    regcache_ok(&[
        "import",
        "--config",
        site.config_arg(),
        b.small_bundle.to_str().unwrap(),
    ])
    .await;
    let tags_before = count(&site.data_dir(), "SELECT count(*) FROM tags");
    let inside = site.path("inside.tar");
    truncate_copy(&b.big_bundle, &inside, last.offset + last.size / 3);
    let err = regcache_fails(&["import", "--config", site.config_arg(), inside.to_str().unwrap()]).await;
    assert!(err.contains(&last.path) && err.contains("truncated"), "{err}");
    let err = import_streamed(&site, &inside).await;
    assert!(err.contains(&last.path) && err.contains("truncated"), "{err}");
    let between = site.path("between.tar");
    truncate_copy(&b.big_bundle, &between, last.offset - 512);
    let err = regcache_fails(&["import", "--config", site.config_arg(), between.to_str().unwrap()]).await;
    assert!(
        err.contains(&digest_of(&last)) && err.contains("neither in the bundle nor cached"),
        "{err}"
    );
    assert_eq!(count(&site.data_dir(), "SELECT count(*) FROM tags"), tags_before);
    assert_eq!(
        count(
            &site.data_dir(),
            "SELECT count(*) FROM repositories WHERE name = 'test/big'"
        ),
        0,
        "nothing of the cut image is linked"
    );
    serves(&site, "test/small", &b.small).await;
    regcache_ok(&["import", "--config", site.config_arg(), good]).await;
    serves(&site, "test/big", &b.big).await;
    serves(&site, "test/small", &b.small).await;

    // A bundle of two images cut after the first one's blobs: the complete one is not
    // linked either, since the bundle as a whole is broken.
    let site = offline_site(&b);
    let (last, _) = last_blob_over(&b.both_bundle, 4 * MIB as u64);
    let cut = site.path("both-cut.tar");
    truncate_copy(&b.both_bundle, &cut, last.offset - 512);
    let err = regcache_fails(&["import", "--config", site.config_arg(), cut.to_str().unwrap()]).await;
    assert!(
        err.contains("test/big:v1") && err.contains(&digest_of(&last)),
        "{err}"
    );
    linked_nothing(&site.data_dir());
    regcache_ok(&[
        "import",
        "--config",
        site.config_arg(),
        b.both_bundle.to_str().unwrap(),
    ])
    .await;
    serves(&site, "test/small", &b.small).await;
    serves(&site, "test/big", &b.big).await;
}

/// `regcache import` reading a named pipe fed by a thread of the test: first the bundle's
/// bytes up to a cut, then (when told) the rest, so the import can be paused in the middle
/// at a point the test chooses.
struct PipedImport {
    child: tokio::process::Child,
    writer: std::thread::JoinHandle<()>,
    rest: std::sync::mpsc::Sender<bool>,
    fifo: PathBuf,
}

impl PipedImport {
    /// Starts the import of `bundle` into `site` and returns once it holds every blob of
    /// `expect` (all before `cut`): it is then waiting for more bytes.
    async fn start(site: &Site, bundle: &Path, cut: u64, expect: &[String]) -> PipedImport {
        let fifo = site.path("pipe");
        let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        let child = tokio::process::Command::new(BIN)
            .args(["import", "--json", "--config", site.config_arg()])
            .arg(&fifo)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning regcache import");
        let (rest, told) = std::sync::mpsc::channel::<bool>();
        let bytes = std::fs::read(bundle).unwrap();
        let writer = std::thread::spawn({
            let fifo = fifo.clone();
            move || {
                use std::io::Write as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&fifo)
                    .expect("open fifo");
                let _ = f.write_all(&bytes[..cut as usize]);
                if told.recv() == Ok(true) {
                    let _ = f.write_all(&bytes[cut as usize..]);
                }
            }
        });
        let data = site.data_dir();
        wait_until_async("the import committed the blobs before the cut", DEADLINE, || {
            // The database may not be created and migrated yet.
            let now: Vec<String> = rusqlite::Connection::open_with_flags(
                data.join("regcache.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .and_then(|db| {
                let mut stmt = db.prepare("SELECT digest FROM import_blobs")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .unwrap_or_default();
            let done = expect.iter().all(|d| now.contains(d));
            async move { done }
        })
        .await;
        PipedImport {
            child,
            writer,
            rest,
            fifo,
        }
    }

    /// SIGKILL, then the pipe is closed.
    async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL");
        let status = self.child.wait().await.unwrap();
        assert!(!status.success(), "killed, not finished: {status}");
        drop(self.rest);
        self.writer.join().unwrap();
        std::fs::remove_file(&self.fifo).unwrap();
    }

    /// Feeds the rest of the bundle; the import must then succeed. Returns its summary.
    async fn finish(self) -> serde_json::Value {
        self.rest.send(true).unwrap();
        let out = tokio::time::timeout(DEADLINE, self.child.wait_with_output())
            .await
            .expect("the import finishes")
            .unwrap();
        self.writer.join().unwrap();
        std::fs::remove_file(&self.fifo).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "import failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON summary")
    }
}

/// `regcache import` of `bundle` fed through a named pipe, so it is read as a stream
/// (entry by entry, hashed on the way) rather than copied from the file; it must fail.
/// Returns its stderr.
async fn import_streamed(site: &Site, bundle: &Path) -> String {
    let fifo = site.path("stream");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let child = tokio::process::Command::new(BIN)
        .args(["import", "--config", site.config_arg()])
        .arg(&fifo)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning regcache import");
    let bytes = std::fs::read(bundle).unwrap();
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .expect("open fifo");
            // The import may stop reading at the corrupt entry.
            let _ = f.write_all(&bytes);
        }
    });
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the import ends")
        .unwrap();
    writer.join().unwrap();
    std::fs::remove_file(&fifo).unwrap();
    assert!(!out.status.success(), "the streamed import should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The blobs a bundle carries before its last large one (those an import paused in that
/// one has committed), and a cut in the middle of that one.
fn cut_in_last_large_blob(bundle: &Path) -> (u64, Vec<String>) {
    let (last, before) = last_blob_over(bundle, 4 * MIB as u64);
    let mut expect: Vec<String> = before.iter().filter(|e| e.size > 4096).map(digest_of).collect();
    expect.sort();
    (last.offset + last.size / 2, expect)
}

#[tokio::test]
async fn an_import_killed_midway_links_nothing_a_rerun_reuses_its_blobs_and_an_abandoned_one_is_collected() {
    let b = bundles().await;
    let (cut, expect) = cut_in_last_large_blob(&b.big_bundle);

    let site = offline_site(&b);
    PipedImport::start(&site, &b.big_bundle, cut, &expect)
        .await
        .kill()
        .await;
    let committed = held(&site.data_dir());
    assert!(expect.iter().all(|d| committed.contains(d)), "{committed:?}");
    linked_nothing(&site.data_dir());
    assert_eq!(count(&site.data_dir(), "SELECT count(*) FROM imports"), 1);
    let inodes: Vec<u64> = committed
        .iter()
        .map(|d| inode(&blob_path(&site.data_dir(), d)))
        .collect();
    let done = regcache_ok(&[
        "import",
        "--config",
        site.config_arg(),
        b.big_bundle.to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(done["blobs_reused"], committed.len(), "{done}");
    assert_eq!(
        done["blobs_committed"].as_u64().unwrap() as usize + committed.len(),
        b.big.blobs().count(),
        "{done}"
    );
    for (d, ino) in committed.iter().zip(&inodes) {
        assert_eq!(
            inode(&blob_path(&site.data_dir(), d)),
            *ino,
            "{d} was not written again"
        );
    }
    serves(&site, "test/big", &b.big).await;

    // Killed and never run again: once it is stale, reconciliation collects what it held.
    let site = Site::new(
        &format!("http://{}", b.host),
        true,
        "[storage]\nreconcile_grace = \"1s\"\n",
    );
    PipedImport::start(&site, &b.big_bundle, cut, &expect)
        .await
        .kill()
        .await;
    let committed = held(&site.data_dir());
    assert!(!committed.is_empty());
    let work_dirs = std::fs::read_dir(site.data_dir().join("imports"))
        .unwrap()
        .count();
    assert_eq!(work_dirs, 1, "the killed import's work dir is left");
    let fsck = regcache_ok(&["fsck", "--config", site.config_arg(), "--json"]).await;
    assert_eq!(
        fsck["imports_abandoned"], 0,
        "a recent import is not abandoned: {fsck}"
    );
    assert_eq!(held(&site.data_dir()), committed);
    // Its last heartbeat, a day ago.
    let db = rusqlite::Connection::open(site.data_dir().join("regcache.db")).unwrap();
    db.execute("UPDATE imports SET heartbeat_at = heartbeat_at - 86400", [])
        .unwrap();
    drop(db);
    let fsck = regcache_ok(&["fsck", "--config", site.config_arg(), "--json"]).await;
    assert_eq!(fsck["imports_abandoned"], 1, "{fsck}");
    assert_eq!(fsck["import_blobs_queued"], committed.len(), "{fsck}");
    assert_eq!(fsck["import_dirs_removed"], 1, "{fsck}");
    assert_eq!(fsck["blobs_deleted"], committed.len(), "{fsck}");
    assert_eq!(leftovers(&site.data_dir()), "", "nothing is left of the import");
    assert_eq!(count(&site.data_dir(), "SELECT count(*) FROM imports"), 0);
    assert_eq!(
        std::fs::read_dir(site.data_dir().join("imports"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn an_import_into_a_serving_data_dir_survives_a_restart_and_is_served_at_once() {
    let b = bundles().await;
    let site = offline_site(&b);
    regcache_ok(&[
        "import",
        "--config",
        site.config_arg(),
        b.small_bundle.to_str().unwrap(),
    ])
    .await;
    let text = std::fs::read_to_string(&site.config_path).unwrap();
    let server_dir = tempfile::tempdir().unwrap();
    let config_for = |port: u16| {
        text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
    };
    let mut server = Regcache::start(server_dir.path(), "first", config_for).await;

    // Pulls of the small image go on while the large one is imported.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let puller = tokio::spawn({
        let (base, small, stop) = (server.base.clone(), b.small.clone(), stop.clone());
        async move {
            let client = reqwest::Client::new();
            let mut pulls = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || pulls == 0 {
                common::app::pull_image(&client, &base, "test/small", "v1", &small).await;
                pulls += 1;
            }
            pulls
        }
    });
    let (cut, expect) = cut_in_last_large_blob(&b.big_bundle);
    let import = PipedImport::start(&site, &b.big_bundle, cut, &expect).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pulls = puller.await.expect("every pull during the import succeeded");
    assert!(pulls >= 1);

    // The server restarts meanwhile: it empties data_dir/tmp and takes back what a dead
    // process left, but the import's work files and holds are its own.
    server.stop().await;
    let work: Vec<PathBuf> = std::fs::read_dir(site.data_dir().join("imports"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(work.len(), 1);
    let mut server = Regcache::start(server_dir.path(), "second", config_for).await;
    assert!(
        work[0].exists(),
        "the running import's work dir survived the restart"
    );
    let still = held(&site.data_dir());
    assert!(
        expect.iter().all(|d| still.contains(d)),
        "and its holds: {still:?}"
    );
    let done = import.finish().await;
    assert_eq!(done["images"][0], format!("{}/test/big:v1", b.host), "{done}");

    // Served without a restart, to skopeo.
    let out = site.path("pulled");
    skopeo_copy(
        &format!(
            "docker://{}/test/big:v1",
            server.base.trim_start_matches("http://")
        ),
        &format!("oci:{}:v1", out.display()),
        &[],
    )
    .await
    .unwrap();
    let digests: Vec<&str> = std::iter::once(b.big.manifest.digest.as_str())
        .chain(b.big.blobs().map(|x| x.digest.as_str()))
        .collect();
    assert_layout_has(&out, &digests);
    assert_eq!(bundle_blobs(&b.big_bundle).len(), digests.len());
    common::app::pull_image(
        &reqwest::Client::new(),
        &server.base,
        "test/small",
        "v1",
        &b.small,
    )
    .await;
    server.stop().await;
}
