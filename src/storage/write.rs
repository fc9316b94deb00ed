//! Committing a verified temporary file under its final key.

use super::{BlobStore, StorageError};
use crate::oci::Digest;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use std::path::Path;
use tokio::io::AsyncReadExt;

/// Part size for multipart uploads: S3 needs at least 5 MiB per part.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts uploaded at once; bounds memory to about this many parts.
const PARTS_IN_FLIGHT: usize = 2;

impl BlobStore {
    /// Moves the verified file at `tmp` under the key of `digest`. The filesystem backend
    /// renames it (atomic, no copy); others upload it and leave `tmp` for the caller.
    /// Content-addressed keys make a second commit of the same digest harmless.
    pub async fn put_file(&self, digest: &Digest, tmp: &Path, size: u64) -> Result<(), StorageError> {
        let key = self.key(digest);
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StorageError::Io { path, source }
        };
        if let Some(dest) = self.local_path(&key) {
            let (tmp, fsync) = (tmp.to_owned(), self.fsync);
            return tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
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
            })?;
        }
        let mut file = tokio::fs::File::open(tmp).await.map_err(io(tmp))?;
        if size <= PART_BYTES as u64 {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut buf).await.map_err(io(tmp))?;
            self.store.put(&key, PutPayload::from(buf)).await?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; PART_BYTES];
        let sent = async {
            loop {
                let n = read_full(&mut file, &mut buf).await.map_err(io(tmp))?;
                if n == 0 {
                    return Ok(());
                }
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        if let Err(e) = sent {
            // Dropped, the upload would stay open on S3 and GCS, its parts kept (and
            // billed) with no key for reconciliation to find (I2). `finish` aborts on its
            // own failures; these are ours.
            if let Err(abort) = writer.abort().await {
                tracing::warn!(object.key = %key, error = %abort, "could not abort a failed multipart upload");
            }
            return Err(e);
        }
        writer.finish().await?;
        Ok(())
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
