//! One blob of a bundle into a work file, hashed on the way, then committed (I1, I2): from
//! a regular file the kernel copies it (`copy_file_range`, no copy through this process)
//! while the part already copied is hashed; from a stream it is read and hashed on one
//! thread and written on another. What is hashed is always the work file's content or
//! the very bytes written to it, so what is verified is exactly what gets committed.
//! Knows nothing of tar entries, names or images.

use super::layout::RawDigest;
use super::source::Origin;
use super::BundleError;
use crate::metadata::{now_secs, Metadata};
use crate::oci::{Digest, Sha256Writer};
use crate::storage::BlobStore;
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Bytes read, hashed and written per step when streaming a blob to its work file.
const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks in flight between the reading thread and the writing one: enough that neither
/// waits for the other; 3 MiB of memory.
const BUFFERS: usize = 3;
/// Bytes copied per step from a file to a work file; after each, the copied part is hashed
/// on the other thread.
const COPY_STEP_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes of a work file mapped at once to hash it: large enough that mapping costs
/// nothing per byte, small enough that the mapped pages (which count in RSS) stay few.
const HASH_WINDOW_BYTES: u64 = 8 * 1024 * 1024;

/// Why a blob did not make it into its work file.
#[derive(Debug)]
pub(super) enum IntakeError {
    /// The source ended after `got` bytes.
    Truncated {
        got: u64,
    },
    Read(std::io::Error),
    /// Writing (or hashing) the work file.
    Write(std::io::Error),
    Thread,
}

/// Streams `size` bytes of `r` into the new file `tmp` and returns their digest. Reading
/// and hashing (this thread) overlap writing (a second one), so a blob goes in at about the
/// speed of the slower of the two rather than their sum. `pool` keeps the chunk buffers
/// from blob to blob; `progress` is called after each chunk.
pub(super) fn stream_into(
    r: &mut dyn Read,
    size: u64,
    tmp: &Path,
    pool: &mut Vec<Vec<u8>>,
    progress: &mut dyn FnMut(),
) -> Result<Digest, IntakeError> {
    let file = std::fs::File::create_new(tmp).map_err(IntakeError::Write)?;
    let mut hasher = Sha256Writer::default();
    let mut got: u64 = 0;
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
                Ok(0) => break Err(IntakeError::Truncated { got }),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    pool.push(buf);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break Err(IntakeError::Truncated { got })
                }
                Err(e) => break Err(IntakeError::Read(e)),
            };
            buf.truncate(n);
            hasher.update(&buf);
            got += n as u64;
            if full_tx.send(buf).is_err() {
                break Ok(()); // the writer stopped on an error, reported below
            }
            progress();
        };
        drop(full_tx);
        (read, writer.join())
    });
    pool.extend(empty_rx.try_iter());
    read?;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(IntakeError::Write(e)),
        Err(_) => return Err(IntakeError::Thread),
    }
    if got != size {
        return Err(IntakeError::Truncated { got });
    }
    Ok(hasher.finish())
}

/// Copies `size` bytes at `origin` into the new file `tmp` by the kernel, on a second
/// thread, while this one hashes what has been copied so far; returns their digest.
/// Hashing `tmp`, this process's own file, keeps what is verified exactly what gets
/// committed whatever happens to the source meanwhile. `progress` gets the bytes hashed.
pub(super) fn copy_into(
    origin: Origin<'_>,
    size: u64,
    tmp: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Digest, IntakeError> {
    let mut src = std::fs::File::open(origin.file).map_err(IntakeError::Read)?;
    src.seek(std::io::SeekFrom::Start(origin.offset))
        .map_err(IntakeError::Read)?;
    let mut dst = std::fs::File::create_new(tmp).map_err(IntakeError::Write)?;
    let reader = dst.try_clone().map_err(IntakeError::Write)?;
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
                // Steps and windows are multiples of each other: every window starts on
                // a page boundary, as a mapping must.
                let len = (copied - hashed).min(HASH_WINDOW_BYTES);
                if let Err(e) = hash_window(&reader, hashed, len, &mut hasher) {
                    return (copier.join(), Err(e));
                }
                hashed += len;
                progress(len);
            }
        }
        (copier.join(), Ok((hasher, hashed)))
    });
    let copied = match copied {
        Ok(r) => r.map_err(IntakeError::Write)?,
        Err(_) => return Err(IntakeError::Thread),
    };
    let (hasher, hashed) = hashed.map_err(IntakeError::Write)?;
    if copied != size || hashed != size {
        return Err(IntakeError::Truncated { got: copied });
    }
    Ok(hasher.finish())
}

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
            if let Err(e) = meta.record_upload(intent, u.key.clone(), u.id.clone()).await {
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
