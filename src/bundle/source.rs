//! Reading a bundle once, entry by entry, whatever its form: a tar (ours or skopeo's
//! `oci-archive`, in any entry order), a `.tar.zst` (told by its magic bytes, not its
//! name), or an OCI layout directory. Nothing is unpacked: each entry's bytes are handed
//! to the caller as a reader, and the bytes read from disk are counted for progress.

use super::layout::{BLOBS_DIR, INDEX_FILE, OCI_LAYOUT_FILE};
use super::tar_guard::TarGuard;
use super::{io_err, BundleError};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Read buffer between the file and the tar (or zstd) reader: large reads keep the disk
/// streaming; small enough to count for nothing in memory.
const READ_BUF_BYTES: usize = 1024 * 1024;
/// zstd frames whose window is larger than 2^this are refused: a decoder allocates the
/// window, and the zstd CLI's levels 1–19 stay within 2^23 (`--long` archives use 2^27,
/// 128 MiB, which would break the memory bound).
const ZSTD_WINDOW_LOG_MAX: u32 = 24;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// One entry as it is read.
pub(crate) struct Entry<'a> {
    pub(crate) path: &'a str,
    pub(crate) size: u64,
    pub(crate) is_dir: bool,
    /// A link or other special file: not content.
    pub(crate) is_special: bool,
    pub(crate) reader: &'a mut dyn Read,
    /// Where the entry's bytes lie in a regular file, when they do (a plain tar file, or
    /// a file of a layout directory): the caller may copy them from there instead of
    /// reading them through `reader`, which then skips them without reading.
    pub(crate) origin: Option<Origin<'a>>,
}

/// A stretch of a regular file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub(crate) file: &'a Path,
    pub(crate) offset: u64,
}

/// Counts the bytes read from the bundle's files (compressed bytes for `.tar.zst`).
#[derive(Debug, Default, Clone)]
pub(crate) struct Counter(Arc<AtomicU64>);

