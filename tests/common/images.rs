//! Deterministic test images built in memory: OCI and Docker manifests, configs, layers and
//! indexes, plus writing them as an OCI image layout so `skopeo copy oci:DIR:TAG ...` can
//! seed a real registry. Nothing here touches the network or regcache itself.
//!
//! Determinism: the same arguments always give the same bytes and therefore the same
//! digests. Layer bytes depend only on the seed, the layer's position and its size (not on
//! `created`), so two images built from one seed share their layers — handy for tests of
//! shared blobs and deduplication.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The annotation that names a tag in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// An `Accept` header value that admits every manifest type these helpers produce.
pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The `created` time used where a caller gives none (indexes' children).
pub const DEFAULT_CREATED: &str = "2024-01-01T00:00:00Z";

/// `"sha256:<hex>"` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One piece of content addressed by its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// `"sha256:<hex>"`.
    pub digest: String,
    pub bytes: Bytes,
    pub media_type: String,
}

impl Blob {
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        Blob {
            digest: sha256_digest(&bytes),
            bytes,
            media_type: media_type.to_owned(),
        }
    }

    /// A blob of `len` pseudo-random bytes derived from `seed` (not a tar; for tests that
    /// only move bytes around).
    pub fn random(seed: &str, len: usize) -> Blob {
        Blob::new("application/octet-stream", pseudo_random(seed_u64(seed), len))
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The hex part of the digest (the file name under `blobs/sha256/`).
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    /// `{mediaType, digest, size}` as used inside manifests.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// Which family of media types an image or index uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Oci,
    /// Docker image manifest v2 schema 2; layers are gzip streams (stored, uncompressed
    /// deflate blocks, so still quick) of a tar.
    Docker,
}

/// A single-platform image: manifest, config and layers.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest; `media_type` is the manifest's media type.
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// The platform architecture recorded in the config (`amd64` unless built for another).
    pub architecture: String,
}

impl Image {
    /// An OCI image for linux/amd64. Each layer is a valid uncompressed tar
    /// (`application/vnd.oci.image.layer.v1.tar`) holding one file of exactly `size`
    /// pseudo-random bytes, so the layer blob is `size` rounded up to 512 plus 1536 bytes of
    /// tar framing. Generation is fast enough for layers of 64 MiB.
    pub fn new(seed: &str, layer_sizes: &[usize], created: &str) -> Image {
        Image::build(seed, layer_sizes, created, "amd64", Flavor::Oci)
    }

    /// The same image with Docker v2 schema 2 media types (gzip layers).
    pub fn docker(seed: &str, layer_sizes: &[usize], created: &str) -> Image {
        Image::build(seed, layer_sizes, created, "amd64", Flavor::Docker)
    }

    /// The general constructor: any architecture (`amd64`, `arm64`, `arm`, …), any flavor.
    pub fn build(
        seed: &str,
        layer_sizes: &[usize],
        created: &str,
        architecture: &str,
        flavor: Flavor,
    ) -> Image {
        let mut layers = Vec::with_capacity(layer_sizes.len());
        let mut diff_ids = Vec::with_capacity(layer_sizes.len());
        for (i, &size) in layer_sizes.iter().enumerate() {
            let data = pseudo_random(seed_u64(&format!("{seed}/layer/{i}")), size);
            let tar = tar_one_file(&format!("layer-{i}.bin"), &data);
            diff_ids.push(sha256_digest(&tar));
            layers.push(match flavor {
                Flavor::Oci => Blob::new(OCI_LAYER_TAR, tar),
                Flavor::Docker => Blob::new(DOCKER_LAYER_GZIP, gzip_stored(&tar)),
            });
        }
        let (manifest_type, config_type) = match flavor {
            Flavor::Oci => (OCI_MANIFEST, OCI_CONFIG),
            Flavor::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG),
        };
        let mut config = json!({
            "created": created,
            "architecture": architecture,
            "os": "linux",
            "config": { "Labels": { "org.regcache.test.seed": seed } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": layer_sizes.iter().map(|size| json!({
                "created": created,
                "created_by": format!("regcache test layer of {size} bytes"),
            })).collect::<Vec<_>>(),
        });
        if let Some(variant) = default_variant(architecture) {
            config["variant"] = json!(variant);
        }
        let config = Blob::new(config_type, to_json(&config));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        Image {
            manifest: Blob::new(manifest_type, to_json(&manifest)),
            config,
            layers,
            architecture: architecture.to_owned(),
        }
    }

    /// An OCI artifact whose `subject` is `subject` (a manifest blob), for referrers tests.
    /// It has the empty config (`application/vnd.oci.empty.v1+json`, `{}`) and one small
    /// `text/plain` layer derived from `seed`.
    pub fn artifact(seed: &str, subject: &Blob, artifact_type: &str) -> Image {
        let config = Blob::new(OCI_EMPTY, &b"{}"[..]);
        let layer = Blob::new("text/plain", format!("regcache test artifact {seed}\n"));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": config.descriptor(),
            "layers": [layer.descriptor()],
            "subject": subject.descriptor(),
            "annotations": { "org.opencontainers.image.created": DEFAULT_CREATED },
        });
        Image {
            manifest: Blob::new(OCI_MANIFEST, to_json(&manifest)),
            config,
            layers: vec![layer],
            architecture: String::new(),
        }
    }

    /// Config and layers (every blob the manifest references).
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }

    /// Manifest, config and layers sizes summed.
    pub fn total_size(&self) -> usize {
        self.manifest.len() + self.blobs().map(Blob::len).sum::<usize>()
    }

    /// Writes this image into the OCI image layout at `dir` (created if needed) under `tag`.
    /// Several images or indexes can share one layout under different tags; writing a tag
    /// again replaces it.
    ///
    /// Panics for Docker-flavored images: skopeo 1.9's `oci:` transport only looks at
    /// `index.json` entries typed as OCI manifest or index ("no descriptor found for
    /// reference"); use `write_skopeo_dir` for those.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) {
        assert_oci(&self.manifest);
        let blobs: Vec<&Blob> = std::iter::once(&self.manifest).chain(self.blobs()).collect();
        write_layout(dir, tag, &self.manifest, &blobs);
    }

    /// Writes this image in skopeo's `dir:` transport format (`skopeo copy dir:DIR …`),
    /// which carries any manifest type, Docker included. One image per directory.
    pub fn write_skopeo_dir(&self, dir: &Path) {
        write_skopeo_dir(dir, &self.manifest, &[], self.blobs());
    }
}

