//! What a prefetch tells as it goes (one event per line with `--json`, a progress bar on a
//! terminal, progress counts on a job's row) and the summary it ends with.

use serde::Serialize;

/// Something that happened. Serialised as `{"event": "<name>", ...}`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every image is resolved: how many the list names (failed ones included), and what
    /// is left to fetch.
    Planned {
        images: u64,
        blobs_to_fetch: u64,
        bytes_to_fetch: u64,
    },
    /// A blob was fetched, verified and committed.
    Blob {
        image: String,
        digest: String,
        size_bytes: u64,
    },
    /// An image is complete in the cache.
    Image(ImageDone),
    /// An image could not be completed.
    Failed(Failure),
    /// The end.
    Summary(Summary),
}

/// An image that is complete in the cache.
#[derive(Debug, Clone, Serialize)]
pub struct ImageDone {
    /// `HOST/REPO:TAG` or `HOST/REPO@DIGEST`, as the list names it.
    pub image: String,
    /// Where it is cached: `upstream/repository`.
    pub repository: String,
    /// The manifest (or index) digest.
    pub digest: String,
    /// `fetched` when anything was fetched, `current` when everything was cached already.
    pub status: &'static str,
    /// Platforms cached, for an index.
    pub platforms: Vec<String>,
    pub manifests_fetched: u64,
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Blobs that were cached already.
    pub blobs_cached: u64,
    pub pinned: bool,
}

/// An image that failed, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub image: String,
    pub error: String,
}

/// How a prefetch ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub images: u64,
    pub images_fetched: u64,
    /// Images that were cached and current already (nothing fetched).
    pub images_current: u64,
    pub images_failed: u64,
    pub manifests_fetched: u64,
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Blobs skipped because they were cached already.
    pub blobs_skipped: u64,
    pub failures: Vec<Failure>,
    pub duration_ms: u64,
}

impl Summary {
    pub(super) fn add(&mut self, done: &ImageDone) {
        if done.status == "current" {
            self.images_current += 1;
        } else {
            self.images_fetched += 1;
        }
        self.manifests_fetched += done.manifests_fetched;
        self.blobs_fetched += done.blobs_fetched;
        self.bytes_fetched += done.bytes_fetched;
        self.blobs_skipped += done.blobs_cached;
    }

    pub(super) fn fail(&mut self, failure: Failure) {
        self.images_failed += 1;
        self.failures.push(failure);
    }

    /// `N of M images failed: a: why; b: why`, for a job's error.
    pub fn failure_text(&self) -> String {
        let list: Vec<String> = self
            .failures
            .iter()
            .map(|f| format!("{}: {}", f.image, f.error))
            .collect();
        format!(
            "{} of {} images failed: {}",
            self.images_failed,
            self.images,
            list.join("; ")
        )
    }
}

/// Where events go. Called from the prefetch's tasks; must not block.
pub trait Reporter: Send + Sync {
    fn event(&self, event: &Event);
    /// Bytes arrived for a blob being fetched (for a progress bar; not an event).
    fn bytes(&self, _n: u64) {}
}

/// Discards everything.
#[derive(Debug, Default)]
pub struct Silent;

impl Reporter for Silent {
    fn event(&self, _event: &Event) {}
}
