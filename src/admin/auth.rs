//! Admission to the admin API: `auth::Access::admin_access` decides (the admin token, or
//! an identity a rule gives `admin`); this maps its answer to admin errors. Credentials
//! are never logged.

use super::{AdminError, AdminState};
use crate::auth::AdminAccess;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub(super) async fn require_admin(
    State(state): State<Arc<AdminState>>,
    req: Request,
    next: Next,
) -> Response {
    match state.access.admin_access(req.headers(), req.extensions()).await {
        AdminAccess::Granted(_) => next.run(req).await,
        AdminAccess::Disabled => AdminError::Disabled.into_response(),
        AdminAccess::Unauthenticated => AdminError::Unauthorized.into_response(),
        AdminAccess::Forbidden { identity } => AdminError::Forbidden(identity.to_string()).into_response(),
        AdminAccess::Busy { retry_after } => AdminError::TooManyLogins {
            retry_after_secs: retry_after.as_secs().max(1),
        }
        .into_response(),
    }
}
