//! regcache's log lines captured in memory (JSON, one event a line), for tests that check
//! what was logged: an error id in an answer must be in a log line. Install it with
//! `capture()` before the first `TestApp` starts (which then keeps this subscriber).

use std::sync::{Mutex, OnceLock, PoisonError};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf).into_owned();
        LINES.lock().unwrap_or_else(PoisonError::into_inner).push(line);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this process's log events from now on (`warn`, and `info` for regcache).
pub fn capture() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("warn,regcache=info")
            .with_writer(|| Capture)
            .try_init()
            .expect("the log capture is the first subscriber of this test binary");
    });
}

/// The captured lines that contain `needle`, parsed.
pub fn lines_with(needle: &str) -> Vec<serde_json::Value> {
    LINES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|l| l.contains(needle))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
        .collect()
}