/// A multi-platform index (OCI image index or Docker manifest list) with its images.
#[derive(Clone, Debug)]
pub struct Index {
    pub manifest: Blob,
    /// `(architecture, image)` in the order listed in the index.
    pub images: Vec<(String, Image)>,
}

impl Index {
    /// An OCI index with one small two-layer linux image per architecture, each child
    /// seeded with `"{seed}/{arch}"`.
    pub fn new(seed: &str, architectures: &[&str]) -> Index {
        Index::build(seed, architectures, Flavor::Oci)
    }

    /// The same as a Docker manifest list of Docker schema 2 images.
    pub fn docker(seed: &str, architectures: &[&str]) -> Index {
        Index::build(seed, architectures, Flavor::Docker)
    }

    fn build(seed: &str, architectures: &[&str], flavor: Flavor) -> Index {
        let images = architectures
            .iter()
            .map(|arch| {
                let image = Image::build(
                    &format!("{seed}/{arch}"),
                    &[2048, 1024],
                    DEFAULT_CREATED,
                    arch,
                    flavor,
                );
                (arch.to_string(), image)
            })
            .collect();
        Index::from_images(flavor, images)
    }

    /// An index over the given images; the platform of each entry is linux/`architecture`.
    pub fn from_images(flavor: Flavor, images: Vec<(String, Image)>) -> Index {
        let media_type = match flavor {
            Flavor::Oci => OCI_INDEX,
            Flavor::Docker => DOCKER_MANIFEST_LIST,
        };
        let manifests: Vec<Value> = images
            .iter()
            .map(|(arch, image)| {
                let mut platform = json!({ "architecture": arch, "os": "linux" });
                if let Some(variant) = default_variant(arch) {
                    platform["variant"] = json!(variant);
                }
                let mut descriptor = image.manifest.descriptor();
                descriptor["platform"] = platform;
                descriptor
            })
            .collect();
        let body = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        });
        Index {
            manifest: Blob::new(media_type, to_json(&body)),
            images,
        }
    }

    /// The child image for `architecture`, if listed.
    pub fn image(&self, architecture: &str) -> Option<&Image> {
        self.images
            .iter()
            .find(|(arch, _)| arch == architecture)
            .map(|(_, image)| image)
    }

    /// Every blob below the index: child manifests, configs and layers (not the index).
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.images
            .iter()
            .flat_map(|(_, image)| std::iter::once(&image.manifest).chain(image.blobs()))
    }

    /// Writes the index and everything below it into the OCI layout at `dir` under `tag`;
    /// `index.json` points at the index, so `skopeo copy --all oci:DIR:TAG …` copies every
    /// platform (without `--all` skopeo picks the host's platform only).
    /// Like `Image::write_oci_layout`, OCI indexes only.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) {
        assert_oci(&self.manifest);
        let blobs: Vec<&Blob> = std::iter::once(&self.manifest).chain(self.blobs()).collect();
        write_layout(dir, tag, &self.manifest, &blobs);
    }

    /// Writes the index (as `manifest.json`), each child manifest (as
    /// `<hex>.manifest.json`) and all blobs in skopeo's `dir:` format; copy it with
    /// `skopeo copy --all dir:DIR …`. Works for Docker manifest lists too.
    pub fn write_skopeo_dir(&self, dir: &Path) {
        let children: Vec<&Blob> = self.images.iter().map(|(_, i)| &i.manifest).collect();
        let blobs = self.images.iter().flat_map(|(_, image)| image.blobs());
        write_skopeo_dir(dir, &self.manifest, &children, blobs);
    }
}

