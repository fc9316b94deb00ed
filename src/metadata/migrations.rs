//! Numbered SQL migrations from `schema/`, embedded at build time and applied in one
//! transaction at start-up. `PRAGMA user_version` records the version reached.

use super::MetadataError;
use rusqlite::{Connection, OptionalExtension};

/// Every migration, in order. A test checks this list against the files in `schema/`.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "0001_init.sql", include_str!("../../schema/0001_init.sql")),
    (
        2,
        "0002_expiry_and_deletes.sql",
        include_str!("../../schema/0002_expiry_and_deletes.sql"),
    ),
    (3, "0003_jobs.sql", include_str!("../../schema/0003_jobs.sql")),
    (
        4,
        "0004_tags_by_manifest.sql",
        include_str!("../../schema/0004_tags_by_manifest.sql"),
    ),
    (
        5,
        "0005_expiry_locality.sql",
        include_str!("../../schema/0005_expiry_locality.sql"),
    ),
    (
        6,
        "0006_open_uploads.sql",
        include_str!("../../schema/0006_open_uploads.sql"),
    ),
    (
        7,
        "0007_referrers_expiry.sql",
        include_str!("../../schema/0007_referrers_expiry.sql"),
    ),
    (
        8,
        "0008_pins_and_prefetch.sql",
        include_str!("../../schema/0008_pins_and_prefetch.sql"),
    ),
    (
        9,
        "0009_observability.sql",
        include_str!("../../schema/0009_observability.sql"),
    ),
    (
        10,
        "0010_imports.sql",
        include_str!("../../schema/0010_imports.sql"),
    ),
];

/// Brings the database up to the newest schema; a database newer than this build is an
/// error rather than something to guess about.
///
/// Foreign keys are off while migrations run, so a migration can rebuild a table other
/// tables refer to (SQLite's documented procedure), and every reference is checked before
/// the transaction commits: a migration that would leave a dangling one changes nothing.
pub(super) fn migrate(conn: &mut Connection) -> Result<usize, MetadataError> {
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    migrate_to(conn, known)
}

/// `migrate`, stopping at version `target` (tests start from older schemas with it).
fn migrate_to(conn: &mut Connection, target: i64) -> Result<usize, MetadataError> {
    let enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
    let temp_store: i64 = conn.query_row("PRAGMA temp_store", [], |r| r.get(0))?;
    conn.pragma_update(None, "foreign_keys", false)?;
    // Rebuilding a table sorts all its keys: let large sorts spill to temporary files
    // rather than hold the whole index in memory (111 MiB RSS for a million entries).
    conn.pragma_update(None, "temp_store", "FILE")?;
    let applied = apply(conn, target);
    conn.pragma_update(None, "temp_store", temp_store)?;
    conn.pragma_update(None, "foreign_keys", enforced)?;
    applied
}

