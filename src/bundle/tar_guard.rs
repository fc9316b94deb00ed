//! A guard between a bundle's bytes and the `tar` crate. `tar` reads a GNU long-name or
//! long-link entry (`L`, `K`) and a PAX extension entry (`x`) whole into memory, however
//! large its header says it is, so a crafted bundle could make `import` allocate
//! gigabytes before a single entry reaches us. The guard follows the archive's structure
//! as its bytes pass — each header, the data it announces, the next header — with
//! `tar`'s own header and PAX parsing, and fails the read when such an entry is larger
//! than [`EXTENSION_MAX`], naming its type and size; `tar` reports that error as the
//! archive being unreadable after the last good entry. Real extension entries hold a
//! path or a few records: a few hundred bytes.
//!
//! A block whose checksum is wrong is not a header: the guard stops following there
//! (`tar` refuses the archive at the same place), as it does after the end-of-archive
//! block or when a seek lands inside a header. A PAX `size` record changes where the next
//! header is, for the guard as for `tar`.

use std::io::{self, Read, Seek, SeekFrom};

/// The largest GNU long-name, long-link or PAX extension entry read (64 KiB).
pub(super) const EXTENSION_MAX: u64 = 64 * 1024;
const BLOCK: u64 = 512;

pub(super) struct TarGuard<R> {
    inner: R,
    /// Offset of the next byte read from `inner`.
    pos: u64,
    /// Where the next header starts; `None` once the guard has stopped following.
    next_header: Option<u64>,
    /// The bytes of that header read so far.
    header: Vec<u8>,
    /// A PAX entry's data being collected: (where it starts, its size, the bytes).
    pax: Option<(u64, u64, Vec<u8>)>,
    /// The `size` record of the last PAX entry, for the next entry that is not an
    /// extension.
    pax_size: Option<u64>,
}

impl<R> TarGuard<R> {
    pub(super) fn new(inner: R) -> Self {
        TarGuard {
            inner,
            pos: 0,
            next_header: Some(0),
            header: Vec::with_capacity(BLOCK as usize),
            pax: None,
            pax_size: None,
        }
    }

    fn stop(&mut self) {
        self.next_header = None;
        self.pax = None;
    }

    /// Follows the structure through `data`, the bytes at offset `at`.
    fn observe(&mut self, mut at: u64, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if let Some((start, len, buf)) = self.pax.as_mut() {
                let end = *start + *len;
                if at < end {
                    if at != *start + buf.len() as u64 {
                        self.stop();
                        return Ok(());
                    }
                    let take = data.len().min((end - at) as usize);
                    buf.extend_from_slice(&data[..take]);
                    (at, data) = (at + take as u64, &data[take..]);
                    if buf.len() as u64 == *len {
                        self.pax_size = pax_size(buf);
                        self.pax = None;
                    }
                    continue;
                }
            }
            let Some(h) = self.next_header else {
                return Ok(());
            };
            let end = at + data.len() as u64;
            if end <= h {
                return Ok(());
            }
            if at < h {
                let skip = (h - at) as usize;
                (at, data) = (h, &data[skip..]);
                continue;
            }
            if at != h + self.header.len() as u64 {
                self.stop();
                return Ok(());
            }
            let take = data.len().min(BLOCK as usize - self.header.len());
            self.header.extend_from_slice(&data[..take]);
            (at, data) = (at + take as u64, &data[take..]);
            if self.header.len() == BLOCK as usize {
                self.parse_header(h)?;
                self.header.clear();
            }
        }
        Ok(())
    }

    /// The header at offset `h` is complete in `self.header`.
    fn parse_header(&mut self, h: u64) -> io::Result<()> {
        let bytes = &self.header[..];
        let header = tar::Header::from_byte_slice(bytes);
        // The end of the archive (an all-zero block), or not a header at all.
        let sum = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 8 * 32;
        if bytes.iter().all(|b| *b == 0) || header.cksum().ok() != Some(sum) {
            self.stop();
            return Ok(());
        }
        let kind = header.entry_type();
        let read_whole = kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions();
        let extension = read_whole || kind.is_pax_global_extensions();
        let Ok(mut size) = header.entry_size() else {
            self.stop();
            return Ok(());
        };
        if !extension {
            if let Some(pax) = self.pax_size.take() {
                size = pax;
            }
        }
        if read_whole && size > EXTENSION_MAX {
            let what = if kind.is_pax_local_extensions() {
                "PAX extension"
            } else {
                "GNU long name"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a {what} entry of {size} bytes (at most {EXTENSION_MAX} are read: they hold a path or a few records)"
                ),
            ));
        }
        let data = h + BLOCK;
        if kind.is_pax_local_extensions() {
            self.pax = Some((data, size, Vec::with_capacity(size as usize)));
            self.pax_size = None;
            if size == 0 {
                self.pax = None;
            }
        }
        self.next_header = size
            .checked_add(BLOCK - 1)
            .and_then(|s| data.checked_add(s & !(BLOCK - 1)));
        Ok(())
    }
}

