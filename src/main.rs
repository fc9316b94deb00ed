//! The `regcache` binary: parse the command line and hand over to [`regcache::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_malloc();
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
/// 86 MiB instead of 62 MiB with two arenas per core.
///
/// A blob transfer reads the upstream in buffers of about 400 KiB and keeps up to 8 MiB of
/// them. With glibc's own thresholds, freed buffers went back to the kernel (munmap, or a
/// heap trimmed past twice the largest freed buffer) and the next ones were faulted in
/// and zeroed again: about 7 000 page faults per 64 MiB. Buffers up to 4 MiB now come
/// from the heap, and an arena keeps up to 8 MiB (a transfer's window) free at its top:
/// regcache's CPU per cold 64 MiB GET went from about 110 ms to 100 ms (a 2 MiB top,
/// 1 MiB threshold: 106 ms; a 16 MiB top: no better than 8).
///
/// An operator's own setting (`MALLOC_ARENA_MAX`, `GLIBC_TUNABLES`) is left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    /// Allocations at least this large are mapped on their own.
    const MMAP_THRESHOLD_BYTES: i32 = 4 << 20;
    /// Free memory an arena keeps at its top before giving it back.
    const TRIM_THRESHOLD_BYTES: i32 = 8 << 20;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let arenas = i32::try_from(cores.saturating_mul(2)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only tunes the allocator, and runs before any other thread exists.
    // Its result (0 when the value is refused) changes nothing we rely on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
}
