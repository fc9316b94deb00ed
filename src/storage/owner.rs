//! The owner marker of a shared store's prefix (S3, GCS): the object
//! `<prefix>/regcache-owner` names the regcache instance whose SQLite database accounts
//! for the blobs under the prefix. Two instances with separate data directories on one
//! prefix would each take the other's blobs for orphans; reconciliation deletes orphans
//! only where the marker names its own instance (I2 without destroying a neighbour's
//! cache). A filesystem or memory store belongs to one data directory and has no marker.

use super::{BlobStore, StorageError};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// The marker's name under the prefix (outside `blobs/`, so no listing of blobs sees it).
pub const OWNER_MARKER: &str = "regcache-owner";

/// Markers are tiny; anything longer is not one of ours.
const MARKER_MAX_BYTES: usize = 4096;

/// Who owns the prefix, as the marker says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixOwner {
    /// A store of one data directory (filesystem, memory): nothing to share.
    NotShared,
    /// The marker names this instance.
    Ours,
    /// No marker yet (only from [`BlobStore::prefix_owner`], which never writes one).
    Unclaimed,
    /// The marker names another instance (and the data directory it gave).
    Other { instance: String, data_dir: String },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    instance: String,
    #[serde(default)]
    data_dir: String,
    #[serde(default)]
    claimed_at: i64,
}

impl BlobStore {
    /// Marks this store as one other regcache instances could share (S3, GCS).
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }

    fn owner_key(&self) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(OWNER_MARKER)
        } else {
            ObjectPath::from(format!("{}/{OWNER_MARKER}", self.prefix.trim_end_matches('/')))
        }
    }

    /// The prefix's owner. A prefix with no marker is claimed for `instance` (of the data
    /// directory `data_dir`) first, with a create-only put (`If-None-Match: *` on S3, a
    /// generation precondition on GCS), so of two instances claiming at once exactly one
    /// writes the marker and both read back the same owner. A store that cannot put
    /// conditionally is written plainly and the marker read back decides, as before.
    pub async fn claim_prefix(
        &self,
        instance: &str,
        data_dir: &str,
        now: i64,
    ) -> Result<PrefixOwner, StorageError> {
        if !self.shared {
            return Ok(PrefixOwner::NotShared);
        }
        let marker = match self.read_marker().await? {
            Some(m) => m,
            None => {
                let mine = Marker {
                    instance: instance.to_owned(),
                    data_dir: data_dir.to_owned(),
                    claimed_at: now,
                };
                let body = PutPayload::from(serde_json::to_vec(&mine).unwrap_or_default());
                let create = PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                };
                match self.store.put_opts(&self.owner_key(), body.clone(), create).await {
                    // Another instance claimed the prefix since it was read: its marker
                    // stands.
                    Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                    Err(object_store::Error::NotImplemented { .. }) => {
                        self.store.put(&self.owner_key(), body).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
                self.read_marker().await?.unwrap_or(mine)
            }
        };
        Ok(if marker.instance == instance {
            PrefixOwner::Ours
        } else {
            PrefixOwner::Other {
                instance: marker.instance,
                data_dir: marker.data_dir,
            }
        })
    }

    /// The prefix's owner, read only.
    pub async fn prefix_owner(&self, instance: &str) -> Result<PrefixOwner, StorageError> {
        if !self.shared {
            return Ok(PrefixOwner::NotShared);
        }
        Ok(match self.read_marker().await? {
            None => PrefixOwner::Unclaimed,
            Some(m) if m.instance == instance => PrefixOwner::Ours,
            Some(m) => PrefixOwner::Other {
                instance: m.instance,
                data_dir: m.data_dir,
            },
        })
    }

    /// The marker, or `None` when there is none; an unreadable one counts as another
    /// instance's (nothing is deleted on its behalf).
    async fn read_marker(&self) -> Result<Option<Marker>, StorageError> {
        let bytes = match self.store.get(&self.owner_key()).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let parsed = (bytes.len() <= MARKER_MAX_BYTES)
            .then(|| serde_json::from_slice::<Marker>(&bytes).ok())
            .flatten();
        Ok(Some(parsed.unwrap_or(Marker {
            instance: "(unreadable marker)".into(),
            data_dir: String::new(),
            claimed_at: 0,
        })))
    }
}
