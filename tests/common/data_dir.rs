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

/// The digest of every `blobs` row.
pub fn blob_rows(data_dir: &Path) -> std::collections::BTreeSet<String> {
    let db = db(data_dir);
    let mut stmt = db.prepare("SELECT digest FROM blobs").expect("prepare");
    let rows = stmt.query_map([], |r| r.get(0)).expect("query blobs");
    rows.collect::<Result<_, _>>().expect("blob rows")
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

/// The tables that hold cached content; all empty once everything was collected.
pub const CONTENT_TABLES: [&str; 6] = [
    "blobs",
    "repo_blobs",
    "tags",
    "repo_manifests",
    "manifests",
    "pending_deletes",
];
/// The tables whose rows carry `expires_at`, `deferred` and `last_used_at`.
pub const ENTRY_TABLES: [&str; 3] = ["tags", "repo_manifests", "repo_blobs"];

/// What is left of cached content: empty when the store and every content table are.
pub fn leftovers(dir: &Path) -> String {
    let mut left = Vec::new();
    let files = blob_files(dir).len();
    if files > 0 {
        left.push(format!("{files} blob files"));
    }
    for table in CONTENT_TABLES {
        let n = count(dir, &format!("SELECT count(*) FROM {table}"));
        if n > 0 {
            left.push(format!("{n} rows in {table}"));
        }
    }
    left.join(", ")
}

/// Rows of the entry tables: (table, expires_at, last_used_at, deferred).
pub fn entries(dir: &Path) -> Vec<(&'static str, Option<i64>, i64, bool)> {
    let conn = db(dir);
    let mut out = Vec::new();
    for table in ENTRY_TABLES {
        let mut stmt = conn
            .prepare(&format!("SELECT expires_at, last_used_at, deferred FROM {table}"))
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((table, r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

/// (rows in tags, repo_manifests, repo_blobs), all deferred and without a due time.
pub fn all_deferred(dir: &Path, expected: (i64, i64, i64)) -> bool {
    let n = |table: &str| {
        count(
            dir,
            &format!("SELECT count(*) FROM {table} WHERE deferred = 1 AND expires_at IS NULL"),
        )
    };
    (n("tags"), n("repo_manifests"), n("repo_blobs")) == expected
}
