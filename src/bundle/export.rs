//! `regcache export`: writes the planned images as an OCI image layout in a tar (zstd
//! compressed when the name ends in `.zst`), streamed straight from the store: on the
//! filesystem backend each blob file is copied into the bundle by the kernel
//! (`copy_file_range`, no copy through this process) when the bundle is a plain tar;
//! other backends stream one chunk at a time. Nothing else is written but the bundle
//! (as `BUNDLE.part`, renamed when complete) and its digest list.

use super::digest_list::{digest_list_path, read_since, write_list};
use super::layout::{LayoutIndex, BLOBS_DIR, DELTA_OF, INDEX_FILE, OCI_LAYOUT_BODY, OCI_LAYOUT_FILE};
use super::plan::{ExportSelection, Item, Planner};
use super::{io_err, BlobAction, BundleError, Event, Progress};
use crate::config::Config;
use crate::metadata::Metadata;
use crate::oci::OCI_INDEX;
use crate::storage::BlobStore;
use crate::upstream::Upstreams;
use futures::StreamExt;
use serde::Serialize;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Handle;

/// zstd level for `.tar.zst`: 3 is zstd's default, about 300 MB/s per core on already
/// compressed layers, which keeps an export near disk speed; higher levels gain little
/// on gzip layers and cost several times the time.
const ZSTD_LEVEL: i32 = 3;
/// Buffer between the tar stream and the zstd encoder (the plain tar is written straight
/// to the file).
const WRITE_BUF_BYTES: usize = 1024 * 1024;
/// Bytes copied per step from a local blob file into a compressed bundle.
const COPY_CHUNK_BYTES: usize = 1024 * 1024;
const TAR_BLOCK: u64 = 512;

/// What the command line chose.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub selection: ExportSelection,
    pub output: PathBuf,
    /// An earlier bundle or its digest list: its blobs are left out.
    pub since: Option<PathBuf>,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportReport {
    pub bundle: String,
    pub digest_list: String,
    pub images: Vec<String>,
    pub manifests: u64,
    pub blobs: u64,
    /// Bytes of manifests and blobs carried (before compression).
    pub content_bytes: u64,
    /// Size of the bundle file.
    pub bundle_bytes: u64,
    /// Manifests and blobs left out because the `--since` bundle carried them.
    pub left_out: u64,
    pub warnings: Vec<String>,
}

/// Exports the cached images `options` selects into a bundle.
pub async fn export(
    config: &Config,
    meta: &Metadata,
    store: &BlobStore,
    options: &ExportOptions,
    progress: Arc<dyn Progress>,
) -> Result<ExportReport, BundleError> {
    let out = &options.output;
    if out.is_dir() {
        return Err(BundleError::Request(format!(
            "-o {}: is a directory; name the bundle file (BUNDLE.tar or BUNDLE.tar.zst)",
            out.display()
        )));
    }
    let upstreams =
        Upstreams::from_config(config).map_err(|e| BundleError::Request(format!("upstreams: {e}")))?;
    let since = match &options.since {
        Some(p) => read_since(p)?,
        None => HashSet::new(),
    };
    let plan = Planner::new(meta, &upstreams, &since)
        .run(&options.selection)
        .await?;
    for w in &plan.warnings {
        progress.event(&Event::Warning { message: w.clone() });
    }
    if plan.entries.is_empty() {
        return Err(BundleError::Request(
            "nothing to export: no selected image is fully cached".into(),
        ));
    }
    let content_bytes: u64 = plan.items.iter().map(|i| i.size).sum();
    progress.event(&Event::Planned {
        images: plan.entries.len(),
        blobs: plan.items.len(),
        bytes: content_bytes,
        left_out: plan.left_out,
    });
    progress.start(Some(content_bytes));
    let mut index = LayoutIndex {
        schema_version: 2,
        media_type: OCI_INDEX.to_owned(),
        manifests: plan.entries.clone(),
        annotations: Default::default(),
    };
    if let Some(p) = &options.since {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        let name = name.strip_suffix(".digests").unwrap_or(&name).to_owned();
        index.annotations.insert(DELTA_OF.to_owned(), name);
    }
    let index_body = serde_json::to_vec(&index).map_err(|e| BundleError::Task(format!("index.json: {e}")))?;

    let writer = Writer {
        rt: Handle::current(),
        meta: meta.clone(),
        store: store.clone(),
        progress: progress.clone(),
    };
    let (items, output) = (plan.items.clone(), out.clone());
    let bundle_bytes = tokio::task::spawn_blocking(move || writer.write(&output, &index_body, &items))
        .await
        .map_err(|e| BundleError::Task(e.to_string()))??;

    let list = digest_list_path(out);
    write_list(
        &list,
        out,
        options.since.as_deref(),
        plan.needed.iter().copied().chain(since.iter().copied()),
    )?;
    Ok(ExportReport {
        bundle: out.display().to_string(),
        digest_list: list.display().to_string(),
        images: plan
            .entries
            .iter()
            .filter_map(|d| d.annotations.get(super::layout::REF_NAME).cloned())
            .collect(),
        manifests: plan.items.iter().filter(|i| i.manifest).count() as u64,
        blobs: plan.items.iter().filter(|i| !i.manifest).count() as u64,
        content_bytes,
        bundle_bytes,
        left_out: plan.left_out as u64,
        warnings: plan.warnings,
    })
}

