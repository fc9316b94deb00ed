//! Real external programs for end-to-end tests: the CNCF registry (`docker-registry`), an
//! S3 server (`moto_server`) and `skopeo`. Each server runs on a free port on 127.0.0.1
//! and is killed by the PID this harness started, on Drop.
//!
//! Missing tools make tests FAIL with an install hint (`require_tool`), never skip: a
//! green run must mean the end-to-end tests ran. `.ci/run` installs everything.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::images::{assert_layout_has, Image};

/// How long a server may take to answer its first request. moto needs 1–3 s to import.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);
/// Attempts at starting a server when the free port was taken in the meantime.
const START_ATTEMPTS: usize = 3;
/// Bound on one `skopeo` invocation; copies in tests move at most a few hundred MiB.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(180);

/// Moto accepts any credentials; these are what tests configure.
pub const MOTO_ACCESS_KEY: &str = "testing";
pub const MOTO_SECRET_KEY: &str = "testing";
pub const MOTO_REGION: &str = "us-east-1";

/// A port that was free a moment ago: bind 127.0.0.1:0, read the port, drop the listener.
/// Another process could take it before it is used; the server starters retry then.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// The path of `name` on `PATH`; panics with an install hint if it is missing, so tests
/// that need real tools fail rather than skip.
pub fn require_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    });
    found.unwrap_or_else(|| {
        let how = match name {
            "moto_server" => "python3 -m pip install 'moto[server]'".to_owned(),
            "ctr" | "containerd" => "apt-get install -y containerd".to_owned(),
            "nginx" => "apt-get install -y nginx-light".to_owned(),
            "promtool" => "apt-get install -y prometheus".to_owned(),
            "systemd-analyze" => "apt-get install -y systemd".to_owned(),
            other => format!("apt-get install -y {other}"),
        };
        panic!("`{name}` is not on PATH; install {name}: {how}, see .ci/run")
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A child process we started, killed (SIGKILL by its PID) and reaped on drop.
#[derive(Debug)]
struct Process {
    child: Child,
    what: &'static str,
    log_path: PathBuf,
}

impl Process {
    fn spawn(what: &'static str, mut cmd: Command, log_path: PathBuf) -> Process {
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("cloning a log file handle");
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what} ({cmd:?}): {e}"));
        Process {
            child,
            what,
            log_path,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls `GET url` every 20 ms until it answers 2xx. `Err(log)` if the process exited
    /// first; panics after `STARTUP_DEADLINE`.
    async fn wait_ready(&mut self, url: &str) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .build()
            .expect("building a reqwest client");
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling a child process") {
                return Err(format!("{} exited with {status}:\n{}", self.what, self.log()));
            }
            if let Ok(resp) = client.get(url).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer GET {url} within {STARTUP_DEADLINE:?}; log:\n{}",
                self.what,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Only the process we spawned, by its PID; `wait` reaps it so no zombie remains.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- the CNCF registry ---------------------------------------------------------------

/// `docker-registry serve` on 127.0.0.1:<free port> with filesystem storage in a temp dir,
/// no auth and deletes enabled.
#[derive(Debug)]
pub struct DockerRegistry {
    // Field order: the process dies before its directory is removed.
    process: Process,
    port: u16,
    dir: TempDir,
}

const REGISTRY_CONFIG_TEMPLATE: &str = include_str!("../../fixtures/docker-registry.yml");

impl DockerRegistry {
    /// A plain registry, ready when this returns (`GET /v2/` answered 200).
    pub async fn start() -> DockerRegistry {
        DockerRegistry::start_with(None).await
    }

    /// A pull-through cache of `remote_url` (distribution's `proxy.remoteurl`), used as the
    /// peer in benchmarks. In this mode the registry refuses pushes.
    pub async fn start_proxy(remote_url: &str) -> DockerRegistry {
        DockerRegistry::start_with(Some(remote_url)).await
    }

    async fn start_with(remote_url: Option<&str>) -> DockerRegistry {
        let binary = require_tool("docker-registry");
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::tempdir().expect("creating a temp dir");
            let storage = dir.path().join("storage");
            std::fs::create_dir_all(&storage).expect("creating registry storage dir");
            let port = free_port();
            let proxy = remote_url
                .map(|url| format!("proxy:\n  remoteurl: {url}\n"))
                .unwrap_or_default();
            let config = REGISTRY_CONFIG_TEMPLATE
                .replace("{{ADDR}}", &format!("127.0.0.1:{port}"))
                .replace("{{ROOT}}", &storage.display().to_string())
                .replace("{{PROXY}}", &proxy);
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).expect("writing registry config");
            let mut cmd = Command::new(&binary);
            cmd.arg("serve").arg(&config_path);
            // The registry reads REGISTRY_* variables as config overrides; keep ours.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(key);
                }
            }
            let mut process = Process::spawn("docker-registry", cmd, dir.path().join("log"));
            match process.wait_ready(&format!("http://127.0.0.1:{port}/v2/")).await {
                Ok(()) => return DockerRegistry { process, port, dir },
                Err(log) if log.contains("address already in use") => last_failure = log,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("docker-registry could not get a free port: {last_failure}")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, as used in image references (`127.0.0.1:PORT/repo:tag`).
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Everything the registry wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

// ----- moto (S3) -----------------------------------------------------------------------

/// `moto_server` on 127.0.0.1:<free port> with one bucket. Moto keeps everything in
/// memory: `stop()` + `start_again()` comes back on the same port with the bucket
/// re-created but EMPTY.
#[derive(Debug)]
pub struct MotoS3 {
    process: Option<Process>,
    port: u16,
    bucket: String,
    dir: TempDir,
}

impl MotoS3 {
    /// Starts moto and creates `bucket` (moto accepts an unsigned `PUT /<bucket>`).
    pub async fn start(bucket: &str) -> MotoS3 {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn_moto(dir.path(), port).await {
                Ok(process) => {
                    let moto = MotoS3 {
                        process: Some(process),
                        port,
                        bucket: bucket.to_owned(),
                        dir,
                    };
                    moto.create_bucket().await;
                    return moto;
                }
                Err(log) if log.contains("Address already in use") => last_failure = log,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("moto_server could not get a free port: {last_failure}")
    }

    /// `http://127.0.0.1:PORT`, for `AmazonS3Builder::with_endpoint` (path-style, plain
    /// HTTP, region `MOTO_REGION`, any keys).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Kills moto (SIGKILL by PID); the port then refuses connections. All objects are lost.
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts moto again on the same port and re-creates the (now empty) bucket.
    pub async fn start_again(&mut self) {
        self.stop();
        let process = spawn_moto(self.dir.path(), self.port)
            .await
            .unwrap_or_else(|log| panic!("restarting moto on port {}: {log}", self.port));
        self.process = Some(process);
        self.create_bucket().await;
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    async fn create_bucket(&self) {
        let url = format!("{}/{}", self.endpoint(), self.bucket);
        let resp = reqwest::Client::new()
            .put(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
        assert!(
            resp.status().is_success(),
            "creating bucket with PUT {url}: {}",
            resp.status()
        );
    }
}

async fn spawn_moto(dir: &Path, port: u16) -> Result<Process, String> {
    let binary = require_tool("moto_server");
    let mut cmd = Command::new(binary);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let mut process = Process::spawn("moto_server", cmd, dir.join(format!("moto-{port}.log")));
    process.wait_ready(&format!("http://127.0.0.1:{port}/")).await?;
    Ok(process)
}

// ----- skopeo --------------------------------------------------------------------------

/// `skopeo --insecure-policy copy --src-tls-verify=false --dest-tls-verify=false
/// --preserve-digests EXTRA SRC DST` (pass `--all` in `extra` for every platform of an
/// index). `Err` carries the exit status and stderr. For other flag sets use `skopeo()`.
///
/// What skopeo 1.9.3 does that matters here:
/// - Pushing to `docker://` it gzips every uncompressed layer (`…layer.v1.tar` becomes
///   `…tar+gzip`), which rewrites the manifests and the index, so the registry would hold
///   digests the test never computed. `--preserve-digests` stops that (and makes skopeo
///   fail instead of silently changing a digest).
/// - With tls-verify=false it tries HTTPS first and falls back to plain HTTP, so the server
///   on the other end sees (and must survive) a TLS ClientHello first.
/// - `--insecure-policy` spares tests from depending on /etc/containers/policy.json.
pub async fn skopeo_copy(src: &str, dst: &str, extra: &[&str]) -> Result<Output, String> {
    let mut args = vec![
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ];
    args.extend_from_slice(extra);
    args.push(src);
    args.push(dst);
    skopeo(&args).await
}

/// Pushes `image` to `registry` as `repo:v1` with skopeo, from an OCI layout written under
/// `work/seed/`.
pub async fn push_image(registry: &DockerRegistry, work: &Path, repo: &str, image: &Image) {
    let layout = work.join("seed").join(repo);
    image.write_oci_layout(&layout, "v1");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/{repo}:v1", registry.host_port()),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {repo}: {e}"));
}

/// Pulls `repo:v1` from the registry at `base` (`http://HOST:PORT`) with skopeo into a
/// fresh OCI layout `out`, and checks that the manifest, config and layers in it hash to
/// their digests.
pub async fn skopeo_pull(base: &str, repo: &str, image: &Image, out: &Path) {
    let host = base.trim_start_matches("http://");
    skopeo_copy(
        &format!("docker://{host}/{repo}:v1"),
        &format!("oci:{}:v1", out.display()),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("pulling {repo} from {host}: {e}"));
    let digests: Vec<&str> = std::iter::once(image.manifest.digest.as_str())
        .chain(image.blobs().map(|b| b.digest.as_str()))
        .collect();
    assert_layout_has(out, &digests);
}

/// Runs skopeo with `args` under `SKOPEO_TIMEOUT`; `Err` unless it exits 0.
pub async fn skopeo(args: &[&str]) -> Result<Output, String> {
    let binary = require_tool("skopeo");
    let child = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // On timeout the future is dropped and this kills the child by its PID.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting skopeo {args:?}: {e}"))?;
    let output = tokio::time::timeout(SKOPEO_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("skopeo {args:?} timed out after {SKOPEO_TIMEOUT:?}"))?
        .map_err(|e| format!("waiting for skopeo {args:?}: {e}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "skopeo {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
