//! Upstream errors, classified by what the cache does about them.

/// Errors from an upstream. `Clone` because one in-flight fetch answers many requests.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream} is unreachable: {message}")]
    Unreachable { upstream: String, message: String },
    #[error("upstream {upstream} timed out: {message}")]
    Timeout { upstream: String, message: String },
    #[error("upstream {upstream} answered {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Status {
        upstream: String,
        status: u16,
        /// The OCI error code from the body, when it had one.
        code: Option<String>,
        message: String,
        retry_after: Option<String>,
    },
    #[error("upstream {upstream}: {message}")]
    Auth { upstream: String, message: String },
    #[error("upstream {upstream} sent an answer larger than {limit_bytes} bytes; refused")]
    TooLarge { upstream: String, limit_bytes: usize },
    #[error("upstream {upstream} sent an invalid response: {message}")]
    Invalid { upstream: String, message: String },
}

impl UpstreamError {
    /// The upstream could not answer (network, timeout, 5xx, rate limit): a cached copy
    /// may be served instead.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Auth { .. } | Self::TooLarge { .. } | Self::Invalid { .. } => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    pub fn from_reqwest(upstream: &str, e: &reqwest::Error) -> Self {
        let message = error_chain(e);
        if e.is_timeout() {
            Self::Timeout {
                upstream: upstream.to_owned(),
                message,
            }
        } else if e.is_decode() || e.is_body() {
            Self::Invalid {
                upstream: upstream.to_owned(),
                message,
            }
        } else {
            Self::Unreachable {
                upstream: upstream.to_owned(),
                message,
            }
        }
    }
}

/// An error with its causes, since reqwest's top-level text says little.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
