//! A small tmpfs mounted by a test, as a data dir whose disk can be filled and freed on
//! command. Mounting needs root (tests and CI run as root): without it the test fails with
//! a message saying so. Unmounted on Drop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size on a fresh directory.
#[derive(Debug)]
pub struct Tmpfs {
    // Field order: unmounted (Drop) before the directory goes.
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` (rounded up to pages by the kernel).
    pub fn mount(size_bytes: u64) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "this test mounts a tmpfs as a full disk and must run as root (CI does); euid is {euid}"
        );
        let dir = tempfile::tempdir().expect("temp dir for the tmpfs");
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(&mount)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { mount, _dir: dir }
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Fills every free byte with `name` (a file outside regcache's own): written until
    /// the kernel answers ENOSPC.
    pub fn fill(&self, name: &str) {
        let mut f = std::fs::File::create(self.mount.join(name)).expect("creating the filler");
        let block = vec![0xA5u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // The last partial page: byte by byte until nothing more fits.
        while let Ok(1) = f.write(&block[..1]) {}
        let _ = f.flush();
    }

    /// Shortens a filler so that about `bytes` are free again (in whole pages).
    pub fn shrink(&self, name: &str, bytes: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.mount.join(name))
            .expect("opening the filler");
        let len = f.metadata().expect("filler metadata").len();
        f.set_len(len.saturating_sub(bytes))
            .expect("shrinking the filler");
    }

    /// Removes a filler written by `fill`.
    pub fn free(&self, name: &str) {
        std::fs::remove_file(self.mount.join(name)).expect("removing the filler");
    }

    /// Bytes free, as `df` says.
    pub fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.mount)
            .output()
            .expect("running df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a server a failed test left running may still hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}
