//! The last step of an import: `index.json` names the images (routed to an upstream by
//! the host in their name, as containerd's `ns` is, or to `--upstream`); each image's
//! manifests come from the bundle or the cache, and every blob they name must be stored.
//! Only when every image is complete is any linked, each in one transaction (I5, I11).

use super::intake::commit_file;
use super::layout::{
    descriptor_name, referrer_descriptor, ImageName, LayoutIndex, Pointer, RawDigest, DELTA_OF,
};
use super::plan::PIN_ANNOTATION;
use super::{BundleError, Event, Progress};
use crate::metadata::{now_secs, ImportedImage, Metadata, NewManifest, RepoKey};
use crate::oci::{config_created, parse_manifest, Digest};
use crate::storage::BlobStore;
use crate::upstream::Upstreams;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Image configs larger than this are not read for their `created` time (as on a pull).
const CONFIG_MAX_BYTES: u64 = 1024 * 1024;
/// Indexes nest at most this deep below an `index.json` entry (an index of indexes is
/// rare; this bounds a hostile bundle's recursion).
const DEPTH_MAX: usize = 4;
/// Problems listed in one error, at most; the count of the rest is given.
const ERRORS_LISTED_MAX: usize = 50;

/// One image `index.json` names, routed.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The name as the bundle gives it.
    name: String,
    repo: RepoKey,
    tag: Option<String>,
    digest: Digest,
    media_type: String,
    /// `io.regcache.pin = "true"`: the export's image list pinned it; the import pins
    /// it too (its tag, or its digest), in the transaction that links it.
    pin: bool,
}

/// What an import reads and holds, for linking.
pub(super) struct LinkContext<'a> {
    pub(super) meta: &'a Metadata,
    pub(super) store: &'a BlobStore,
    pub(super) import: i64,
    pub(super) work: &'a Path,
    pub(super) spooled: &'a HashMap<RawDigest, u64>,
    pub(super) bundle: &'a str,
}

/// What linking did.
#[derive(Debug, Default)]
pub(super) struct Linked {
    pub(super) images: Vec<String>,
    pub(super) children_absent: u64,
}

/// Routes image names to repositories.
#[derive(Debug, Clone)]
pub(super) struct Linker {
    upstreams: Upstreams,
    upstream: Option<String>,
}

impl Linker {
    pub(super) fn new(upstreams: &Upstreams, upstream: Option<&str>) -> Self {
        Self {
            upstreams: upstreams.clone(),
            upstream: upstream.map(str::to_owned),
        }
    }

    /// Every image `index.json` names, or what is wrong with each name that does not
    /// route.
    pub(super) fn targets(&self, index: &LayoutIndex) -> Result<Vec<Target>, Vec<String>> {
        let names: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
        let (mut targets, mut errors) = (Vec::new(), Vec::new());
        let mut tagged: HashMap<(RepoKey, String), Digest> = HashMap::new();
        for (i, d) in index.manifests.iter().enumerate() {
            let at = format!("index.json manifests[{i}]");
            let digest: Digest = match d.digest.parse() {
                Ok(digest) => digest,
                Err(e) => {
                    errors.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let Some(name) = descriptor_name(d) else {
                errors.push(format!(
                    "{at} ({digest}) has no image name: give it the annotation \
                     io.containerd.image.name or org.opencontainers.image.ref.name = HOST/REPO:TAG \
                     (skopeo copy … oci-archive:FILE:HOST/REPO:TAG writes it)"
                ));
                continue;
            };
            let parsed = match ImageName::parse(name, &names) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let ns = self.upstream.as_deref().or(parsed.host.as_deref());
            let routed = match self.upstreams.route(ns, &parsed.repo) {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!(
                        "{at} ({name}): {e}; configure an upstream with that name or host, or pass --upstream NAME"
                    ));
                    continue;
                }
            };
            let repo = RepoKey {
                upstream: routed.upstream.name.clone(),
                name: routed.repo.to_string(),
            };
            let tag = match parsed.pointer {
                Pointer::Tag(t) => Some(t.to_string()),
                Pointer::Digest(named) if named != digest => {
                    errors.push(format!("{at} ({name}) names {named} but points at {digest}"));
                    continue;
                }
                Pointer::Digest(_) => None,
            };
            if let Some(t) = &tag {
                match tagged.insert((repo.clone(), t.clone()), digest.clone()) {
                    Some(other) if other != digest => {
                        errors.push(format!("{at} ({name}): the tag is also given to {other}"));
                        continue;
                    }
                    _ => {}
                }
            }
            targets.push(Target {
                name: name.to_owned(),
                repo,
                tag,
                digest,
                media_type: d.media_type.clone(),
                pin: d.annotations.get(PIN_ANNOTATION).is_some_and(|v| v == "true"),
            });
        }
        if errors.is_empty() {
            Ok(targets)
        } else {
            Err(errors)
        }
    }

