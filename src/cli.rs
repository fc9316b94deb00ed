//! Command-line entry points. The only place (with `main`) where `anyhow` is used.

mod admin_ops;
mod args;
mod bundle;
mod disk_status;
mod format;
mod ops;
mod pins;
mod prefetch;

use crate::config::{self, Config};
use anyhow::Context;
use args::{ConfigArg, JsonArg, REPO_VALUE_NAME};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "regcache",
    version,
    about = "A pull-through cache for OCI / Docker registries",
    after_help = configuration_help(),
    // Help wraps at the terminal's width (100 columns when it is not a terminal), and
    // at 100 on wider terminals too, so paragraphs stay readable.
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration comes from, for the top-level `--help`; the defaults are read
/// from the config types so the text cannot drift from them.
fn configuration_help() -> String {
    let server = config::ServerConfig::default();
    format!(
        "Configuration:\n  \
         A TOML file given with --config FILE or REGCACHE_CONFIG=FILE; config.example.toml\n  \
         documents every key. Without one, the embedded defaults mirror Docker Hub, listen on\n  \
         {listen} and keep data in {data_dir}.\n  \
         Any key can be set from the environment: REGCACHE_ and the key's path with __\n  \
         between levels, e.g. REGCACHE_PROXY__TTL=1d, REGCACHE_SERVER__DATA_DIR=/srv/cache.\n  \
         `regcache check-config` prints the result, or what is wrong with it.",
        listen = server.listen,
        data_dir = server.data_dir.display(),
    )
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cache.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the effective configuration (secrets redacted), or what is wrong with it.
    ///
    /// Also checks that server.data_dir is a directory this user can write, or can be
    /// created. Exits non-zero on any problem.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Counts and bytes of what is cached, the deletion queue and the applied settings.
    ///
    /// Reads the same database as a running server, also while it runs.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Queue a purge of everything cached, or of one repository.
    ///
    /// What is purged is no longer served and will be refetched; its blobs go through the
    /// deletion pipeline. A running server does the work; `regcache jobs ID` shows it.
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        /// The repository to purge; everything when omitted. Without an upstream name, the
        /// default upstream's repository (as for a pull)
        #[arg(value_name = REPO_VALUE_NAME)]
        repository: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List the 100 most recent jobs, or show one.
    Jobs {
        #[command(flatten)]
        config: ConfigArg,
        /// The job to show (its number in the list, or what purge, delete-repo and cleanup
        /// run printed); without it, the list
        id: Option<i64>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List cached repositories, or show one with its tags.
    Repos {
        #[command(flatten)]
        config: ConfigArg,
        /// The repository to show; without it, the list. Without an upstream name, the
        /// default upstream's repository (as for a pull)
        #[arg(value_name = REPO_VALUE_NAME)]
        repository: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Delete a cached repository.
    ///
    /// It is no longer served at once; a running server's deletion workers remove it in
    /// resumable batches. `regcache jobs ID` shows the work.
    DeleteRepo {
        #[command(flatten)]
        config: ConfigArg,
        /// The repository to delete. Without an upstream name, the default upstream's
        /// repository (as for a pull)
        #[arg(value_name = REPO_VALUE_NAME)]
        repository: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Cleanup policies ([[cleanup.policy]] in the config file).
    Cleanup {
        #[command(subcommand)]
        command: CleanupCommand,
    },
    /// Reconcile storage with metadata, and delete what is queued.
    ///
    /// Queues orphan objects (stored, but in no row) for deletion, repairs rows whose
    /// object is missing (the next pull refetches it), removes stale temporary files, and
    /// deletes what is queued. Safe beside a running server.
    Fsck {
        #[command(flatten)]
        config: ConfigArg,
        /// Report what would be done; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Also re-hash every stored blob and quarantine mismatches
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Fill the cache with the images an image list names (see README "Prefetch"), through
    /// the same verified path as a pull, skipping what is cached and current. Works beside
    /// a running server or without one; exits non-zero if any image failed.
    Prefetch {
        #[command(flatten)]
        config: ConfigArg,
        /// The image list file (TOML; fixtures/images.example.toml shows the format)
        #[arg(value_name = "LIST")]
        list: std::path::PathBuf,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Pin an image (HOST/REPO:TAG or HOST/REPO@DIGEST): exempt from ttl expiry, size
    /// eviction and cleanup policies, cached or not yet. Without REF, list the pins.
    Pin {
        #[command(flatten)]
        config: ConfigArg,
        /// The image to pin, HOST/REPO:TAG or HOST/REPO@DIGEST (HOST: an upstream's name or
        /// registry host); without it, the pins are listed
        #[arg(value_name = "REF")]
        reference: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Unpin an image: its entries become ordinary again, due at now + ttl.
    Unpin {
        #[command(flatten)]
        config: ConfigArg,
        /// The image to unpin, HOST/REPO:TAG or HOST/REPO@DIGEST, as it was pinned
        #[arg(value_name = "REF")]
        reference: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Write cached images to a bundle, an OCI image layout in a .tar (or .tar.zst), to
    /// carry to another site (see README "Bundles"); also writes BUNDLE.digests, for a
    /// later --since. Works beside a running server.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// The image list file naming the cached images to export (the format prefetch
        /// reads)
        #[arg(value_name = "LIST", required_unless_present = "all", conflicts_with = "all")]
        list: Option<std::path::PathBuf>,
        /// Export every cached image instead of a list
        #[arg(long)]
        all: bool,
        /// The bundle to write: NAME.tar, or NAME.tar.zst to compress it
        #[arg(long, short, value_name = "BUNDLE")]
        output: std::path::PathBuf,
        /// An earlier bundle, or its .digests file: leave out every blob it carried
        #[arg(long, value_name = "PREVIOUS")]
        since: Option<std::path::PathBuf>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Import a bundle (regcache's, a skopeo oci-archive, or an OCI layout directory):
    /// every blob is verified, and an image is served only once all of it is in. Works
    /// beside a running server; creates the data dir of a fresh site.
    Import {
        #[command(flatten)]
        config: ConfigArg,
        /// The bundle: a .tar, a .tar.zst or an OCI layout directory
        #[arg(value_name = "BUNDLE")]
        bundle: std::path::PathBuf,
        /// Put every image under this upstream, whatever registry its name gives
        #[arg(long, value_name = "NAME")]
        upstream: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
enum CleanupCommand {
    /// Run every cleanup policy now, or show what it would delete.
    ///
    /// Queues a cleanup job for every repository every policy matches, ignoring the
    /// cadence; with --dry-run, lists what would be deleted and why, changing nothing.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// List what would be deleted and why; queue nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonArg,
    },
}

fn load(arg: &ConfigArg) -> anyhow::Result<config::Loaded> {
    // `env::vars` panics on a variable that is not UTF-8; no config key is one, so such
    // variables are passed over.
    let env = std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    config::load_report(arg.config.as_deref(), env).context("invalid configuration")
}

/// The data dir must be usable before anything is started (and `check-config` says so).
fn check_data_dir(loaded: &config::Loaded) -> anyhow::Result<()> {
    config::check_data_dir(&loaded.config).map_err(|e| anyhow::Error::new(loaded.explain(e)))
}

/// Once logging is on: the `REGCACHE_*` variables the config left out.
fn log_ignored_env(loaded: &config::Loaded) {
    for var in &loaded.ignored_env {
        tracing::debug!(
            env.var = %var,
            "ignored environment variable: it names no config section (Kubernetes sets such \
             variables for a Service named regcache)"
        );
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            let loaded = load(&config)?;
            let _log = init_logging(&loaded.config.log)?;
            log_ignored_env(&loaded);
            check_data_dir(&loaded)?;
            for (i, p) in loaded.config.prefetch.iter().enumerate() {
                crate::imagelist::load(&p.list)
                    .with_context(|| format!("config key `prefetch[{i}].list`"))?;
            }
            crate::auth::Access::check_files(&loaded.config).context("invalid identity file")?;
            print!(
                "{}",
                toml::to_string_pretty(&loaded.config).context("printing the configuration")?
            );
            Ok(())
        }
        Command::Status { config, json } => {
            let c = load(&config)?.config;
            runtime()?.block_on(ops::status(&c, json.json))
        }
        Command::Fsck {
            config,
            dry_run,
            verify,
            json,
        } => {
            let c = load(&config)?.config;
            let _log = init_logging(&config::LogConfig {
                level: "warn".into(),
                ..c.log.clone()
            })?;
            runtime()?.block_on(ops::fsck(&c, dry_run, verify, json.json))
        }
        Command::Purge {
            config,
            repository,
            json,
        } => {
            let c = load(&config)?.config;
            runtime()?.block_on(admin_ops::purge(&c, repository.as_deref(), json.json))
        }
        Command::Jobs { config, id, json } => {
            let c = load(&config)?.config;
            runtime()?.block_on(admin_ops::jobs(&c, id, json.json))
        }
        Command::Repos {
            config,
            repository,
            json,
        } => {
            let c = load(&config)?.config;
            runtime()?.block_on(admin_ops::repos(&c, repository.as_deref(), json.json))
        }
        Command::DeleteRepo {
            config,
            repository,
            json,
        } => {
            let c = load(&config)?.config;
            runtime()?.block_on(admin_ops::delete_repo(&c, &repository, json.json))
        }
        Command::Cleanup {
            command:
                CleanupCommand::Run {
                    config,
                    dry_run,
                    json,
                },
        } => {
            let c = load(&config)?.config;
            runtime()?.block_on(admin_ops::cleanup_run(&c, dry_run, json.json))
        }
        Command::Prefetch { config, list, json } => {
            let c = load(&config)?.config;
            let _log = init_logging(&config::LogConfig {
                level: "warn".into(),
                ..c.log.clone()
            })?;
            runtime()?.block_on(prefetch::prefetch(&c, &list, json.json))
        }
        Command::Pin {
            config,
            reference,
            json,
        } => {
            let c = load(&config)?.config;
            runtime()?.block_on(pins::pin(&c, reference.as_deref(), json.json))
        }
        Command::Unpin {
            config,
            reference,
            json,
        } => {
            let c = load(&config)?.config;
            runtime()?.block_on(pins::unpin(&c, &reference, json.json))
        }
        Command::Export {
            config,
            list,
            all,
            output,
            since,
            json,
        } => {
            let c = load(&config)?.config;
            let _log = init_logging(&config::LogConfig {
                level: "warn".into(),
                ..c.log.clone()
            })?;
            runtime()?.block_on(bundle::export(&c, list.as_deref(), all, output, since, json.json))
        }
        Command::Import {
            config,
            bundle: path,
            upstream,
            json,
        } => {
            let c = load(&config)?.config;
            let _log = init_logging(&config::LogConfig {
                level: "warn".into(),
                ..c.log.clone()
            })?;
            runtime()?.block_on(bundle::import(&c, &path, upstream, json.json))
        }
        Command::Serve { config } => {
            let loaded = load(&config)?;
            check_data_dir(&loaded)?;
            let _log = init_logging(&loaded.config.log)?;
            log_ignored_env(&loaded);
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(loaded.config))
        }
    }
}

/// The error and its causes on one line, each said once: a layer's message often already
/// ends with its source's text (thiserror's `{source}`), which `{:#}` would print again
/// (`Permission denied (os error 13): Permission denied (os error 13)`).
pub fn error_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
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

fn init_logging(log: &config::LogConfig) -> anyhow::Result<crate::log_writer::LogGuard> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).context("RUST_LOG")?,
        _ => EnvFilter::try_new(&log.level)
            .with_context(|| format!("config key `log.level`: {:?}", log.level))?,
    };
    // Colours only for a person at a terminal: a log file, journald or `kubectl logs`
    // would show the escape codes as text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::log_writer::stderr())
        .with_ansi(ansi);
    let style = if log.format == "json" {
        builder.json().init();
        crate::log_writer::Style::Json
    } else {
        builder.init();
        crate::log_writer::Style::Text
    };
    if !ansi {
        crate::log_writer::set_style(style);
    }
    Ok(crate::log_writer::LogGuard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("data directory /srv/cache: {source}")]
    struct Layer {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(13);
        let e = anyhow::Error::new(Layer { source: io }).context("starting the server");
        let text = error_message(&e);
        assert_eq!(text.matches("os error 13").count(), 1, "{text}");
        assert!(
            text.starts_with("starting the server: data directory /srv/cache: "),
            "{text}"
        );
        // Causes that add something are kept.
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_message(&e), "outer: middle: inner");
    }
}
