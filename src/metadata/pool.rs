//! Connections: one writer (serialised by a mutex: SQLite allows one writer anyway) and a
//! few readers that WAL lets run beside it. Calls hop onto tokio's blocking pool.

use super::{migrations, MetadataError};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Readers beside the writer. Reads are short point lookups; four keep two cores busy
/// without holding many page caches.
const READERS: usize = 4;
/// The writer's page cache, in KiB (negative: SQLite reads it as KiB). Readers keep
/// SQLite's default of 2 MiB.
const WRITER_CACHE_KIB: i64 = -16 * 1024;
/// WAL pages after which a commit checkpoints: 256 MiB at 4 KiB pages.
const WAL_CHECKPOINT_PAGES: i64 = 64 * 1024;
/// What the WAL file is truncated to after a checkpoint, so a burst of bulk work does not
/// keep its peak size on disk.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;
/// Prepared statements the writer keeps.
const WRITER_STATEMENTS: usize = 64;
/// How long a connection waits for a lock before SQLITE_BUSY.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Handle to the metadata database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metadata {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    stats: super::stats::MetadataStats,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("readers", &self.readers.len())
            .finish()
    }
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding a connection leaves it usable (any open transaction was
    // rolled back when it dropped), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metadata {
    /// Opens (creating if needed) and migrates the database. Blocking: call at start-up
    /// or from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Self, MetadataError> {
        let open_err = |source| MetadataError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut writer = Connection::open(path).map_err(open_err)?;
        configure(&writer)?;
        configure_writer(&writer)?;
        writer
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(open_err)?;
        migrations::migrate(&mut writer)?;
        let readers = (0..READERS)
            .map(|_| {
                let c = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY
                        | OpenFlags::SQLITE_OPEN_NO_MUTEX
                        | OpenFlags::SQLITE_OPEN_URI,
                )
                .map_err(open_err)?;
                configure(&c)?;
                Ok(Mutex::new(c))
            })
            .collect::<Result<Vec<_>, MetadataError>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
                stats: super::stats::MetadataStats::default(),
            }),
        })
    }

    /// What this handle's writes waited and took, and what it removed; for `/metrics`.
    pub fn stats(&self) -> &super::stats::MetadataStats {
        &self.inner.stats
    }

    /// Runs `f` on a reader connection, off the async runtime.
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetadataError> + Send + 'static,
    {
        let inner = self.inner.clone();
        run_blocking(move || {
            // Take a free reader if there is one, else queue on the next in turn.
            let conn = inner
                .readers
                .iter()
                .find_map(|m| m.try_lock().ok())
                .unwrap_or_else(|| {
                    let i = inner.next_reader.fetch_add(1, Ordering::Relaxed) % inner.readers.len();
                    lock(&inner.readers[i])
                });
            f(&conn)
        })
        .await
    }

    /// Runs `f` in one IMMEDIATE transaction on the writer (I5: one logical change, one
    /// transaction), committing when it returns `Ok`.
    pub(super) async fn write<T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, MetadataError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let asked = Instant::now();
        run_blocking(move || {
            let mut conn = lock(&inner.writer);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let began = Instant::now();
            inner.stats.writer_wait.observe(began - asked);
            let out = f(&tx);
            // Rolled back or committed, the writer was held this long.
            let committed = out.and_then(|out| Ok(tx.commit().map(|()| out)?));
            inner.stats.transaction.observe(began.elapsed());
            committed
        })
        .await
    }
}

fn configure(conn: &Connection) -> Result<(), MetadataError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

/// The writer does the bulk work (expiry, deletion, purges), whose batches touch pages
/// all over the indexes of a large database. Measured on a million-entry cache, a
/// checkpoint after every batch (the default, at 4 MiB of WAL; a batch writes about
/// 64 MiB) was half of expiry's time: checkpointing at 256 MiB lets a page changed by
/// several batches be copied once (a third less time in a replay of expiry). Sorts
/// stay in memory, and a larger page cache than a reader's keeps the inner index pages.
fn configure_writer(conn: &Connection) -> Result<(), MetadataError> {
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
    // Expiry, deletion and serving keep a few dozen statements hot on the writer; rusqlite's
    // default of 16 would evict and re-prepare them batch after batch.
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
    Ok(())
}

async fn run_blocking<T, F>(f: F) -> Result<T, MetadataError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, MetadataError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MetadataError::Task(e.to_string()))?
}
