//! Where the binary's log lines go: the thread that logs hands each formatted line to one
//! writer thread through a bounded channel, and that thread writes whatever has queued in
//! one `write(2)` to stderr. A request pays for formatting its access-log line, not for a
//! system call and the file's lock (measured: the synchronous write was half of the access
//! log's cost, about 4% of a warm tag-manifest request's CPU).
//!
//! While lines keep coming the writer polls every `POLL` instead of sleeping in the
//! channel: a sleeping receiver costs every sender a futex wake-up, which measured as
//! dearer than the write it saved. After `IDLE_POLLS` empty polls it sleeps in the channel
//! until the next line, so an idle server does not wake.
//!
//! Nothing is dropped: when `QUEUE_LINES` wait (the disk stalls), loggers block, as they
//! did writing to stderr themselves. [`LogGuard`] writes out what is queued when dropped;
//! a SIGKILL loses what the writer had not written yet (microseconds' worth while it
//! keeps up).

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::OnceLock;

/// Lines that may wait for the writer (about 16 MiB at 256 bytes a line).
const QUEUE_LINES: usize = 64 * 1024;
/// Bytes gathered into one write.
const WRITE_BYTES: usize = 64 * 1024;
/// How often a busy writer looks for lines: the most a line waits to be written.
const POLL: std::time::Duration = std::time::Duration::from_millis(10);
/// Empty polls (one second's worth) before the writer sleeps until the next line.
const IDLE_POLLS: u32 = 100;

enum Msg {
    Line(Vec<u8>),
    /// Write out everything queued before this, then answer.
    Flush(SyncSender<()>),
}

static QUEUE: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();

/// The channel to the writer thread, started on first use; `None` if it could not start
/// (lines are then written directly).
fn queue() -> Option<&'static SyncSender<Msg>> {
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = sync_channel(QUEUE_LINES);
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || write_loop(&rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn write_loop(rx: &Receiver<Msg>) {
    let mut out = std::io::BufWriter::with_capacity(WRITE_BYTES, std::io::stderr());
    let mut idle = 0;
    loop {
        let first = if idle >= IDLE_POLLS {
            match rx.recv() {
                Ok(msg) => Some(msg),
                Err(_) => return,
            }
        } else {
            match rx.try_recv() {
                Ok(msg) => Some(msg),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            }
        };
        let Some(first) = first else {
            idle += 1;
            std::thread::sleep(POLL);
            continue;
        };
        idle = 0;
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Msg::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        // Nothing more queued: write what was gathered.
        let _ = out.flush();
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
            queue_line(std::mem::take(&mut self.0));
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
pub fn queue_line(line: Vec<u8>) {
    let unsent = match queue() {
        Some(tx) => match tx.try_send(Msg::Line(line)) {
            Ok(()) => return,
            Err(TrySendError::Full(msg)) => tx.send(msg).err().map(|e| e.0),
            Err(TrySendError::Disconnected(msg)) => Some(msg),
        },
        None => Some(Msg::Line(line)),
    };
    if let Some(Msg::Line(line)) = unsent {
        let _ = std::io::stderr().write_all(&line);
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
    let Some(tx) = QUEUE.get().and_then(Option::as_ref) else {
        return;
    };
    let (done, written) = sync_channel(1);
    if tx.send(Msg::Flush(done)).is_ok() {
        let _ = written.recv();
    }
}
