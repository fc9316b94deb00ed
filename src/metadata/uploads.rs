//! Multipart uploads in flight (I2): recorded on their write intent before the first part
//! is sent; one whose write was abandoned, or whose process died, is kept as a stale
//! upload until reconciliation has aborted it.

use super::{Metadata, MetadataError};
use rusqlite::{params, Transaction};

/// A multipart upload as SQLite records it: the object key and the store's upload id.
/// Metadata's own type, so this layer does not depend on `storage` (the caller, which
/// knows both, builds one from the other's `storage::OpenUpload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub key: String,
    pub id: String,
}

/// A stale upload and how its aborts went so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleUpload {
    pub upload: UploadRecord,
    pub attempts: i64,
}

impl Metadata {
    /// Records `upload` on the write intent `intent`, before any part is sent.
    pub async fn record_upload(&self, intent: i64, key: String, id: String) -> Result<(), MetadataError> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE write_intents SET upload_key = ?2, upload_id = ?3 WHERE id = ?1",
                params![intent, key, id],
            )?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` stale uploads, those tried least first.
    pub async fn stale_uploads(&self, limit: u32) -> Result<Vec<StaleUpload>, MetadataError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT upload_key, upload_id, attempts FROM stale_uploads
                  ORDER BY attempts, since LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit], |r| {
                Ok(StaleUpload {
                    upload: UploadRecord {
                        key: r.get(0)?,
                        id: r.get(1)?,
                    },
                    attempts: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// An upload is aborted (or the store no longer knows it): nothing left to do.
    pub async fn forget_stale_upload(&self, upload: UploadRecord) -> Result<(), MetadataError> {
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM stale_uploads WHERE upload_key = ?1 AND upload_id = ?2",
                params![upload.key, upload.id],
            )?;
            Ok(())
        })
        .await
    }

    /// Aborting `upload` failed with `error`; the next pass tries again.
    pub async fn stale_upload_failed(
        &self,
        upload: UploadRecord,
        error: String,
    ) -> Result<(), MetadataError> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE stale_uploads SET attempts = attempts + 1, last_error = ?3
                  WHERE upload_key = ?1 AND upload_id = ?2",
                params![upload.key, upload.id, error],
            )?;
            Ok(())
        })
        .await
    }
}

/// Moves the uploads of write intent `intent` (of every intent when `None`) to
/// `stale_uploads`, ahead of deleting the intents.
pub(super) fn keep_stale_uploads(
    tx: &Transaction<'_>,
    intent: Option<i64>,
    now: i64,
) -> Result<usize, MetadataError> {
    Ok(tx.execute(
        "INSERT OR IGNORE INTO stale_uploads (upload_key, upload_id, since)
         SELECT upload_key, upload_id, ?2 FROM write_intents
          WHERE upload_id IS NOT NULL AND (?1 IS NULL OR id = ?1)",
        params![intent, now],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::now_secs;

    fn upload(n: u32) -> UploadRecord {
        UploadRecord {
            key: format!("blobs/sha256/aa/{n}"),
            id: format!("upload-{n}"),
        }
    }

    async fn keys(meta: &Metadata) -> Vec<UploadRecord> {
        let mut v: Vec<_> = meta
            .stale_uploads(100)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.upload)
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    #[tokio::test]
    async fn uploads_of_abandoned_and_dead_writes_stay_until_aborted_and_completed_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Metadata::open(&dir.path().join("regcache.db")).unwrap();
        let now = now_secs();
        let mut intents = Vec::new();
        for (n, digest) in ["sha256:a", "sha256:b", "sha256:c", "sha256:d"]
            .iter()
            .enumerate()
        {
            let intent = meta.begin_write(digest, now).await.unwrap().unwrap();
            if n < 3 {
                let u = upload(n as u32);
                meta.record_upload(intent, u.key, u.id).await.unwrap();
            }
            intents.push(intent);
        }
        // Upload 0 completes with its row; upload 1's write fails; 2 is in flight, as is
        // the single put of d (no upload).
        let repo = crate::metadata::RepoKey {
            upstream: "up".into(),
            name: "r".into(),
        };
        meta.commit_blob(&repo, "sha256:a", 10, intents[0], now)
            .await
            .unwrap();
        meta.abandon_write(intents[1]).await.unwrap();
        assert_eq!(
            keys(&meta).await,
            vec![upload(1)],
            "only the abandoned one is stale"
        );

        // A restart: the write of the dead process left upload 2 open.
        meta.reset_after_restart().await.unwrap();
        assert_eq!(keys(&meta).await, vec![upload(1), upload(2)]);

        meta.stale_upload_failed(upload(1), "store down".into())
            .await
            .unwrap();
        let tried = meta.stale_uploads(100).await.unwrap();
        assert_eq!(
            tried.last().map(|s| (&s.upload, s.attempts)),
            Some((&upload(1), 1)),
            "least tried first"
        );
        meta.forget_stale_upload(upload(1)).await.unwrap();
        meta.forget_stale_upload(upload(2)).await.unwrap();
        assert!(keys(&meta).await.is_empty());
        // Recorded twice (a second restart before the abort) is one stale upload.
        let intent = meta.begin_write("sha256:e", now).await.unwrap().unwrap();
        let u = upload(4);
        meta.record_upload(intent, u.key, u.id).await.unwrap();
        meta.abandon_write(intent).await.unwrap();
        meta.reset_after_restart().await.unwrap();
        assert_eq!(keys(&meta).await, vec![upload(4)]);
    }
}
