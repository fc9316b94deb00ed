//! `GET|HEAD /v2/<name>/manifests/<reference>`.

use super::{body_unless_head, RegistryError};
use crate::cache::{Cache, Target};
use crate::oci::Reference;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub(super) async fn get(
    cache: &Arc<Cache>,
    t: &Target,
    reference: &Reference,
    head: bool,
) -> Result<Response, RegistryError> {
    let m = cache.manifest(t, reference).await?;
    let headers = [
        (CONTENT_TYPE, m.media_type.clone()),
        (CONTENT_LENGTH, m.body.len().to_string()),
        (ETAG, format!("\"{}\"", m.digest)),
    ];
    let mut resp = (headers, body_unless_head(head, m.body)).into_response();
    if let Ok(v) = m.digest.parse() {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    Ok(resp)
}
