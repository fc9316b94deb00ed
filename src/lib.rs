//! regcache: a pull-through cache for OCI / Docker registries. See ARCHITECTURE.md for
//! where things live and which invariant each part upholds.

// Input, I/O and the network must never be able to panic the server; tests may unwrap.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod auth;
pub mod bundle;
pub mod cache;
pub mod civil;
pub mod cli;
pub mod config;
pub mod counters;
pub mod fault;
pub mod glob;
pub mod identity;
pub mod imagelist;
pub mod log_writer;
pub mod metadata;
pub mod metrics;
pub mod oci;
pub mod prefetch;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod status_page;
pub mod storage;
pub mod upstream;
