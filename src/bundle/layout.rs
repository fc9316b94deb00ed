//! The OCI image layout as bundles carry it: entry paths (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), `index.json` and the annotations that name an image, full image
//! names (`HOST/REPO:TAG`, `HOST/REPO@DIGEST`), and the platforms listed in an index.
//! Pure: no I/O.

use crate::oci::{Digest, RepoName, Tag};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The file naming the layout version.
pub(crate) const OCI_LAYOUT_FILE: &str = "oci-layout";
pub(crate) const OCI_LAYOUT_BODY: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
pub(crate) const INDEX_FILE: &str = "index.json";
/// Where blobs live in a layout.
pub(crate) const BLOBS_DIR: &str = "blobs/sha256";
/// The full image name as skopeo's `oci-archive:BUNDLE:REF` matches it.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The full image name as containerd's importer names the image it creates.
pub(crate) const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// On a delta bundle's `index.json`: the bundle it leaves out the blobs of, so an import
/// missing them can say what to import first.
pub(crate) const DELTA_OF: &str = "io.regcache.bundle.delta-of";
/// `index.json` is read into memory; larger than this is not an index of images.
pub(crate) const INDEX_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// A sha256 digest as its 32 raw bytes: sets of a bundle's digests (hundreds of thousands
/// for a large cache) take a third of the memory of strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RawDigest(pub(crate) [u8; 32]);

impl RawDigest {
    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        let mut raw = [0u8; 32];
        // Lowercase only, as digests are written (`Digest` refuses uppercase too).
        if hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        hex::decode_to_slice(hex, &mut raw).ok().map(|()| Self(raw))
    }

    pub(crate) fn of(d: &Digest) -> Self {
        // A `Digest` holds 64 validated lowercase hex characters.
        Self::from_hex(d.hex()).unwrap_or(Self([0; 32]))
    }

    pub(crate) fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn digest(&self) -> Digest {
        // 64 lowercase hex characters always parse.
        format!("sha256:{}", self.hex())
            .parse()
            .unwrap_or_else(|_| Digest::of(b""))
    }

    /// `blobs/sha256/<hex>`.
    pub(crate) fn path(&self) -> String {
        format!("{BLOBS_DIR}/{}", self.hex())
    }
}

impl fmt::Display for RawDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// What an entry of a bundle is, by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntryKind {
    OciLayout,
    Index,
    Blob(RawDigest),
    /// A directory, or a file a layout may carry that regcache does not need.
    Ignored,
}

/// Classifies an entry path (`./` and `/` prefixes, as `tar` writes them, are ignored).
/// Err names what is wrong with a path under `blobs/`.
pub(crate) fn entry_kind(path: &str, is_dir: bool) -> Result<EntryKind, String> {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    let p = p.strip_suffix('/').unwrap_or(p);
    if is_dir || p.is_empty() || p == "." {
        return Ok(EntryKind::Ignored);
    }
    match p {
        OCI_LAYOUT_FILE => return Ok(EntryKind::OciLayout),
        INDEX_FILE => return Ok(EntryKind::Index),
        _ => {}
    }
    let Some(rest) = p.strip_prefix("blobs/") else {
        return Ok(EntryKind::Ignored);
    };
    let Some((algorithm, encoded)) = rest.split_once('/') else {
        return Err("is not blobs/<algorithm>/<hex>".into());
    };
    if algorithm != "sha256" {
        return Err(format!(
            "uses digest algorithm {algorithm:?}; only sha256 is supported"
        ));
    }
    RawDigest::from_hex(encoded)
        .map(EntryKind::Blob)
        .ok_or_else(|| format!("{encoded:?} is not 64 lowercase hex characters"))
}

/// A descriptor as `index.json` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<serde_json::Value>,
}

/// `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LayoutIndex {
    pub(crate) schema_version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) media_type: String,
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// What a full image name selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pointer {
    Tag(Tag),
    Digest(Digest),
}

