//! Image list files: which images `regcache prefetch` fills the cache with and `regcache
//! export` puts in a bundle. Pure parsing and validation (I8): every error names the entry
//! and the field. Resolving a `HOST` to an upstream and a `tag_regex` to tags is the
//! caller's (the same rule as containerd's `ns`, see `upstream::routing`).
//!
//! ```toml
//! [[image]]
//! ref = "docker.io/library/alpine"
//! tags = ["3.20", "3.19"]
//! platforms = ["linux/amd64", "linux/arm64"]   # default: every platform of an index
//! pin = true                                   # default: false
//!
//! [[image]]
//! ref = "ghcr.io/acme/app"
//! tag_regex = '^v1\.[0-9]+$'
//!
//! [[image]]
//! ref = "docker.io/library/busybox@sha256:…"   # or ref = "HOST/REPO:TAG"
//! ```

use crate::oci::{Digest, RepoName, Tag};
use serde::Deserialize;
use std::fmt;
use std::path::Path;

/// Entries in one list file, at most: a list is written by people, and each entry may
/// expand to many tags; this keeps a mistaken or hostile file from planning without end.
const ENTRIES_MAX: usize = 10_000;
/// Explicit tags per entry, at most (same reason).
const TAGS_MAX: usize = 10_000;
/// Longest `tag_regex` accepted; a regex is compiled once per entry.
const REGEX_MAX_BYTES: usize = 1024;

/// A list file that cannot be used. `at` names the entry and field (`image[2].tags[0]`).
#[derive(Debug, thiserror::Error)]
pub enum ImageListError {
    #[error("image list {path}: cannot read it: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image list{}: {message}", in_file(.path))]
    Syntax { path: Option<String>, message: String },
    #[error("image list{}: `{at}`: {message}", in_file(.path))]
    Invalid {
        path: Option<String>,
        at: String,
        message: String,
    },
}

fn in_file(path: &Option<String>) -> String {
    path.as_ref().map(|p| format!(" {p}")).unwrap_or_default()
}

/// One validated entry.
#[derive(Debug, Clone)]
pub struct ImageEntry {
    /// The registry as written: an upstream's name, or a host (with port) that routes to
    /// an upstream by the `ns` rule (`docker.io` matches Docker Hub).
    pub host: String,
    /// The repository as written (Docker Hub names get `library/` when routed).
    pub repo: RepoName,
    pub select: Selection,
    /// `os/arch[/variant]` filters for indexes; empty means every platform.
    pub platforms: Vec<Platform>,
    /// Exempt from ttl expiry, size eviction and cleanup policies.
    pub pin: bool,
}

/// Which manifests of the repository an entry names.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Tags named explicitly (`tags = [...]` or `ref = "…:TAG"`).
    pub tags: Vec<Tag>,
    /// Tags matching this (anchored by the writer, as with `name_regex_*` in policies).
    pub tag_regex: Option<regex::Regex>,
    /// A manifest named by digest (`digest = "…"` or `ref = "…@sha256:…"`).
    pub digest: Option<Digest>,
}

