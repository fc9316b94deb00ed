//! Every metric family `/metrics` shows, with its help text, read from the counters of
//! the requests, upstreams, cache and metadata handle, and from the cached SQLite gauges.
//! Counters that can be listed ahead (kinds, results, reasons) are written even at 0, so
//! `rate()` and alerts see them from the first scrape.

use super::exposition::{Exposition, Type};
use super::{Answer, Kind, Observer};
use crate::metadata::{ExpiredKind, RemovalReason};
use crate::upstream::Op;
use std::time::SystemTime;

/// Job kinds and states the schema allows (`schema/0003_jobs.sql`).
const JOB_KINDS: [&str; 3] = ["purge", "delete_repository", "cleanup"];
const JOB_STATES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub(super) async fn render(obs: &Observer) -> String {
    let mut e = Exposition::default();
    build_and_requests(obs, &mut e);
    upstreams(obs, &mut e);
    cache(obs, &mut e);
    stored(obs, &mut e).await;
    removals(obs, &mut e);
    sqlite(obs, &mut e);
    e.finish()
}

fn build_and_requests(obs: &Observer, e: &mut Exposition) {
    e.family(
        "regcache_build_info",
        Type::Gauge,
        "The running build (always 1).",
    );
    e.int(
        "regcache_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    e.family(
        "process_start_time_seconds",
        Type::Gauge,
        "When the server started, Unix seconds.",
    );
    e.real("process_start_time_seconds", &[], unix_secs(obs.started_at()));
    e.family(
        "regcache_requests_total",
        Type::Counter,
        "Registry requests routed to an upstream, by kind and result (hit, revalidated, miss, stale; error: status >= 400).",
    );
    for r in obs.requests() {
        for kind in Kind::ALL {
            for answer in Answer::ALL {
                e.int(
                    "regcache_requests_total",
                    &[
                        ("upstream", &r.upstream.name),
                        ("kind", kind.label()),
                        ("result", answer.label()),
                    ],
                    r.get(kind, answer),
                );
            }
        }
    }
    e.family(
        "regcache_served_bytes_total",
        Type::Counter,
        "Response body bytes sent to clients for registry requests answered without error, by upstream.",
    );
    for r in obs.requests() {
        e.int(
            "regcache_served_bytes_total",
            &[("upstream", &r.upstream.name)],
            r.served_bytes(),
        );
    }
}

fn upstreams(obs: &Observer, e: &mut Exposition) {
    let list: Vec<_> = obs.cache().upstreams().iter().cloned().collect();
    e.family(
        "regcache_upstream_fetched_bytes_total",
        Type::Counter,
        "Body bytes received from each upstream (blobs, manifests, tag lists, referrers).",
    );
    for u in &list {
        e.int(
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", &u.name)],
            u.stats.fetched_bytes(),
        );
    }
    e.family(
        "regcache_upstream_requests_total",
        Type::Counter,
        "Requests to each upstream by operation and HTTP status (code=\"error\": no answer).",
    );
    for u in &list {
        for (op, code, n) in u.stats.requests() {
            let code = code.map_or_else(|| "error".to_owned(), |c| c.to_string());
            e.int(
                "regcache_upstream_requests_total",
                &[("upstream", &u.name), ("op", op.label()), ("code", &code)],
                n,
            );
        }
    }
    e.family(
        "regcache_upstream_request_duration_seconds",
        Type::Histogram,
        "Time until each upstream's response headers came, by operation.",
    );
    for u in &list {
        for op in Op::ALL {
            let h = u.stats.latency(op).snapshot();
            if h.count > 0 {
                e.histogram(
                    "regcache_upstream_request_duration_seconds",
                    &[("upstream", &u.name), ("op", op.label())],
                    &h,
                );
            }
        }
    }
    e.family(
        "regcache_upstream_throttled_total",
        Type::Counter,
        "Answers 429 Too Many Requests from each upstream.",
    );
    for u in &list {
        e.int(
            "regcache_upstream_throttled_total",
            &[("upstream", &u.name)],
            u.stats.throttled(),
        );
    }
    for (name, help, pick) in [
        (
            "regcache_upstream_last_success_timestamp_seconds",
            "When each upstream last answered (any status but 429 and 5xx), Unix seconds; 0: never.",
            (|s: &crate::upstream::UpstreamStats| s.last_success_ms()) as fn(&_) -> u64,
        ),
        (
            "regcache_upstream_last_failure_timestamp_seconds",
            "When a request to each upstream last failed (no answer, 429 or 5xx), Unix seconds; 0: never.",
            |s: &crate::upstream::UpstreamStats| s.last_failure_ms(),
        ),
    ] {
        e.family(name, Type::Gauge, help);
        for u in &list {
            e.real(name, &[("upstream", &u.name)], pick(&u.stats) as f64 / 1000.0);
        }
    }
}

fn cache(obs: &Observer, e: &mut Exposition) {
    let in_flight = obs.cache().transfers_in_flight();
    e.family(
        "regcache_transfers_in_flight",
        Type::Gauge,
        "Blob downloads from upstreams running now.",
    );
    for u in obs.cache().upstreams().iter() {
        e.int(
            "regcache_transfers_in_flight",
            &[("upstream", &u.name)],
            in_flight.get(&u.name).copied().unwrap_or(0),
        );
    }
    e.family(
        "regcache_transfer_joins_total",
        Type::Counter,
        "Client requests that joined a blob download already under way instead of starting one.",
    );
    e.int("regcache_transfer_joins_total", &[], obs.cache().transfer_joins());
}

