//! The data dir's disk in `regcache status`: free space, measured here, and the full-disk
//! episode the server recorded (the server is another process; see `storage::DataDisk`).

use super::format::{bytes, when};
use crate::storage::{read_record, space};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub(super) struct DiskStatus {
    free_bytes: Option<u64>,
    total_bytes: Option<u64>,
    /// The server records writes failing for lack of space, or little is free.
    full: bool,
    /// Unix seconds, as the server recorded it.
    full_since: Option<i64>,
    error: Option<String>,
    recorded_by_pid: Option<u32>,
}

impl DiskStatus {
    pub(super) fn measure(data_dir: &Path) -> Self {
        let space = space(data_dir).ok();
        let record = read_record(data_dir);
        let full_since = record.as_ref().and_then(|r| r.full_since);
        Self {
            free_bytes: space.map(|s| s.free_bytes),
            total_bytes: space.map(|s| s.total_bytes),
            full: full_since.is_some() || space.is_some_and(|s| s.is_low()),
            full_since,
            error: record.as_ref().and_then(|r| r.error.clone()),
            recorded_by_pid: record.map(|r| r.pid),
        }
    }

    /// The rows `regcache status` shows for the disk.
    pub(super) fn rows(&self, now: i64) -> Vec<(&'static str, String)> {
        let mut rows = vec![(
            "disk",
            match (self.free_bytes, self.total_bytes) {
                (Some(free), Some(total)) => format!("{} free of {}", bytes(free), bytes(total)),
                _ => "free space unknown".to_owned(),
            },
        )];
        if !self.full {
            rows.push(("disk full", "no".to_owned()));
            return rows;
        }
        let why = match (self.full_since, &self.error) {
            (Some(since), error) => format!(
                "since {} (recorded by the server, pid {}): {}",
                when(since, now),
                self.recorded_by_pid.unwrap_or(0),
                error.as_deref().unwrap_or("writes fail for lack of space")
            ),
            (None, _) => "almost no space is left".to_owned(),
        };
        rows.push(("disk full", format!("YES, {why}")));
        rows.push((
            "",
            "blobs are passed through and manifests served without caching until space is freed".to_owned(),
        ));
        rows
    }
}