/// A full image name: `HOST/REPO:TAG` or `HOST/REPO@DIGEST` (a host is optional when
/// read: docker's rule decides whether the first component is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageName {
    pub(crate) host: Option<String>,
    pub(crate) repo: RepoName,
    pub(crate) pointer: Pointer,
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        match &self.pointer {
            Pointer::Tag(t) => write!(f, "{}:{t}", self.repo),
            Pointer::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

impl ImageName {
    /// Parses a name as `index.json` annotations carry it. `upstream_names` count as
    /// hosts too (the routing rule matches names as well as hosts). With both a tag and a
    /// digest (`…:TAG@DIGEST`) the tag is kept; the descriptor gives the digest.
    pub(crate) fn parse(s: &str, upstream_names: &[&str]) -> Result<Self, String> {
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d)),
            None => (s, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest[last_slash.unwrap_or(0)..].find(':') {
            Some(colon) => {
                let at = last_slash.unwrap_or(0) + colon;
                (&rest[..at], Some(&rest[at + 1..]))
            }
            None => (rest, None),
        };
        let (host, repo) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || upstream_names.contains(&first) =>
            {
                (Some(first.to_ascii_lowercase()), rest)
            }
            _ => (None, name),
        };
        if !name.contains('/') && host.is_none() && tag.is_none() && digest.is_none() {
            return Err(format!(
                "{s:?} is not a full image name (HOST/REPO:TAG or HOST/REPO@DIGEST)"
            ));
        }
        let repo: RepoName = repo.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let pointer = match (tag, digest) {
            (Some(t), _) => Pointer::Tag(t.parse().map_err(|e| format!("{s:?}: {e}"))?),
            (None, Some(d)) => Pointer::Digest(d.parse().map_err(|e| format!("{s:?}: {e}"))?),
            (None, None) => {
                return Err(format!(
                    "{s:?} names no tag or digest (HOST/REPO:TAG or HOST/REPO@DIGEST)"
                ))
            }
        };
        Ok(Self { host, repo, pointer })
    }
}

/// The name an `index.json` descriptor gives its image: containerd's annotation first
/// (what `ctr images import` uses), then the OCI one (what skopeo matches).
pub(crate) fn descriptor_name(d: &Descriptor) -> Option<&str> {
    d.annotations
        .get(CONTAINERD_NAME)
        .or_else(|| d.annotations.get(REF_NAME))
        .map(String::as_str)
        .filter(|n| !n.is_empty())
}

/// A platform as an index lists it: `os`, `architecture`, `variant`.
pub(crate) type ChildPlatform = (String, String, Option<String>);

