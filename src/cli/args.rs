//! Arguments that several subcommands take, defined once so that `--config`, `--json` and
//! a repository argument read the same in every `--help` (`tests/cli_help.rs` checks it).

use clap::Args;
use std::path::PathBuf;

/// `--config FILE` (or `REGCACHE_CONFIG`): every subcommand that reads the configuration
/// flattens this.
#[derive(Debug, Clone, Args)]
pub(super) struct ConfigArg {
    /// TOML config file; without one, the embedded defaults, which mirror Docker Hub
    /// (`regcache --help` says more). REGCACHE_* variables override any key
    #[arg(long, short, env = "REGCACHE_CONFIG", value_name = "FILE")]
    pub(super) config: Option<PathBuf>,
}

/// `--json`: every subcommand that prints a table flattens this.
#[derive(Debug, Clone, Copy, Args)]
pub(super) struct JsonArg {
    /// Print JSON instead of text: one document, or one line per event for commands that
    /// report progress (times as Unix seconds, sizes in bytes)
    #[arg(long)]
    pub(super) json: bool,
}

/// How a repository argument is written, everywhere: the upstream's name, then the
/// repository as that upstream names it. Without an upstream name the default upstream's
/// repository is meant, as for a pull (`alpine` is `docker.io/library/alpine` when Docker Hub
/// is the default).
pub(super) const REPO_VALUE_NAME: &str = "UPSTREAM/REPO";