fn assert_oci(manifest: &Blob) {
    assert!(
        manifest.media_type == OCI_MANIFEST || manifest.media_type == OCI_INDEX,
        "skopeo cannot read {} from an OCI layout; use write_skopeo_dir",
        manifest.media_type
    );
}

/// skopeo's `dir:` transport, version 1.1 as skopeo 1.9.3 writes it: a `version` file,
/// `manifest.json` (the top manifest), `<hex>.manifest.json` per child of an index, and
/// every blob as a file named by its bare hex digest.
fn write_skopeo_dir<'a>(dir: &Path, top: &Blob, children: &[&Blob], blobs: impl Iterator<Item = &'a Blob>) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    write_file(&dir.join("version"), b"Directory Transport Version: 1.1\n");
    write_file(&dir.join("manifest.json"), &top.bytes);
    for child in children {
        write_file(&dir.join(format!("{}.manifest.json", child.hex())), &child.bytes);
    }
    for blob in blobs {
        write_file(&dir.join(blob.hex()), &blob.bytes);
    }
}

/// Writes an OCI image layout: `oci-layout`, `blobs/sha256/<hex>` for each blob and an
/// `index.json` whose entry for `tag` carries the `org.opencontainers.image.ref.name`
/// annotation — that annotation is how skopeo's `oci:DIR:TAG` finds the image (an entry
/// without it can only be selected when it is the only one, as `oci:DIR`).
fn write_layout(dir: &Path, tag: &str, top: &Blob, blobs: &[&Blob]) {
    let blob_dir = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir)
        .unwrap_or_else(|e| panic!("creating OCI layout dir {}: {e}", blob_dir.display()));
    write_file(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
    for blob in blobs {
        let path = blob_dir.join(blob.hex());
        if !path.exists() {
            write_file(&path, &blob.bytes);
        }
    }
    let index_path = dir.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&index_path) {
        Ok(existing) => {
            let index: Value = serde_json::from_slice(&existing)
                .unwrap_or_else(|e| panic!("parsing {}: {e}", index_path.display()));
            index["manifests"].as_array().cloned().unwrap_or_default()
        }
        Err(_) => Vec::new(),
    };
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION] != json!(tag));
    let mut descriptor = top.descriptor();
    descriptor["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
    manifests.push(descriptor);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    write_file(&index_path, &to_json(&index));
}

fn write_file(path: &Path, data: &[u8]) {
    let mut file = fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.write_all(data)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn to_json(value: &Value) -> Vec<u8> {
    // serde_json's map is ordered by key (no preserve_order feature), so output is stable.
    serde_json::to_vec(value).expect("serialising test JSON cannot fail")
}

fn default_variant(architecture: &str) -> Option<&'static str> {
    match architecture {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

/// FNV-1a of the seed, never zero (xorshift's only fixed point).
fn seed_u64(seed: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash | 1
}

/// `len` bytes of xorshift64* output: about 0.1 s for 64 MiB even in a debug build.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = vec![0u8; len];
    let mut chunks = out.chunks_exact_mut(8);
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    };
    for chunk in &mut chunks {
        chunk.copy_from_slice(&next());
    }
    let rest = chunks.into_remainder();
    let last = next();
    rest.copy_from_slice(&last[..rest.len()]);
    out
}

/// A POSIX ustar archive with one regular file: header, data padded to 512, two zero
/// blocks. Fixed mtime/owner so the bytes are deterministic.
fn tar_one_file(name: &str, data: &[u8]) -> Vec<u8> {
    assert!(name.len() < 100, "tar name too long: {name}");
    let padded = data.len().div_ceil(512) * 512;
    let mut tar = Vec::with_capacity(512 + padded + 1024);
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(format!("{:011o}\0", 1_704_067_200u64).as_bytes());
    header[148..156].copy_from_slice(b"        ");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
    tar.extend_from_slice(&header);
    tar.extend_from_slice(data);
    tar.resize(512 + padded + 1024, 0);
    tar
}

/// A valid gzip member whose deflate stream uses stored (uncompressed) blocks: no
/// compression library needed, and every decoder accepts it.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 65_535;
    let blocks = data.len().div_ceil(BLOCK).max(1);
    let mut out = Vec::with_capacity(data.len() + blocks * 5 + 18);
    // Magic, CM=deflate, no flags, mtime 0, XFL 0, OS=unix.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]);
    let mut chunks = data.chunks(BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let len = chunk.len() as u16;
        out.push(u8::from(last)); // BFINAL bit, BTYPE=00 (stored).
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (n, entry) in table.iter_mut().enumerate() {
        let mut c = n as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *entry = c;
    }
    let mut crc = !0u32;
    for &byte in data {
        crc = table[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Every blob the pulled OCI layout holds hashes to its name, and `expected` are there.
pub fn assert_layout_has(dir: &Path, expected: &[&str]) {
    for digest in expected {
        let hex = digest.trim_start_matches("sha256:");
        let path = dir.join("blobs/sha256").join(hex);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(sha256_digest(&bytes), *digest, "{} is intact", path.display());
    }
}
