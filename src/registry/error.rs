//! The registry API's one error type: an OCI error code, an HTTP status and extra
//! headers, serialised as the distribution spec's error JSON. Every lower-layer error is
//! mapped here, once, with a full match.

use crate::auth::{Refused, Who};
use crate::cache::CacheError;
use crate::oci::{DigestError, NameError};
use crate::upstream::{RouteError, UpstreamError};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Error codes of the distribution spec, plus the few the CNCF registry adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    TagInvalid,
    PaginationNumberInvalid,
    RangeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    #[serde(rename = "TOOMANYREQUESTS")]
    TooManyRequests,
    Unavailable,
    NotFound,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::ManifestInvalid => "MANIFEST_INVALID",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::TagInvalid => "TAG_INVALID",
            Self::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Self::RangeInvalid => "RANGE_INVALID",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::Unsupported => "UNSUPPORTED",
            Self::TooManyRequests => "TOOMANYREQUESTS",
            Self::Unavailable => "UNAVAILABLE",
            Self::NotFound => "NOT_FOUND",
            Self::Unknown => "UNKNOWN",
        }
    }

    fn from_upstream(code: &str) -> Option<Self> {
        Some(match code {
            "BLOB_UNKNOWN" => Self::BlobUnknown,
            "MANIFEST_UNKNOWN" => Self::ManifestUnknown,
            "NAME_UNKNOWN" => Self::NameUnknown,
            "NAME_INVALID" => Self::NameInvalid,
            "DIGEST_INVALID" => Self::DigestInvalid,
            "UNAUTHORIZED" => Self::Unauthorized,
            "DENIED" => Self::Denied,
            "TOOMANYREQUESTS" => Self::TooManyRequests,
            "UNSUPPORTED" => Self::Unsupported,
            _ => return None,
        })
    }
}

/// An error answer. `message` is what the client reads: about its own request, or a plain
/// sentence; internal text (paths, SQL, I/O messages, upstream URLs and bodies) only ever
/// goes to the log, under `error_id`, which the answer carries too.
#[derive(Debug)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub status: StatusCode,
    pub message: String,
    /// Set when details were logged instead of sent: the id of that log line.
    pub error_id: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// How loudly a withheld error is logged.
#[derive(Debug, Clone, Copy)]
enum Severity {
    /// A fault of regcache or its machine: a 500.
    Internal,
    /// The upstream failed or refused.
    Upstream,
    /// An ordinary "not found" from the upstream.
    Quiet,
    /// The upstream cannot be reached: warned about once per upstream and cause
    /// (`upstream::warn_unavailable`), so each request's line is only informational.
    Unavailable,
}

