//! The binary's configuration errors as a newcomer meets them: each names the key (and the
//! variable or upstream it came from), says what is wrong in plain words and how to fix it,
//! and says each cause once. `check-config` and `serve` refuse an unusable
//! `server.data_dir` before creating anything. Variables Kubernetes injects for a Service
//! named `regcache` are ignored (logged at debug), a typo inside a real section is not.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::binary::{self, write, Output};

/// Generous: a debug binary on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);
/// The user a test running as root runs the binary as, to meet permission errors.
const NOBODY: u32 = 65534;

fn run(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    binary::run(args, env, cwd, DEADLINE)
}

/// A failure whose message names every needle, says each OS error once and prints
/// nothing on stdout.
fn assert_explained(out: &Output, needles: &[&str]) {
    out.assert_failure_naming(needles);
    assert!(out.stdout.is_empty(), "nothing printed on error: {out:#?}");
    assert!(
        out.stderr.matches("os error").count() <= 1,
        "a cause said twice: {}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {}", out.stderr);
}

/// Whether this process runs as root (permission bits do not stop root).
fn running_as_root(dir: &Path) -> bool {
    let probe = dir.join("uid-probe");
    std::fs::write(&probe, "").expect("probe file");
    let uid = std::fs::metadata(&probe).expect("probe metadata").uid();
    std::fs::remove_file(&probe).expect("removing the probe");
    uid == 0
}

/// A config file's text, the environment, and what the error must say.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn config_errors_name_the_key_and_the_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let cases: [Case; 6] = [
        (
            "[proxy]\nttll = \"1d\"\n",
            &[],
            &[
                "proxy.ttll",
                "unknown key `ttll`",
                "did you mean `ttl`?",
                "[proxy] has: ttl,",
            ],
        ),
        (
            "[[upstream]]\nname = \"local\"\n",
            &[],
            &["upstream[0].url", "upstream \"local\"", "add `url = …`"],
        ),
        (
            "[[upstream]]\nname = \"local\"\nurl = \"registry.local:5000\"\n",
            &[],
            &[
                "upstream[0].url",
                "upstream \"local\"",
                "needs http:// or https://",
                "\"https://registry.local:5000\"",
            ],
        ),
        (
            "",
            &[("REGCACHE_STORAGE__BACKEND", "s4")],
            &[
                "storage.backend",
                "REGCACHE_STORAGE__BACKEND",
                "did you mean \"s3\"?",
            ],
        ),
        (
            "",
            &[("REGCACHE_PROXY__OFLINE", "true")],
            &[
                "proxy.ofline",
                "REGCACHE_PROXY__OFLINE",
                "did you mean `offline`?",
            ],
        ),
        (
            "[server]\nlisten = \"5000\"\n",
            &[],
            &["server.listen", "\"5000\" is not host:port"],
        ),
    ];
    for (i, (text, env, needles)) in cases.into_iter().enumerate() {
        let config = write(d, &format!("case-{i}.toml"), text);
        let out = run(&["check-config", "--config", &config], env, d);
        assert_explained(&out, needles);
        assert!(!out.stderr.contains("``"), "broken quoting: {}", out.stderr);
        assert!(
            !out.stderr.contains("relative URL without a base"),
            "{}",
            out.stderr
        );
    }
}

/// What Kubernetes injects into every pod of a namespace with a Service named `regcache`.
const KUBERNETES: [(&str, &str); 5] = [
    ("REGCACHE_PORT", "tcp://10.0.0.1:5000"),
    ("REGCACHE_SERVICE_HOST", "10.0.0.1"),
    ("REGCACHE_SERVICE_PORT", "5000"),
    ("REGCACHE_PORT_5000_TCP", "tcp://10.0.0.1:5000"),
    ("REGCACHE_PORT_5000_TCP_ADDR", "10.0.0.1"),
];

