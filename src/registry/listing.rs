//! `GET /v2/<name>/tags/list` (sorted and paginated here with `n`/`last`, whatever the
//! upstream does) and `GET /v2/<name>/referrers/<digest>`.

use super::{body_unless_head, ErrorCode, Query, RegistryError};
use crate::cache::{Cache, Target};
use crate::oci::{Digest, RepoName};
use axum::http::header::{CONTENT_TYPE, LINK};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub(super) async fn tags(
    cache: &Arc<Cache>,
    t: &Target,
    name: &RepoName,
    query: &Query,
    head: bool,
) -> Result<Response, RegistryError> {
    let n = match query.get("n") {
        Some(raw) => Some(raw.parse::<usize>().map_err(|_| {
            RegistryError::new(
                ErrorCode::PaginationNumberInvalid,
                StatusCode::BAD_REQUEST,
                format!("n={raw:?} is not a non-negative integer"),
            )
        })?),
        None => None,
    };
    let last = query.get("last").map(String::as_str);
    let all = cache.tags(t).await?;
    let (page, more) = paginate(&all, n, last);
    #[derive(serde::Serialize)]
    struct TagList<'a> {
        name: &'a str,
        tags: &'a [String],
    }
    let body = serde_json::to_string(&TagList {
        name: name.as_str(),
        tags: page,
    })
    .unwrap_or_default();
    let mut resp = ([(CONTENT_TYPE, "application/json")], body_unless_head(head, body)).into_response();
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        let mut next = url::form_urlencoded::Serializer::new(String::new());
        next.append_pair("n", &n.to_string()).append_pair("last", last);
        if let Some(ns) = query.get("ns") {
            next.append_pair("ns", ns);
        }
        let link = format!("</v2/{name}/tags/list?{}>; rel=\"next\"", next.finish());
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(LINK, v);
        }
    }
    Ok(resp)
}

/// The page after `last` (exclusive) of at most `n` names from a sorted list, and whether
/// more follow it.
fn paginate<'a>(sorted: &'a [String], n: Option<usize>, last: Option<&str>) -> (&'a [String], bool) {
    let from = last.map_or(0, |l| sorted.partition_point(|t| t.as_str() <= l));
    let rest = &sorted[from..];
    match n {
        Some(n) if n < rest.len() => (&rest[..n], true),
        _ => (rest, false),
    }
}

pub(super) async fn referrers(
    cache: &Arc<Cache>,
    t: &Target,
    digest: &Digest,
    query: &Query,
    head: bool,
) -> Result<Response, RegistryError> {
    let artifact_type = query.get("artifactType").map(String::as_str);
    let r = cache.referrers(t, digest, artifact_type).await?;
    let mut resp = (
        [(CONTENT_TYPE, r.media_type.clone())],
        body_unless_head(head, r.body),
    )
        .into_response();
    if let Some(v) = r.filters_applied.and_then(|f| HeaderValue::from_str(&f).ok()) {
        resp.headers_mut().insert("oci-filters-applied", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_after_last_with_limit() {
        let all: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(paginate(&all, None, None), (&all[..], false));
        assert_eq!(paginate(&all, Some(2), None), (&all[..2], true));
        assert_eq!(paginate(&all, Some(2), Some("b")), (&all[2..], false));
        assert_eq!(paginate(&all, Some(10), Some("a")), (&all[1..], false));
        assert_eq!(paginate(&all, Some(0), None), (&all[..0], true));
        // `last` need not be a tag that exists.
        assert_eq!(paginate(&all, None, Some("bb")), (&all[2..], false));
    }
}
