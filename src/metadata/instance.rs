//! This instance's id: made once, kept in the database, so it names the data directory
//! (not the process or the host). The storage owner marker (`storage/owner.rs`) records
//! it to tell this instance's bucket prefix from another's.

use super::{Metadata, MetadataError};
use rusqlite::{params, OptionalExtension};

const INSTANCE_KEY: &str = "instance_id";

impl Metadata {
    /// The id of this data directory's instance, created on first use.
    pub async fn instance_id(&self, now: i64) -> Result<String, MetadataError> {
        self.write(move |tx| {
            let known: Option<String> = tx
                .query_row("SELECT value FROM settings WHERE key = ?1", [INSTANCE_KEY], |r| {
                    r.get(0)
                })
                .optional()?;
            if let Some(id) = known {
                return Ok(id);
            }
            let id = ulid::Ulid::new().to_string();
            tx.execute(
                "INSERT INTO settings (key, value, applied_at) VALUES (?1, ?2, ?3)",
                params![INSTANCE_KEY, id, now],
            )?;
            Ok(id)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regcache.db");
        let first = Metadata::open(&path).unwrap().instance_id(1).await.unwrap();
        assert_eq!(
            Metadata::open(&path).unwrap().instance_id(2).await.unwrap(),
            first
        );
        let other = tempfile::tempdir().unwrap();
        let second = Metadata::open(&other.path().join("regcache.db")).unwrap();
        assert_ne!(second.instance_id(1).await.unwrap(), first);
    }
}
