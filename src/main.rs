//! The `regcache` binary: parse the command line and hand over to [`regcache::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    match regcache::cli::run(regcache::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regcache: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