fn apply(conn: &mut Connection, target: i64) -> Result<usize, MetadataError> {
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(MetadataError::SchemaTooNew { found, known });
    }
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found && m.0 <= target) {
        // Some rebuild tables: seconds on a large cache, so an upgrade says what it does.
        if found > 0 {
            tracing::info!(
                schema.from = version - 1,
                schema.to = version,
                migration = name,
                "migrating the database schema"
            );
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        applied += 1;
    }
    if applied > 0 {
        // A whole-database check, so only after a change: start-up stays fast.
        let dangling: Option<(String, String)> = tx
            .query_row("PRAGMA foreign_key_check", [], |r| Ok((r.get(0)?, r.get(2)?)))
            .optional()?;
        if let Some((table, parent)) = dangling {
            return Err(MetadataError::Migration(format!(
                "a row of {table} would refer to a missing row of {parent}"
            )));
        }
    }
    tx.commit()?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_match_schema_dir_and_are_numbered_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schema");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.1.to_owned()).collect();
        assert_eq!(
            files, listed,
            "every schema/*.sql file must be listed in MIGRATIONS"
        );
        for (i, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1);
            assert!(
                name.starts_with(&format!("{version:04}_")),
                "{name} must start with its number"
            );
        }
    }

    #[test]
    fn migrating_twice_is_a_no_op_and_newer_schemas_are_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len());
        assert_eq!(migrate(&mut conn).unwrap(), 0);
        conn.pragma_update(None, "user_version", 999).unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(MetadataError::SchemaTooNew { found: 999, .. })
        ));
    }

    /// A version-4 database holding one cached image (a tag -> manifest -> config and layer
    /// blobs, all linked in their repository) and a failing pending delete.
    fn version_4_with_an_image() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        migrate_to(&mut conn, 4).unwrap();
        conn.execute_batch(
            "INSERT INTO repositories (id, upstream, name, created_at, last_used_at) VALUES (1, 'hub', 'library/alpine', 10, 20);
             INSERT INTO blobs (digest, size_bytes, cached_at, last_used_at) VALUES ('sha256:c', 2, 10, 20), ('sha256:l', 3, 11, 21);
             INSERT INTO manifests (digest, media_type, size_bytes, body, config_digest, created, subject_digest, cached_at)
                 VALUES ('sha256:m', 'application/vnd.oci.image.manifest.v1+json', 2, x'7b7d', 'sha256:c', NULL, NULL, 10);
             INSERT INTO manifest_refs VALUES ('sha256:m', 'sha256:c', 'blob'), ('sha256:m', 'sha256:l', 'blob');
             INSERT INTO repo_manifests (repo_id, digest, cached_at, last_used_at, expires_at) VALUES (1, 'sha256:m', 10, 20, 100);
             INSERT INTO repo_blobs (repo_id, digest, cached_at, last_used_at, expires_at)
                 VALUES (1, 'sha256:c', 10, 20, 100), (1, 'sha256:l', 11, 21, 101);
             INSERT INTO tags (repo_id, name, digest, cached_at, last_used_at, expires_at) VALUES (1, 'latest', 'sha256:m', 10, 20, 100);
             INSERT INTO pending_deletes (digest, size_bytes, reason, state, attempts, next_attempt_at, last_error, created_at)
                 VALUES ('sha256:old', 7, 'expired', 'pending', 3, 200, 'store unreachable', 90);",
        )
        .unwrap();
        conn
    }

    /// Every row of the tables version 5 rebuilds or re-indexes, as text.
    fn rows(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for table in [
            "blobs",
            "manifests",
            "manifest_refs",
            "repo_manifests",
            "repo_blobs",
            "tags",
            "pending_deletes",
        ] {
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
                .unwrap();
            let width = stmt.column_count();
            let mut q = stmt.query([]).unwrap();
            while let Some(r) = q.next().unwrap() {
                let values: Vec<rusqlite::types::Value> = (0..width).map(|i| r.get(i).unwrap()).collect();
                out.push(format!("{table} {values:?}"));
            }
        }
        out
    }

    fn keyed_by_digest_alone(conn: &Connection, table: &str) -> bool {
        let sql: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        sql.contains("WITHOUT ROWID")
    }

    #[test]
    fn version_5_rebuilds_tables_keyed_by_digest_keeping_every_row_and_reference() {
        let mut conn = version_4_with_an_image();
        let before = rows(&conn);
        assert_eq!(before.len(), 10);
        assert_eq!(migrate_to(&mut conn, 5).unwrap(), 1);
        assert_eq!(rows(&conn), before);
        for table in ["blobs", "manifests", "pending_deletes"] {
            assert!(keyed_by_digest_alone(&conn, table), "{table}");
        }
        let enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert!(enforced, "foreign keys are enforced again after migrating");
        // The references now point at the rebuilt tables: a linked blob or a tagged
        // manifest cannot go, and removing an unlinked manifest still takes its references.
        assert!(conn
            .execute("DELETE FROM blobs WHERE digest = 'sha256:l'", [])
            .is_err());
        assert!(conn
            .execute("DELETE FROM manifests WHERE digest = 'sha256:m'", [])
            .is_err());
        conn.execute_batch(
            "DELETE FROM tags; DELETE FROM repo_manifests; DELETE FROM manifests WHERE digest = 'sha256:m';",
        )
        .unwrap();
        let refs: i64 = conn
            .query_row("SELECT count(*) FROM manifest_refs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(refs, 0);
    }

    #[test]
    fn version_6_keeps_write_intents_and_records_no_upload_for_them() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 5).unwrap();
        conn.execute(
            "INSERT INTO write_intents (id, digest, expires_at) VALUES (7, 'sha256:w', 50)",
            [],
        )
        .unwrap();
        assert_eq!(migrate_to(&mut conn, 6).unwrap(), 1);
        let intent: (i64, String, Option<String>, Option<String>) = conn
            .query_row(
                "SELECT id, digest, upload_key, upload_id FROM write_intents",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(intent, (7, "sha256:w".to_owned(), None, None));
        let stale: i64 = conn
            .query_row("SELECT count(*) FROM stale_uploads", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stale, 0);
    }

    #[test]
    fn version_7_gives_stored_referrers_answers_their_upstreams_ttl() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 6).unwrap();
        conn.execute_batch(
            "INSERT INTO upstream_settings (upstream, ttl_secs, applied_at) VALUES ('a', 100, 0), ('b', 0, 0);
             INSERT INTO repositories (id, upstream, name, created_at, last_used_at) VALUES (1, 'a', 'r', 0, 0), (2, 'b', 'r', 0, 0);
             INSERT INTO referrers (repo_id, digest, artifact_type, media_type, body, fetched_at)
               VALUES (1, 'sha256:s', '', 'x', x'00', 40), (2, 'sha256:s', '', 'x', x'00', 40);",
        )
        .unwrap();
        assert_eq!(migrate_to(&mut conn, 7).unwrap(), 1);
        let expiry: Vec<Option<i64>> = conn
            .prepare("SELECT expires_at FROM referrers ORDER BY repo_id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(expiry, [Some(140), None], "ttl 100 from fetched_at; ttl 0: never");
    }

    #[test]
    fn version_8_keeps_jobs_and_their_deletes_and_leaves_every_entry_unpinned() {
        let mut conn = version_4_with_an_image();
        migrate_to(&mut conn, 7).unwrap();
        conn.execute_batch(
            "INSERT INTO jobs (id, kind, args, state, max_attempts, run_after, created_at, updated_at, dedupe_key)
                 VALUES (3, 'purge', '{}', 'running', 5, 10, 10, 10, 'k');
             INSERT INTO job_deletes (job_id, digest) VALUES (3, 'sha256:old');",
        )
        .unwrap();
        let jobs = |c: &Connection| -> Vec<String> {
            let mut stmt = c.prepare("SELECT * FROM jobs ORDER BY id").unwrap();
            let width = stmt.column_count();
            let mut q = stmt.query([]).unwrap();
            let mut out = Vec::new();
            while let Some(r) = q.next().unwrap() {
                let values: Vec<rusqlite::types::Value> = (0..width).map(|i| r.get(i).unwrap()).collect();
                out.push(format!("{values:?}"));
            }
            out
        };
        let before = jobs(&conn);
        assert_eq!(migrate_to(&mut conn, 8).unwrap(), 1);
        assert_eq!(jobs(&conn), before);
        // The rebuilt table takes the new kind, still refuses unknown ones, and job_deletes
        // still refers to it (deleting the job takes its rows).
        conn.execute(
            "INSERT INTO jobs (kind, args, state, max_attempts, run_after, created_at, updated_at)
             VALUES ('prefetch', '{}', 'queued', 5, 10, 10, 10)",
            [],
        )
        .unwrap();
        assert!(conn
            .execute(
                "INSERT INTO jobs (kind, args, state, max_attempts, run_after, created_at, updated_at)
                 VALUES ('bogus', '{}', 'queued', 5, 10, 10, 10)",
                [],
            )
            .is_err());
        // A second running job with the same key is still refused.
        assert!(conn
            .execute(
                "INSERT INTO jobs (kind, args, state, max_attempts, run_after, created_at, updated_at, dedupe_key)
                 VALUES ('purge', '{}', 'queued', 5, 10, 10, 10, 'k')",
                [],
            )
            .is_err());
        conn.execute("DELETE FROM jobs WHERE id = 3", []).unwrap();
        let left: i64 = conn
            .query_row("SELECT count(*) FROM job_deletes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        for table in ["tags", "repo_manifests", "repo_blobs"] {
            let pinned: i64 = conn
                .query_row(
                    &format!("SELECT count(*) FROM {table} WHERE pinned != 0"),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(pinned, 0, "{table}");
        }
    }

    #[test]
    fn a_migration_that_would_leave_a_dangling_reference_changes_nothing() {
        let mut conn = version_4_with_an_image();
        // A link to a blob that has no row, as an old bug with checks off might have left.
        conn.pragma_update(None, "foreign_keys", false).unwrap();
        conn.execute(
            "INSERT INTO repo_blobs (repo_id, digest, cached_at, last_used_at) VALUES (1, 'sha256:gone', 1, 1)",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        let before = rows(&conn);
        let err = migrate(&mut conn).unwrap_err();
        assert!(
            matches!(&err, MetadataError::Migration(m) if m.contains("repo_blobs") && m.contains("blobs")),
            "{err}"
        );
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 4);
        assert_eq!(rows(&conn), before);
        assert!(!keyed_by_digest_alone(&conn, "blobs"));
        let enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert!(enforced);
    }
}
