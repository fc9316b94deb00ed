//! Reading what the cache needs out of a manifest: its media type, the blobs it refers
//! to, its child manifests, and an image config's `created` time.

use super::digest::Digest;
use super::media_types::{is_index, OCI_MANIFEST};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest has no media type (neither in the body nor in Content-Type)")]
    NoMediaType,
    #[error("manifest refers to an invalid digest: {0}")]
    Digest(#[from] super::digest::DigestError),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default)]
    manifests: Vec<RawDescriptor>,
    subject: Option<RawDescriptor>,
}

#[derive(Debug, Deserialize)]
struct RawDescriptor {
    digest: String,
}

/// What the cache records about a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    pub media_type: String,
    /// The image config blob, for image manifests.
    pub config: Option<Digest>,
    /// Layer blobs (and the config) that pulling this image needs.
    pub blobs: Vec<Digest>,
    /// Child manifests of an index.
    pub children: Vec<Digest>,
    /// The manifest this one refers to (referrers API).
    pub subject: Option<Digest>,
}

/// Parses a manifest body. `content_type` is the upstream's header, used when the body
/// does not carry `mediaType` (allowed for OCI manifests).
pub fn parse_manifest(body: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(body)?;
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    let media_type = match (raw.media_type, header) {
        (Some(m), _) => m,
        (None, Some(h)) => h.to_owned(),
        // An OCI manifest may omit mediaType; guess from its shape.
        (None, None) if !raw.manifests.is_empty() => super::media_types::OCI_INDEX.to_owned(),
        (None, None) if raw.config.is_some() => OCI_MANIFEST.to_owned(),
        (None, None) => return Err(ManifestError::NoMediaType),
    };
    let config = raw.config.map(|c| c.digest.parse::<Digest>()).transpose()?;
    let mut blobs: Vec<Digest> = Vec::new();
    if let Some(c) = &config {
        blobs.push(c.clone());
    }
    for layer in raw.layers {
        let d: Digest = layer.digest.parse()?;
        if !blobs.contains(&d) {
            blobs.push(d);
        }
    }
    let children = if is_index(&media_type) || !raw.manifests.is_empty() {
        raw.manifests
            .into_iter()
            .map(|m| m.digest.parse())
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let subject = raw.subject.map(|s| s.digest.parse()).transpose()?;
    Ok(ParsedManifest {
        media_type,
        config,
        blobs,
        children,
        subject,
    })
}

/// The `created` field of an image config, if it has one that parses as RFC 3339.
/// Returned as Unix seconds.
pub fn config_created(config: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct Config {
        created: Option<String>,
    }
    let created = serde_json::from_slice::<Config>(config).ok()?.created?;
    parse_rfc3339_secs(&created)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` to Unix seconds.
fn parse_rfc3339_secs(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(crate::civil::days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_lists_config_then_layers() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"digest":"{}","size":1}},"layers":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let m = parse_manifest(body.as_bytes(), None).unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
        assert_eq!(m.config.unwrap().to_string(), d('a'));
        let blobs: Vec<_> = m.blobs.iter().map(ToString::to_string).collect();
        assert_eq!(blobs, vec![d('a'), d('b'), d('c')]);
        assert!(m.children.is_empty());
    }

    #[test]
    fn index_lists_children_and_takes_type_from_header() {
        let body = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}"}}]}}"#, d('e'));
        let m = parse_manifest(
            body.as_bytes(),
            Some("application/vnd.docker.distribution.manifest.list.v2+json"),
        )
        .unwrap();
        assert_eq!(m.children.len(), 1);
        assert!(is_index(&m.media_type));
    }

    #[test]
    fn bad_manifests_are_errors() {
        assert!(parse_manifest(b"not json", None).is_err());
        assert!(matches!(
            parse_manifest(b"{}", None),
            Err(ManifestError::NoMediaType)
        ));
        let bad = r#"{"mediaType":"x","config":{"digest":"md5:00"}}"#;
        assert!(matches!(
            parse_manifest(bad.as_bytes(), None),
            Err(ManifestError::Digest(_))
        ));
    }

    #[test]
    fn created_times_parse() {
        assert_eq!(config_created(br#"{"created":"1970-01-01T00:00:00Z"}"#), Some(0));
        assert_eq!(
            config_created(br#"{"created":"2024-02-29T12:00:00.123456789Z"}"#),
            Some(1_709_208_000)
        );
        assert_eq!(
            config_created(br#"{"created":"2024-02-29T14:00:00+02:00"}"#),
            Some(1_709_208_000)
        );
        assert_eq!(config_created(br#"{"created":"yesterday"}"#), None);
        assert_eq!(config_created(br#"{"architecture":"amd64"}"#), None);
    }
}