impl RegistryError {
    /// An error about the client's own request; `message` may quote its input.
    pub fn new(code: ErrorCode, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status,
            message: message.into(),
            error_id: None,
            headers: Vec::new(),
        }
    }

    /// An error whose `detail` is logged (once, here) under a fresh id; the client gets
    /// `message` and the id.
    fn withheld(
        code: ErrorCode,
        status: StatusCode,
        message: &str,
        severity: Severity,
        detail: &dyn std::fmt::Display,
    ) -> Self {
        let error_id = crate::cache::new_error_id();
        match severity {
            Severity::Internal => {
                tracing::error!(error.id = %error_id, http.status = status.as_u16(), error = %detail, "internal error")
            }
            Severity::Upstream => {
                tracing::warn!(error.id = %error_id, http.status = status.as_u16(), error = %detail, "upstream error")
            }
            Severity::Unavailable => {
                tracing::info!(error.id = %error_id, http.status = status.as_u16(), error = %detail, "upstream unavailable")
            }
            Severity::Quiet => {
                tracing::debug!(error.id = %error_id, http.status = status.as_u16(), error = %detail, "upstream error")
            }
        }
        Self::with_id(code, status, message, error_id)
    }

    /// An answer for an error already logged under `error_id`.
    fn with_id(code: ErrorCode, status: StatusCode, message: &str, error_id: String) -> Self {
        Self {
            message: format!("{message} (error id {error_id})"),
            error_id: Some(error_id),
            ..Self::new(code, status, "")
        }
    }

    /// A request that panicked: logged here with the panic's message, answered 500.
    pub(super) fn panicked(payload: &(dyn std::any::Any + Send), method: &str, path: &str) -> Self {
        let error_id = crate::cache::new_error_id();
        tracing::error!(
            error.id = %error_id, http.method = %method, http.path = %path,
            panic.message = %crate::cache::panic_message(payload),
            "request panicked; it alone fails"
        );
        Self::with_id(
            ErrorCode::Unknown,
            StatusCode::INTERNAL_SERVER_ERROR,
            INTERNAL,
            error_id,
        )
    }

    fn with_header(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }

    pub(super) fn name_invalid(e: NameError) -> Self {
        Self::new(ErrorCode::NameInvalid, StatusCode::BAD_REQUEST, e.to_string())
    }

    pub(super) fn digest_invalid(e: DigestError) -> Self {
        Self::new(ErrorCode::DigestInvalid, StatusCode::BAD_REQUEST, e.to_string())
    }

    pub(super) fn reference_invalid(e: NameError) -> Self {
        match e {
            NameError::Digest(d) => Self::digest_invalid(d),
            other => Self::new(ErrorCode::TagInvalid, StatusCode::BAD_REQUEST, other.to_string()),
        }
    }

    pub(super) fn not_found_endpoint(path: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            StatusCode::NOT_FOUND,
            format!("no registry endpoint at {path}"),
        )
    }

    /// 401 with the challenge: no credentials, and this needs a login.
    pub(super) fn login_required() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            StatusCode::UNAUTHORIZED,
            "authentication required",
        )
        .with_header(axum::http::header::WWW_AUTHENTICATE, crate::auth::CHALLENGE)
    }

    /// 403 `DENIED`: `who` may not pull `upstream/repo`.
    pub(super) fn denied(who: &Who, upstream: &str, repo: &str) -> Self {
        let message = match who {
            Who::Anonymous => format!("anonymous clients may not pull {upstream}/{repo}"),
            Who::Identity { name, .. } => format!("{name:?} may not pull {upstream}/{repo}"),
        };
        Self::new(ErrorCode::Denied, StatusCode::FORBIDDEN, message)
    }

    pub(super) fn unsupported_push() -> Self {
        Self::new(
            ErrorCode::Unsupported,
            StatusCode::METHOD_NOT_ALLOWED,
            "regcache is a pull-through cache: push and delete are not supported",
        )
    }
}

/// The message of every 500.
const INTERNAL: &str = "internal error; the server log has the details under this error id";

impl From<RouteError> for RegistryError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::UnknownNamespace(_) | RouteError::NoDefault(_) => {
                Self::new(ErrorCode::NameUnknown, StatusCode::NOT_FOUND, e.to_string())
            }
        }
    }
}

impl From<Refused> for RegistryError {
    fn from(e: Refused) -> Self {
        match e {
            Refused::BadLogin => Self::new(
                ErrorCode::Unauthorized,
                StatusCode::UNAUTHORIZED,
                "the credentials are not valid",
            )
            .with_header(axum::http::header::WWW_AUTHENTICATE, crate::auth::CHALLENGE),
            Refused::Busy { retry_after } => Self::new(
                ErrorCode::TooManyRequests,
                StatusCode::TOO_MANY_REQUESTS,
                "too many login attempts from this address; retry later",
            )
            .with_header(
                axum::http::header::RETRY_AFTER,
                &retry_after.as_secs().max(1).to_string(),
            ),
        }
    }
}

