//! What this process's metadata handle did, counted in memory for `/metrics`: how long
//! writes waited for the writer and held it, and what expiry, eviction, purges, cleanup
//! and reconciliation handed to the deletion pipeline, by reason. Counted after the
//! transaction committed, so a rolled-back batch counts nothing.

use crate::counters::{Counter, Histogram, DATABASE_BOUNDS};

/// Why a blob was handed to the deletion pipeline (the `reason` of its pending delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalReason {
    /// Its ttl passed and nothing live held it.
    Expired,
    /// Storage was over `storage.max_size`.
    Evicted,
    /// A purge or a repository deletion.
    Purged,
    /// A cleanup policy deleted the tags that held it.
    Cleanup,
    /// Reconciliation found it in storage with no row.
    Orphan,
}

impl RemovalReason {
    pub const ALL: [RemovalReason; 5] = [
        RemovalReason::Expired,
        RemovalReason::Evicted,
        RemovalReason::Purged,
        RemovalReason::Cleanup,
        RemovalReason::Orphan,
    ];

    /// The `reason` label, as recorded on pending deletes.
    pub fn label(self) -> &'static str {
        match self {
            RemovalReason::Expired => "expired",
            RemovalReason::Evicted => "evicted",
            RemovalReason::Purged => "purged",
            RemovalReason::Cleanup => "cleanup",
            RemovalReason::Orphan => "orphan",
        }
    }
}

/// Entries expiry removes (or defers, with deletes off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiredKind {
    Tag,
    ManifestLink,
    BlobLink,
    /// Due, but kept because `storage.delete.enabled` is false.
    Deferred,
}

impl ExpiredKind {
    pub const ALL: [ExpiredKind; 4] = [
        ExpiredKind::Tag,
        ExpiredKind::ManifestLink,
        ExpiredKind::BlobLink,
        ExpiredKind::Deferred,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ExpiredKind::Tag => "tag",
            ExpiredKind::ManifestLink => "manifest_link",
            ExpiredKind::BlobLink => "blob_link",
            ExpiredKind::Deferred => "deferred",
        }
    }
}

#[derive(Debug)]
pub struct MetadataStats {
    /// From asking for a write until its transaction began: the blocking pool, the writer
    /// mutex and SQLite's busy wait (another process writing).
    pub writer_wait: Histogram,
    /// From `BEGIN IMMEDIATE` until the commit returned.
    pub transaction: Histogram,
    removed: [Counter; RemovalReason::ALL.len()],
    expired: [Counter; ExpiredKind::ALL.len()],
    evicted_bytes: Counter,
}

impl Default for MetadataStats {
    fn default() -> Self {
        Self {
            writer_wait: Histogram::new(DATABASE_BOUNDS),
            transaction: Histogram::new(DATABASE_BOUNDS),
            removed: Default::default(),
            expired: Default::default(),
            evicted_bytes: Counter::default(),
        }
    }
}

impl MetadataStats {
    pub(super) fn removed(&self, reason: RemovalReason, blobs: u64) {
        self.removed[reason as usize].add(blobs);
    }

    pub(super) fn expired(&self, r: &super::ExpiryReport) {
        for (kind, n) in [
            (ExpiredKind::Tag, r.tags),
            (ExpiredKind::ManifestLink, r.manifest_links),
            (ExpiredKind::BlobLink, r.blob_links),
            (ExpiredKind::Deferred, r.deferred),
        ] {
            self.expired[kind as usize].add(n);
        }
        self.removed(RemovalReason::Expired, r.blobs_to_delete);
    }

    pub(super) fn evicted(&self, blobs: u64, bytes: u64) {
        self.removed(RemovalReason::Evicted, blobs);
        self.evicted_bytes.add(bytes);
    }

    /// Blobs handed to the deletion pipeline for `reason` so far.
    pub fn removed_blobs(&self, reason: RemovalReason) -> u64 {
        self.removed[reason as usize].get()
    }

    /// Entries of `kind` expiry acted on so far.
    pub fn expired_entries(&self, kind: ExpiredKind) -> u64 {
        self.expired[kind as usize].get()
    }

    /// Bytes of the blobs eviction queued for deletion.
    pub fn evicted_bytes(&self) -> u64 {
        self.evicted_bytes.get()
    }
}
