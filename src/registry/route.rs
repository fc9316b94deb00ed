//! Parsing `/v2/...` paths. Repository names contain slashes, so the endpoint is found
//! from the right: `.../manifests/<ref>`, `.../blobs/<digest>`, `.../tags/list`,
//! `.../referrers/<digest>`, `.../blobs/uploads/...`.

use super::error::RegistryError;
use crate::oci::{Digest, Reference, RepoName};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Endpoint {
    Base,
    Catalog,
    Manifest { name: RepoName, reference: Reference },
    Blob { name: RepoName, digest: Digest },
    Tags { name: RepoName },
    Referrers { name: RepoName, digest: Digest },
    Upload,
}

/// `path` is the request path starting with `/v2/`.
pub(super) fn parse(path: &str) -> Result<Endpoint, RegistryError> {
    let rest = path
        .strip_prefix("/v2")
        .ok_or_else(|| RegistryError::not_found_endpoint(path))?;
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(Endpoint::Base);
    }
    if rest == "_catalog" {
        return Ok(Endpoint::Catalog);
    }
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let n = segments.len();
    let name = |upto: usize| -> Result<RepoName, RegistryError> {
        if upto == 0 {
            return Err(RegistryError::not_found_endpoint(path));
        }
        segments[..upto]
            .join("/")
            .parse()
            .map_err(RegistryError::name_invalid)
    };
    // Push: POST /v2/<name>/blobs/uploads/, PATCH|PUT /v2/<name>/blobs/uploads/<id>.
    if let Some(i) = segments.windows(2).rposition(|w| w == ["blobs", "uploads"]) {
        if i >= 1 && n - i <= 3 {
            return Ok(Endpoint::Upload);
        }
    }
    if n >= 3 && segments[n - 2] == "tags" && segments[n - 1] == "list" {
        return Ok(Endpoint::Tags { name: name(n - 2)? });
    }
    if n >= 3 {
        let last = decode(segments[n - 1]);
        match segments[n - 2] {
            "manifests" => {
                let reference = last.parse().map_err(RegistryError::reference_invalid)?;
                return Ok(Endpoint::Manifest {
                    name: name(n - 2)?,
                    reference,
                });
            }
            "blobs" => {
                let digest = last.parse().map_err(RegistryError::digest_invalid)?;
                return Ok(Endpoint::Blob {
                    name: name(n - 2)?,
                    digest,
                });
            }
            "referrers" => {
                let digest = last.parse().map_err(RegistryError::digest_invalid)?;
                return Ok(Endpoint::Referrers {
                    name: name(n - 2)?,
                    digest,
                });
            }
            _ => {}
        }
    }
    Err(RegistryError::not_found_endpoint(path))
}

/// Undoes percent-encoding of ':' in digests (`sha256%3A...`), which some clients send.
fn decode(segment: &str) -> String {
    segment.replace("%3A", ":").replace("%3a", ":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn ok(path: &str) -> Endpoint {
        parse(path).unwrap_or_else(|e| panic!("{path}: {e:?}"))
    }

    #[test]
    fn endpoints_with_slashed_names() {
        assert_eq!(ok("/v2/"), Endpoint::Base);
        assert_eq!(ok("/v2"), Endpoint::Base);
        assert!(
            matches!(ok("/v2/library/alpine/manifests/3.20"), Endpoint::Manifest { name, .. } if name.as_str() == "library/alpine")
        );
        assert!(
            matches!(ok(&format!("/v2/a/b/c/blobs/{D}")), Endpoint::Blob { name, .. } if name.as_str() == "a/b/c")
        );
        assert!(matches!(
            ok(&format!("/v2/a/blobs/{}", D.replace(':', "%3A"))),
            Endpoint::Blob { .. }
        ));
        assert!(matches!(ok("/v2/a/b/tags/list"), Endpoint::Tags { name } if name.as_str() == "a/b"));
        assert!(matches!(
            ok(&format!("/v2/a/referrers/{D}")),
            Endpoint::Referrers { .. }
        ));
        // A repository may itself be called "manifests" or "tags".
        assert!(
            matches!(ok("/v2/manifests/manifests/latest"), Endpoint::Manifest { name, .. } if name.as_str() == "manifests")
        );
        assert!(matches!(ok("/v2/tags/tags/list"), Endpoint::Tags { name } if name.as_str() == "tags"));
        assert_eq!(ok("/v2/a/blobs/uploads/"), Endpoint::Upload);
        assert_eq!(ok("/v2/a/b/blobs/uploads/some-uuid"), Endpoint::Upload);
        assert_eq!(ok("/v2/_catalog"), Endpoint::Catalog);
    }

    #[test]
    fn bad_input_maps_to_spec_codes() {
        let code = |p: &str| parse(p).unwrap_err().code.as_str();
        assert_eq!(code("/v2/UPPER/manifests/latest"), "NAME_INVALID");
        assert_eq!(code("/v2/a/blobs/sha256:zz"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/blobs/md5:abc"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/manifests/-bad"), "TAG_INVALID");
        assert_eq!(code("/v2/a/manifests/sha256:zz"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/unknown/x"), "NOT_FOUND");
        assert_eq!(code("/v2/manifests/latest"), "NOT_FOUND");
    }
}