/// Where the tar stream goes.
enum Sink {
    /// Straight into the file: local blob files are copied by the kernel.
    Plain(File),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<File>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(f) => f.write(buf),
            Self::Zstd(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(f) => f.flush(),
            Self::Zstd(z) => z.flush(),
        }
    }
}

impl Sink {
    /// Copies `len` bytes of `file` into the stream; returns how many there were.
    fn copy_file(&mut self, file: &mut File, len: u64, buf: &mut [u8]) -> std::io::Result<u64> {
        match self {
            // std's `io::copy` between two files uses copy_file_range on Linux.
            Self::Plain(out) => std::io::copy(&mut file.take(len), out),
            Self::Zstd(z) => {
                let mut src = file.take(len);
                let mut total = 0;
                loop {
                    let n = src.read(buf)?;
                    if n == 0 {
                        return Ok(total);
                    }
                    z.write_all(&buf[..n])?;
                    total += n as u64;
                }
            }
        }
    }

    fn finish(self) -> std::io::Result<File> {
        match self {
            Self::Plain(f) => Ok(f),
            Self::Zstd(z) => z.finish()?.into_inner().map_err(|e| e.into_error()),
        }
    }
}

/// The writing side, on a blocking thread; async calls go through `rt`.
struct Writer {
    rt: Handle,
    meta: Metadata,
    store: BlobStore,
    progress: Arc<dyn Progress>,
}