impl Counter {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Counted<R> {
    inner: R,
    counter: Counter,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<R: Seek> Seek for Counted<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// The size of what `for_each_entry` will read (the file, or every file of a layout
/// directory), for a progress bar; `None` when unknown (a pipe).
pub(crate) fn total_bytes(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        let mut total = 0;
        for name in [OCI_LAYOUT_FILE, INDEX_FILE] {
            total += std::fs::metadata(path.join(name)).map_or(0, |m| m.len());
        }
        for e in std::fs::read_dir(path.join(BLOBS_DIR)).ok()?.flatten() {
            total += e.metadata().map_or(0, |m| m.len());
        }
        Some(total)
    } else if meta.is_file() {
        Some(meta.len())
    } else {
        None
    }
}

/// Calls `visit` for each entry of the bundle at `path`, in the order stored.
pub(crate) fn for_each_entry(
    path: &Path,
    counter: &Counter,
    visit: &mut dyn FnMut(Entry<'_>) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.is_dir() {
        return walk_directory(path, counter, visit);
    }
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(
        READ_BUF_BYTES,
        Counted {
            inner: file,
            counter: counter.clone(),
        },
    );
    let head = reader.fill_buf().map_err(io_err(path))?;
    let bundle_err = |message: String| BundleError::Bundle {
        bundle: path.display().to_string(),
        message,
    };
    if head.is_empty() {
        return Err(bundle_err("is empty".into()));
    }
    if head.starts_with(&GZIP_MAGIC) {
        return Err(bundle_err(
            "is gzip-compressed; bundles are plain .tar or .tar.zst".into(),
        ));
    }
    if head.starts_with(&ZSTD_MAGIC) {
        let mut decoder = zstd::stream::read::Decoder::with_buffer(reader).map_err(io_err(path))?;
        decoder
            .window_log_max(ZSTD_WINDOW_LOG_MAX)
            .map_err(io_err(path))?;
        let mut archive = tar::Archive::new(TarGuard::new(decoder));
        let entries = archive.entries().map_err(|e| tar_err(path, "(start)", e))?;
        walk_tar(path, entries, None, visit)
    } else if meta.is_file() {
        // A plain tar in a regular file: entries' bytes can be copied from it directly,
        // and whatever is not read is skipped by seeking.
        let mut archive = tar::Archive::new(TarGuard::new(reader));
        let entries = archive
            .entries_with_seek()
            .map_err(|e| tar_err(path, "(start)", e))?;
        walk_tar(path, entries, Some(path), visit)
    } else {
        let mut archive = tar::Archive::new(TarGuard::new(reader));
        let entries = archive.entries().map_err(|e| tar_err(path, "(start)", e))?;
        walk_tar(path, entries, None, visit)
    }
}

fn tar_err(bundle: &Path, last: &str, e: std::io::Error) -> BundleError {
    BundleError::Bundle {
        bundle: bundle.display().to_string(),
        message: format!("is not a readable tar archive after entry {last}: {e}"),
    }
}

fn walk_tar<R: Read>(
    bundle: &Path,
    entries: tar::Entries<'_, R>,
    file: Option<&Path>,
    visit: &mut dyn FnMut(Entry<'_>) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    let mut last = String::from("(start of the archive)");
    let tar_err = |last: &str, e: std::io::Error| tar_err(bundle, last, e);
    for entry in entries {
        let mut entry = entry.map_err(|e| tar_err(&last, e))?;
        let path = entry
            .path()
            .map_err(|e| tar_err(&last, e))?
            .to_string_lossy()
            .into_owned();
        let kind = entry.header().entry_type();
        let size = entry.size();
        let offset = entry.raw_file_position();
        last.clone_from(&path);
        visit(Entry {
            path: &path,
            size,
            is_dir: kind.is_dir(),
            is_special: !(kind.is_file() || kind.is_dir() || kind == tar::EntryType::Continuous),
            reader: &mut entry,
            // Regular files only: their bytes are one stretch of the archive.
            origin: file
                .filter(|_| kind.is_file())
                .map(|file| Origin { file, offset }),
        })?;
    }
    Ok(())
}

/// A layout directory is read in the order an importer would want from an archive:
/// `oci-layout`, `index.json`, then the blobs.
fn walk_directory(
    dir: &Path,
    counter: &Counter,
    visit: &mut dyn FnMut(Entry<'_>) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    for name in [OCI_LAYOUT_FILE, INDEX_FILE] {
        let path = dir.join(name);
        if path.is_file() {
            visit_file(&path, name, counter, visit)?;
        }
    }
    let blobs = dir.join("blobs");
    let mut algorithms: Vec<_> = match std::fs::read_dir(&blobs) {
        Ok(d) => d.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&blobs)(e)),
    };
    algorithms.sort();
    for algorithm_dir in algorithms {
        let algorithm = algorithm_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<_> = std::fs::read_dir(&algorithm_dir)
            .map_err(io_err(&algorithm_dir))?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            visit_file(&file, &format!("blobs/{algorithm}/{name}"), counter, visit)?;
        }
    }
    Ok(())
}

fn visit_file(
    path: &Path,
    entry: &str,
    counter: &Counter,
    visit: &mut dyn FnMut(Entry<'_>) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        // Never opened: a FIFO would block the import forever, a device read without end.
        return visit(Entry {
            path: entry,
            size: 0,
            is_dir: meta.is_dir(),
            is_special: !meta.is_dir(),
            reader: &mut std::io::empty(),
            origin: None,
        });
    }
    let file = File::open(path).map_err(io_err(path))?;
    // Bounded to the size seen, so a file that grows meanwhile is not read past it (one
    // that shrinks ends early, which the reader reports as truncated).
    let mut reader = Counted {
        inner: file.take(meta.len()),
        counter: counter.clone(),
    };
    visit(Entry {
        path: entry,
        size: meta.len(),
        is_dir: false,
        is_special: false,
        reader: &mut reader,
        origin: Some(Origin {
            file: path,
            offset: 0,
        }),
    })
}
