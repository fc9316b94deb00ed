//! `regcache import`: reads a bundle once, entry by entry (`source`). Each blob is hashed
//! while it is written to a work file, and committed (write intent → final key → row, I2)
//! only if it matches the digest its entry names (I1, I11); it is then held for this
//! import until its image is linked. Manifests are verified and kept in the work
//! directory until then. A blob the store already has (an earlier, interrupted run, or
//! content the cache had) is held, not written again. Once the whole bundle is read,
//! `link` links every image whose content is complete, or none.

use super::layout::{entry_kind, looks_like_manifest, EntryKind, LayoutIndex, RawDigest, INDEX_MAX_BYTES};
use super::link::{self, Linker};
use super::source::{self, Counter, Entry, Origin};
use super::{imports_dir, io_err, BlobAction, BundleError, Event, Progress};
use crate::config::Config;
use crate::metadata::{now_secs, Held, Metadata};
use crate::oci::{Sha256Writer, MANIFEST_MAX_BYTES};
use crate::storage::BlobStore;
use crate::upstream::Upstreams;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;

/// Bytes read, hashed and written per step when streaming a blob to its work file.
const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks in flight between the reading thread and the writing one: enough that neither
/// waits for the other; 3 MiB of memory.
const BUFFERS: usize = 3;
/// How often a running import says it is alive (see `STALE_AFTER_SECS`).
const HEARTBEAT: Duration = Duration::from_secs(30);
/// An import not heard from for this long (20 missed heartbeats), or for
/// `storage.reconcile_grace` if longer, is abandoned: its holds go and what only it held
/// is queued for deletion. Long enough that a rerun after an interruption still finds
/// its blobs; reconciliation and every import check for abandoned ones.
pub(crate) const STALE_AFTER_SECS: i64 = 600;
/// The work directory of an import not heard from for this long (4 missed heartbeats) is
/// removed: its process is gone, and a partial blob file in it may be large.
pub(crate) const WORK_DIR_STALE_SECS: i64 = 120;
/// `oci-layout` is a tiny JSON file.
const LAYOUT_FILE_MAX_BYTES: u64 = 4096;

/// What the command line chose.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Put every image under this upstream, whatever host its name gives.
    pub upstream: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub bundle: String,
    /// `HOST/REPO:TAG` (or `@DIGEST`) of every image linked.
    pub images: Vec<String>,
    pub blobs_committed: u64,
    pub bytes_committed: u64,
    /// Blobs the store already had: held and linked, not written again.
    pub blobs_reused: u64,
    pub manifests: u64,
    /// Children of indexes that neither the bundle nor the cache has (an export filtered
    /// by platform): the index is served, those platforms are not.
    pub children_absent: u64,
    /// Blobs the bundle carried that no image needed, queued for deletion again.
    pub unused_blobs_queued: u64,
}

/// Imports the bundle at `bundle` (a file or a layout directory) into the cache that
/// `config`, `meta` and `store` describe; works beside a running server on the same data
/// directory.
pub async fn import(
    config: &Config,
    meta: &Metadata,
    store: &BlobStore,
    bundle: &Path,
    options: &ImportOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImportReport, BundleError> {
    let upstreams =
        Upstreams::from_config(config).map_err(|e| BundleError::Request(format!("upstreams: {e}")))?;
    if let Some(name) = &options.upstream {
        if upstreams.by_name(name).is_none() {
            let names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            return Err(BundleError::Request(format!(
                "--upstream {name:?}: no upstream has that name (configured: {})",
                names.join(", ")
            )));
        }
    }
    let data_dir = &config.server.data_dir;
    let grace = i64::try_from(config.storage.reconcile_grace.as_secs()).unwrap_or(i64::MAX);
    abandon_stale_imports(meta, data_dir, grace, false).await?;

    let source = bundle.display().to_string();
    let import = meta.begin_import(&source, now_secs()).await?;
    let work = imports_dir(data_dir).join(import.to_string());
    std::fs::create_dir_all(work.join("manifests")).map_err(io_err(&work))?;
    let heartbeat = Heartbeat::start(meta.clone(), import);
    let linker = Linker::new(&upstreams, options.upstream.as_deref());
    progress.start(source::total_bytes(bundle));

    let reader = Reader {
        rt: Handle::current(),
        meta: meta.clone(),
        store: store.clone(),
        import,
        work: work.clone(),
        bundle: source.clone(),
        linker: linker.clone(),
        spooled: HashMap::new(),
        held: HashSet::new(),
        index: None,
        layout_seen: false,
        report: ImportReport {
            bundle: source.clone(),
            ..ImportReport::default()
        },
        progress: progress.clone(),
        counter: Counter::default(),
        reported: 0,
        pool: Vec::new(),
    };
    let bundle_path = bundle.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let counter = reader.counter.clone();
        let result = source::for_each_entry(&bundle_path, &counter, &mut |e| reader.entry(e));
        reader.tick();
        result.map(|()| reader)
    })
    .await
    .map_err(|e| BundleError::Task(e.to_string()));
    let outcome = match read {
        Ok(Ok(reader)) => link_all(reader).await,
        Ok(Err(e)) | Err(e) => Err(e),
    };
    drop(heartbeat);
    // The work files go whatever happened; what was committed stays held on record for
    // a rerun until the import is finished or abandoned.
    let _ = std::fs::remove_dir_all(&work);
    let mut report = outcome?;
    report.unused_blobs_queued = meta.finish_import(import, now_secs()).await?;
    Ok(report)
}

