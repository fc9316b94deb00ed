//! The `regcache` binary: parse the command line and hand over to [`regcache::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    cap_malloc_arenas();
    match regcache::cli::run(regcache::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regcache: {}", regcache::cli::error_message(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own malloc arena, up to 8 per core, and keeps
/// what an arena frees for that arena. SQLite and storage calls run on tokio's blocking
/// pool, whose threads come and go with load: during a mass delete (16 unlinking beside the
/// SQLite writer) the heap spread over 16 arenas, and the 1 M-entry expiry bench peaked at
/// 86 MiB instead of 62 MiB with two arenas per core. An operator's own setting
/// (`MALLOC_ARENA_MAX`, `GLIBC_TUNABLES`) is left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let arenas = i32::try_from(cores.saturating_mul(2)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only tunes the allocator, and runs before any other thread exists.
    // Its result (0 when the value is refused) changes nothing we rely on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}
