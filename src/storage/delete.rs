//! Deleting blobs: in bulk where the backend can (S3's DeleteObjects through
//! `delete_stream`; plain unlinks on one thread for the filesystem), with not-found
//! counted as deleted (I3).

use super::BlobStore;
use crate::oci::Digest;
use futures::StreamExt;
use std::collections::HashMap;
use std::path::PathBuf;

impl BlobStore {
    /// Deletes the objects of `digests`; returns the ones confirmed gone and the ones that
    /// failed with their error. A missing object counts as gone.
    pub async fn delete_many(&self, digests: &[Digest]) -> (Vec<Digest>, Vec<(Digest, String)>) {
        // Filesystem: every digest has a local path (the first `None` ends the collect).
        let local: Option<Vec<(Digest, PathBuf)>> = digests
            .iter()
            .map(|d| self.local_path(&self.key(d)).map(|p| (d.clone(), p)))
            .collect();
        if let Some(paths) = local {
            return unlink_local(paths, digests).await;
        }
        let by_key: HashMap<String, Digest> = digests
            .iter()
            .map(|d| (self.key(d).to_string(), d.clone()))
            .collect();
        let keys: Vec<_> = digests.iter().map(|d| Ok(self.key(d))).collect();
        let mut results = self.store.delete_stream(futures::stream::iter(keys).boxed());
        let mut done = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let mut failed_keys: HashMap<String, String> = HashMap::new();
        while let Some(r) = results.next().await {
            match r {
                Ok(path) => {
                    if let Some(d) = by_key.get(path.as_ref()) {
                        done.push(d.clone());
                    }
                }
                Err(object_store::Error::NotFound { path, .. }) => {
                    // Backends name the key, or (local files) the absolute path ending in it.
                    match by_key.iter().find(|(k, _)| path.ends_with(k.as_str())) {
                        Some((_, d)) => done.push(d.clone()),
                        None => errors.push(format!("not found: {path}")),
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    // Attribute the error to the key it names, when it names one.
                    match by_key.keys().find(|k| message.contains(k.as_str())) {
                        Some(k) => {
                            failed_keys.insert(k.clone(), message);
                        }
                        None => errors.push(message),
                    }
                }
            }
        }
        let confirmed: std::collections::HashSet<&Digest> = done.iter().collect();
        let fallback = errors
            .first()
            .cloned()
            .unwrap_or_else(|| "storage did not confirm the delete".into());
        let failed = digests
            .iter()
            .filter(|d| !confirmed.contains(d))
            .map(|d| {
                let error = failed_keys
                    .get(&self.key(d).to_string())
                    .cloned()
                    .unwrap_or_else(|| fallback.clone());
                (d.clone(), error)
            })
            .collect();
        (done, failed)
    }
}

/// The filesystem backend: every file unlinked on one blocking thread. object_store's
/// local delete runs one blocking task per file, ten at a time, which capped deletion
/// near 1 700 files/s at a million pending deletes.
async fn unlink_local(
    paths: Vec<(Digest, PathBuf)>,
    digests: &[Digest],
) -> (Vec<Digest>, Vec<(Digest, String)>) {
    let unlink = move || {
        let mut done = Vec::with_capacity(paths.len());
        let mut failed = Vec::new();
        for (digest, path) in paths {
            match std::fs::remove_file(&path) {
                Ok(()) => done.push(digest),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => done.push(digest),
                Err(e) => failed.push((digest, format!("removing {}: {e}", path.display()))),
            }
        }
        (done, failed)
    };
    match tokio::task::spawn_blocking(unlink).await {
        Ok(outcome) => outcome,
        Err(e) => (
            Vec::new(),
            digests
                .iter()
                .map(|d| (d.clone(), format!("delete task failed: {e}")))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::StorageConfig;
    use crate::oci::Digest;

    #[tokio::test]
    async fn deletes_present_and_counts_missing_as_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::build(&StorageConfig::default(), dir.path()).unwrap();
        let present = Digest::of(b"present");
        let tmp = dir.path().join("t");
        std::fs::write(&tmp, b"present").unwrap();
        store.put_file(&present, &tmp, 7, None).await.unwrap();
        let missing = Digest::of(b"missing");
        let (done, failed) = store.delete_many(&[present.clone(), missing.clone()]).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(done.len(), 2);
        assert_eq!(store.size_of(&present).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_removed_is_reported_failed_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::build(&StorageConfig::default(), dir.path()).unwrap();
        let blocked = Digest::of(b"blocked");
        // A directory where the blob file should be: unlink fails (EISDIR), not "not found".
        let hex = blocked.hex();
        let at = dir.path().join("store/blobs/sha256").join(&hex[..2]).join(hex);
        std::fs::create_dir_all(at.join("inside")).unwrap();
        let gone = Digest::of(b"never stored");
        let (done, failed) = store.delete_many(&[blocked.clone(), gone.clone()]).await;
        assert_eq!(done, vec![gone]);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, blocked);
        assert!(
            failed[0].1.contains(hex),
            "the error names the file: {}",
            failed[0].1
        );
        assert!(at.exists());
    }
}