async fn link_all(reader: Reader) -> Result<ImportReport, BundleError> {
    let Reader {
        meta,
        store,
        import,
        work,
        bundle,
        linker,
        spooled,
        index,
        layout_seen,
        mut report,
        progress,
        ..
    } = reader;
    let Some(index) = index else {
        return Err(BundleError::Bundle {
            bundle,
            message: "has no index.json, so it is not an OCI image layout (or it was cut short)".into(),
        });
    };
    if !layout_seen {
        progress.event(&Event::Warning {
            message: format!("{bundle} has no oci-layout file; reading it as an OCI image layout anyway"),
        });
    }
    let ctx = link::LinkContext {
        meta: &meta,
        store: &store,
        import,
        work: &work,
        spooled: &spooled,
        bundle: &bundle,
    };
    let linked = linker.link(&ctx, &index, progress.as_ref()).await?;
    report.images = linked.images;
    report.children_absent = linked.children_absent;
    Ok(report)
}

/// Abandons imports not heard from for `max(grace_secs, STALE_AFTER_SECS)` (their holds
/// go; what only they held is queued for deletion) and removes work directories of
/// imports no longer running. Returns (imports abandoned, blobs queued, dirs removed);
/// with `dry_run`, changes nothing and counts only the directories.
pub async fn abandon_stale_imports(
    meta: &Metadata,
    data_dir: &Path,
    grace_secs: i64,
    dry_run: bool,
) -> Result<(u64, u64, u64), BundleError> {
    let now = now_secs();
    let (imports, queued) = if dry_run {
        (0, 0)
    } else {
        let cutoff = now.saturating_sub(grace_secs.max(STALE_AFTER_SECS));
        let r = meta.abandon_stale_imports(cutoff, now).await?;
        (r.imports, r.blobs_queued)
    };
    // Listed before the imports on record are read: an import records itself before it
    // creates its directory, so every directory listed here has its row by then.
    let dir = imports_dir(data_dir);
    let entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(&dir) {
        Ok(d) => d.flatten().collect(),
        Err(_) => return Ok((imports, queued, 0)),
    };
    let running: HashMap<i64, i64> = meta.imports_on_record().await?.into_iter().collect();
    let mut removed = 0;
    for e in entries {
        let alive = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i64>().ok())
            .and_then(|id| running.get(&id))
            .is_some_and(|beat| now - beat < WORK_DIR_STALE_SECS);
        if !alive && (dry_run || std::fs::remove_dir_all(e.path()).is_ok()) {
            removed += 1;
        }
    }
    Ok((imports, queued, removed))
}

/// Beats every `HEARTBEAT` while the import runs; stops when dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(meta: Metadata, import: i64) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match meta.import_heartbeat(import, now_secs()).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(import.id = import, error = %e, "import heartbeat failed"),
                }
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The reading side, on a blocking thread; async calls go through `rt`.
struct Reader {
    rt: Handle,
    meta: Metadata,
    store: BlobStore,
    import: i64,
    work: PathBuf,
    bundle: String,
    linker: Linker,
    /// Manifests verified and kept in `work/manifests/<hex>`, with their sizes.
    spooled: HashMap<RawDigest, u64>,
    /// Blobs committed or held by this run.
    held: HashSet<RawDigest>,
    index: Option<LayoutIndex>,
    layout_seen: bool,
    report: ImportReport,
    progress: Arc<dyn Progress>,
    counter: Counter,
    reported: u64,
    /// Chunk buffers, kept from blob to blob.
    pool: Vec<Vec<u8>>,
}

