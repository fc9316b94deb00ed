//! `regcache import`: reads a bundle once, entry by entry (`source`). Each blob is hashed
//! while it is written to a work file, and committed (write intent → final key → row, I2)
//! only if it matches the digest its entry names (I1, I11); it is then held for this
//! import until its image is linked. Manifests are verified and kept in the work
//! directory until then. A blob the store already has (an earlier, interrupted run, or
//! content the cache had) is held, not written again. Once the whole bundle is read,
//! `link` links every image whose content is complete, or none.

use super::abandon::{abandon_stale_imports, Heartbeat};
use super::intake::{self, commit_file, IntakeError};
use super::layout::{entry_kind, looks_like_manifest, EntryKind, LayoutIndex, RawDigest, INDEX_MAX_BYTES};
use super::link::{self, Linker};
use super::source::{self, Counter, Entry, Origin};
use super::{imports_dir, io_err, BlobAction, BundleError, Event, Progress};
use crate::config::Config;
use crate::metadata::{now_secs, Held, Metadata};
use crate::oci::MANIFEST_MAX_BYTES;
use crate::storage::BlobStore;
use crate::upstream::Upstreams;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Handle;

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
        let hashed = match origin {
            Some(o) => {
                let progress = &self.progress;
                intake::copy_into(o, size, &tmp, &mut |n| progress.advance(n))
            }
            None => {
                // Progress is the bytes read from the bundle (compressed, for .tar.zst).
                let (pool, progress, counter, reported) =
                    (&mut self.pool, &self.progress, &self.counter, &mut self.reported);
                intake::stream_into(r, size, &tmp, pool, &mut || {
                    let now = counter.get();
                    progress.advance(now.saturating_sub(*reported));
                    *reported = now.max(*reported);
                })
            }
        };
        let verified = match hashed {
            Ok(actual) => self.verify(entry, &digest, actual),
            Err(IntakeError::Truncated { got }) => Err(self.truncated(entry, size, got)),
            Err(IntakeError::Read(e)) => Err(self.entry_err(entry, format!("cannot be read: {e}"))),
            Err(IntakeError::Write(e)) => Err(io_err(&tmp)(e)),
            Err(IntakeError::Thread) => Err(BundleError::Task("a blob copying thread panicked".into())),
        };
        match verified {
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
