//! The data dir's disk: its free space (statvfs), and whether local writes fail for lack
//! of it. A full disk is an episode: logged once when a write first fails for lack of
//! space and once when space is back, however many requests meet it in between. The
//! server records the episode in a small file that `regcache status`, another process,
//! reads. Knows nothing of SQLite or HTTP: callers say what failed.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// The state file, under the data dir.
const STATE_FILE: &str = "disk-state.json";
/// The state file's fixed length. It is written whole when the server starts, then only
/// overwritten in place, which needs no new block even when the disk is full.
const STATE_BYTES: usize = 512;
/// An episode ends once the largest write that failed in it would fit and at least this
/// much is free: room for SQLite's next commits and a small layer, so that a freed
/// kilobyte does not end an episode the next write would start again.
const RESUME_FREE_MIN_BYTES: u64 = 8 << 20;
/// `status` calls a disk full below this much free space (or 1 % of the disk, if that is
/// less): about one layer of a common image.
const LOW_FREE_BYTES: u64 = 64 << 20;

/// Free and total bytes of a file system, as an unprivileged writer sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Space {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

impl Space {
    /// Whether this little is left that regcache cannot cache much more.
    pub fn is_low(&self) -> bool {
        self.free_bytes < LOW_FREE_BYTES.min(self.total_bytes / 100)
    }
}

