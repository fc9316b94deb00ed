//! One server per data directory: `serve` holds an exclusive lock on
//! `data_dir/regcache.lock` for as long as it runs. A second server on the same directory
//! would empty the first one's `tmp/` (its downloads in flight) and take back its write
//! intents and delete claims at start-up (I2, I3); it refuses to start instead, naming the
//! holder's pid. The lock is `flock`, which the kernel drops when the holder exits, even
//! by SIGKILL, so a crash never blocks a restart. CLI commands that work beside a running
//! server (status, jobs, purge, repos, delete-repo, cleanup, fsck, prefetch, pin, unpin)
//! take no lock: SQLite arbitrates their writes, fsck only touches what the server leaves
//! alone, and prefetch downloads into its own temporary directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("data directory {} is locked by another regcache process{}; stop it, or give this one its own server.data_dir", dir.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("locking the data directory ({}): {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DataDirLock {
    /// Takes the lock on `data_dir` (which must exist) and records this process's pid in
    /// the lock file, for the message a second process prints.
    pub fn acquire(data_dir: &Path) -> Result<Self, LockError> {
        let path = data_dir.join("regcache.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match try_flock(&file) {
            Ok(true) => {}
            Ok(false) => {
                // The holder writes its pid right after locking; a moment earlier, the
                // file is still empty (or holds a dead holder's pid, being rewritten).
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: data_dir.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(e) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// An exclusive, non-blocking `flock` on `file`: `Ok(false)` when another open file
/// description holds it (another process, or another server in this one).
fn try_flock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        match DataDirLock::acquire(dir.path()) {
            Err(e @ LockError::Held { pid: Some(pid), .. }) => {
                assert_eq!(pid, std::process::id());
                assert!(e.to_string().contains(&format!("pid {pid}")), "{e}");
            }
            other => panic!("{other:?}"),
        }
        drop(first);
        let _again = DataDirLock::acquire(dir.path()).unwrap();
    }
}
