//! The real `regcache` binary, as the CLI and crash tests run it: one-shot commands with an
//! empty environment and a deadline (`run`), and `regcache serve` on a free port that a
//! test can SIGKILL by its PID and start again on the same data directory (`Regcache`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::external::free_port;

pub const BIN: &str = env!("CARGO_BIN_EXE_regcache");
/// Bound on start-up, on `stop` and on each short wait of a served binary.
pub const SERVE_DEADLINE: Duration = Duration::from_secs(30);

// ----- one-shot commands ------------------------------------------------------------------

/// What a finished one-shot run printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts success; returns the output for chaining.
    pub fn ok(self) -> Self {
        self.assert_success();
        self
    }

    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "{self:#?}");
        self
    }

    /// Fails with a message on stderr that contains every one of `needles`.
    pub fn assert_failure_naming(&self, needles: &[&str]) -> &Self {
        assert!(!self.status.success(), "expected failure: {self:#?}");
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "stderr does not name {needle:?}: {self:#?}"
            );
        }
        self
    }

    /// Stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Stdout as TOML (what `check-config` prints).
    pub fn config(&self) -> toml::Table {
        self.stdout
            .parse()
            .unwrap_or_else(|e| panic!("check-config printed no TOML ({e}): {self:#?}"))
    }
}

/// Runs the binary in `cwd` with `args` and only `env` set (so the host's `RUST_LOG` or
/// `REGCACHE_*` cannot leak in); SIGKILLs it and panics after `deadline`.
pub fn run(args: &[&str], env: &[(&str, &str)], cwd: &Path, deadline: Duration) -> Output {
    finish(command(args, env, cwd), args, deadline)
}

/// [`run`] as another user (`uid`, with the same group id): a test running as root
/// meets permission errors only this way. The caller must be root.
pub fn run_as(uid: u32, args: &[&str], env: &[(&str, &str)], cwd: &Path, deadline: Duration) -> Output {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = command(args, env, cwd);
    cmd.uid(uid).gid(uid);
    finish(cmd, args, deadline)
}

fn command(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn finish(mut cmd: Command, args: &[&str], deadline: Duration) -> Output {
    let child = cmd.spawn().expect("spawn regcache");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(deadline) {
        Ok(out) => out.expect("wait for regcache"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("regcache {args:?} did not exit within {deadline:?}");
        }
    };
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the binary with `args` and an empty environment from async code (killed if the
/// future is dropped); asserts it exits 0 and returns what it printed.
pub async fn run_ok_async(args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .kill_on_drop(true)
        .output()
        .await
        .expect("running regcache");
    assert!(
        out.status.success(),
        "regcache {args:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes `text` to `dir/name`; returns the path as a string for an argument list.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.to_str().expect("UTF-8 path").to_owned()
}

/// Kills the child (ours) if a test panics while it runs.
#[derive(Debug)]
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ----- `regcache serve` -------------------------------------------------------------------

/// `regcache serve` started by a test; killed (SIGKILL, by its PID) on drop.
#[derive(Debug)]
pub struct Regcache {
    child: Option<Child>,
    pub base: String,
    pub config: PathBuf,
    log: PathBuf,
}

impl Regcache {
    /// Writes `config_for(port)` to `dir/regcache.toml` for a free port, starts the binary
    /// (logging to `dir/regcache-{run}-{attempt}.log`) and waits until `/v2/` answers;
    /// tries another port if the one chosen was taken meanwhile.
    pub async fn start(dir: &Path, run: &str, config_for: impl Fn(u16) -> String) -> Regcache {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let config = dir.join("regcache.toml");
            std::fs::write(&config, config_for(port)).expect("writing the config");
            let log = dir.join(format!("regcache-{run}-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("log file");
            let child = Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&config)
                .env_clear()
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log handle"))
                .stderr(out)
                .spawn()
                .expect("spawning regcache serve");
            let mut server = Regcache {
                child: Some(child),
                base: format!("http://127.0.0.1:{port}"),
                config,
                log,
            };
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(log) if log.contains("in use") => last = log,
                Err(log) => panic!("regcache did not start:\n{log}"),
            }
        }
        panic!("regcache found no free port: {last}")
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let end = Instant::now() + SERVE_DEADLINE;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if let Ok(resp) = client.get(format!("{}/v2/", self.base)).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            assert!(Instant::now() < end, "regcache not ready:\n{}", self.log());
            tokio::time::sleep(super::POLL_INTERVAL).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines whose message is `message`, as their `fields`.
    pub fn log_events(&self, message: &str) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .map(|v| v["fields"].clone())
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL regcache");
            let status = child.wait().expect("reaping regcache");
            assert!(!status.success(), "killed, not exited: {status:?}");
        }
    }

    /// SIGTERM and wait for the clean exit.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(term.success());
        let end = Instant::now() + SERVE_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "clean exit on SIGTERM: {status:?}\n{}",
                    self.log()
                );
                return;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("regcache did not stop on SIGTERM:\n{}", self.log());
            }
            tokio::time::sleep(super::POLL_INTERVAL).await;
        }
    }

    /// `regcache fsck --json` beside this server, on its data directory.
    pub async fn fsck(&self) -> Value {
        let config = self.config.to_str().expect("UTF-8 path");
        let out = run_ok_async(&["fsck", "--json", "--config", config]).await;
        serde_json::from_slice(&out.stdout).expect("fsck --json prints JSON")
    }
}

impl Drop for Regcache {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