/// The file system holding `dir`.
pub fn space(dir: &Path) -> std::io::Result<Space> {
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `s` is a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The field types differ between platforms (u32 or u64).
    #[allow(clippy::unnecessary_cast)]
    let (frsize, avail, blocks) = (s.f_frsize as u64, s.f_bavail as u64, s.f_blocks as u64);
    Ok(Space {
        free_bytes: avail.saturating_mul(frsize),
        total_bytes: blocks.saturating_mul(frsize),
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Whether a write failed because the disk (or the user's quota) is full.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// What the server last recorded about its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub pid: u32,
    /// Unix seconds.
    pub recorded_at: i64,
    /// Since when (Unix seconds) local writes fail for lack of space; `None`: they do not.
    pub full_since: Option<i64>,
    /// The first failure of the episode.
    pub error: Option<String>,
}

/// Reads what the server recorded in `data_dir`; `None` when nothing readable is there.
pub fn read_record(data_dir: &Path) -> Option<DiskRecord> {
    let text = std::fs::read_to_string(data_dir.join(STATE_FILE)).ok()?;
    serde_json::from_str(text.trim_end()).ok()
}

/// The data dir's disk as the server sees it; shared by everything that writes there.
#[derive(Debug)]
pub struct DataDisk {
    dir: PathBuf,
    /// The state file, written in place; `None` when it could not be created.
    state: Option<File>,
    episode: Mutex<Option<Episode>>,
}

#[derive(Debug)]
struct Episode {
    started: Instant,
    /// The largest write that failed in this episode.
    needed_bytes: u64,
    failures: u64,
}

impl DataDisk {
    /// Opens (or creates) the state file under `data_dir` and records "not full". A disk
    /// already full may not let the file be created; status then measures space alone.
    pub fn open(data_dir: &Path) -> Self {
        let state = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(data_dir.join(STATE_FILE))
            .map_err(|e| tracing::warn!(error = %e, "cannot create the disk state file; status will measure free space only"))
            .ok();
        let disk = Self {
            dir: data_dir.to_owned(),
            state,
            episode: Mutex::default(),
        };
        disk.record(None, None);
        disk
    }

    /// Like [`DataDisk::open`], for a process beside the server (a CLI prefetch): it measures
    /// and logs, but leaves the state file to the server, whose episode it would overwrite.
    pub fn unrecorded(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.to_owned(),
            state: None,
            episode: Mutex::default(),
        }
    }

    /// Free space of the data dir's file system.
    pub fn space(&self) -> std::io::Result<Space> {
        space(&self.dir)
    }

    /// Whether an episode of a full disk is going on.
    pub fn is_full(&self) -> bool {
        self.lock().is_some()
    }

    /// A write of `needed_bytes` (0: unknown) into the data dir failed for lack of space
    /// (`what` says which). The first failure of an episode is logged and recorded; later
    /// ones only counted.
    pub fn out_of_space(&self, what: &str, needed_bytes: u64, error: &dyn std::fmt::Display) {
        let mut episode = self.lock();
        if let Some(e) = episode.as_mut() {
            e.failures += 1;
            e.needed_bytes = e.needed_bytes.max(needed_bytes);
            tracing::debug!(write = what, error = %error, "data dir disk still full");
            return;
        }
        let since = unix_now();
        *episode = Some(Episode {
            started: Instant::now(),
            needed_bytes,
            failures: 1,
        });
        drop(episode);
        let free = self.space().map(|s| s.free_bytes).unwrap_or(0);
        tracing::warn!(
            write = what, error = %error, free_bytes = free, needed_bytes,
            "data dir disk is full: blobs are passed through and manifests served without caching until space is freed"
        );
        self.record(Some(since), Some(error.to_string()));
    }

    /// Ends the episode when space is back (see `RESUME_FREE_MIN_BYTES`); cheap when none
    /// is going on. Called periodically; returns whether the disk counts as full.
    pub fn check(&self) -> bool {
        let needed = match self.lock().as_ref() {
            None => return false,
            Some(e) => e.needed_bytes,
        };
        let Ok(space) = self.space() else {
            return true;
        };
        // A write larger than half the disk does not keep an episode going for ever.
        let needed = needed.min(space.total_bytes / 2).max(RESUME_FREE_MIN_BYTES);
        if space.free_bytes < needed {
            return true;
        }
        let Some(e) = self.lock().take() else {
            return false;
        };
        tracing::info!(
            free_bytes = space.free_bytes,
            duration_ms = e.started.elapsed().as_millis() as u64,
            writes_failed = e.failures,
            "data dir disk has space again; caching resumes"
        );
        self.record(None, None);
        false
    }

    fn lock(&self) -> MutexGuard<'_, Option<Episode>> {
        self.episode
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Overwrites the state file in place with a fixed-length record. A 512-byte write
    /// into the page cache, at most twice per episode: done inline.
    fn record(&self, full_since: Option<i64>, error: Option<String>) {
        let Some(file) = &self.state else {
            return;
        };
        let mut record = DiskRecord {
            pid: std::process::id(),
            recorded_at: unix_now(),
            full_since,
            error,
        };
        let mut text = serde_json::to_string(&record).unwrap_or_default();
        if text.len() >= STATE_BYTES {
            // Only the error text can be long; keep the record within its block.
            record.error = record.error.map(|e| e.chars().take(200).collect());
            text = serde_json::to_string(&record).unwrap_or_default();
        }
        let mut buf = text.into_bytes();
        buf.resize(STATE_BYTES.max(buf.len()), b' ');
        buf[STATE_BYTES - 1] = b'\n';
        if let Err(e) = file.write_all_at(&buf[..STATE_BYTES], 0) {
            tracing::debug!(error = %e, "could not record the disk state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_is_recorded_once_and_ends_when_space_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DataDisk::open(dir.path());
        let record = read_record(dir.path()).unwrap();
        assert_eq!(record.full_since, None);
        assert_eq!(record.pid, std::process::id());

        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_out_of_space(&enospc));
        assert!(!is_out_of_space(&std::io::Error::from_raw_os_error(libc::EIO)));
        disk.out_of_space("test", 10, &enospc);
        let first = read_record(dir.path()).unwrap();
        assert!(first.full_since.is_some());
        assert!(first.error.as_deref().unwrap().contains("space"));
        disk.out_of_space("test", 20, &"later failure");
        assert_eq!(
            read_record(dir.path()).unwrap(),
            first,
            "recorded once per episode"
        );
        assert!(disk.is_full());

        // A temp dir has far more than 8 MiB free: the episode ends.
        assert!(!disk.check());
        assert!(!disk.is_full());
        assert_eq!(read_record(dir.path()).unwrap().full_since, None);
        assert_eq!(
            std::fs::metadata(dir.path().join(STATE_FILE)).unwrap().len(),
            STATE_BYTES as u64
        );
    }

    #[test]
    fn an_episode_lasts_while_the_failed_write_would_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DataDisk::open(dir.path());
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let total = space(dir.path()).unwrap().total_bytes;
        let free = space(dir.path()).unwrap().free_bytes;
        // More than is free, less than half the disk: the episode goes on. Halfway between
        // the two, so that other processes freeing space meanwhile do not end it.
        if free + 2 < total / 2 {
            disk.out_of_space("test", free + (total / 2 - free) / 2, &enospc);
            assert!(disk.check(), "the failed write would not fit yet");
            assert!(disk.is_full());
            assert!(disk.check(), "still");
        }
        // More than half the disk: it ends once half the disk is free.
        let ends = free >= total / 2;
        let other_dir = tempfile::tempdir().unwrap();
        let other = DataDisk::open(other_dir.path());
        other.out_of_space("test", u64::MAX, &enospc);
        assert_eq!(!other.check(), ends);
    }

    #[test]
    fn low_space_is_relative_to_small_disks() {
        let gib = 1 << 30;
        assert!(Space {
            free_bytes: 0,
            total_bytes: 64 << 20
        }
        .is_low());
        assert!(!Space {
            free_bytes: 1 << 20,
            total_bytes: 64 << 20
        }
        .is_low());
        assert!(Space {
            free_bytes: 63 << 20,
            total_bytes: 1000 * gib
        }
        .is_low());
        assert!(!Space {
            free_bytes: 65 << 20,
            total_bytes: 1000 * gib
        }
        .is_low());
        assert!(space(Path::new("/")).unwrap().total_bytes > 0);
    }
}
