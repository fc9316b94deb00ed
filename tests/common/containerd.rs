//! A private containerd for end-to-end tests, and `ctr` to drive it. containerd runs with
//! its own root, state and socket under a short-named directory in /tmp
//! (`fixtures/containerd.toml`) and is killed by the PID this harness started, on Drop.
//!
//! `ctr content fetch` does the registry traffic in the `ctr` process itself (containerd
//! only stores what it is given), reading mirrors from `--hosts-dir`: for a reference
//! `HOST/repo:tag` it loads `<hosts-dir>/HOST/hosts.toml`, tries each `[host."…"]` mirror
//! with `?ns=HOST` (URL-encoded) appended, then falls back to `server`.
//!
//! Missing tools make tests fail with an install hint (`require_tool`), never skip.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::external::require_tool;

/// containerd boots in about 50 ms here; this only bounds a broken start.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// Bound on one `ctr` invocation; tests fetch a few small images.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// The containerd namespace tests work in (explicit, so `CONTAINERD_NAMESPACE` in the
/// environment does not matter).
pub const NAMESPACE: &str = "regcache-test";

const CONFIG_TEMPLATE: &str = include_str!("../../fixtures/containerd.toml");

/// `containerd --config <dir>/config.toml`, ready (its socket accepts connections) when
/// `start` returns.
#[derive(Debug)]
pub struct Containerd {
    // Field order: the process dies before its directory is removed.
    child: Child,
    dir: TempDir,
}

impl Containerd {
    pub async fn start() -> Containerd {
        let binary = require_tool("containerd");
        // tempfile's default is $TMPDIR, which may be long; the socket path must stay
        // under 108 bytes, so a short name right in /tmp.
        let dir = tempfile::Builder::new()
            .prefix("ctd")
            .tempdir_in("/tmp")
            .expect("creating a temp dir in /tmp");
        let config_path = dir.path().join("config.toml");
        let config = CONFIG_TEMPLATE.replace("{{DIR}}", &dir.path().display().to_string());
        std::fs::write(&config_path, config).expect("writing containerd config");
        let log_path = dir.path().join("log");
        let log = File::create(&log_path).expect("creating the containerd log");
        let log_err = log.try_clone().expect("cloning a log file handle");
        let child = Command::new(&binary)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut containerd = Containerd { child, dir };
        containerd.wait_ready().await;
        containerd
    }

    /// Polls every 20 ms until the gRPC socket accepts a connection.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling containerd") {
                panic!("containerd exited with {status}; log:\n{}", self.log());
            }
            if UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd's socket {} did not accept within {STARTUP_DEADLINE:?}; log:\n{}",
                self.socket().display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// Everything containerd wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ctr --address SOCK --namespace NAMESPACE ARGS` under `CTR_TIMEOUT`; `Err` (with
    /// the status, stderr and containerd's log) unless it exits 0.
    pub async fn ctr(&self, args: &[&str]) -> Result<Output, String> {
        let binary = require_tool("ctr");
        let child = tokio::process::Command::new(binary)
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // On timeout the future is dropped and this kills ctr by its PID.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting ctr {args:?}: {e}"))?;
        let output = tokio::time::timeout(CTR_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| format!("ctr {args:?} timed out after {CTR_TIMEOUT:?}"))?
            .map_err(|e| format!("waiting for ctr {args:?}: {e}"))?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(format!(
                "ctr {args:?} failed ({}):\n{}\ncontainerd log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                self.log()
            ))
        }
    }

    /// `ctr --debug … content fetch --hosts-dir HOSTS_DIR EXTRA REFERENCE`. With `--debug`
    /// ctr logs every registry request to stderr as a `msg="do request"` line with its
    /// `url=…`; `requests` in the result lists those URLs.
    pub async fn fetch(&self, hosts_dir: &Path, reference: &str, extra: &[&str]) -> Fetched {
        let hosts_dir = hosts_dir.display().to_string();
        let mut args = vec!["--debug", "content", "fetch", "--hosts-dir", &hosts_dir];
        args.extend_from_slice(extra);
        args.push(reference);
        let output = self
            .ctr(&args)
            .await
            .unwrap_or_else(|e| panic!("fetching {reference} with containerd: {e}"));
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let requests = stderr
            .lines()
            .filter(|l| l.contains("msg=\"do request\""))
            .map(|l| {
                let url = l
                    .split_once(" url=")
                    .unwrap_or_else(|| panic!("a do-request line without url: {l}"))
                    .1;
                url.trim_matches('"').to_owned()
            })
            .collect();
        Fetched { requests, stderr }
    }

    /// The digests in containerd's content store (`ctr content ls -q`), sorted.
    pub async fn content_digests(&self) -> Vec<String> {
        let output = self
            .ctr(&["content", "ls", "-q"])
            .await
            .unwrap_or_else(|e| panic!("listing containerd content: {e}"));
        let mut digests: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        digests.sort_unstable();
        digests
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Only the process we spawned, by its PID; `wait` reaps it so no zombie remains.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one `ctr content fetch` did.
#[derive(Debug)]
pub struct Fetched {
    /// The URL of every registry request ctr made, in order.
    pub requests: Vec<String>,
    /// ctr's full debug output, for failure messages.
    pub stderr: String,
}

/// Writes `<hosts_dir>/<registry_host>/hosts.toml`: images named `registry_host/…` are
/// pulled and resolved through the plain-HTTP mirror `mirror_url` first, with
/// `server_url` (the registry itself) as containerd's fallback.
pub fn write_hosts_toml(hosts_dir: &Path, registry_host: &str, server_url: &str, mirror_url: &str) {
    write_hosts_toml_with(hosts_dir, registry_host, server_url, mirror_url, "");
}

/// `write_hosts_toml` with `mirror_extra` (TOML lines) added to the mirror's
/// `[host."…"]` table, e.g. `ca = "…"` or a `[host."…".header]` table after it.
pub fn write_hosts_toml_with(
    hosts_dir: &Path,
    registry_host: &str,
    server_url: &str,
    mirror_url: &str,
    mirror_extra: &str,
) {
    let dir = hosts_dir.join(registry_host);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let toml = format!(
        "server = \"{server_url}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{mirror_extra}"
    );
    let path = dir.join("hosts.toml");
    std::fs::write(&path, toml).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