impl From<UpstreamError> for RegistryError {
    /// The upstream's own message and body, and the URLs and network errors in `e`, stay
    /// in the log: they may name internal hosts or carry whatever the upstream put there.
    fn from(e: UpstreamError) -> Self {
        use Severity::{Quiet, Unavailable, Upstream};
        let withheld =
            |code, status, message: &str, severity| Self::withheld(code, status, message, severity, &e);
        match &e {
            UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. } => {
                // The operator's WARN is rate-limited per upstream and cause; the line
                // carrying this request's error id is at info.
                crate::upstream::warn_unavailable(&e);
                let message = match &e {
                    UpstreamError::Timeout { .. } => "the upstream registry did not answer in time",
                    _ => "the upstream registry cannot be reached",
                };
                withheld(
                    ErrorCode::Unavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    message,
                    Unavailable,
                )
            }
            UpstreamError::Status {
                status,
                code,
                retry_after,
                ..
            } => {
                let known = code.as_deref().and_then(ErrorCode::from_upstream);
                let err = match *status {
                    429 => withheld(
                        ErrorCode::TooManyRequests,
                        StatusCode::TOO_MANY_REQUESTS,
                        "the upstream registry is limiting requests; retry later",
                        Upstream,
                    ),
                    401 => withheld(
                        ErrorCode::Unauthorized,
                        StatusCode::UNAUTHORIZED,
                        "the upstream registry asks for authentication",
                        Upstream,
                    ),
                    403 => withheld(
                        ErrorCode::Denied,
                        StatusCode::FORBIDDEN,
                        "the upstream registry denied access",
                        Upstream,
                    ),
                    404 => {
                        let code = known.unwrap_or(ErrorCode::NameUnknown);
                        withheld(code, StatusCode::NOT_FOUND, not_found_message(code), Quiet)
                    }
                    s if s >= 500 => withheld(
                        ErrorCode::Unavailable,
                        StatusCode::BAD_GATEWAY,
                        &format!("the upstream registry failed (HTTP {s})"),
                        Upstream,
                    ),
                    s => withheld(
                        known.unwrap_or(ErrorCode::Unknown),
                        StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
                        &format!("the upstream registry refused the request (HTTP {s})"),
                        Upstream,
                    ),
                };
                match retry_after {
                    Some(v) => err.with_header(axum::http::header::RETRY_AFTER, v),
                    None => err,
                }
            }
            UpstreamError::Auth { .. } => withheld(
                ErrorCode::Denied,
                StatusCode::FORBIDDEN,
                "authentication with the upstream registry failed",
                Upstream,
            ),
            UpstreamError::TooLarge { limit_bytes, .. } => withheld(
                ErrorCode::ManifestInvalid,
                StatusCode::BAD_GATEWAY,
                &format!("the upstream registry sent an answer larger than {limit_bytes} bytes"),
                Upstream,
            ),
            UpstreamError::Invalid { .. } => withheld(
                ErrorCode::Unknown,
                StatusCode::BAD_GATEWAY,
                "the upstream registry sent an invalid answer",
                Upstream,
            ),
        }
    }
}

/// The distribution spec's wording for a "not found" code.
fn not_found_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BlobUnknown => "blob unknown to registry",
        ErrorCode::ManifestUnknown => "manifest unknown",
        ErrorCode::NameUnknown => "repository name not known to registry",
        _ => "not found",
    }
}

