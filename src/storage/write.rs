//! Committing a verified temporary file under its final key: a rename on the filesystem,
//! one put for small blobs, and for large ones on S3 and GCS a multipart upload whose id
//! the caller records before any part is sent (I2: an upload a crash leaves open is
//! found in SQLite and aborted, rather than kept and billed unseen).

use super::{BlobStore, StorageError};
use crate::oci::Digest;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

/// Part size for multipart uploads: S3 needs at least 5 MiB per part.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts uploaded at once; bounds memory to about this many parts.
const PARTS_IN_FLIGHT: usize = 2;

/// A multipart upload opened for one blob, to be recorded before its parts are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub id: String,
}

impl BlobStore {
    /// Opens a multipart upload for `digest` when [`BlobStore::put_file`] will send `size`
    /// bytes in parts (S3 and GCS, blobs over one part); `None` when it will not.
    pub async fn open_upload(&self, digest: &Digest, size: u64) -> Result<Option<OpenUpload>, StorageError> {
        let Some(mp) = &self.multipart else {
            return Ok(None);
        };
        if self.local_root.is_some() || size <= PART_BYTES as u64 {
            return Ok(None);
        }
        let key = self.key(digest);
        let id = mp.0.create_multipart(&key).await?;
        Ok(Some(OpenUpload {
            key: key.to_string(),
            id,
        }))
    }

    /// Aborts an upload left open by a crash or a failed write; one the store no longer
    /// knows (aborted or completed already) counts as aborted.
    pub async fn abort_upload(&self, upload: &OpenUpload) -> Result<(), StorageError> {
        let Some(mp) = &self.multipart else {
            return Ok(());
        };
        let key = ObjectPath::from(upload.key.as_str());
        match mp.0.abort_multipart(&key, &upload.id).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves the verified file at `tmp` under the key of `digest`. The filesystem backend
    /// renames it (atomic, no copy); others upload it (in the parts of `upload` when
    /// given) and leave `tmp` for the caller. Content-addressed keys make a second commit
    /// of the same digest harmless.
    pub async fn put_file(
        &self,
        digest: &Digest,
        tmp: &Path,
        size: u64,
        upload: Option<&OpenUpload>,
    ) -> Result<(), StorageError> {
        let key = self.key(digest);
        if let Some(dest) = self.local_path(&key) {
            return rename_into_place(tmp, dest, self.fsync).await;
        }
        let mut file = tokio::fs::File::open(tmp).await.map_err(io(tmp))?;
        if let (Some(upload), Some(mp)) = (upload, &self.multipart) {
            return put_parts(&mp.0, upload, &mut file, tmp).await;
        }
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut buf).await.map_err(io(tmp))?;
        self.store.put(&key, PutPayload::from(buf)).await?;
        Ok(())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.display().to_string();
    move |source| StorageError::Io { path, source }
}

async fn rename_into_place(tmp: &Path, dest: std::path::PathBuf, fsync: bool) -> Result<(), StorageError> {
    let tmp = tmp.to_owned();
    tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
        if fsync {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io(&tmp))?;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        if fsync {
            if let Some(parent) = dest.parent() {
                std::fs::File::open(parent)
                    .and_then(|f| f.sync_all())
                    .map_err(io(parent))?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| StorageError::Io {
        path: "blocking commit task".into(),
        source: std::io::Error::other(e),
    })?
}

/// Sends `file` in the parts of `upload`, `PARTS_IN_FLIGHT` at a time (each on its own
/// task, so parts keep moving while the next is read), and completes it; on any failure
/// the upload is aborted (a failed abort leaves it to the caller's record). Dropping this
/// future drops the part tasks with it.
async fn put_parts(
    mp: &Arc<dyn MultipartStore>,
    upload: &OpenUpload,
    file: &mut tokio::fs::File,
    tmp: &Path,
) -> Result<(), StorageError> {
    let key = ObjectPath::from(upload.key.as_str());
    let sent = async {
        let mut parts = Vec::new();
        let mut in_flight = JoinSet::new();
        for index in 0.. {
            if in_flight.len() >= PARTS_IN_FLIGHT {
                parts.push(joined(in_flight.join_next().await)?);
            }
            let mut buf = vec![0u8; PART_BYTES];
            let n = read_full(file, &mut buf).await.map_err(io(tmp))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let (mp, key, id) = (mp.clone(), key.clone(), upload.id.clone());
            in_flight.spawn(async move {
                let part = mp.put_part(&key, &id, index, PutPayload::from(buf)).await?;
                Ok::<_, object_store::Error>((index, part))
            });
        }
        while let Some(done) = in_flight.join_next().await {
            parts.push(joined(Some(done))?);
        }
        parts.sort_by_key(|(index, _)| *index);
        let parts = parts.into_iter().map(|(_, part)| part).collect();
        mp.complete_multipart(&key, &upload.id, parts).await?;
        Ok::<_, StorageError>(())
    }
    .await;
    if let Err(e) = sent {
        if let Err(abort) = mp.abort_multipart(&key, &upload.id).await {
            tracing::warn!(object.key = %key, error = %abort, "could not abort a failed multipart upload; reconciliation retries");
        }
        return Err(e);
    }
    Ok(())
}

type PartResult = Result<(usize, PartId), object_store::Error>;

/// The outcome of a part task `join_next` returned.
fn joined(done: Option<Result<PartResult, tokio::task::JoinError>>) -> Result<(usize, PartId), StorageError> {
    match done {
        Some(Ok(part)) => Ok(part?),
        Some(Err(e)) => Err(StorageError::Io {
            path: "multipart part task".into(),
            source: std::io::Error::other(e),
        }),
        None => Err(StorageError::Io {
            path: "multipart part task".into(),
            source: std::io::Error::other("no part in flight"),
        }),
    }
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;

    /// A blob of three and a half parts goes up as an upload of four parts, in order, and
    /// an open upload aborts. (That an upload S3 no longer knows counts as aborted is
    /// checked against moto in tests/delete_failures.rs; InMemory answers otherwise.)
    #[tokio::test]
    async fn large_blobs_go_up_in_ordered_parts_of_a_recorded_upload() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(InMemory::new());
        let store = BlobStore::new(memory.clone(), "cache".into(), None, false).with_multipart(memory);
        let data: Vec<u8> = (0..PART_BYTES * 7 / 2).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let tmp = dir.path().join("upload.tmp");
        std::fs::write(&tmp, &data).unwrap();

        let small = Digest::of(b"small");
        assert_eq!(store.open_upload(&small, 5).await.unwrap(), None, "one put");
        let upload = store
            .open_upload(&digest, data.len() as u64)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(upload.key, store.key(&digest).to_string());
        store
            .put_file(&digest, &tmp, data.len() as u64, Some(&upload))
            .await
            .unwrap();
        let stored: Vec<Bytes> = store
            .open(&digest, None)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert!(stored.concat() == data, "the parts were put together in order");

        let other = Digest::of(b"other");
        let open = store
            .open_upload(&other, data.len() as u64)
            .await
            .unwrap()
            .unwrap();
        store.abort_upload(&open).await.unwrap();
    }
}
