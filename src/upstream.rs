//! Talking to upstream registries: which upstream serves a request (routing), the bearer
//! token dance, and the pull-side requests the cache needs. Knows nothing of storage or
//! SQLite; returns bodies and streams for the cache to verify.

mod auth;
mod client;
mod error;
mod routing;
mod tags;
mod unavailable;

pub use client::{FetchedManifest, FetchedReferrers, ManifestHead, Upstream};
pub use error::UpstreamError;
pub use routing::{RouteError, Routed, Upstreams};
pub use tags::{TAG_LIST_MAX_BYTES, TAG_PAGES_MAX};
pub use unavailable::warn_unavailable;
