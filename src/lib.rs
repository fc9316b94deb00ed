//! regcache: a pull-through cache for OCI / Docker registries. See ARCHITECTURE.md for
//! where things live and which invariant each part upholds.

pub mod cache;
pub mod cli;
pub mod config;
pub mod metadata;
pub mod oci;
pub mod registry;
pub mod server;
pub mod storage;
pub mod upstream;
