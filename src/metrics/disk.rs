//! Space on the filesystem holding `server.data_dir` (the database, downloads in progress
//! and, on the filesystem backend, the blobs): what "disk nearly full" alerts on when no
//! `storage.max_size` is set. One `statvfs` call per scrape.

use std::path::Path;

/// (size, available to an unprivileged user) in bytes; `None` where unsupported or when
/// the call fails.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call and `stat` is
    // writable memory of the right type; statvfs writes it fully when it returns 0.
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    let block = stat.f_frsize;
    Some((
        stat.f_blocks.saturating_mul(block),
        stat.f_bavail.saturating_mul(block),
    ))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn space(_path: &Path) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_current_directory_has_a_size() {
        let (size, available) = super::space(std::path::Path::new(".")).unwrap();
        assert!(size > 0 && available <= size);
        assert_eq!(super::space(std::path::Path::new("/no/such/dir")), None);
    }
}
