//! Building the object store a config names.

use super::{BlobStore, StorageError};
use crate::config::{Backend, StorageConfig};
use object_store::aws::AmazonS3Builder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{ClientOptions, RetryConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Silence tolerated on a storage connection; the whole-request timeout is off because a
/// large blob legitimately takes long (CRATES.md: the default 30 s covers the whole body).
const STORAGE_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// object_store's own retries (default: 10 over up to 3 minutes) are kept short: a failed
/// delete is retried durably by the deletion pipeline with its own backoff, a failed write
/// fails the transfer (nothing is stored), and a long stall would hold shutdown.
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
        ..RetryConfig::default()
    }
}

/// Builds the blob store for `config`; the filesystem backend keeps its objects under
/// `<data_dir>/store` (created if missing), blobs at `store/blobs/sha256/...`.
pub fn build(config: &StorageConfig, data_dir: &Path) -> Result<BlobStore, StorageError> {
    let cfg_err = |e: object_store::Error| StorageError::Config(e.to_string());
    match config.backend {
        Backend::Filesystem => {
            let root = data_dir.join("store");
            std::fs::create_dir_all(&root).map_err(|source| StorageError::Io {
                path: root.display().to_string(),
                source,
            })?;
            let root = root.canonicalize().map_err(|source| StorageError::Io {
                path: root.display().to_string(),
                source,
            })?;
            let fs = LocalFileSystem::new_with_prefix(&root).map_err(cfg_err)?;
            Ok(BlobStore::new(
                Arc::new(fs),
                String::new(),
                Some(root),
                config.fsync,
            ))
        }
        Backend::Memory => Ok(BlobStore::new(
            Arc::new(InMemory::new()),
            String::new(),
            None,
            false,
        )),
        Backend::S3 => {
            let s3 = config
                .s3
                .as_ref()
                .ok_or_else(|| StorageError::Config("storage.s3 is missing".into()))?;
            let options = client_options(s3.allow_http);
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_region(&s3.region)
                .with_client_options(options)
                .with_retry(retry())
                .with_allow_http(s3.allow_http);
            if let Some(endpoint) = &s3.endpoint {
                b = b.with_endpoint(endpoint);
            }
            if let Some(id) = &s3.access_key_id {
                b = b.with_access_key_id(id);
            }
            if let Some(secret) = &s3.secret_access_key {
                b = b.with_secret_access_key(secret.expose());
            }
            let store = Arc::new(b.build().map_err(cfg_err)?);
            Ok(BlobStore::new(store.clone(), s3.prefix.clone(), None, false)
                .with_multipart(store)
                .shared())
        }
        Backend::Gcs => {
            let gcs = config
                .gcs
                .as_ref()
                .ok_or_else(|| StorageError::Config("storage.gcs is missing".into()))?;
            let store = Arc::new(gcs_builder(gcs).build().map_err(cfg_err)?);
            Ok(BlobStore::new(store.clone(), gcs.prefix.clone(), None, false)
                .with_multipart(store)
                .shared())
        }
    }
}

fn client_options(allow_http: bool) -> ClientOptions {
    // `with_client_options` replaces every option, so allow_http is set here too.
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_timeout_disabled()
        .with_connect_timeout(Duration::from_secs(10))
        .with_read_timeout(STORAGE_READ_TIMEOUT)
}

pub(super) fn gcs_builder(gcs: &crate::config::GcsConfig) -> GoogleCloudStorageBuilder {
    let mut b = GoogleCloudStorageBuilder::new()
        .with_bucket_name(&gcs.bucket)
        .with_client_options(client_options(gcs.allow_http))
        .with_retry(retry());
    if let Some(url) = &gcs.base_url {
        b = b.with_base_url(url);
    }
    if let Some(path) = &gcs.service_account_path {
        b = b.with_service_account_path(path.display().to_string());
    }
    if let Some(key) = &gcs.service_account_key {
        b = b.with_service_account_key(key.expose());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GcsConfig, Secret};
    use object_store::gcp::GoogleConfigKey;

    fn gcs(base_url: Option<&str>) -> GcsConfig {
        GcsConfig {
            bucket: "cache-bucket".into(),
            service_account_path: None,
            service_account_key: None,
            base_url: base_url.map(str::to_owned),
            allow_http: true,
            prefix: "mirror".into(),
        }
    }

    #[test]
    fn gcs_builder_carries_bucket_and_endpoint_from_config() {
        let b = gcs_builder(&gcs(Some("http://127.0.0.1:4443")));
        assert_eq!(
            b.get_config_value(&GoogleConfigKey::Bucket).as_deref(),
            Some("cache-bucket")
        );
        let built = b.build().expect("a GCS store builds from bucket + base URL");
        assert!(format!("{built}").contains("cache-bucket"), "{built}");
    }

    #[test]
    fn gcs_with_bad_service_account_is_a_config_error() {
        let mut c = gcs(None);
        c.service_account_key = Some(Secret::new("{not json"));
        let config = StorageConfig {
            backend: Backend::Gcs,
            gcs: Some(c),
            ..StorageConfig::default()
        };
        let err = build(&config, Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(err, StorageError::Config(_)), "{err}");
    }

    #[test]
    fn filesystem_keys_are_content_addressed_under_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let store = build(&StorageConfig::default(), dir.path()).unwrap();
        let d = crate::oci::Digest::of(b"x");
        let key = store.key(&d);
        assert_eq!(
            key.as_ref(),
            format!("blobs/sha256/{}/{}", &d.hex()[..2], d.hex())
        );
        assert!(store.describe().starts_with("filesystem:"));
    }
}