async fn stored(obs: &Observer, e: &mut Exposition) {
    let gauges = match obs.gauges().await {
        Ok(g) => Some(g),
        Err(err) => {
            tracing::warn!(error = %err, "metrics: reading the stored gauges failed");
            None
        }
    };
    let g = gauges.as_ref().map(|(g, _)| g.as_ref());
    let now = crate::metadata::now_secs();
    let plain: [(&str, &str, Option<u64>); 8] = [
        ("regcache_stored_blobs", "Blobs stored.", g.map(|g| g.blobs)),
        (
            "regcache_stored_bytes",
            "Bytes of the blobs stored.",
            g.map(|g| g.blob_bytes),
        ),
        (
            "regcache_repositories",
            "Repositories cached.",
            g.map(|g| g.repositories),
        ),
        (
            "regcache_deletes_pending",
            "Blobs queued for deletion from storage (waiting or being deleted).",
            g.map(|g| g.deletes_pending),
        ),
        (
            "regcache_deletes_deferred",
            "Blobs whose deletion waits because storage.delete.enabled is false.",
            g.map(|g| g.deletes_deferred),
        ),
        (
            "regcache_deletes_failing",
            "Queued deletions whose last attempt failed (retried with backoff).",
            g.map(|g| g.deletes_failing),
        ),
        (
            "regcache_deletes_oldest_failing_age_seconds",
            "Age of the oldest failing deletion since it was queued; 0: none is failing.",
            g.map(|g| {
                g.oldest_failing
                    .as_ref()
                    .map_or(0, |f| u64::try_from(now - f.since).unwrap_or(0))
            }),
        ),
        (
            "regcache_multipart_uploads_open",
            "Multipart uploads on record: in flight, or left open until reconciliation aborts them.",
            g.map(|g| g.open_uploads),
        ),
    ];
    for (name, help, value) in plain {
        e.family(name, Type::Gauge, help);
        if let Some(v) = value {
            e.int(name, &[], v);
        }
    }
    e.family(
        "regcache_storage_max_bytes",
        Type::Gauge,
        "storage.max_size: the bound eviction keeps stored bytes under (absent: no bound).",
    );
    if let Some(max) = obs.settings().max_size {
        e.int("regcache_storage_max_bytes", &[], max);
    }
    let space = obs.data_dir_space();
    e.family(
        "regcache_data_dir_size_bytes",
        Type::Gauge,
        "Size of the filesystem holding server.data_dir.",
    );
    if let Some((size, _)) = space {
        e.int("regcache_data_dir_size_bytes", &[], size);
    }
    e.family(
        "regcache_data_dir_available_bytes",
        Type::Gauge,
        "Bytes available to regcache on the filesystem holding server.data_dir.",
    );
    if let Some((_, available)) = space {
        e.int("regcache_data_dir_available_bytes", &[], available);
    }
    e.family("regcache_jobs", Type::Gauge, "Jobs on record by kind and state.");
    if let Some(g) = g {
        let count = |kind: &str, state: &str| {
            g.jobs
                .iter()
                .find(|(k, s, _)| k == kind && s == state)
                .map_or(0, |j| j.2)
        };
        for kind in JOB_KINDS {
            for state in JOB_STATES {
                e.int(
                    "regcache_jobs",
                    &[("kind", kind), ("state", state)],
                    count(kind, state),
                );
            }
        }
    }
    e.family(
        "regcache_metrics_gauges_read_seconds",
        Type::Gauge,
        "How long the last read of the SQLite-backed gauges took (they are kept 10 s).",
    );
    if let Some((_, took)) = &gauges {
        e.real("regcache_metrics_gauges_read_seconds", &[], took.as_secs_f64());
    }
}

fn removals(obs: &Observer, e: &mut Exposition) {
    let stats = obs.cache().metadata().stats();
    e.family(
        "regcache_removed_blobs_total",
        Type::Counter,
        "Blobs handed to the deletion pipeline, by reason (expired, evicted, purged, cleanup, orphan).",
    );
    for reason in RemovalReason::ALL {
        e.int(
            "regcache_removed_blobs_total",
            &[("reason", reason.label())],
            stats.removed_blobs(reason),
        );
    }
    e.family(
        "regcache_expired_entries_total",
        Type::Counter,
        "Entries whose ttl passed, by kind (deferred: kept because deletes are off).",
    );
    for kind in ExpiredKind::ALL {
        e.int(
            "regcache_expired_entries_total",
            &[("kind", kind.label())],
            stats.expired_entries(kind),
        );
    }
    e.family(
        "regcache_evicted_bytes_total",
        Type::Counter,
        "Bytes of the blobs evicted to stay under storage.max_size.",
    );
    e.int("regcache_evicted_bytes_total", &[], stats.evicted_bytes());
}

fn sqlite(obs: &Observer, e: &mut Exposition) {
    let stats = obs.cache().metadata().stats();
    e.family(
        "regcache_sqlite_writer_wait_seconds",
        Type::Histogram,
        "Time a write waited for SQLite's single writer (blocking pool, writer lock, busy wait).",
    );
    e.histogram(
        "regcache_sqlite_writer_wait_seconds",
        &[],
        &stats.writer_wait.snapshot(),
    );
    e.family(
        "regcache_sqlite_transaction_seconds",
        Type::Histogram,
        "Time a write transaction held SQLite's writer, begin to commit.",
    );
    e.histogram(
        "regcache_sqlite_transaction_seconds",
        &[],
        &stats.transaction.snapshot(),
    );
}
