//! Bundle tests' helpers: a site (a config file and its data dir, as the CLI reads it and
//! as `TestApp` serves it), the `regcache export` / `import` commands run as a user runs
//! them, seeding tags into docker-registry, and reading or damaging a bundle's tar entries
//! with the `tar` crate (not regcache's code).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use regcache::config::Config;

use super::binary::BIN;
use super::external::{skopeo_copy, DockerRegistry};
use super::images::{Image, Index};

/// Bound on one export or import in tests (a few MiB on a busy 2-core machine).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// A cache site: `dir/regcache.toml` with its data in `dir/data`.
#[derive(Debug)]
pub struct Site {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Site {
    /// A site whose only upstream, "cncf" (the default), is at `upstream_url`; `extra` is
    /// appended to the config (more sections).
    pub fn new(upstream_url: &str, offline: bool, extra: &str) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let config_path = dir.path().join("regcache.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [proxy]\noffline = {offline}\nrevalidate_timeout = \"2s\"\nread_timeout = \"5s\"\n\
             [[upstream]]\nname = \"cncf\"\nurl = \"{upstream_url}\"\ndefault = true\n{extra}",
            data.display()
        );
        std::fs::write(&config_path, text).expect("writing the site config");
        Site { dir, config_path }
    }

    pub fn config(&self) -> Config {
        regcache::config::load(Some(&self.config_path), Vec::new()).expect("the site config loads")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_arg(&self) -> &str {
        self.config_path.to_str().expect("UTF-8 path")
    }

    /// A path in the site's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs `regcache ARGS` with an empty environment under `CLI_TIMEOUT` (killed when it
/// passes); returns what it did, whether it succeeded or not.
pub async fn regcache(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning regcache");
    tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("regcache {args:?} did not finish within {CLI_TIMEOUT:?}"))
        .expect("waiting for regcache")
}

/// `regcache ARGS`, which must succeed; returns what it printed as JSON (`--json`: the
/// document, or the last line of JSON lines, the summary), or null.
pub async fn regcache_ok(args: &[&str]) -> serde_json::Value {
    let out = regcache(args).await;
    assert!(
        out.status.success(),
        "regcache {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // One JSON document (`fsck --json`), or JSON lines ending with the summary.
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout)
        .ok()
        .or_else(|| stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()))
        .unwrap_or(serde_json::Value::Null)
}

/// `regcache ARGS`, which must fail; returns its stderr.
pub async fn regcache_fails(args: &[&str]) -> String {
    let out = regcache(args).await;
    assert!(
        !out.status.success(),
        "regcache {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Pushes `image` to the registry as `repo:tag`.
pub async fn seed_image(registry: &DockerRegistry, work: &Path, repo: &str, tag: &str, image: &Image) {
    let layout = work
        .join("seed")
        .join(format!("{}-{tag}", repo.replace('/', "-")));
    image.write_oci_layout(&layout, tag);
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{}/{repo}:{tag}", registry.host_port()),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {repo}:{tag}: {e}"));
}

/// Pushes `index` (every platform) to the registry as `repo:tag`.
pub async fn seed_index(registry: &DockerRegistry, work: &Path, repo: &str, tag: &str, index: &Index) {
    let layout = work
        .join("seed")
        .join(format!("{}-{tag}", repo.replace('/', "-")));
    index.write_oci_layout(&layout, tag);
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{}/{repo}:{tag}", registry.host_port()),
        &["--all"],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {repo}:{tag}: {e}"));
}

/// One file of a bundle: its path, where its data starts in the archive, its size.
#[derive(Debug, Clone)]
pub struct TarEntry {
    pub path: String,
    pub offset: u64,
    pub size: u64,
}

/// The entries of a tar bundle (or of a `.tar.zst`, decompressed; offsets are then into
/// the decompressed stream), in order.
pub fn tar_entries(bundle: &Path) -> Vec<TarEntry> {
    let file = std::fs::File::open(bundle).unwrap_or_else(|e| panic!("{}: {e}", bundle.display()));
    let reader: Box<dyn Read> = if bundle.extension().is_some_and(|e| e == "zst") {
        Box::new(zstd::stream::read::Decoder::new(file).expect("zstd"))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            let e = e.expect("tar entry");
            TarEntry {
                path: e.path().expect("path").to_string_lossy().into_owned(),
                offset: e.raw_file_position(),
                size: e.size(),
            }
        })
        .collect()
}

/// The digests of the `blobs/sha256/…` files of a bundle, sorted.
pub fn bundle_blobs(bundle: &Path) -> Vec<String> {
    let mut out: Vec<String> = tar_entries(bundle)
        .into_iter()
        .filter_map(|e| {
            e.path
                .strip_prefix("blobs/sha256/")
                .filter(|h| !h.is_empty())
                .map(|h| format!("sha256:{h}"))
        })
        .collect();
    out.sort();
    out
}

/// One file's bytes from a tar bundle.
pub fn tar_file(bundle: &Path, name: &str) -> Vec<u8> {
    let file = std::fs::File::open(bundle).expect("bundle");
    let mut archive = tar::Archive::new(file);
    for e in archive.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        if e.path().expect("path").to_string_lossy() == name {
            let mut body = Vec::new();
            e.read_to_end(&mut body).expect("reading an entry");
            return body;
        }
    }
    panic!("{name} is not in {}", bundle.display())
}

/// `index.json` of a tar bundle.
pub fn bundle_index(bundle: &Path) -> serde_json::Value {
    serde_json::from_slice(&tar_file(bundle, "index.json")).expect("index.json is JSON")
}

/// The image names (`io.containerd.image.name`) `index.json` lists, sorted.
pub fn bundle_names(bundle: &Path) -> Vec<String> {
    let index = bundle_index(bundle);
    let mut names: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|d| {
            let n = d["annotations"]["io.containerd.image.name"]
                .as_str()
                .expect("io.containerd.image.name")
                .to_owned();
            assert_eq!(
                d["annotations"]["org.opencontainers.image.ref.name"].as_str(),
                Some(n.as_str()),
                "both annotations carry the full name"
            );
            n
        })
        .collect();
    names.sort();
    names
}

/// Copies `bundle` to `out` with one byte of the data of entry `path` flipped, `at` bytes
/// into it.
pub fn corrupt_entry(bundle: &Path, out: &Path, path: &str, at: u64) {
    let entry = tar_entries(bundle)
        .into_iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("{path} is not in {}", bundle.display()));
    assert!(at < entry.size);
    std::fs::copy(bundle, out).expect("copying the bundle");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(out)
        .expect("opening the copy");
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(entry.offset + at)).unwrap();
    f.read_exact(&mut byte).unwrap();
    f.seek(SeekFrom::Start(entry.offset + at)).unwrap();
    f.write_all(&[byte[0] ^ 0xff]).unwrap();
}

/// Copies the first `len` bytes of `bundle` to `out`.
pub fn truncate_copy(bundle: &Path, out: &Path, len: u64) {
    let bytes = std::fs::read(bundle).expect("reading the bundle");
    std::fs::write(out, &bytes[..len as usize]).expect("writing the truncated copy");
}

/// The inode of a file (to tell a blob file written again from one left in place).
pub fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}
