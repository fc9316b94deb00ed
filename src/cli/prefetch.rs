//! `regcache prefetch`: fills the data dir's cache with the images a list names, beside a
//! running server or without one. It builds its own cache over the same SQLite and store
//! (a server sees what it commits at once), with its own temporary directory: a cache
//! empties its temporary directory when built, and the server's holds the server's
//! downloads.

use super::format::bytes;
use crate::cache::{Cache, CacheParts, CacheSettings};
use crate::config::{Backend, Config};
use crate::metadata::Metadata;
use crate::prefetch::{Event, Reporter, Summary};
use crate::upstream::Upstreams;
use anyhow::Context;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A command-line run's temporary directories live under `data_dir/cli-tmp` (on the
/// store's filesystem, so a verified file is renamed into place, not copied). One left by
/// a run that died is removed by a later run once it has not changed for this long; a
/// live run's directory changes with every file it writes.
const STALE_TMP_AFTER: Duration = Duration::from_secs(24 * 3600);

pub(super) async fn prefetch(config: &Config, list: &Path, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.proxy.offline,
        "proxy.offline = true: a prefetch needs its upstreams (for this command, set REGCACHE_PROXY__OFFLINE=false)"
    );
    anyhow::ensure!(
        config.storage.backend != Backend::Memory,
        "storage.backend = \"memory\" keeps blobs inside the server's process, so a prefetch from the command line cannot fill it; add a [[prefetch]] list to the server's config instead"
    );
    let entries = crate::imagelist::load(list)?;
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating server.data_dir {}", data_dir.display()))?;
    let db = data_dir.join("regcache.db");
    let meta = tokio::task::spawn_blocking(move || Metadata::open(&db))
        .await
        .context("opening the database")?
        .context("opening the database")?;
    let store = crate::storage::build(&config.storage, data_dir).context("opening storage")?;
    let upstreams = Upstreams::from_config(config).context("building the upstream clients")?;
    let tmp = CliTmp::create(data_dir)?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let cache = Cache::new(CacheParts {
        meta,
        store,
        upstreams,
        tmp_dir: tmp.0.clone(),
        settings: CacheSettings::from_config(config),
        active: Arc::default(),
        uses: Arc::default(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    })
    .with_context(|| format!("creating {}", tmp.0.display()))?;
    // Flushes the uses a prefetch records (it extends what it found cached, as a pull does).
    tasks.spawn(cache.clone().run_background());
    let interrupted = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                shutdown.cancel();
            }
        })
    };
    let reporter = CliReporter::new(json);
    let summary = crate::prefetch::run(&cache, &entries, &reporter, &shutdown).await;
    reporter.finish();
    interrupted.abort();
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    drop(cache);
    drop(tmp);
    if !json {
        print_summary(&summary);
    }
    if !summary.failures.is_empty() {
        for f in &summary.failures {
            eprintln!("failed: {}: {}", f.image, f.error);
        }
        anyhow::bail!("{} of {} images failed", summary.images_failed, summary.images);
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    println!(
        "images            {} ({} fetched, {} current, {} failed)",
        s.images, s.images_fetched, s.images_current, s.images_failed
    );
    println!("manifests fetched {}", s.manifests_fetched);
    println!(
        "blobs fetched     {} ({})",
        s.blobs_fetched,
        bytes(s.bytes_fetched)
    );
    println!("blobs skipped     {} (cached already)", s.blobs_skipped);
    println!("took              {:.1} s", s.duration_ms as f64 / 1000.0);
}

/// This run's temporary directory, removed when dropped.
struct CliTmp(PathBuf);

impl CliTmp {
    fn create(data_dir: &Path) -> anyhow::Result<Self> {
        let root = data_dir.join("cli-tmp");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= STALE_TMP_AFTER);
                if stale {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(ulid::Ulid::new().to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for CliTmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A progress bar on a terminal (bytes, rate, ETA, images done of total) or one JSON line
/// per event; without either, one line per image.
struct CliReporter {
    json: bool,
    bar: Option<indicatif::ProgressBar>,
    images: AtomicU64,
    done: AtomicU64,
}

impl CliReporter {
    fn new(json: bool) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            // A spinner while images are resolved; the bar once the bytes to fetch are known.
            let b = indicatif::ProgressBar::new_spinner();
            b.set_message("resolving images");
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Self {
            json,
            bar,
            images: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(b) => b.println(text),
            None => println!("{text}"),
        }
    }

    fn image_finished(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let images = self.images.load(Ordering::Relaxed);
        if let (Some(b), true) = (&self.bar, images > 0) {
            b.set_message(format!("images {done}/{images}"));
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Reporter for CliReporter {
    fn event(&self, event: &Event) {
        if self.json {
            // One line per event; serialising these plain structs cannot fail.
            if let Ok(line) = serde_json::to_string(event) {
                println!("{line}");
            }
            return;
        }
        match event {
            Event::Planned {
                images,
                bytes_to_fetch,
                ..
            } => {
                self.images.store(*images, Ordering::Relaxed);
                if let Some(b) = &self.bar {
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b.set_length(*bytes_to_fetch);
                    // Images that failed while resolving are done already.
                    let done = self.done.load(Ordering::Relaxed);
                    b.set_message(format!("images {done}/{images}"));
                }
            }
            Event::Image(d) => {
                self.image_finished();
                let what = if d.status == "current" {
                    "current".to_owned()
                } else {
                    format!("fetched {} blobs ({})", d.blobs_fetched, bytes(d.bytes_fetched))
                };
                let pinned = if d.pinned { ", pinned" } else { "" };
                self.line(format!("{}  {}  {what}{pinned}", d.image, d.digest));
            }
            Event::Failed(f) => {
                self.image_finished();
                let text = format!("FAILED {}: {}", f.image, f.error);
                match &self.bar {
                    Some(b) => b.println(text),
                    None => eprintln!("{text}"),
                }
            }
            Event::Blob { .. } | Event::Summary(_) => {}
        }
    }

    fn bytes(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
}
