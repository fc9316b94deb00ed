//! Pure OCI vocabulary: digests, repository names, references, media types and manifest
//! parsing. Depends on nothing else in the crate and does no I/O.

mod descriptor;
mod digest;
mod manifest;
mod media_types;
mod name;

pub use descriptor::{descriptors, Descriptor, Descriptors, PlatformSpec};
pub use digest::{Digest, DigestError, Sha256Writer};
pub use manifest::{config_created, parse_manifest, ManifestError, ParsedManifest};
pub use media_types::{
    is_index, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MANIFEST_ACCEPT, MANIFEST_MAX_BYTES, OCI_INDEX,
    OCI_MANIFEST,
};
pub use name::{NameError, Reference, RepoName, Tag};