impl Reader {
    fn entry_err(&self, entry: &str, message: impl Into<String>) -> BundleError {
        BundleError::Entry {
            bundle: self.bundle.clone(),
            entry: entry.to_owned(),
            message: message.into(),
        }
    }

    /// Reports the bytes read since the last call.
    fn tick(&mut self) {
        let now = self.counter.get();
        if now > self.reported {
            self.progress.advance(now - self.reported);
            self.reported = now;
        }
    }

    fn entry(&mut self, e: Entry<'_>) -> Result<(), BundleError> {
        let kind = entry_kind(e.path, e.is_dir).map_err(|m| self.entry_err(e.path, m))?;
        if e.is_special {
            if kind == EntryKind::Ignored {
                return Ok(());
            }
            return Err(self.entry_err(e.path, "is a link or special file, not the content itself"));
        }
        match kind {
            EntryKind::Ignored => Ok(()),
            EntryKind::OciLayout => {
                let body = self.read_small(e.path, e.size, LAYOUT_FILE_MAX_BYTES, e.reader)?;
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|err| self.entry_err(e.path, format!("is not JSON: {err}")))?;
                if !v["imageLayoutVersion"].is_string() {
                    return Err(self.entry_err(e.path, "has no imageLayoutVersion"));
                }
                self.layout_seen = true;
                Ok(())
            }
            EntryKind::Index => {
                let path = e.path.to_owned();
                let body = self.read_small(&path, e.size, INDEX_MAX_BYTES, e.reader)?;
                let index: LayoutIndex = serde_json::from_slice(&body)
                    .map_err(|err| self.entry_err(&path, format!("is not an OCI index: {err}")))?;
                // Names are checked as soon as they are known: a bundle whose images go
                // nowhere fails before any blob is written.
                self.linker
                    .targets(&index)
                    .map_err(|errors| self.entry_err(&path, errors.join("; ")))?;
                self.index = Some(index);
                Ok(())
            }
            EntryKind::Blob(digest) => {
                let path = e.path.to_owned();
                self.blob(&path, digest, e.size, e.reader, e.origin)?;
                self.tick();
                Ok(())
            }
        }
    }

    /// Reads a whole small entry (at most `max` bytes).
    fn read_small(
        &mut self,
        entry: &str,
        size: u64,
        max: u64,
        r: &mut dyn Read,
    ) -> Result<Vec<u8>, BundleError> {
        if size > max {
            return Err(self.entry_err(entry, format!("is {size} bytes; at most {max} are accepted")));
        }
        let mut body = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        r.read_to_end(&mut body)
            .map_err(|err| self.entry_err(entry, format!("cannot be read: {err}")))?;
        if body.len() as u64 != size {
            return Err(self.truncated(entry, size, body.len() as u64));
        }
        Ok(body)
    }

    fn truncated(&self, entry: &str, size: u64, got: u64) -> BundleError {
        self.entry_err(
            entry,
            format!("truncated: the bundle ends after {got} of its {size} bytes"),
        )
    }

    fn blob(
        &mut self,
        entry: &str,
        digest: RawDigest,
        size: u64,
        r: &mut dyn Read,
        origin: Option<Origin<'_>>,
    ) -> Result<(), BundleError> {
        if self.held.contains(&digest) || self.spooled.contains_key(&digest) {
            return Ok(()); // the same blob twice in one archive
        }
        if size <= MANIFEST_MAX_BYTES as u64 {
            let body = self.read_small(entry, size, size, r)?;
            self.verify(entry, &digest, crate::oci::Digest::of(&body))?;
            if looks_like_manifest(&body) {
                let path = self.work.join("manifests").join(digest.hex());
                std::fs::write(&path, &body).map_err(io_err(&path))?;
                self.spooled.insert(digest, size);
                self.report.manifests += 1;
                self.event(&digest, size, BlobAction::Manifest);
                return Ok(());
            }
            if self.reuse(entry, &digest)? {
                return Ok(());
            }
            let tmp = self.work.join(format!("{}.part", ulid::Ulid::new()));
            std::fs::write(&tmp, &body).map_err(io_err(&tmp))?;
            return self.commit(entry, &digest, &tmp, size);
        }
        if self.reuse(entry, &digest)? {
            match origin {
                // Not read: the archive skips it by seeking.
                Some(_) => self.progress.advance(size),
                // A stream is read in order: read past it, without hashing.
                None => {
                    std::io::copy(r, &mut std::io::sink())
                        .map_err(|err| self.entry_err(entry, format!("cannot be read: {err}")))?;
                }
            }
            return Ok(());
        }
        let tmp = self.work.join(format!("{}.part", ulid::Ulid::new()));
        let written = match origin {
            Some(o) => self.copy_hashed(entry, &digest, size, o, &tmp),
            None => self.write_hashed(entry, &digest, size, r, &tmp),
        };
        match written {
            Ok(()) => self.commit(entry, &digest, &tmp, size),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Holds `digest` if the store has it already; `true` when it does.
    fn reuse(&mut self, entry: &str, digest: &RawDigest) -> Result<bool, BundleError> {
        let held = self.rt.block_on(self.meta.hold_stored_blob(
            self.import,
            &digest.to_string(),
            now_secs(),
        ))?;
        match held {
            Held::Stored { size } => {
                self.held.insert(*digest);
                self.report.blobs_reused += 1;
                self.event(digest, size, BlobAction::Reused);
                Ok(true)
            }
            Held::Absent => Ok(false),
            Held::Deleting => Err(self.entry_err(
                entry,
                "the cache is deleting this blob right now; run the import again in a minute",
            )),
        }
    }

    /// Streams `size` bytes of `r` into `tmp`, hashing them; the content must hash to
    /// `digest`. Reading and hashing (this thread) overlap writing (a second one), so a
    /// blob goes in at about the speed of the slower of the two rather than their sum.
    fn write_hashed(
        &mut self,
        entry: &str,
        digest: &RawDigest,
        size: u64,
        r: &mut dyn Read,
        tmp: &Path,
    ) -> Result<(), BundleError> {
        let file = std::fs::File::create_new(tmp).map_err(io_err(tmp))?;
        let mut hasher = Sha256Writer::default();
        let mut got: u64 = 0;
        let mut pool = std::mem::take(&mut self.pool);
        while pool.len() < BUFFERS {
            pool.push(Vec::new());
        }
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
        let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
        let (read, written) = std::thread::scope(|s| {
            let writer = s.spawn(move || -> std::io::Result<()> {
                let mut file = file;
                for chunk in full_rx {
                    file.write_all(&chunk)?;
                    // Never blocks: there are only BUFFERS buffers.
                    let _ = empty_tx.send(chunk);
                }
                Ok(())
            });
            let read = loop {
                if got == size {
                    break Ok(());
                }
                let mut buf = match pool.pop() {
                    Some(b) => b,
                    None => match empty_rx.recv() {
                        Ok(b) => b,
                        // The writer stopped on an error, reported below.
                        Err(_) => break Ok(()),
                    },
                };
                buf.resize(CHUNK_BYTES, 0);
                let want = usize::try_from((size - got).min(CHUNK_BYTES as u64)).unwrap_or(CHUNK_BYTES);
                let n = match r.read(&mut buf[..want]) {
                    Ok(0) => break Err(self.truncated(entry, size, got)),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                        pool.push(buf);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        break Err(self.truncated(entry, size, got))
                    }
                    Err(e) => break Err(self.entry_err(entry, format!("cannot be read: {e}"))),
                };
                buf.truncate(n);
                hasher.update(&buf);
                got += n as u64;
                if full_tx.send(buf).is_err() {
                    break Ok(()); // the writer stopped on an error, reported below
                }
                self.tick();
            };
            drop(full_tx);
            (read, writer.join())
        });
        pool.extend(empty_rx.try_iter());
        self.pool = pool;
        read?;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io_err(tmp)(e)),
            Err(_) => return Err(BundleError::Task("the blob writer thread panicked".into())),
        }
        self.verify(entry, digest, hasher.finish())
    }

    /// Copies the entry's bytes from the file they lie in to `tmp` by the kernel
    /// (`copy_file_range`: no copy through this process) on a second thread, while this
    /// one hashes what has been copied so far. Hashing `tmp`, this process's own file,
    /// keeps what is verified exactly what gets committed whatever happens to the bundle
    /// meanwhile.
    fn copy_hashed(
        &mut self,
        entry: &str,
        digest: &RawDigest,
        size: u64,
        origin: Origin<'_>,
        tmp: &Path,
    ) -> Result<(), BundleError> {
        let mut src = std::fs::File::open(origin.file).map_err(io_err(origin.file))?;
        src.seek(std::io::SeekFrom::Start(origin.offset))
            .map_err(io_err(origin.file))?;
        let mut dst = std::fs::File::create_new(tmp).map_err(io_err(tmp))?;
        let reader = dst.try_clone().map_err(io_err(tmp))?;
        let (progress_tx, progress_rx) = std::sync::mpsc::channel::<u64>();
        let (copied, hashed) = std::thread::scope(|s| {
            let copier = s.spawn(move || -> std::io::Result<u64> {
                let mut total = 0;
                while total < size {
                    let step = (size - total).min(COPY_STEP_BYTES);
                    let n = std::io::copy(&mut (&mut src).take(step), &mut dst)?;
                    total += n;
                    if n < step || progress_tx.send(total).is_err() {
                        break;
                    }
                }
                Ok(total)
            });
            let mut hasher = Sha256Writer::default();
            let mut hashed = 0;
            for copied in progress_rx {
                while hashed < copied {
                    let len = (copied - hashed).min(HASH_WINDOW_BYTES);
                    match hash_window(&reader, hashed, len, &mut hasher) {
                        Ok(()) => hashed += len,
                        Err(e) => return (copier.join(), Err(e)),
                    }
                    self.progress.advance(len);
                }
            }
            (copier.join(), Ok((hasher, hashed)))
        });
        let copied = match copied {
            Ok(r) => r.map_err(io_err(tmp))?,
            Err(_) => return Err(BundleError::Task("the blob copying thread panicked".into())),
        };
        let (hasher, hashed) = hashed.map_err(io_err(tmp))?;
        if copied != size || hashed != size {
            return Err(self.truncated(entry, size, copied));
        }
        self.verify(entry, digest, hasher.finish())
    }

    fn verify(
        &self,
        entry: &str,
        expected: &RawDigest,
        actual: crate::oci::Digest,
    ) -> Result<(), BundleError> {
        if RawDigest::of(&actual) == *expected {
            return Ok(());
        }
        Err(self.entry_err(
            entry,
            format!("corrupt: its content hashes to {actual}, not to the {expected} it is named by"),
        ))
    }

    /// Commits a verified work file (see `commit_file`), held for this import.
    fn commit(&mut self, entry: &str, digest: &RawDigest, tmp: &Path, size: u64) -> Result<(), BundleError> {
        let committed = self.rt.block_on(commit_file(
            &self.meta,
            &self.store,
            self.import,
            digest,
            tmp,
            size,
        ));
        let _ = std::fs::remove_file(tmp);
        if !committed? {
            return Err(self.entry_err(
                entry,
                "the cache is deleting this blob right now; run the import again in a minute",
            ));
        }
        self.held.insert(*digest);
        self.report.blobs_committed += 1;
        self.report.bytes_committed += size;
        self.event(digest, size, BlobAction::Committed);
        Ok(())
    }

    fn event(&self, digest: &RawDigest, size: u64, action: BlobAction) {
        self.progress.event(&Event::Blob {
            digest: digest.to_string(),
            size_bytes: size,
            action,
        });
    }
}

