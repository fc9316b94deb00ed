//! Command-line entry points. The only place (with `main`) where `anyhow` is used.

mod admin_ops;
mod format;
mod ops;

use crate::config::{self, Config};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "regcache",
    version,
    about = "A pull-through cache for OCI / Docker registries"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cache.
    Serve {
        /// TOML config file; without it the embedded defaults mirror Docker Hub.
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (secrets redacted), or what is wrong with it.
    CheckConfig {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Counts and bytes of what is cached, the deletion queue and the applied settings.
    /// Reads the same database as a running server.
    Status {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Queue a purge of everything cached, or of one repository (UPSTREAM/REPO): it is no
    /// longer served and will be refetched; its blobs go through the deletion pipeline.
    Purge {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// UPSTREAM/REPO; everything when omitted.
        repository: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List recent jobs, or show one.
    Jobs {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        id: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// List cached repositories, or show one (UPSTREAM/REPO) with its tags.
    Repos {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a cached repository (UPSTREAM/REPO): no longer served at once, removed in
    /// resumable batches by the server's deletion workers.
    DeleteRepo {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Cleanup policies.
    Cleanup {
        #[command(subcommand)]
        command: CleanupCommand,
    },
    /// Reconcile storage with metadata: queue orphan objects for deletion, repair rows
    /// whose object is missing, remove stale temporary files, and delete what is queued.
    Fsck {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// Report only; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also re-hash every stored blob and quarantine mismatches.
        #[arg(long)]
        verify: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CleanupCommand {
    /// Queue a cleanup job for every repository every policy matches, now (ignoring the
    /// cadence); with --dry-run, list what would be deleted and why, changing nothing.
    Run {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    // `REGCACHE_CONFIG` names the file (clap reads it above); it is not a config key.
    let env = std::env::vars().filter(|(k, _)| k != "REGCACHE_CONFIG");
    config::load(path, env).context("invalid configuration")
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            let c = load(config.as_deref())?;
            crate::auth::Access::check_files(&c).context("invalid identity file")?;
            print!(
                "{}",
                toml::to_string_pretty(&c).context("printing the configuration")?
            );
            Ok(())
        }
        Command::Status { config, json } => {
            let c = load(config.as_deref())?;
            runtime()?.block_on(ops::status(&c, json))
        }
        Command::Fsck {
            config,
            dry_run,
            verify,
            json,
        } => {
            let c = load(config.as_deref())?;
            init_logging(&config::LogConfig {
                level: "warn".into(),
                ..c.log.clone()
            })?;
            runtime()?.block_on(ops::fsck(&c, dry_run, verify, json))
        }
        Command::Purge {
            config,
            repository,
            json,
        } => {
            let c = load(config.as_deref())?;
            runtime()?.block_on(admin_ops::purge(&c, repository.as_deref(), json))
        }
        Command::Jobs { config, id, json } => {
            let c = load(config.as_deref())?;
            runtime()?.block_on(admin_ops::jobs(&c, id, json))
        }
        Command::Repos { config, name, json } => {
            let c = load(config.as_deref())?;
            runtime()?.block_on(admin_ops::repos(&c, name.as_deref(), json))
        }
        Command::DeleteRepo { config, name, json } => {
            let c = load(config.as_deref())?;
            runtime()?.block_on(admin_ops::delete_repo(&c, &name, json))
        }
        Command::Cleanup {
            command:
                CleanupCommand::Run {
                    config,
                    dry_run,
                    json,
                },
        } => {
            let c = load(config.as_deref())?;
            runtime()?.block_on(admin_ops::cleanup_run(&c, dry_run, json))
        }
        Command::Serve { config } => {
            let c = load(config.as_deref())?;
            init_logging(&c.log)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(c))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = crate::server::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    server.stop().await?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

fn init_logging(log: &config::LogConfig) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).context("RUST_LOG")?,
        _ => EnvFilter::try_new(&log.level)
            .with_context(|| format!("config key `log.level`: {:?}", log.level))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}
