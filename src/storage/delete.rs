//! Deleting blobs: in bulk where the backend can (S3's DeleteObjects through
//! `delete_stream`), with not-found counted as deleted (I3).

use super::BlobStore;
use crate::oci::Digest;
use futures::StreamExt;
use std::collections::HashMap;

impl BlobStore {
    /// Deletes the objects of `digests`; returns the ones confirmed gone and the ones that
    /// failed with their error. A missing object counts as gone.
    pub async fn delete_many(&self, digests: &[Digest]) -> (Vec<Digest>, Vec<(Digest, String)>) {
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
        store.put_file(&present, &tmp, 7).await.unwrap();
        let missing = Digest::of(b"missing");
        let (done, failed) = store.delete_many(&[present.clone(), missing.clone()]).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(done.len(), 2);
        assert_eq!(store.size_of(&present).await.unwrap(), None);
    }
}
