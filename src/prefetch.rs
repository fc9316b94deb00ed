//! Prefetch: fills the cache with the images an image list names, before anyone pulls
//! them (edge sites ahead of an outage, air-gapped bundles). Every manifest and blob goes
//! through the cache's own paths (`cache/fill.rs`): verified before it is stored (I1, I11),
//! one upstream GET per blob, linked only under the repository it was fetched for (I7).
//! What is cached and current is skipped: a cached tag costs one upstream HEAD, a cached
//! blob nothing upstream. Used by `regcache prefetch` (beside a running server or not) and
//! by the server's `[[prefetch]]` jobs. Calls the cache and metadata; never HTTP.

mod job;
mod plan;
mod report;

pub use job::{spawn_jobs, PREFETCH_KINDS};
pub use report::{Event, Failure, ImageDone, Reporter, Silent, Summary};

use crate::cache::{BlobFill, Cache};
use crate::imagelist::ImageEntry;
use crate::metadata::{now_secs, BlobAccess};
use crate::oci::Reference;
use futures::StreamExt;
use plan::{why, Planned};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Images whose manifests are resolved at once: each is a HEAD or a small GET, so a few
/// side by side keep a long list quick without a burst at the upstream.
const RESOLVE_PARALLEL: usize = 4;
/// Blob transfers of one image at once: enough to fill a link with several mid-sized
/// layers; each holds a temporary file and an upstream connection.
const BLOB_PARALLEL: usize = 4;

/// Fills the cache with `entries`, telling `reporter` as it goes; returns the summary
/// (also sent as the last event). Stops starting images once `stop` fires; those are
/// reported as failed.
pub async fn run(
    cache: &Arc<Cache>,
    entries: &[ImageEntry],
    reporter: &dyn Reporter,
    stop: &CancellationToken,
) -> Summary {
    let started = Instant::now();
    let mut summary = Summary::default();
    let (units, failures) = plan::expand(cache, entries).await;
    summary.images = (units.len() + failures.len()) as u64;
    for f in failures {
        reporter.event(&Event::Failed(f.clone()));
        summary.fail(f);
    }
    let resolved: Vec<_> = futures::stream::iter(units)
        .map(|u| plan::resolve(cache, u))
        .buffered(RESOLVE_PARALLEL)
        .collect()
        .await;
    let mut planned = Vec::new();
    for r in resolved {
        match r {
            Ok(p) => planned.push(p),
            Err(f) => {
                reporter.event(&Event::Failed(f.clone()));
                summary.fail(f);
            }
        }
    }
    let (blobs_to_fetch, bytes_to_fetch) = still_missing(cache, &planned).await;
    reporter.event(&Event::Planned {
        images: summary.images,
        blobs_to_fetch,
        bytes_to_fetch,
    });
    for p in planned {
        let outcome = if stop.is_cancelled() {
            Err("stopped before it was fetched".to_owned())
        } else {
            fill(cache, &p, reporter).await
        };
        match outcome {
            Ok(done) => {
                summary.add(&done);
                reporter.event(&Event::Image(done));
            }
            Err(error) => {
                let f = Failure {
                    image: p.unit.name.clone(),
                    error,
                };
                reporter.event(&Event::Failed(f.clone()));
                summary.fail(f);
            }
        }
    }
    summary.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    reporter.event(&Event::Summary(summary.clone()));
    summary
}

/// Blobs (and their declared bytes) not yet linked where they are wanted, each counted
/// once: what the progress bar measures.
async fn still_missing(cache: &Arc<Cache>, planned: &[Planned]) -> (u64, u64) {
    let mut seen = HashSet::new();
    let (mut blobs, mut bytes) = (0, 0);
    for p in planned {
        for b in &p.blobs {
            let d = b.digest.to_string();
            if !seen.insert((p.unit.target.key.clone(), d.clone())) {
                continue;
            }
            let linked = matches!(
                cache.metadata().blob_access(&p.unit.target.key, &d).await,
                Ok(BlobAccess::Linked { .. })
            );
            if !linked {
                blobs += 1;
                bytes += b.size;
            }
        }
    }
    (blobs, bytes)
}

/// Fetches what the image still lacks, then pins it if the list says so.
async fn fill(cache: &Arc<Cache>, p: &Planned, reporter: &dyn Reporter) -> Result<ImageDone, String> {
    let t = &p.unit.target;
    let progress = |n: u64| reporter.bytes(n);
    // Owned descriptors: a stream over borrowed ones makes this future's Send-ness
    // depend on a higher-ranked lifetime the compiler cannot prove.
    let results: Vec<_> = futures::stream::iter(p.blobs.clone())
        .map(|b| {
            let progress = &progress;
            async move {
                let r = cache.fill_blob(t, &b.digest, progress).await;
                (b, r)
            }
        })
        .buffer_unordered(BLOB_PARALLEL)
        .collect()
        .await;
    let mut done = ImageDone {
        image: p.unit.name.clone(),
        repository: t.key.to_string(),
        digest: p.digest.clone(),
        status: "current",
        platforms: p.platforms.clone(),
        manifests_fetched: p.manifests_fetched,
        blobs_fetched: 0,
        bytes_fetched: 0,
        blobs_cached: 0,
        pinned: false,
    };
    let mut errors = Vec::new();
    for (b, r) in results {
        match r {
            Ok(BlobFill::Cached { .. }) => done.blobs_cached += 1,
            Ok(BlobFill::Fetched { size }) => {
                done.blobs_fetched += 1;
                done.bytes_fetched += size;
                reporter.event(&Event::Blob {
                    image: p.unit.name.clone(),
                    digest: b.digest.to_string(),
                    size_bytes: size,
                });
            }
            Ok(BlobFill::NotStored) => errors.push(format!(
                "blob {} was being deleted as it arrived and was not stored; run the prefetch again",
                b.digest
            )),
            Err(e) => errors.push(why(&e)),
        }
    }
    if let Some(first) = errors.first() {
        return Err(if errors.len() > 1 {
            format!("{first} (and {} more blob errors)", errors.len() - 1)
        } else {
            first.clone()
        });
    }
    if done.manifests_fetched + done.blobs_fetched > 0 {
        done.status = "fetched";
    }
    if p.unit.pin {
        let reference = match &p.unit.reference {
            Reference::Tag(t) => t.to_string(),
            Reference::Digest(d) => d.to_string(),
        };
        cache
            .metadata()
            .pin(&t.key, &reference, now_secs())
            .await
            .map_err(|e| format!("pinning: {e}"))?;
        done.pinned = true;
    }
    Ok(done)
}
