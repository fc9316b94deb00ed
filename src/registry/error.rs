//! The registry API's one error type: an OCI error code, an HTTP status and extra
//! headers, serialised as the distribution spec's error JSON. Every lower-layer error is
//! mapped here, once, with a full match.

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

#[derive(Debug)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub status: StatusCode,
    pub message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status,
            message: message.into(),
            headers: Vec::new(),
        }
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

    pub(super) fn unsupported_push() -> Self {
        Self::new(
            ErrorCode::Unsupported,
            StatusCode::METHOD_NOT_ALLOWED,
            "regcache is a pull-through cache: push and delete are not supported",
        )
    }
}

impl From<RouteError> for RegistryError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::UnknownNamespace(_) | RouteError::NoDefault(_) => {
                Self::new(ErrorCode::NameUnknown, StatusCode::NOT_FOUND, e.to_string())
            }
        }
    }
}

impl From<UpstreamError> for RegistryError {
    fn from(e: UpstreamError) -> Self {
        let message = e.to_string();
        match &e {
            UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. } => {
                Self::new(ErrorCode::Unavailable, StatusCode::SERVICE_UNAVAILABLE, message)
            }
            UpstreamError::Status {
                status,
                code,
                retry_after,
                ..
            } => {
                let known = code.as_deref().and_then(ErrorCode::from_upstream);
                let err = match *status {
                    429 => Self::new(ErrorCode::TooManyRequests, StatusCode::TOO_MANY_REQUESTS, message),
                    401 => Self::new(ErrorCode::Unauthorized, StatusCode::UNAUTHORIZED, message),
                    403 => Self::new(ErrorCode::Denied, StatusCode::FORBIDDEN, message),
                    404 => Self::new(
                        known.unwrap_or(ErrorCode::NameUnknown),
                        StatusCode::NOT_FOUND,
                        message,
                    ),
                    s if s >= 500 => Self::new(ErrorCode::Unavailable, StatusCode::BAD_GATEWAY, message),
                    s => Self::new(
                        known.unwrap_or(ErrorCode::Unknown),
                        StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
                        message,
                    ),
                };
                match retry_after {
                    Some(v) => err.with_header(axum::http::header::RETRY_AFTER, v),
                    None => err,
                }
            }
            UpstreamError::Auth { .. } => Self::new(ErrorCode::Denied, StatusCode::FORBIDDEN, message),
            UpstreamError::TooLarge { .. } => {
                Self::new(ErrorCode::ManifestInvalid, StatusCode::BAD_GATEWAY, message)
            }
            UpstreamError::Invalid { .. } => Self::new(ErrorCode::Unknown, StatusCode::BAD_GATEWAY, message),
        }
    }
}

impl From<CacheError> for RegistryError {
    fn from(e: CacheError) -> Self {
        let message = e.to_string();
        match e {
            CacheError::Upstream(u) => u.into(),
            CacheError::BlobUnknown { .. } => {
                Self::new(ErrorCode::BlobUnknown, StatusCode::NOT_FOUND, message)
            }
            CacheError::ManifestUnknown { .. } => {
                Self::new(ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND, message)
            }
            CacheError::NameUnknown { .. } | CacheError::RepositoryDeleting { .. } => {
                Self::new(ErrorCode::NameUnknown, StatusCode::NOT_FOUND, message)
            }
            CacheError::DigestMismatch { .. } => {
                Self::new(ErrorCode::DigestInvalid, StatusCode::BAD_GATEWAY, message)
            }
            CacheError::Truncated { .. } => {
                Self::new(ErrorCode::Unavailable, StatusCode::BAD_GATEWAY, message)
            }
            CacheError::ManifestInvalid(_) => {
                Self::new(ErrorCode::ManifestInvalid, StatusCode::BAD_GATEWAY, message)
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
            CacheError::BlobTooLarge { .. } => {
                Self::new(ErrorCode::Unknown, StatusCode::BAD_GATEWAY, message)
            }
            // Logged where it was caught, with its details.
            CacheError::Panicked { .. } => {
                Self::new(ErrorCode::Unknown, StatusCode::INTERNAL_SERVER_ERROR, message)
            }
            CacheError::Metadata(_) | CacheError::Storage(_) | CacheError::Io(_) => {
                // Logged once, here, where it becomes a 500.
                tracing::error!(error = %message, "internal error");
                Self::new(ErrorCode::Unknown, StatusCode::INTERNAL_SERVER_ERROR, message)
            }
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
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&Body {
            errors: [Item {
                code: self.code,
                message: &self.message,
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
}
