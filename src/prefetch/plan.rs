//! Resolving a list into images: each entry's upstream (the `ns` rule, as containerd's
//! requests are routed), its tags (as written, or matched against the upstream's tag
//! list), and for each image its manifests — made current with one HEAD per cached tag —
//! and the blobs its selected platforms need.

use super::report::Failure;
use crate::cache::{Cache, CacheError, Target};
use crate::imagelist::{ImageEntry, Platform};
use crate::metadata::ManifestRecord;
use crate::oci::{descriptors, is_index, Descriptor, Digest, Reference};
use std::collections::HashSet;
use std::sync::Arc;

/// Index levels followed below an image's top manifest: an index of images is one level;
/// an index of indexes two. Deeper is malformed or hostile.
const NESTING_MAX: usize = 2;
/// Blobs one image may name, at most: far above any real image (hundreds of layers), a
/// bound on what a hostile manifest can make a prefetch plan.
const BLOBS_MAX: usize = 10_000;

/// One image of the list: an entry's tag or digest.
#[derive(Debug, Clone)]
pub(super) struct Unit {
    /// `HOST/REPO:TAG` or `HOST/REPO@DIGEST`.
    pub name: String,
    pub target: Target,
    pub reference: Reference,
    pub platforms: Vec<Platform>,
    pub pin: bool,
}

/// An image whose manifests are cached and current; its blobs are what is left.
#[derive(Debug, Clone)]
pub(super) struct Planned {
    pub unit: Unit,
    pub digest: String,
    /// Platforms selected, for an index.
    pub platforms: Vec<String>,
    pub manifests_fetched: u64,
    pub blobs: Vec<Descriptor>,
    /// The digests in `blobs`: an index's images share layers, and up to `BLOBS_MAX`
    /// a scan of the list per blob added was quadratic.
    seen: HashSet<Digest>,
}

/// Expands the entries into images. An entry that cannot be routed, whose tag list cannot
/// be read, or whose `tag_regex` matches nothing, is a failure under its own name.
pub(super) async fn expand(cache: &Arc<Cache>, entries: &[ImageEntry]) -> (Vec<Unit>, Vec<Failure>) {
    let (mut units, mut failures) = (Vec::new(), Vec::new());
    for entry in entries {
        let target = match cache.target(Some(&entry.host), &entry.repo) {
            Ok(t) => t,
            Err(e) => {
                failures.push(Failure {
                    image: entry.name(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        let mut tags = entry.select.tags.clone();
        if let Some(regex) = &entry.select.tag_regex {
            match cache.tags(&target).await {
                Ok(all) => {
                    let matched: Vec<_> = all.iter().filter(|t| regex.is_match(t)).collect();
                    if matched.is_empty() {
                        failures.push(Failure {
                            image: format!("{} (tag_regex {:?})", entry.name(), regex.as_str()),
                            error: format!("matches none of the {} tags upstream", all.len()),
                        });
                    }
                    // The upstream's list has no duplicates; only the explicit tags can
                    // repeat a match (a set: the list may hold 100 000 tags).
                    let explicit: HashSet<_> = tags.iter().cloned().collect();
                    for t in matched {
                        match t.parse() {
                            Ok(tag) if !explicit.contains(&tag) => tags.push(tag),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(repo.name = %target.key, tag.name = %t, error = %e, "upstream lists an invalid tag; skipped")
                            }
                        }
                    }
                }
                Err(e) => {
                    failures.push(Failure {
                        image: format!("{} (tag_regex {:?})", entry.name(), regex.as_str()),
                        error: format!("listing the upstream's tags: {}", why(&e)),
                    });
                }
            }
        }
        let refs = tags
            .into_iter()
            .map(|t| (format!("{}:{t}", entry.name()), Reference::Tag(t)))
            .chain(
                entry
                    .select
                    .digest
                    .iter()
                    .map(|d| (format!("{}@{d}", entry.name()), Reference::Digest(d.clone()))),
            );
        for (name, reference) in refs {
            units.push(Unit {
                name,
                target: target.clone(),
                reference,
                platforms: entry.platforms.clone(),
                pin: entry.pin,
            });
        }
    }
    (units, failures)
}

/// Makes the image's manifests current (caching what changed) and lists its blobs.
pub(super) async fn resolve(cache: &Arc<Cache>, unit: Unit) -> Result<Planned, Failure> {
    let fail = |error: String| Failure {
        image: unit.name.clone(),
        error,
    };
    let (top, fetched) = cache
        .refresh_manifest(&unit.target, &unit.reference)
        .await
        .map_err(|e| fail(why(&e)))?;
    let mut planned = Planned {
        digest: top.digest.clone(),
        platforms: Vec::new(),
        manifests_fetched: u64::from(fetched),
        blobs: Vec::new(),
        seen: HashSet::new(),
        unit: unit.clone(),
    };
    collect(cache, &unit, top, 0, &mut planned).await.map_err(fail)?;
    Ok(planned)
}

async fn collect(
    cache: &Arc<Cache>,
    unit: &Unit,
    m: ManifestRecord,
    depth: usize,
    out: &mut Planned,
) -> Result<(), String> {
    let d = descriptors(&m.body).map_err(|e| format!("manifest {}: {e}", m.digest))?;
    if !is_index(&m.media_type) && d.children.is_empty() {
        for b in d.blobs {
            if !out.seen.contains(&b.digest) {
                if out.blobs.len() >= BLOBS_MAX {
                    return Err(format!("names more than {BLOBS_MAX} blobs"));
                }
                out.seen.insert(b.digest.clone());
                out.blobs.push(b);
            }
        }
        return Ok(());
    }
    if depth >= NESTING_MAX {
        return Err(format!("indexes nested more than {NESTING_MAX} deep"));
    }
    let selected: Vec<&Descriptor> = d
        .children
        .iter()
        .filter(|c| {
            unit.platforms.is_empty()
                || c.platform.as_ref().is_some_and(|p| {
                    unit.platforms
                        .iter()
                        .any(|f| f.matches(&p.os, &p.architecture, p.variant.as_deref()))
                })
        })
        .collect();
    if selected.is_empty() {
        let wanted: Vec<String> = unit.platforms.iter().map(ToString::to_string).collect();
        let has: Vec<String> = d
            .children
            .iter()
            .filter_map(|c| c.platform.as_ref().map(ToString::to_string))
            .collect();
        return Err(format!(
            "no platform of the index matches {}; it has {}",
            wanted.join(", "),
            if has.is_empty() {
                "none declared".to_owned()
            } else {
                has.join(", ")
            }
        ));
    }
    for child in selected {
        let (cm, fetched) = cache
            .refresh_manifest(&unit.target, &Reference::Digest(child.digest.clone()))
            .await
            .map_err(|e| format!("child manifest {}: {}", child.digest, why(&e)))?;
        out.manifests_fetched += u64::from(fetched);
        if let Some(p) = &child.platform {
            out.platforms.push(p.to_string());
        }
        Box::pin(collect(cache, unit, cm, depth + 1, out)).await?;
    }
    Ok(())
}

/// A cache error as a prefetch failure says it.
pub(super) fn why(e: &CacheError) -> String {
    match e {
        CacheError::ManifestUnknown { reference } => format!("{reference} not found upstream"),
        CacheError::BlobUnknown { digest } => format!("blob {digest} not found upstream"),
        CacheError::NameUnknown { repo } => format!("repository {repo} not found upstream"),
        other => other.to_string(),
    }
}
