//! Where the binary's log lines go: the thread that logs appends each formatted line to
//! one shared buffer, and one writer thread takes what has gathered and writes it in one
//! `write(2)` to stderr. A request pays for formatting its access-log line and one short
//! copy under a lock, not for a system call and the file's lock (measured: the
//! synchronous write was half of the access log's cost, about 4% of a warm tag-manifest
//! request's CPU), nor for a buffer allocated per line and freed on another thread (an
//! earlier channel of lines: callgrind put glibc's cross-thread frees at a quarter of the
//! remaining access-log cost).
//!
//! While lines keep coming the writer looks every `POLL` instead of being woken per line:
//! a sleeping writer costs every logger a futex wake-up, which measured as dearer than the
//! write it saved. After `IDLE_POLLS` empty looks it sleeps until the next line, so an idle
//! server does not wake.
//!
//! Nothing is dropped: when `QUEUE_BYTES` wait (the disk stalls), loggers block, as they
//! did writing to stderr themselves. [`LogGuard`] writes out what is queued when dropped;
//! a SIGKILL loses what the writer had not written yet (microseconds' worth while it
//! keeps up).

use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

/// Bytes that may wait for the writer (about 64 000 lines of 256 bytes).
const QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// The writer's buffer is given back to the allocator when a stall grew it past this.
const KEEP_BYTES: usize = 1024 * 1024;
/// How often a busy writer looks for lines: the most a line waits to be written.
const POLL: std::time::Duration = std::time::Duration::from_millis(10);
/// Empty looks (one second's worth) before the writer sleeps until the next line.
const IDLE_POLLS: u32 = 100;

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    /// The writer sleeps on it when idle.
    lines: Condvar,
    /// Loggers wait on it for room, `flush` for its bytes to be written.
    written: Condvar,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// Bytes ever queued, and ever written: what `flush` compares.
    queued: u64,
    done: u64,
    writer_sleeps: bool,
}

static QUEUE: OnceLock<Option<&'static Queue>> = OnceLock::new();

fn lock(q: &Queue) -> MutexGuard<'_, State> {
    q.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The queue, its writer thread started on first use; `None` if the thread could not
/// start (lines are then written directly).
fn queue() -> Option<&'static Queue> {
    *QUEUE.get_or_init(|| {
        let q: &'static Queue = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_loop(q))
            .ok()
            .map(|_| q)
    })
}

fn write_loop(q: &Queue) {
    let mut out = std::io::stderr();
    let mut batch = Vec::new();
    let mut idle = 0;
    loop {
        let mut state = lock(q);
        if state.pending.is_empty() {
            if idle < IDLE_POLLS {
                drop(state);
                idle += 1;
                std::thread::sleep(POLL);
                continue;
            }
            state.writer_sleeps = true;
            while state.pending.is_empty() {
                state = q.lines.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            state.writer_sleeps = false;
        }
        idle = 0;
        std::mem::swap(&mut state.pending, &mut batch);
        let upto = state.queued;
        // Loggers waiting for room may go on.
        q.written.notify_all();
        drop(state);
        let _ = out.write_all(&batch);
        batch.clear();
        if batch.capacity() > KEEP_BYTES {
            batch = Vec::new();
        }
        lock(q).done = upto;
        q.written.notify_all();
    }
}

/// A `tracing_subscriber` writer to stderr through the writer thread.
pub fn stderr() -> MakeStderr {
    MakeStderr
}

#[derive(Debug, Clone, Copy)]
pub struct MakeStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// One event's bytes, queued when dropped (the formatter writes a whole line, then drops
/// its writer).
#[derive(Debug)]
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            queue_line(&self.0);
        }
    }
}

/// How the subscriber `init_logging` installed writes its lines, for code that writes a
/// line of its own (the access log) in the same shape; `None` until it is set, and then
/// such code goes through `tracing` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// tracing-subscriber's `Full` text format, without colours.
    Text,
    /// tracing-subscriber's JSON format.
    Json,
}

static STYLE: OnceLock<Style> = OnceLock::new();

/// Records the installed subscriber's format (once; later calls change nothing). Not
/// called for a terminal: colours are `tracing`'s business.
pub fn set_style(style: Style) {
    let _ = STYLE.set(style);
}

/// The installed subscriber's format, when lines may be written directly.
pub fn style() -> Option<Style> {
    STYLE.get().copied()
}

/// Queues one whole line (ending in `\n`) behind the lines already queued.
pub fn queue_line(line: &[u8]) {
    let Some(q) = queue() else {
        let _ = std::io::stderr().write_all(line);
        return;
    };
    let mut state = lock(q);
    while state.pending.len() >= QUEUE_BYTES {
        state = q.written.wait(state).unwrap_or_else(PoisonError::into_inner);
    }
    state.pending.extend_from_slice(line);
    state.queued += line.len() as u64;
    if state.writer_sleeps {
        q.lines.notify_one();
    }
}

/// Writes out every queued line when dropped: keep it until the process ends.
#[derive(Debug)]
pub struct LogGuard;

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// Waits until every line queued so far is written.
pub fn flush() {
    let Some(q) = QUEUE.get().copied().flatten() else {
        return;
    };
    let mut state = lock(q);
    let target = state.queued;
    q.lines.notify_one();
    while state.done < target {
        state = q.written.wait(state).unwrap_or_else(PoisonError::into_inner);
    }
}