/// A platform filter, `os/arch` or `os/arch/variant`, as in an index's `platform` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Whether an index entry's platform is selected. A filter without a variant takes
    /// every variant of its architecture.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && self.variant.as_deref().is_none_or(|v| Some(v) == variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| ok(p)) {
            return Err(format!(
                "{s:?} is not os/arch or os/arch/variant (e.g. \"linux/arm64\", \"linux/arm/v7\")"
            ));
        }
        Ok(Self {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

/// One image named on its own, `HOST/REPO:TAG` or `HOST/REPO@DIGEST` (what `regcache pin`
/// takes); HOST resolves to an upstream by the same rule as a list's.
#[derive(Debug, Clone)]
pub struct ImageRef {
    pub host: String,
    pub repo: RepoName,
    /// Exactly one of `tag` and `digest` is set.
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl std::str::FromStr for ImageRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, tag, digest) = split_reference(s)?;
        let (host, repo) = host_and_repo(name)?;
        let (tag, digest) = match (tag, digest) {
            (Some(_), Some(_)) => return Err(format!("{s:?}: give a tag or a digest, not both")),
            (None, None) => {
                return Err(format!(
                    "{s:?} names no image: write HOST/REPO:TAG or HOST/REPO@sha256:..."
                ))
            }
            (Some(t), None) => (Some(t.parse::<Tag>().map_err(|e| e.to_string())?), None),
            (None, Some(d)) => (None, Some(d.parse::<Digest>().map_err(|e| e.to_string())?)),
        };
        Ok(Self {
            host,
            repo,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repo)?;
        match (&self.tag, &self.digest) {
            (Some(t), _) => write!(f, ":{t}"),
            (None, Some(d)) => write!(f, "@{d}"),
            (None, None) => Ok(()),
        }
    }
}

/// `HOST/REPO` split and checked: HOST lowercased, REPO a valid repository name.
fn host_and_repo(name: &str) -> Result<(String, RepoName), String> {
    let (host, repo) = name
        .split_once('/')
        .ok_or_else(|| format!("{name:?} needs a registry: HOST/REPO, e.g. \"docker.io/library/alpine\""))?;
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err(format!("{host:?} is not a registry host or upstream name"));
    }
    let repo: RepoName = repo.parse().map_err(|e| format!("{e}"))?;
    Ok((host.to_ascii_lowercase(), repo))
}

impl ImageEntry {
    /// `HOST/REPO` as written.
    pub fn name(&self) -> String {
        format!("{}/{}", self.host, self.repo)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    #[serde(default)]
    image: Vec<RawEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    tags: Vec<String>,
    tag_regex: Option<String>,
    digest: Option<String>,
    #[serde(default)]
    platforms: Vec<String>,
    #[serde(default)]
    pin: bool,
}

/// Reads and validates the list file at `path`.
pub fn load(path: &Path) -> Result<Vec<ImageEntry>, ImageListError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImageListError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|e| e.in_path(path))
}

impl ImageListError {
    fn in_path(self, p: &Path) -> Self {
        let path = Some(p.display().to_string());
        match self {
            Self::Syntax { message, .. } => Self::Syntax { path, message },
            Self::Invalid { at, message, .. } => Self::Invalid { path, at, message },
            read @ Self::Read { .. } => read,
        }
    }
}

/// Parses and validates a list file's text.
pub fn parse(text: &str) -> Result<Vec<ImageEntry>, ImageListError> {
    let raw: RawList = toml::from_str(text).map_err(|e| ImageListError::Syntax {
        path: None,
        message: e.message().to_owned(),
    })?;
    if raw.image.len() > ENTRIES_MAX {
        return Err(invalid(
            "image",
            format!("{} entries; at most {ENTRIES_MAX}", raw.image.len()),
        ));
    }
    raw.image
        .into_iter()
        .enumerate()
        .map(|(i, e)| entry(i, e))
        .collect()
}

fn invalid(at: impl Into<String>, message: impl Into<String>) -> ImageListError {
    ImageListError::Invalid {
        path: None,
        at: at.into(),
        message: message.into(),
    }
}

