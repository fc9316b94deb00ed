//! What regcache left in a data directory, read beside it (running or not): its SQLite
//! database, read-only, and the filesystem store's blob files (`store/blobs/sha256/..`).

use std::path::{Path, PathBuf};

/// A read-only connection to `data_dir/regcache.db`.
pub fn db(data_dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        data_dir.join("regcache.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open regcache.db read-only")
}

/// The single integer `sql` (a `SELECT count(*) ...`) yields.
pub fn count(data_dir: &Path, sql: &str) -> i64 {
    db(data_dir).query_row(sql, [], |r| r.get(0)).expect(sql)
}

/// The file the filesystem store keeps the blob `digest` in.
pub fn blob_path(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data_dir.join("store/blobs/sha256").join(&hex[..2]).join(hex)
}

/// Every file under `data_dir/store/blobs`.
pub fn blob_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![data_dir.join("store").join("blobs")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
