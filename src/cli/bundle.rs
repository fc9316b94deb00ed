//! `regcache export` and `regcache import`: bundles for air-gapped and edge sites. Both
//! work on the data dir directly, beside a running server or without one; import creates
//! the data dir and database of a fresh site.

use super::format::bytes;
use super::ops::open_metadata;
use crate::bundle::{self, Event, ExportOptions, ExportSelection, ImportOptions};
use crate::config::Config;
use crate::metadata::Metadata;
use anyhow::Context;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the user sees as a run goes: a progress bar on a terminal (stderr), one JSON line
/// per event on stdout with `--json`, else warnings only.
#[derive(Debug)]
struct Report {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
}

impl Report {
    fn new(json: bool, verb: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(verb.to_owned());
            b
        });
        Self { bar, json }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl bundle::Progress for Report {
    fn start(&self, total: Option<u64>) {
        if let Some(b) = &self.bar {
            match total {
                Some(t) => b.set_length(t),
                None => b.set_style(indicatif::ProgressStyle::default_spinner()),
            }
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    fn event(&self, e: &Event) {
        if self.json {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
            return;
        }
        match e {
            Event::Warning { message } => self.line(&format!("warning: {message}")),
            Event::Image { name, digest } => {
                if self.bar.is_some() {
                    self.line(&format!("imported {name} ({digest})"));
                }
            }
            Event::Planned { .. } | Event::Blob { .. } => {}
        }
    }
}

/// The memory backend keeps blobs inside the server process: another process can neither
/// read them nor add to them.
fn refuse_memory_backend(config: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.storage.backend != crate::config::Backend::Memory,
        "config key `storage.backend` is \"memory\": its blobs live inside the server process, \
         out of reach of this command (bundles work on filesystem, S3 and GCS storage)"
    );
    Ok(())
}

pub(super) async fn export(
    config: &Config,
    list: Option<&Path>,
    all: bool,
    output: PathBuf,
    since: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let selection = match (list, all) {
        (Some(path), false) => ExportSelection::List(crate::imagelist::load(path)?),
        (None, true) => ExportSelection::All,
        _ => anyhow::bail!("give an image list file or --all (not both)"),
    };
    refuse_memory_backend(config)?;
    let meta = open_metadata(config).await?;
    let store = crate::storage::build(&config.storage, &config.server.data_dir).context("opening storage")?;
    let report = Arc::new(Report::new(json, "exporting"));
    let options = ExportOptions {
        selection,
        output,
        since,
    };
    let done = bundle::export(config, &meta, &store, &options, report.clone()).await;
    report.finish();
    let done = done?;
    if json {
        let mut v = serde_json::to_value(&done)?;
        v["event"] = "done".into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "exported {} images to {} ({}; {} manifests, {} blobs, {} of content)",
        done.images.len(),
        done.bundle,
        bytes(done.bundle_bytes),
        done.manifests,
        done.blobs,
        bytes(done.content_bytes)
    );
    if done.left_out > 0 {
        println!("left out {} the earlier bundle carried", done.left_out);
    }
    println!("digest list: {}", done.digest_list);
    Ok(())
}

/// The data dir's database, created (and the data dir with it) on a fresh site.
async fn open_or_create(config: &Config) -> anyhow::Result<Metadata> {
    let dir = &config.server.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating the data dir {}", dir.display()))?;
    if dir.join("regcache.db").is_file() {
        return open_metadata(config).await;
    }
    let path = dir.join("regcache.db");
    tokio::task::spawn_blocking(move || Metadata::open(&path))
        .await
        .context("creating the database")?
        .context("creating the database")
}

pub(super) async fn import(
    config: &Config,
    path: &Path,
    upstream: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.exists(),
        "bundle {}: no such file or directory",
        path.display()
    );
    refuse_memory_backend(config)?;
    let meta = open_or_create(config).await?;
    let store = crate::storage::build(&config.storage, &config.server.data_dir).context("opening storage")?;
    let report = Arc::new(Report::new(json, "importing"));
    let done = bundle::import(
        config,
        &meta,
        &store,
        path,
        &ImportOptions { upstream },
        report.clone(),
    )
    .await;
    report.finish();
    let done = done?;
    if json {
        let mut v = serde_json::to_value(&done)?;
        v["event"] = "done".into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "imported {} images from {}: {} blobs committed ({}), {} already stored, {} manifests",
        done.images.len(),
        done.bundle,
        done.blobs_committed,
        bytes(done.bytes_committed),
        done.blobs_reused,
        done.manifests
    );
    for name in &done.images {
        println!("  {name}");
    }
    if done.children_absent > 0 {
        println!(
            "{} platform images of indexes are in neither the bundle nor the cache (not served)",
            done.children_absent
        );
    }
    Ok(())
}