fn entry(i: usize, raw: RawEntry) -> Result<ImageEntry, ImageListError> {
    let at = |field: &str| format!("image[{i}].{field}");
    let (name, tag, digest) = split_reference(&raw.reference).map_err(|m| invalid(at("ref"), m))?;
    let (host, repo) = host_and_repo(name).map_err(|m| invalid(at("ref"), m))?;
    if raw.tags.len() > TAGS_MAX {
        return Err(invalid(
            at("tags"),
            format!("{} tags; at most {TAGS_MAX}", raw.tags.len()),
        ));
    }
    let mut tags = Vec::new();
    for (j, t) in tag
        .iter()
        .copied()
        .chain(raw.tags.iter().map(String::as_str))
        .enumerate()
    {
        let field = if tag.is_some() && j == 0 {
            at("ref")
        } else {
            at(&format!("tags[{}]", j - usize::from(tag.is_some())))
        };
        let t: Tag = t.parse().map_err(|e| invalid(field, format!("{e}")))?;
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    let tag_regex = match raw.tag_regex {
        Some(r) if r.len() > REGEX_MAX_BYTES => {
            return Err(invalid(
                at("tag_regex"),
                format!("longer than {REGEX_MAX_BYTES} bytes"),
            ))
        }
        Some(r) => Some(regex::Regex::new(&r).map_err(|e| invalid(at("tag_regex"), e.to_string()))?),
        None => None,
    };
    let digest = match (digest, raw.digest) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                at("digest"),
                "the digest is already in `ref`; give it once",
            ))
        }
        (Some(d), None) => Some(
            d.parse::<Digest>()
                .map_err(|e| invalid(at("ref"), e.to_string()))?,
        ),
        (None, Some(d)) => Some(
            d.parse::<Digest>()
                .map_err(|e| invalid(at("digest"), e.to_string()))?,
        ),
        (None, None) => None,
    };
    if tags.is_empty() && tag_regex.is_none() && digest.is_none() {
        return Err(invalid(
            at("ref"),
            format!("{:?} names no image: add `tags = [...]`, `tag_regex = \"...\"` or `digest = \"sha256:...\"`, or write HOST/REPO:TAG", raw.reference),
        ));
    }
    let mut platforms = Vec::new();
    for (j, p) in raw.platforms.iter().enumerate() {
        let p: Platform = p
            .parse()
            .map_err(|m| invalid(at(&format!("platforms[{j}]")), m))?;
        if !platforms.contains(&p) {
            platforms.push(p);
        }
    }
    Ok(ImageEntry {
        host,
        repo,
        select: Selection {
            tags,
            tag_regex,
            digest,
        },
        platforms,
        pin: raw.pin,
    })
}