#[test]
fn kubernetes_service_variables_are_ignored_but_a_typo_in_a_section_is_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut env = KUBERNETES.to_vec();
    env.push(("REGCACHE_PROXY__TTL", "2d"));
    env.push(("RUST_LOG", "debug"));
    let out = run(&["check-config"], &env, dir.path());
    let printed = out.assert_success().config();
    assert_eq!(
        printed["proxy"]["ttl"].as_str(),
        Some("2d"),
        "a real key still applies"
    );
    for (var, _) in KUBERNETES {
        let line = out
            .stderr
            .lines()
            .find(|l| l.ends_with(&format!("env.var={var}")))
            .unwrap_or_else(|| panic!("{var} not logged: {}", out.stderr));
        assert!(line.contains("DEBUG") && line.contains("ignored"), "{line}");
    }
    assert!(
        !out.stderr.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal: {:?}",
        out.stderr
    );

    env.push(("REGCACHE_STORAGE__DELET__ENABLED", "false"));
    let out = run(&["check-config"], &env, dir.path());
    assert_explained(
        &out,
        &[
            "storage.delet",
            "REGCACHE_STORAGE__DELET__ENABLED",
            "did you mean `delete`?",
        ],
    );
}

/// A read-only tmpfs, unmounted on drop; `None` where mounting is not allowed (not root,
/// or a container without CAP_SYS_ADMIN).
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    fn new(at: &Path) -> Option<ReadOnlyMount> {
        std::fs::create_dir_all(at).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| ReadOnlyMount(at.to_path_buf()))
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn check_config_and_serve_refuse_an_unusable_data_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    // Readable by the unprivileged user the binary may run as.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = running_as_root(d);

    let file = write(d, "a-file", "not a directory");
    let locked = d.join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let locked = locked.to_str().expect("UTF-8").to_owned();
    let read_only = d.join("read-only");
    let mount = if root {
        ReadOnlyMount::new(&read_only)
    } else {
        None
    };
    let read_only = read_only.to_str().expect("UTF-8").to_owned();

    // (data_dir, what the message must say); each also names server.data_dir.
    let mut cases: Vec<(String, Vec<String>)> = vec![
        (
            file.clone(),
            vec![
                format!("{file} is a file, not a directory"),
                "set server.data_dir to a directory".into(),
            ],
        ),
        (
            format!("{file}/cache"),
            vec![
                format!("{file}/cache does not exist and cannot be created"),
                format!("{file} is a file, not a directory"),
            ],
        ),
        (
            locked.clone(),
            vec![format!("{locked} is not writable by this user"), "chown".into()],
        ),
        (
            format!("{locked}/cache"),
            vec![
                format!("{locked}/cache does not exist and cannot be created"),
                format!("{locked} is not writable by this user"),
            ],
        ),
    ];
    if mount.is_some() {
        cases.push((
            read_only.clone(),
            vec![
                format!("{read_only} is on a read-only file system"),
                "mount it read-write".into(),
            ],
        ));
        cases.push((
            format!("{read_only}/cache"),
            vec![
                format!("{read_only}/cache does not exist and cannot be created"),
                format!("{read_only} is on a read-only file system"),
            ],
        ));
    } else {
        eprintln!("no read-only mount could be made here; config::validate's unit test covers its words");
    }

    for (i, (data_dir, needles)) in cases.iter().enumerate() {
        let config = write(
            d,
            &format!("data-dir-{i}.toml"),
            &format!("[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{data_dir}\"\n"),
        );
        let mut needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        needles.push("server.data_dir");
        for command in ["check-config", "serve"] {
            let args = [command, "--config", &config];
            let out = if root {
                binary::run_as(NOBODY, &args, &[], d, DEADLINE)
            } else {
                run(&args, &[], d)
            };
            assert_explained(&out, &needles);
        }
        assert!(!Path::new(&format!("{file}/cache")).exists());
    }
    assert_eq!(
        std::fs::read_dir(&locked).expect("read locked").count(),
        0,
        "nothing created in the unwritable directory"
    );

    // Set from the environment: the variable is named.
    let out = run(&["check-config"], &[("REGCACHE_SERVER__DATA_DIR", &file)], d);
    assert_explained(
        &out,
        &["server.data_dir", "REGCACHE_SERVER__DATA_DIR", "is a file"],
    );
}

/// A variable that is not UTF-8 (any program may leave one) is passed over, not a panic.
#[test]
fn a_variable_that_is_not_utf8_is_passed_over() {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(binary::BIN)
        .arg("check-config")
        .env_clear()
        .env(
            std::ffi::OsStr::from_bytes(b"LEFT_BY_SOMEONE"),
            std::ffi::OsStr::from_bytes(b"\xff\xfe"),
        )
        .env("REGCACHE_PROXY__TTL", "3d")
        .current_dir(dir.path())
        .output()
        .expect("running regcache");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("ttl = \"3d\""), "{stdout}");
}