    /// Checks every image, then links them all (one transaction each), or none.
    pub(super) async fn link(
        &self,
        ctx: &LinkContext<'_>,
        index: &LayoutIndex,
        progress: &dyn Progress,
    ) -> Result<Linked, BundleError> {
        let targets = self.targets(index).map_err(|errors| BundleError::Bundle {
            bundle: ctx.bundle.to_owned(),
            message: format!("index.json: {}", errors.join("; ")),
        })?;
        let hint = index
            .annotations
            .get(DELTA_OF)
            .map(|p| format!(" (this bundle is a delta of {p}: import that one first)"))
            .unwrap_or_default();
        let mut linked = Linked::default();
        let (mut images, mut errors) = (Vec::new(), Vec::new());
        for t in &targets {
            match resolve(ctx, t, &hint).await? {
                Ok((image, absent)) => {
                    linked.children_absent += absent;
                    images.push((t, image));
                }
                Err(why) => errors.push(format!("{}: {why}", t.name)),
            }
        }
        if !errors.is_empty() {
            let more = errors.len().saturating_sub(ERRORS_LISTED_MAX);
            errors.truncate(ERRORS_LISTED_MAX);
            if more > 0 {
                errors.push(format!("… and {more} more"));
            }
            return Err(BundleError::Incomplete(errors));
        }
        for (t, image) in images {
            if let Err(refused) = ctx
                .meta
                .link_imported_image(ctx.import, image, now_secs())
                .await?
            {
                return Err(BundleError::Bundle {
                    bundle: ctx.bundle.to_owned(),
                    message: format!(
                        "image {}: {refused}; nothing of it was linked: run the import again",
                        t.name
                    ),
                });
            }
            progress.event(&Event::Image {
                name: t.name.clone(),
                digest: t.digest.to_string(),
            });
            linked.images.push(t.name.clone());
        }
        Ok(linked)
    }
}