/// `HOST/REPO[:TAG][@DIGEST]` → (`HOST/REPO`, tag, digest). A `:` after the last `/` is a
/// tag separator; one before it belongs to the host's port.
fn split_reference(r: &str) -> Result<(&str, Option<&str>, Option<&str>), String> {
    let r = r.trim();
    if r.is_empty() {
        return Err("must not be empty".into());
    }
    let (rest, digest) = match r.split_once('@') {
        Some((rest, d)) => (rest, Some(d)),
        None => (r, None),
    };
    let last_slash = rest.rfind('/').unwrap_or(0);
    let (name, tag) = match rest[last_slash..].find(':') {
        Some(colon) => {
            let at = last_slash + colon;
            (&rest[..at], Some(&rest[at + 1..]))
        }
        None => (rest, None),
    };
    Ok((name, tag, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_forms_parse() {
        let d = format!("sha256:{}", "a".repeat(64));
        let list = parse(&format!(
            r#"
            [[image]]
            ref = "docker.io/library/alpine"
            tags = ["3.20", "3.19", "3.20"]
            platforms = ["linux/amd64", "linux/arm/v7"]
            pin = true

            [[image]]
            ref = "127.0.0.1:5000/acme/app:v1"
            tag_regex = '^v1\.[0-9]+$'

            [[image]]
            ref = "ghcr/acme/tool@{d}"
            "#
        ))
        .unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].name(), "docker.io/library/alpine");
        assert_eq!(list[0].select.tags.len(), 2, "duplicates are dropped");
        assert!(list[0].pin);
        assert!(list[0].platforms[0].matches("linux", "amd64", None));
        assert!(list[0].platforms[1].matches("linux", "arm", Some("v7")));
        assert!(!list[0].platforms[1].matches("linux", "arm", Some("v6")));
        assert_eq!(list[1].host, "127.0.0.1:5000");
        assert_eq!(list[1].repo.as_str(), "acme/app");
        assert_eq!(list[1].select.tags[0].as_str(), "v1");
        assert!(list[1].select.tag_regex.as_ref().unwrap().is_match("v1.12"));
        assert!(!list[1].pin);
        assert_eq!(list[2].select.digest.as_ref().unwrap().to_string(), d);
        assert!(list[2].platforms.is_empty());
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_entry_and_field() {
        assert!(err("[[image]]\nref = \"alpine\"\ntags = [\"1\"]\n").contains("`image[0].ref`"));
        assert!(err("[[image]]\nref = \"docker.io/Alpine\"\ntags = [\"1\"]\n").contains("`image[0].ref`"));
        let e = err("[[image]]\nref = \"docker.io/a\"\ntags = [\"ok\", \"-bad\"]\n");
        assert!(e.contains("`image[0].tags[1]`"), "{e}");
        let e = err("[[image]]\nref = \"docker.io/a:x\"\ntags = [\"ok\", \"-bad\"]\n");
        assert!(e.contains("`image[0].tags[1]`"), "{e}");
        assert!(err("[[image]]\nref = \"docker.io/a\"\ntag_regex = \"(\"\n").contains("`image[0].tag_regex`"));
        assert!(
            err("[[image]]\nref = \"docker.io/a\"\ndigest = \"sha256:zz\"\n").contains("`image[0].digest`")
        );
        assert!(
            err("[[image]]\nref = \"docker.io/a\"\ntags=[\"1\"]\nplatforms = [\"linux\"]\n")
                .contains("`image[0].platforms[0]`")
        );
        let e = err("[[image]]\nref = \"docker.io/a\"\n");
        assert!(e.contains("names no image") && e.contains("tags = [...]"), "{e}");
        assert!(err("[[image]]\nref = \"docker.io/a\"\ntag = \"1\"\n").contains("unknown field"));
        assert!(err("[[image]]\ntags = [\"1\"]\n").contains("missing field"));
    }

    #[test]
    fn single_image_references_need_exactly_a_tag_or_a_digest() {
        let d = format!("sha256:{}", "b".repeat(64));
        let r: ImageRef = "Docker.io/library/alpine:3.20".parse().unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str()),
            ("docker.io", "library/alpine")
        );
        assert_eq!(r.to_string(), "docker.io/library/alpine:3.20");
        let r: ImageRef = format!("127.0.0.1:5000/a/b@{d}").parse().unwrap();
        assert_eq!(r.digest.unwrap().to_string(), d);
        assert!(r.tag.is_none());
        for bad in [
            "alpine:3",
            "docker.io/library/alpine",
            "docker.io/a:-x",
            "docker.io/a@sha256:zz",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
        assert!(format!("docker.io/a:t@{d}")
            .parse::<ImageRef>()
            .unwrap_err()
            .contains("not both"));
    }

    #[test]
    fn the_shipped_example_list_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/images.example.toml"
        ));
        let list = load(path).unwrap();
        assert_eq!(list.len(), 4);
        assert!(list[0].pin && list[0].platforms.len() == 2);
        assert_eq!(list[1].select.tags[0].as_str(), "1.36");
        assert!(list[2].select.tag_regex.is_some());
        assert!(list[3].select.digest.is_some());
    }

    #[test]
    fn references_split_on_the_last_segment() {
        assert_eq!(split_reference("h:5000/a/b").unwrap(), ("h:5000/a/b", None, None));
        assert_eq!(
            split_reference("h:5000/a/b:t").unwrap(),
            ("h:5000/a/b", Some("t"), None)
        );
        assert_eq!(
            split_reference("h/a@sha256:x").unwrap(),
            ("h/a", None, Some("sha256:x"))
        );
        assert_eq!(
            split_reference("h/a:t@sha256:x").unwrap(),
            ("h/a", Some("t"), Some("sha256:x"))
        );
    }
}
