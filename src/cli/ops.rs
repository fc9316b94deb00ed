//! `regcache status` and `regcache fsck`: work on the data dir directly, beside a running
//! server or without one (SQLite's WAL lets both use it; claims and write intents keep a
//! CLI delete and a server write apart).

use super::format::{bytes, fields, secs, when};
use crate::cache::ActiveBlobs;
use crate::config::Config;
use crate::metadata::{now_secs, Metadata};
use crate::scheduler::reconcile::{reconcile, Progress, ReconcileOptions, ReconcileReport};
use crate::scheduler::{run_deletes_once, Scheduler, SchedulerSettings};
use anyhow::Context;
use std::io::IsTerminal;
use std::sync::Arc;

pub(super) async fn open_metadata(config: &Config) -> anyhow::Result<Metadata> {
    let path = config.server.data_dir.join("regcache.db");
    anyhow::ensure!(
        path.is_file(),
        "no regcache database at {} (server.data_dir = {}): give the server's config with \
         --config, or start `regcache serve` with this one first",
        path.display(),
        config.server.data_dir.display()
    );
    tokio::task::spawn_blocking(move || Metadata::open(&path))
        .await
        .context("opening the database")?
        .context("opening the database")
}

pub(super) async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let meta = open_metadata(config).await?;
    let s = meta.status().await?;
    let disk = super::disk_status::DiskStatus::measure(&config.server.data_dir);
    if json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            status: &'a crate::metadata::Status,
            disk: &'a super::disk_status::DiskStatus,
        }
        let out = Out {
            status: &s,
            disk: &disk,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let count_bytes = |c: &crate::metadata::CountBytes| format!("{} ({})", c.count, bytes(c.bytes));
    let mut rows = vec![
        ("data dir", config.server.data_dir.display().to_string()),
        ("repositories", s.repositories.to_string()),
        ("tags", s.tags.to_string()),
        ("manifests", count_bytes(&s.manifests)),
        ("blobs", count_bytes(&s.blobs)),
        ("pending deletes", count_bytes(&s.pending_deletes)),
        ("deferred deletes", count_bytes(&s.deferred_deletes)),
        ("deferred entries", s.deferred_entries.to_string()),
        (
            "oldest failing delete",
            s.oldest_failing_delete.as_ref().map_or_else(
                || "none".to_owned(),
                |f| {
                    format!(
                        "{} after {} attempts, next at {}: {}",
                        f.digest,
                        f.attempts,
                        when(f.next_attempt_at, now_secs()),
                        f.last_error
                    )
                },
            ),
        ),
        ("open uploads", s.open_uploads.to_string()),
        (
            "pins",
            format!(
                "{} ({} not cached yet): {} tags, {} manifests, {} blobs ({}) pinned",
                s.pins,
                s.pins_not_cached,
                s.pinned_tags,
                s.pinned_manifests,
                s.pinned_blobs.count,
                bytes(s.pinned_blobs.bytes)
            ),
        ),
        (
            "applied settings",
            format!("storage.delete.enabled = {}", s.delete_enabled),
        ),
    ];
    for (upstream, ttl) in &s.ttls {
        rows.push(("", format!("ttl of upstream {upstream} = {}", secs(*ttl))));
    }
    rows.extend(disk.rows(now_secs()));
    print!("{}", fields(&rows));
    Ok(())
}

/// A progress bar on a terminal, nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Progress for Bar {
    fn phase(&self, name: &str, total: Option<u64>) {
        if let Some(b) = &self.0 {
            b.set_position(0);
            b.set_length(total.unwrap_or(0));
            b.set_message(name.to_owned());
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
}

/// A scheduler over the data dir, for work done from the command line.
pub(super) async fn scheduler_for(config: &Config) -> anyhow::Result<Scheduler> {
    let meta = open_metadata(config).await?;
    let store = crate::storage::build(&config.storage, &config.server.data_dir).context("opening storage")?;
    let mut settings = SchedulerSettings::from_config(config);
    // Deletes follow the switch the server applied (recorded in SQLite), not this
    // process's config: a CLI run must not defer or perform what the server would not.
    settings.deletes_enabled = meta.applied_settings().await?.delete_enabled;
    Ok(Scheduler {
        meta,
        store,
        settings,
        tmp_dir: Some(config.server.data_dir.join("tmp")),
        active: Arc::new(ActiveBlobs::default()),
        deletes_due: Arc::default(),
        jobs: crate::scheduler::JobSettings::from_config(config),
        jobs_due: Arc::default(),
        uses: None,
        shutdown: tokio_util::sync::CancellationToken::new(),
    })
}

pub(super) async fn fsck(config: &Config, dry_run: bool, verify: bool, json: bool) -> anyhow::Result<()> {
    let scheduler = scheduler_for(config).await?;
    let bar = Bar(std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos}") {
            b.set_style(style);
        }
        b
    }));
    let report = reconcile(&scheduler, ReconcileOptions { dry_run, verify }, &bar).await?;
    let (deleted, failed) = if dry_run {
        (0, 0)
    } else {
        run_deletes_once(&scheduler).await?
    };
    if let Some(b) = &bar.0 {
        b.finish_and_clear();
    }
    if json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a ReconcileReport,
            blobs_deleted: u64,
            deletes_failed: u64,
        }
        let out = Out {
            report: &report,
            blobs_deleted: deleted,
            deletes_failed: failed,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print_report(&report, deleted, failed);
    Ok(())
}

fn print_report(r: &ReconcileReport, deleted: u64, failed: u64) {
    let verb = |done: &str| {
        if r.dry_run {
            format!("would be {done}")
        } else {
            done.to_owned()
        }
    };
    println!("objects in storage       {}", r.objects_scanned);
    println!("blob rows                {}", r.rows_scanned);
    println!(
        "orphan objects           {} ({}); {} {}, {} younger than the grace period left alone",
        r.orphan_objects,
        bytes(r.orphan_bytes),
        if r.dry_run {
            r.orphan_objects
        } else {
            r.orphans_queued
        },
        verb("queued for deletion"),
        r.orphans_too_young
    );
    println!(
        "rows without object      {}; {} {}",
        r.missing_objects,
        if r.dry_run {
            r.missing_objects
        } else {
            r.rows_repaired
        },
        verb("repaired")
    );
    println!(
        "temporary files          {} stale; {} {}",
        r.temp_files_stale,
        if r.dry_run {
            r.temp_files_stale
        } else {
            r.temp_files_removed
        },
        verb("removed")
    );
    if r.stale_uploads > 0 {
        println!(
            "open multipart uploads   {}; {} {}",
            r.stale_uploads,
            if r.dry_run {
                r.stale_uploads
            } else {
                r.uploads_aborted
            },
            verb("aborted")
        );
    }
    if r.imports_abandoned + r.import_dirs_removed > 0 {
        println!(
            "abandoned imports        {}; {} blobs only they held queued for deletion, {} work dirs {}",
            r.imports_abandoned,
            r.import_blobs_queued,
            r.import_dirs_removed,
            verb("removed")
        );
    }
    if r.blobs_verified > 0 || r.blobs_corrupt > 0 {
        println!(
            "verified blobs           {}; {} corrupt, {} {}",
            r.blobs_verified,
            r.blobs_corrupt,
            if r.dry_run {
                r.blobs_corrupt
            } else {
                r.blobs_quarantined
            },
            verb("quarantined")
        );
    }
    if !r.dry_run {
        println!("blobs deleted            {deleted}; {failed} failed (kept, will be retried)");
    }
}
