//! Admin API errors: a status and a message, as `{"error": "..."}`.

use crate::metadata::MetadataError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the admin API is disabled: set admin.token or admin.token_file (or REGCACHE_ADMIN__TOKEN), or give an identity admin = true in an [[auth.rule]], to enable it")]
    Disabled,
    #[error("a valid `Authorization: Bearer <admin.token>` header, or the login of an identity with admin, is required")]
    Unauthorized,
    #[error("{0:?} may not use the admin API (no [[auth.rule]] gives it admin = true)")]
    Forbidden(String),
    #[error("too many login attempts from this address; retry later")]
    TooManyLogins { retry_after_secs: u64 },
    #[error("metadata: {0}")]
    Metadata(#[from] MetadataError),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Disabled | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooManyLogins { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Metadata(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            // Logged once, here, where it becomes a 500.
            tracing::error!(error = %self, "admin API internal error");
        }
        let mut resp = (
            status,
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        match self {
            Self::Unauthorized => {
                for challenge in crate::auth::ADMIN_CHALLENGES {
                    resp.headers_mut().append(
                        axum::http::header::WWW_AUTHENTICATE,
                        axum::http::HeaderValue::from_static(challenge),
                    );
                }
            }
            Self::TooManyLogins { retry_after_secs } => {
                resp.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(retry_after_secs),
                );
            }
            _ => {}
        }
        resp
    }
}