impl From<CacheError> for RegistryError {
    fn from(e: CacheError) -> Self {
        let message = e.to_string();
        match e {
            CacheError::Upstream(u) => u.into(),
            // regcache's own words about the client's request.
            CacheError::BlobUnknown { .. } => {
                Self::new(ErrorCode::BlobUnknown, StatusCode::NOT_FOUND, message)
            }
            CacheError::ManifestUnknown { .. } => {
                Self::new(ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND, message)
            }
            CacheError::NameUnknown { .. } | CacheError::RepositoryDeleting { .. } => {
                Self::new(ErrorCode::NameUnknown, StatusCode::NOT_FOUND, message)
            }
            CacheError::RangeNotSatisfiable { size } => Self::new(
                ErrorCode::RangeInvalid,
                StatusCode::RANGE_NOT_SATISFIABLE,
                message,
            )
            .with_header(axum::http::header::CONTENT_RANGE, &format!("bytes */{size}")),
            CacheError::ShuttingDown => {
                Self::new(ErrorCode::Unavailable, StatusCode::SERVICE_UNAVAILABLE, message)
            }
            // What the upstream sent was wrong; the text names digests and sizes only.
            CacheError::DigestMismatch { .. } => Self::withheld(
                ErrorCode::DigestInvalid,
                StatusCode::BAD_GATEWAY,
                &message,
                Severity::Upstream,
                &message,
            ),
            CacheError::Truncated { .. } => Self::withheld(
                ErrorCode::Unavailable,
                StatusCode::BAD_GATEWAY,
                &message,
                Severity::Upstream,
                &message,
            ),
            CacheError::ManifestInvalid(_) => Self::withheld(
                ErrorCode::ManifestInvalid,
                StatusCode::BAD_GATEWAY,
                "the upstream registry sent an invalid manifest",
                Severity::Upstream,
                &message,
            ),
            CacheError::Metadata(_) | CacheError::Storage(_) | CacheError::Io(_) => Self::withheld(
                ErrorCode::Unknown,
                StatusCode::INTERNAL_SERVER_ERROR,
                INTERNAL,
                Severity::Internal,
                &message,
            ),
            // Logged where it was caught, under this id.
            CacheError::Panicked { error_id } => Self::with_id(
                ErrorCode::Unknown,
                StatusCode::INTERNAL_SERVER_ERROR,
                INTERNAL,
                error_id,
            ),
            // The size names only the bound the operator set.
            CacheError::BlobTooLarge { .. } => Self::withheld(
                ErrorCode::Unknown,
                StatusCode::BAD_GATEWAY,
                &message,
                Severity::Upstream,
                &message,
            ),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    errors: [Item<'a>; 1],
}

#[derive(Serialize)]
struct Item<'a> {
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<Detail<'a>>,
}

#[derive(Serialize)]
struct Detail<'a> {
    error_id: &'a str,
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&Body {
            errors: [Item {
                code: self.code,
                message: &self.message,
                detail: self.error_id.as_deref().map(|error_id| Detail { error_id }),
            }],
        })
        .unwrap_or_default();
        let mut resp = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_spec_codes() {
        assert_eq!(
            serde_json::to_string(&ErrorCode::TooManyRequests).unwrap(),
            "\"TOOMANYREQUESTS\""
        );
        assert_eq!(
            serde_json::to_string(&ErrorCode::BlobUnknown).unwrap(),
            "\"BLOB_UNKNOWN\""
        );
        for c in [
            ErrorCode::NameInvalid,
            ErrorCode::PaginationNumberInvalid,
            ErrorCode::Unsupported,
        ] {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{}\"", c.as_str()));
        }
    }

    #[test]
    fn upstream_rate_limit_keeps_retry_after() {
        let e: RegistryError = UpstreamError::Status {
            upstream: "hub".into(),
            status: 429,
            code: Some("TOOMANYREQUESTS".into()),
            message: "slow down".into(),
            retry_after: Some("30".into()),
        }
        .into();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.code, ErrorCode::TooManyRequests);
        let resp = e.into_response();
        assert_eq!(resp.headers().get("retry-after").unwrap(), "30");
    }

    #[test]
    fn internal_and_upstream_text_stays_in_the_log() {
        let secret = "/var/lib/regcache/store/blobs SELECT * FROM blobs http://10.1.2.3:5000/v2/x";
        let errors: Vec<RegistryError> = vec![
            CacheError::from(std::io::Error::other(secret)).into(),
            UpstreamError::Unreachable {
                upstream: "u".into(),
                message: secret.into(),
            }
            .into(),
            UpstreamError::Status {
                upstream: "u".into(),
                status: 500,
                code: Some("UNKNOWN".into()),
                message: secret.into(),
                retry_after: None,
            }
            .into(),
            UpstreamError::Status {
                upstream: "u".into(),
                status: 404,
                code: Some("MANIFEST_UNKNOWN".into()),
                message: secret.into(),
                retry_after: None,
            }
            .into(),
            UpstreamError::Invalid {
                upstream: "u".into(),
                message: secret.into(),
            }
            .into(),
            UpstreamError::Auth {
                upstream: "u".into(),
                message: secret.into(),
            }
            .into(),
            CacheError::ManifestInvalid(secret.into()).into(),
        ];
        for e in errors {
            let id = e.error_id.clone().expect("an error id");
            let (status, code) = (e.status, e.code);
            let resp = e.into_response();
            let body = futures::executor::block_on(axum::body::to_bytes(resp.into_body(), 1 << 20)).unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let text = json.to_string();
            for internal in ["/var/lib", "SELECT", "10.1.2.3"] {
                assert!(
                    !text.contains(internal),
                    "{status} {code:?} leaks {internal}: {text}"
                );
            }
            assert_eq!(json["errors"][0]["detail"]["error_id"], id.as_str(), "{text}");
            assert!(
                json["errors"][0]["message"].as_str().unwrap().contains(&id),
                "{text}"
            );
        }
    }
}
