//! `GET|HEAD /v2/<name>/blobs/<digest>`, with a single `Range`.

use super::{ErrorCode, RegistryError};
use crate::cache::{ByteRange, Cache, Target};
use crate::oci::Digest;
use axum::body::Body;
use axum::http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use std::sync::Arc;

pub(super) async fn get(
    cache: &Arc<Cache>,
    t: &Target,
    digest: &Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, RegistryError> {
    let range = match headers.get(RANGE) {
        Some(v) => parse_range(v.to_str().unwrap_or_default())?,
        None => None,
    };
    let blob = cache.blob(t, digest, range, head).await?;
    let mut resp = Response::new(match blob.body {
        Some(stream) if !head => Body::from_stream(stream),
        _ => Body::empty(),
    });
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(ETAG, v);
    }
    match (&blob.range, blob.size) {
        (Some(r), Some(size)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end - 1)) {
                h.insert(CONTENT_RANGE, v);
            }
        }
        (_, Some(size)) => {
            resp.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(size));
        }
        (_, None) => {}
    }
    Ok(resp)
}

/// Parses one `bytes=` range. Several ranges, or another unit, are ignored (the whole
/// blob is sent, which RFC 9110 allows); a malformed byte range is an error.
fn parse_range(value: &str) -> Result<Option<ByteRange>, RegistryError> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let bad = || {
        RegistryError::new(
            ErrorCode::RangeInvalid,
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("malformed Range header {value:?}: expected bytes=START-[END] or bytes=-SUFFIX"),
        )
    };
    let (start, end) = spec.trim().split_once('-').ok_or_else(bad)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    Ok(Some(match (start.trim().is_empty(), end.trim().is_empty()) {
        (true, false) => ByteRange::Suffix(num(end)?),
        (false, true) => ByteRange::From {
            start: num(start)?,
            end: None,
        },
        (false, false) => {
            let (s, e) = (num(start)?, num(end)?);
            if e < s {
                return Err(bad());
            }
            ByteRange::From {
                start: s,
                end: Some(e),
            }
        }
        (true, true) => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_headers() {
        assert_eq!(
            parse_range("bytes=0-9").unwrap(),
            Some(ByteRange::From {
                start: 0,
                end: Some(9)
            })
        );
        assert_eq!(
            parse_range("bytes=5-").unwrap(),
            Some(ByteRange::From { start: 5, end: None })
        );
        assert_eq!(parse_range("bytes=-5").unwrap(), Some(ByteRange::Suffix(5)));
        assert_eq!(parse_range("bytes=0-1,5-6").unwrap(), None);
        assert_eq!(parse_range("items=0-1").unwrap(), None);
        for bad in ["bytes=-", "bytes=a-b", "bytes=9-1", "bytes=5"] {
            assert_eq!(
                parse_range(bad).unwrap_err().code,
                ErrorCode::RangeInvalid,
                "{bad}"
            );
        }
    }
}
