//! Descriptors as a prefetch reads them: the children of an index with their platforms,
//! and the blobs of an image manifest with their declared sizes. Sizes are what the
//! manifest claims, used for progress only; content is verified by digest when fetched.

use super::digest::Digest;
use super::manifest::ManifestError;
use serde::Deserialize;

/// A platform as an index entry declares it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One descriptor of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    /// As declared (0 when missing).
    pub size: u64,
    /// Index entries only, when declared.
    pub platform: Option<PlatformSpec>,
}

/// What a manifest refers to: child manifests (an index) and blobs (an image: config
/// first, then layers, each once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptors {
    pub children: Vec<Descriptor>,
    pub blobs: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Raw {
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default)]
    manifests: Vec<RawDescriptor>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    platform: Option<PlatformSpec>,
}

impl RawDescriptor {
    fn parse(self) -> Result<Descriptor, ManifestError> {
        Ok(Descriptor {
            digest: self.digest.parse()?,
            size: self.size,
            platform: self.platform,
        })
    }
}

/// The descriptors of a manifest body (already parsed once by `parse_manifest`).
pub fn descriptors(body: &[u8]) -> Result<Descriptors, ManifestError> {
    let raw: Raw = serde_json::from_slice(body)?;
    let children = raw
        .manifests
        .into_iter()
        .map(RawDescriptor::parse)
        .collect::<Result<_, _>>()?;
    let mut blobs: Vec<Descriptor> = Vec::new();
    for d in raw.config.into_iter().chain(raw.layers) {
        let d = d.parse()?;
        if !blobs.iter().any(|b| b.digest == d.digest) {
            blobs.push(d);
        }
    }
    Ok(Descriptors { children, blobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn index_children_carry_platforms_and_images_their_blobs_once() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}},
                {{"digest":"{}","size":11}}]}}"#,
            digest('a'),
            digest('b')
        );
        let d = descriptors(index.as_bytes()).unwrap();
        assert_eq!(d.children.len(), 2);
        assert_eq!(
            d.children[0].platform.as_ref().unwrap().to_string(),
            "linux/arm/v7"
        );
        assert_eq!(d.children[1].platform, None);
        assert!(d.blobs.is_empty());
        let image = format!(
            r#"{{"config":{{"digest":"{c}","size":5}},"layers":[{{"digest":"{l}","size":7}},{{"digest":"{l}","size":7}}]}}"#,
            c = digest('c'),
            l = digest('d')
        );
        let d = descriptors(image.as_bytes()).unwrap();
        assert_eq!(
            d.blobs.iter().map(|b| b.size).collect::<Vec<_>>(),
            [5, 7],
            "config first, each blob once"
        );
        assert!(descriptors(br#"{"layers":[{"digest":"md5:x"}]}"#).is_err());
        assert!(descriptors(br#"{"layers":[{"digest":"sha256:x","size":-1}]}"#).is_err());
    }
}