/// The `size` record of a PAX extension entry's data, as `tar` reads it.
fn pax_size(data: &[u8]) -> Option<u64> {
    tar::PaxExtensions::new(data)
        .filter_map(Result::ok)
        .filter(|e| e.key() == Ok("size"))
        .filter_map(|e| e.value().ok()?.parse().ok())
        .last()
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let at = self.pos;
        self.pos += n as u64;
        self.observe(at, &buf[..n])?;
        Ok(n)
    }
}

impl<R: Seek> Seek for TarGuard<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Every entry's path and bytes, read by `tar` through the guard.
    fn read_through_guard(archive: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut a = tar::Archive::new(TarGuard::new(Cursor::new(archive)));
        for e in a.entries_with_seek()? {
            let mut e = e?;
            let path = e.path()?.to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes)?;
            out.push((path, bytes));
        }
        Ok(out)
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, bytes).unwrap();
    }

    #[test]
    fn ordinary_archives_read_as_without_it() {
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, "oci-layout", b"{}");
        // A GNU long name (`L` entry) of 300 bytes, and a PAX path.
        let long = format!("blobs/{}/x", "d".repeat(290));
        file(&mut b, &long, &[7; 3000]);
        b.append_pax_extensions([("path", b"blobs/pax-named".as_slice())])
            .unwrap();
        file(&mut b, "ignored-name", b"pax");
        let archive = b.into_inner().unwrap();
        let got = read_through_guard(&archive).unwrap();
        let plain: Vec<_> = {
            let mut a = tar::Archive::new(Cursor::new(&archive));
            a.entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let mut v = Vec::new();
                    e.read_to_end(&mut v).unwrap();
                    (e.path().unwrap().to_string_lossy().into_owned(), v)
                })
                .collect()
        };
        assert_eq!(got, plain);
        assert_eq!(got[1].0, long);
        assert_eq!(got[2], ("blobs/pax-named".to_owned(), b"pax".to_vec()));
    }

    #[test]
    fn a_pax_size_record_moves_the_next_header() {
        // What Go's archive/tar writes for entries too large for the header's field: the
        // size in a PAX record and 0 in the header. Here 600 bytes, so that the guard has
        // to skip two blocks of data to find the next header, which is a long name.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", b"600".as_slice())]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("big").unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        let mut archive = b.into_inner().unwrap();
        // Without the end-of-archive blocks the builder wrote.
        archive.truncate(archive.len() - 1024);
        archive.extend_from_slice(h.as_bytes());
        archive.extend_from_slice(&[1; 600]);
        archive.resize(archive.len() + 424, 0);
        let mut rest = tar::Builder::new(Vec::new());
        file(&mut rest, &format!("{}/after", "n".repeat(200)), b"after");
        let mut good = archive.clone();
        good.extend_from_slice(&rest.into_inner().unwrap());
        let got = read_through_guard(&good).unwrap();
        assert_eq!(got[0], ("big".to_owned(), vec![1; 600]));
        assert!(got[1].0.ends_with("/after") && got[1].1 == b"after");
        // Followed by a huge long name: found only by a guard that skipped the 600 bytes
        // (one that took the header's 0 would read data as headers and stop following).
        let mut rest = tar::Builder::new(Vec::new());
        file(&mut rest, &format!("{}/after", "n/".repeat(40_000)), b"after");
        let mut bad = archive;
        bad.extend_from_slice(&rest.into_inner().unwrap());
        let err = read_through_guard(&bad).unwrap_err();
        assert!(err.to_string().contains("GNU long name entry"), "{err}");
    }

    #[test]
    fn a_huge_long_name_or_pax_entry_is_refused_before_it_is_read() {
        let long = format!("{}/x", "a/".repeat(40_000));
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, "oci-layout", b"{}");
        file(&mut b, &long, b"data");
        let err = read_through_guard(&b.into_inner().unwrap()).unwrap_err();
        let said = format!("GNU long name entry of {} bytes", long.len() + 1);
        assert!(err.to_string().contains(&said), "{err}");

        let mut b = tar::Builder::new(Vec::new());
        let value = vec![b'v'; 100_000];
        b.append_pax_extensions([("comment", value.as_slice())]).unwrap();
        file(&mut b, "x", b"data");
        let err = read_through_guard(&b.into_inner().unwrap()).unwrap_err();
        assert!(err.to_string().contains("PAX extension entry of"), "{err}");
    }
}