/// An index's children (digest, platform), in order.
pub(crate) fn index_children(body: &[u8]) -> Vec<(String, Option<ChildPlatform>)> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        manifests: Vec<RawChild>,
    }
    #[derive(Deserialize)]
    struct RawChild {
        digest: String,
        platform: Option<RawPlatform>,
    }
    #[derive(Deserialize)]
    struct RawPlatform {
        os: String,
        architecture: String,
        variant: Option<String>,
    }
    serde_json::from_slice::<Raw>(body)
        .map(|r| {
            r.manifests
                .into_iter()
                .map(|c| (c.digest, c.platform.map(|p| (p.os, p.architecture, p.variant))))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a small blob is a manifest (an image manifest, an index, or an artifact with a
/// config), rather than an image config or a layer that happens to be JSON.
pub(crate) fn looks_like_manifest(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        config: Option<serde_json::Value>,
        manifests: Option<serde_json::Value>,
    }
    if body.first().is_none_or(|b| *b != b'{') {
        return false;
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(p) => {
            p.schema_version == Some(2)
                && (p.manifests.is_some()
                    || p.config.is_some()
                    || p.media_type.is_some_and(|m| m.contains("manifest")))
        }
        Err(_) => false,
    }
}

/// The descriptor a referrers answer lists for a manifest with a subject: media type,
/// digest, size, `artifactType` (or the config's media type) and annotations.
pub(crate) fn referrer_descriptor(digest: &str, media_type: &str, body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let artifact_type = v["artifactType"]
        .as_str()
        .or_else(|| v["config"]["mediaType"].as_str())
        .unwrap_or_default();
    let mut d = serde_json::json!({
        "mediaType": media_type,
        "digest": digest,
        "size": body.len(),
    });
    if !artifact_type.is_empty() {
        d["artifactType"] = artifact_type.into();
    }
    if v["annotations"].is_object() {
        d["annotations"] = v["annotations"].clone();
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        let hex = "ab".repeat(32);
        assert_eq!(entry_kind("oci-layout", false), Ok(EntryKind::OciLayout));
        assert_eq!(entry_kind("./index.json", false), Ok(EntryKind::Index));
        assert_eq!(entry_kind("blobs/", true), Ok(EntryKind::Ignored));
        assert_eq!(entry_kind("./", true), Ok(EntryKind::Ignored));
        assert!(matches!(
            entry_kind(&format!("./blobs/sha256/{hex}"), false),
            Ok(EntryKind::Blob(_))
        ));
        assert!(entry_kind("blobs/sha512/00", false)
            .unwrap_err()
            .contains("sha512"));
        assert!(entry_kind("blobs/sha256/XY", false).unwrap_err().contains("hex"));
        assert!(entry_kind(&format!("blobs/sha256/{}", hex.to_uppercase()), false).is_err());
        assert_eq!(entry_kind("manifest.json", false), Ok(EntryKind::Ignored));
    }

    #[test]
    fn names_parse_with_docker_host_rules() {
        let d = format!("sha256:{}", "c".repeat(64));
        let n = ImageName::parse("docker.io/library/alpine:3.20", &[]).unwrap();
        assert_eq!(n.host.as_deref(), Some("docker.io"));
        assert_eq!(n.repo.as_str(), "library/alpine");
        assert_eq!(n.to_string(), "docker.io/library/alpine:3.20");
        let n = ImageName::parse("127.0.0.1:5000/test/app:v1", &[]).unwrap();
        assert_eq!(n.host.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(n.pointer, Pointer::Tag("v1".parse().unwrap()));
        let n = ImageName::parse(&format!("hub/team/app@{d}"), &["hub"]).unwrap();
        assert_eq!(n.host.as_deref(), Some("hub"));
        assert_eq!(n.pointer, Pointer::Digest(d.parse().unwrap()));
        assert_eq!(n.to_string(), format!("hub/team/app@{d}"));
        let n = ImageName::parse("team/app:v2", &[]).unwrap();
        assert_eq!((n.host, n.repo.as_str()), (None, "team/app"));
        assert!(ImageName::parse("v1", &[]).is_err());
        assert!(ImageName::parse("docker.io/library/alpine", &[])
            .unwrap_err()
            .contains("no tag"));
        assert!(ImageName::parse("docker.io/Alpine:1", &[]).is_err());
    }

    #[test]
    fn manifests_are_told_from_configs() {
        assert!(looks_like_manifest(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#
        ));
        assert!(looks_like_manifest(br#"{"schemaVersion":2,"manifests":[]}"#));
        assert!(!looks_like_manifest(
            br#"{"architecture":"amd64","os":"linux","rootfs":{}}"#
        ));
        assert!(!looks_like_manifest(b"\x1f\x8b binary"));
    }

    #[test]
    fn index_children_carry_platforms() {
        let body = br#"{"manifests":[{"digest":"sha256:a","platform":{"os":"linux","architecture":"arm","variant":"v7"}},{"digest":"sha256:b"}]}"#;
        let c = index_children(body);
        assert_eq!(c[0].1, Some(("linux".into(), "arm".into(), Some("v7".into()))));
        assert_eq!(c[1], ("sha256:b".into(), None));
    }
}