/// I2's write order for a verified work file: write intent → final key (a rename on the
/// filesystem, an upload elsewhere) → the row, held for `import`. `false` when the digest
/// is being deleted right now and cannot be written.
pub(super) async fn commit_file(
    meta: &Metadata,
    store: &BlobStore,
    import: i64,
    digest: &RawDigest,
    tmp: &Path,
    size: u64,
) -> Result<bool, BundleError> {
    let d = digest.digest();
    let ds = d.to_string();
    let Some(intent) = meta.begin_write(&ds, now_secs()).await? else {
        return Ok(false);
    };
    let written = async {
        // A multipart upload is on record before its first part is sent (I2).
        let upload = store.open_upload(&d, size).await?;
        if let Some(u) = &upload {
            if let Err(e) = meta.record_upload(intent, u.clone()).await {
                let _ = store.abort_upload(u).await;
                return Err(e.into());
            }
        }
        store.put_file(&d, tmp, size, upload.as_ref()).await?;
        meta.commit_imported_blob(import, &ds, size, intent, now_secs())
            .await?;
        Ok::<_, BundleError>(())
    }
    .await;
    if let Err(e) = written {
        let _ = meta.abandon_write(intent).await;
        return Err(e);
    }
    Ok(true)
}

/// Bytes copied per step from the bundle to a work file; after each, the copied part is
/// hashed on the other thread.
const COPY_STEP_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes of a work file mapped at once to hash it: large enough that mapping costs
/// nothing per byte, small enough that the mapped pages (which count in RSS) stay few.
const HASH_WINDOW_BYTES: u64 = 8 * 1024 * 1024;

/// Hashes `len` bytes of `file` from `offset`, mapped (the page cache's pages, not a copy).
fn hash_window(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    hasher: &mut Sha256Writer,
) -> std::io::Result<()> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: `file` is this import's own work file in its work directory, changed by
    // nothing but the copy that wrote these bytes before it reported them.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .populate()
            .map(file)?
    };
    hasher.update(&map);
    Ok(())
}