impl Writer {
    /// Writes the bundle to `out` (via `out.part`); returns its size in bytes.
    fn write(&self, out: &Path, index: &[u8], items: &[Item]) -> Result<u64, BundleError> {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".part");
        let part = out.with_file_name(name);
        let written = self.write_to(&part, out, index, items);
        match written {
            Ok(size) => {
                std::fs::rename(&part, out).map_err(io_err(out))?;
                Ok(size)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }

    fn write_to(&self, part: &Path, out: &Path, index: &[u8], items: &[Item]) -> Result<u64, BundleError> {
        let file = File::create(part).map_err(io_err(part))?;
        let zstd = out.extension().is_some_and(|e| e == "zst");
        let sink = if zstd {
            Sink::Zstd(
                zstd::stream::write::Encoder::new(
                    BufWriter::with_capacity(WRITE_BUF_BYTES, file),
                    ZSTD_LEVEL,
                )
                .map_err(io_err(part))?,
            )
        } else {
            Sink::Plain(file)
        };
        let mut tar = Tar { sink, path: part };
        tar.file(OCI_LAYOUT_FILE, OCI_LAYOUT_BODY)?;
        tar.file(INDEX_FILE, index)?;
        tar.dir("blobs/")?;
        tar.dir(&format!("{BLOBS_DIR}/"))?;
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        for item in items {
            if item.manifest {
                self.manifest(&mut tar, item)?;
            } else {
                self.blob(&mut tar, item, &mut buf)?;
            }
            self.progress.advance(item.size);
            self.progress.event(&Event::Blob {
                digest: item.digest.to_string(),
                size_bytes: item.size,
                action: BlobAction::Written,
            });
        }
        let file = tar.end()?;
        // Not fsynced (tar and skopeo do not either; on a busy disk it was most of the
        // export's time): a bundle a crash damaged is refused on import, naming the entry.
        Ok(file.metadata().map_err(io_err(part))?.len())
    }

    fn manifest(&self, tar: &mut Tar<'_>, item: &Item) -> Result<(), BundleError> {
        let digest = item.digest.to_string();
        let Some(m) = self.rt.block_on(self.meta.cached_manifest(&digest))? else {
            return Err(vanished(&digest));
        };
        tar.file(&item.digest.path(), &m.body)
    }

    fn blob(&self, tar: &mut Tar<'_>, item: &Item, buf: &mut [u8]) -> Result<(), BundleError> {
        let digest = item.digest.digest();
        let path = item.digest.path();
        tar.header(&path, item.size, false)?;
        let copied = match self.store.local_blob_path(&digest) {
            Some(local) => {
                let mut file = match File::open(&local) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(vanished(&digest.to_string()))
                    }
                    Err(e) => return Err(io_err(&local)(e)),
                };
                tar.sink
                    .copy_file(&mut file, item.size, buf)
                    .map_err(io_err(tar.path))?
            }
            None => self.rt.block_on(async {
                let mut body = match self.store.open(&digest, None).await {
                    Ok(b) => b,
                    Err(crate::storage::StorageError::NotFound { .. }) => {
                        return Err(vanished(&digest.to_string()))
                    }
                    Err(e) => return Err(e.into()),
                };
                let mut n: u64 = 0;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| BundleError::Io {
                        path: format!("stored blob {digest}"),
                        source: e,
                    })?;
                    // Never more than the header announced: the tar would be unreadable.
                    if n + chunk.len() as u64 > item.size {
                        return Ok(item.size + 1);
                    }
                    tar.sink.write_all(&chunk).map_err(io_err(tar.path))?;
                    n += chunk.len() as u64;
                }
                Ok(n)
            })?,
        };
        if copied != item.size {
            return Err(BundleError::Request(format!(
                "stored blob {digest} is not {} bytes as recorded (read {copied}{}); \
                 run `regcache fsck --verify` and export again",
                item.size,
                if copied > item.size { " or more" } else { "" }
            )));
        }
        tar.pad(item.size)
    }
}

fn vanished(digest: &str) -> BundleError {
    BundleError::Request(format!(
        "{digest} was removed from the cache while the export ran (expired or evicted); export again"
    ))
}

/// The tar format, written by hand around `tar::Header` so blob bytes can go through the
/// kernel's file-to-file copy (the `tar` crate's builder copies through a `dyn Write`).
struct Tar<'a> {
    sink: Sink,
    path: &'a Path,
}

impl Tar<'_> {
    fn header(&mut self, name: &str, size: u64, dir: bool) -> Result<(), BundleError> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).map_err(io_err(self.path))?;
        h.set_size(size);
        h.set_mode(if dir { 0o755 } else { 0o644 });
        // Fixed, so the same content gives the same bundle.
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_cksum();
        self.sink.write_all(h.as_bytes()).map_err(io_err(self.path))
    }

    fn pad(&mut self, size: u64) -> Result<(), BundleError> {
        let rem = size % TAR_BLOCK;
        if rem != 0 {
            let zeros = [0u8; TAR_BLOCK as usize];
            self.sink
                .write_all(&zeros[..(TAR_BLOCK - rem) as usize])
                .map_err(io_err(self.path))?;
        }
        Ok(())
    }

    fn file(&mut self, name: &str, body: &[u8]) -> Result<(), BundleError> {
        self.header(name, body.len() as u64, false)?;
        self.sink.write_all(body).map_err(io_err(self.path))?;
        self.pad(body.len() as u64)
    }

    fn dir(&mut self, name: &str) -> Result<(), BundleError> {
        self.header(name, 0, true)
    }

    /// Two zero blocks end a tar archive.
    fn end(mut self) -> Result<File, BundleError> {
        self.sink
            .write_all(&[0u8; 2 * TAR_BLOCK as usize])
            .map_err(io_err(self.path))?;
        self.sink.finish().map_err(io_err(self.path))
    }
}
