//! Numbered SQL migrations from `schema/`, embedded at build time and applied in one
//! transaction at start-up. `PRAGMA user_version` records the version reached.

use super::MetadataError;
use rusqlite::Connection;

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
];

/// Brings the database up to the newest schema; a database newer than this build is an
/// error rather than something to guess about.
pub(super) fn migrate(conn: &mut Connection) -> Result<usize, MetadataError> {
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(MetadataError::SchemaTooNew { found, known });
    }
    let mut applied = 0;
    for (version, _name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        applied += 1;
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
}
