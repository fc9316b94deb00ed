//! The small digest-list file every export writes next to its bundle (`BUNDLE.digests`):
//! every digest a site holds once it has imported the bundle and the bundles it is a
//! delta of. `--since` reads one (or an earlier bundle itself) to leave those digests out.

use super::layout::{entry_kind, EntryKind, RawDigest};
use super::source::{self, Counter};
use super::{io_err, BundleError};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The first line of a digest list; how `--since` tells one from a bundle.
const HEADER: &str = "# regcache bundle digests v1";
/// Lines of a digest list read at most: ten million digests is a cache far beyond any
/// this was built for, and bounds what a wrong file can make `--since` hold in memory.
const LINES_MAX: usize = 10_000_000;

/// `BUNDLE.digests`, next to the bundle.
pub fn digest_list_path(bundle: &Path) -> PathBuf {
    let mut name = bundle.file_name().unwrap_or_default().to_os_string();
    name.push(".digests");
    bundle.with_file_name(name)
}

/// What `--since PREVIOUS` leaves out: the digests of a digest list, or the blobs an
/// earlier bundle carried (read through once).
pub(super) fn read_since(path: &Path) -> Result<HashSet<RawDigest>, BundleError> {
    if path.is_file() {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let mut first = String::new();
        // A bundle's first bytes are not a line of text; read a bounded prefix only.
        (&mut reader)
            .take(HEADER.len() as u64 + 1)
            .read_line(&mut first)
            .ok();
        if first.trim_end() == HEADER {
            return read_list(path, reader);
        }
    }
    let mut found = HashSet::new();
    source::for_each_entry(path, &Counter::default(), &mut |e| {
        if let Ok(EntryKind::Blob(d)) = entry_kind(e.path, e.is_dir) {
            found.insert(d);
        }
        Ok(())
    })
    .map_err(|e| BundleError::Request(format!("--since {}: {e}", path.display())))?;
    Ok(found)
}

fn read_list(path: &Path, reader: impl BufRead) -> Result<HashSet<RawDigest>, BundleError> {
    let mut out = HashSet::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if i >= LINES_MAX {
            return Err(BundleError::Request(format!(
                "--since {}: more than {LINES_MAX} lines",
                path.display()
            )));
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let digest = line
            .strip_prefix("sha256:")
            .and_then(RawDigest::from_hex)
            .ok_or_else(|| {
                BundleError::Request(format!(
                    "--since {}: line {}: {line:?} is not a sha256 digest",
                    path.display(),
                    i + 2
                ))
            })?;
        out.insert(digest);
    }
    Ok(out)
}

/// Writes the digest list of `bundle` (sorted, so two exports of the same content give
/// the same file), replacing any earlier one atomically.
pub(super) fn write_list(
    path: &Path,
    bundle: &Path,
    delta_of: Option<&Path>,
    digests: impl Iterator<Item = RawDigest>,
) -> Result<(), BundleError> {
    let mut all: Vec<RawDigest> = digests.collect();
    all.sort_unstable();
    all.dedup();
    let part = path.with_extension("digests.part");
    let file = std::fs::File::create(&part).map_err(io_err(&part))?;
    let mut w = std::io::BufWriter::new(file);
    let mut body = format!(
        "{HEADER}\n# bundle: {}\n",
        bundle.file_name().unwrap_or_default().to_string_lossy()
    );
    if let Some(p) = delta_of {
        body.push_str(&format!(
            "# delta of: {} (this list includes its digests)\n",
            p.display()
        ));
    }
    w.write_all(body.as_bytes()).map_err(io_err(&part))?;
    for d in all {
        writeln!(w, "{d}").map_err(io_err(&part))?;
    }
    let file = w.into_inner().map_err(|e| io_err(&part)(e.into_error()))?;
    file.sync_all().map_err(io_err(&part))?;
    std::fs::rename(&part, path).map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("weekly.tar.zst");
        let path = digest_list_path(&bundle);
        assert_eq!(path.file_name().unwrap(), "weekly.tar.zst.digests");
        let a = RawDigest([1; 32]);
        let b = RawDigest([2; 32]);
        write_list(&path, &bundle, Some(Path::new("full.tar")), [b, a, b].into_iter()).unwrap();
        let read = read_since(&path).unwrap();
        assert_eq!(read, HashSet::from([a, b]));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(HEADER) && text.contains("delta of: full.tar"),
            "{text}"
        );

        std::fs::write(&path, format!("{HEADER}\nsha256:{}\nnope\n", a.hex())).unwrap();
        let e = read_since(&path).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("nope"), "{e}");
    }
}