/// Gathers an image: the manifest `index.json` points at and every child the bundle or
/// the cache has, with the blobs they name. The outer `Err` is a failure of the cache;
/// the inner one says why the image is not complete. Also returns how many children of
/// indexes neither has (an export filtered by platform leaves them out).
async fn resolve(
    ctx: &LinkContext<'_>,
    t: &Target,
    hint: &str,
) -> Result<Result<(ImportedImage, u64), String>, BundleError> {
    let mut image = ImportedImage {
        repo: t.repo.clone(),
        tag: t.tag.clone(),
        pin: t
            .pin
            .then(|| t.tag.clone().unwrap_or_else(|| t.digest.to_string())),
        manifests: Vec::new(),
        blobs: Vec::new(),
        referrers: Vec::new(),
    };
    let mut absent = 0;
    let mut seen = HashSet::new();
    // (digest, media type from the parent's descriptor, depth); depth 0 is required.
    let mut stack = vec![(t.digest.clone(), Some(t.media_type.clone()), 0usize)];
    while let Some((digest, media_hint, depth)) = stack.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let required = depth == 0;
        let raw = RawDigest::of(&digest);
        let (body, in_bundle) = if ctx.spooled.contains_key(&raw) {
            let path = ctx.work.join("manifests").join(raw.hex());
            let body = std::fs::read(&path).map_err(super::io_err(&path))?;
            (bytes::Bytes::from(body), true)
        } else if let Some(m) = ctx.meta.cached_manifest(&digest.to_string()).await? {
            (m.body, false)
        } else if required {
            return Ok(Err(format!(
                "manifest {digest} is neither in the bundle nor cached{hint}"
            )));
        } else {
            absent += 1;
            continue;
        };
        let hint_type = media_hint.as_deref().filter(|m| !m.is_empty());
        let parsed = match parse_manifest(&body, hint_type) {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("manifest {digest}: {e}"))),
        };
        let names: Vec<String> = parsed.blobs.iter().map(ToString::to_string).collect();
        let stored = ctx.meta.stored_blob_sizes(names.clone()).await?;
        let mut complete = true;
        for (blob, name) in parsed.blobs.iter().zip(&names) {
            if stored.contains_key(name) {
                continue;
            }
            let raw_blob = RawDigest::of(blob);
            if let Some(size) = ctx.spooled.get(&raw_blob) {
                // A blob that looked like a manifest when it was read: commit it now.
                commit_spooled(ctx, &raw_blob, *size).await?;
                continue;
            }
            if required || in_bundle {
                return Ok(Err(format!(
                    "needs blob {blob} (named by manifest {digest}), which is neither in the bundle nor cached{hint}"
                )));
            }
            complete = false;
        }
        if !complete {
            // A child the cache has without all its blobs, which the bundle does not
            // carry: the index is served, this platform is not.
            absent += 1;
            continue;
        }
        let created = match &parsed.config {
            Some(config) => ctx
                .store
                .read_small(config, CONFIG_MAX_BYTES)
                .await
                .ok()
                .flatten()
                .and_then(|b| config_created(&b)),
            None => None,
        };
        if depth < DEPTH_MAX {
            for child in &parsed.children {
                stack.push((child.clone(), None, depth + 1));
            }
        }
        if let Some(subject) = &parsed.subject {
            image.referrers.push((
                subject.to_string(),
                referrer_descriptor(&digest.to_string(), &parsed.media_type, &body),
            ));
        }
        image.blobs.extend(names);
        image.manifests.push(NewManifest {
            digest: digest.to_string(),
            media_type: parsed.media_type,
            body,
            config: parsed.config.as_ref().map(ToString::to_string),
            blobs: parsed.blobs.iter().map(ToString::to_string).collect(),
            children: parsed.children.iter().map(ToString::to_string).collect(),
            subject: parsed.subject.as_ref().map(ToString::to_string),
            created,
        });
    }
    image.blobs.sort_unstable();
    image.blobs.dedup();
    Ok(Ok((image, absent)))
}

/// Commits a kept manifest file as a blob (content named as a layer or config by some
/// manifest, which looked like a manifest itself).
async fn commit_spooled(ctx: &LinkContext<'_>, digest: &RawDigest, size: u64) -> Result<(), BundleError> {
    let spool = ctx.work.join("manifests").join(digest.hex());
    let tmp = ctx.work.join(format!("{}.part", ulid::Ulid::new()));
    std::fs::copy(&spool, &tmp).map_err(super::io_err(&tmp))?;
    let committed = commit_file(ctx.meta, ctx.store, ctx.import, digest, &tmp, size).await;
    let _ = std::fs::remove_file(&tmp);
    if committed? {
        Ok(())
    } else {
        Err(BundleError::Bundle {
            bundle: ctx.bundle.to_owned(),
            message: format!("blob {digest}: the cache is deleting it right now; run the import again"),
        })
    }
}
