//! The cache logic between the HTTP layers and the parts below: decides what is served
//! from storage, what is fetched (once per digest, however many ask), what is revalidated,
//! and records it all in metadata. Calls `metadata`, `storage` and `upstream`; never HTTP.

mod active;
mod blobs;
mod error;
mod listing;
mod manifests;
mod single_flight;
mod transfer;
mod uses;

pub use crate::config::{Config, Duration};
use crate::metadata::{Metadata, RepoKey};
use crate::oci::{Digest, RepoName};
use crate::storage::BlobStore;
use crate::upstream::{RouteError, Upstream, Upstreams};
pub use active::{ActiveBlobs, ActiveGuard};
pub use blobs::{BlobResponse, ByteRange};
pub use error::{new_error_id, panic_message, CacheError};
use single_flight::SingleFlight;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
pub use uses::UseBuffer;

/// A repository on a chosen upstream: what every cache operation acts on.
#[derive(Debug, Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    /// The name as the upstream knows it (Docker Hub names already have `library/`).
    pub repo: RepoName,
    pub key: RepoKey,
}

/// Behaviour switches taken from the config at start-up.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub offline: bool,
    pub revalidate_after: Duration,
    pub revalidate_timeout: Duration,
}

impl CacheSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            offline: config.proxy.offline,
            revalidate_after: config.proxy.revalidate_after,
            revalidate_timeout: config.proxy.revalidate_timeout,
        }
    }
}

type TransferKey = (RepoKey, Digest);

/// What a cache is built from (see `server::start`).
#[derive(Debug)]
pub struct CacheParts {
    pub meta: Metadata,
    pub store: BlobStore,
    pub upstreams: Upstreams,
    pub tmp_dir: PathBuf,
    pub settings: CacheSettings,
    pub active: Arc<ActiveBlobs>,
    pub uses: Arc<UseBuffer>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

#[derive(Debug)]
pub struct Cache {
    meta: Metadata,
    store: BlobStore,
    upstreams: Upstreams,
    tmp_dir: PathBuf,
    settings: CacheSettings,
    /// Blob downloads in progress, one per (repository, digest).
    transfers: Mutex<HashMap<TransferKey, watch::Receiver<transfer::State>>>,
    /// Tag revalidation HEADs in progress: concurrent requests share one.
    revalidations: SingleFlight<(RepoKey, String), Option<String>>,
    /// Manifest fetches in progress.
    manifest_fetches: SingleFlight<(RepoKey, String), crate::metadata::ManifestRecord>,
    /// Upstream tag-list walks in progress: one per repository at a time (up to 100
    /// pages each), however many clients list it.
    tag_walks: SingleFlight<RepoKey, Arc<Vec<String>>>,
    /// When each tag was last confirmed upstream (memory only: after a restart every tag
    /// is revalidated once, which is the safe direction).
    checked: Mutex<HashMap<(RepoKey, String), Instant>>,
    uses: Arc<UseBuffer>,
    /// Blobs being served right now: eviction never picks them.
    active: Arc<ActiveBlobs>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// A std mutex never held across an await; poisoning only means another request
/// panicked, which leaves these maps consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Cache {
    /// `parts.tmp_dir` holds downloads in progress; it is emptied here because no
    /// transfer survives a restart (I2: crash leftovers are swept, never adopted).
    pub fn new(parts: CacheParts) -> std::io::Result<Arc<Self>> {
        let CacheParts {
            meta,
            store,
            upstreams,
            tmp_dir,
            settings,
            active,
            uses,
            tasks,
            shutdown,
        } = parts;
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir)?;
        }
        std::fs::create_dir_all(&tmp_dir)?;
        Ok(Arc::new(Self {
            meta,
            store,
            upstreams,
            tmp_dir,
            settings,
            transfers: Mutex::default(),
            revalidations: SingleFlight::default(),
            manifest_fetches: SingleFlight::default(),
            tag_walks: SingleFlight::default(),
            checked: Mutex::default(),
            uses,
            active,
            tasks,
            shutdown,
        }))
    }

    /// Digests of the blobs being streamed to clients right now.
    pub fn blobs_being_served(&self) -> Vec<String> {
        self.active.snapshot()
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Routes a client's repository name (and containerd's `ns`) to an upstream.
    pub fn target(&self, ns: Option<&str>, name: &RepoName) -> Result<Target, RouteError> {
        let routed = self.upstreams.route(ns, name)?;
        let key = RepoKey {
            upstream: routed.upstream.name.clone(),
            name: routed.repo.to_string(),
        };
        Ok(Target {
            upstream: routed.upstream,
            repo: routed.repo,
            key,
        })
    }

    /// Background work the cache owns: flushing recorded uses. Returns when `shutdown`
    /// fires, after a last flush.
    pub async fn run_background(self: Arc<Self>) {
        uses::flush_loop(&self.uses, &self.meta, &self.shutdown).await;
    }
}
