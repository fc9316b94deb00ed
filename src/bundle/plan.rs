//! What an export carries, decided from metadata before a byte is written: the images an
//! image list (or `--all`) selects among those cached, each with its manifests (an index
//! whole, or the children its `platforms` select), the blobs they name, and their
//! referrers (manifests whose subject it is, cosign's `sha256-<hex>.*` tags). An image
//! goes in only if every blob it needs is stored; blobs `--since` names are left out.

use super::layout::{index_children, Descriptor, RawDigest, CONTAINERD_NAME, REF_NAME};
use super::BundleError;
use crate::imagelist::{ImageEntry, Platform};
use crate::metadata::{Metadata, RepoKey};
use crate::oci::is_index;
use crate::upstream::Upstreams;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// On an `index.json` entry: the image list asked for it to be pinned (see `import`).
pub(super) const PIN_ANNOTATION: &str = "io.regcache.pin";
/// Indexes nest at most this deep (as on import).
const DEPTH_MAX: usize = 4;

/// Which cached images an export takes.
#[derive(Debug, Clone)]
pub enum ExportSelection {
    /// The entries of an image list file.
    List(Vec<ImageEntry>),
    /// Everything cached.
    All,
}

/// One file of the bundle: a manifest (body read from metadata) or a blob (from the store).
#[derive(Debug, Clone, Copy)]
pub(super) struct Item {
    pub(super) digest: RawDigest,
    pub(super) size: u64,
    pub(super) manifest: bool,
}

/// What the bundle will carry.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// `index.json`'s entries, one per image.
    pub(super) entries: Vec<Descriptor>,
    /// Manifests then blobs, each once, none that `--since` names.
    pub(super) items: Vec<Item>,
    /// Every digest the selected images need (carried or left out).
    pub(super) needed: HashSet<RawDigest>,
    /// How many of those `--since` left out.
    pub(super) left_out: usize,
    pub(super) warnings: Vec<String>,
}

/// An image to add: repository, manifest, tag, platform filter, and whether a missing
/// part is an error (asked for by name) or a warning (found by `--all` or as a referrer).
struct Want {
    repo: RepoKey,
    digest: String,
    tag: Option<String>,
    platforms: Vec<Platform>,
    strict: bool,
    pin: bool,
}

pub(super) struct Planner<'a> {
    meta: &'a Metadata,
    upstreams: &'a Upstreams,
    since: &'a HashSet<RawDigest>,
    plan: Plan,
    names: HashSet<String>,
    /// Children every visited index lists, exported or not (`--all` does not offer them
    /// again as images of their own).
    listed_children: HashSet<String>,
    /// Per repository: subject digest → referrer manifests linked there.
    referrers: HashMap<RepoKey, HashMap<String, Vec<String>>>,
    /// Per repository: its cached tags.
    tags: HashMap<RepoKey, Vec<(String, String)>>,
    queue: VecDeque<Want>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(meta: &'a Metadata, upstreams: &'a Upstreams, since: &'a HashSet<RawDigest>) -> Self {
        Self {
            meta,
            upstreams,
            since,
            plan: Plan::default(),
            names: HashSet::new(),
            listed_children: HashSet::new(),
            referrers: HashMap::new(),
            tags: HashMap::new(),
            queue: VecDeque::new(),
        }
    }

    pub(super) async fn run(mut self, selection: &ExportSelection) -> Result<Plan, BundleError> {
        match selection {
            ExportSelection::List(entries) => {
                for (i, entry) in entries.iter().enumerate() {
                    self.want_entry(i, entry).await?;
                }
                self.drain().await?;
            }
            ExportSelection::All => {
                for repo in self.meta.served_repositories().await? {
                    for (tag, digest) in self.cached_tags(&repo).await? {
                        self.queue.push_back(Want {
                            repo: repo.clone(),
                            digest,
                            tag: Some(tag),
                            platforms: Vec::new(),
                            strict: false,
                            pin: false,
                        });
                    }
                    self.drain().await?;
                    // Manifests cached by digest only (pulled as HOST/REPO@DIGEST).
                    for (digest, subject) in self.meta.linked_manifests(&repo).await? {
                        let raw = digest.strip_prefix("sha256:").and_then(RawDigest::from_hex);
                        let covered = raw.is_some_and(|r| self.plan.needed.contains(&r))
                            || subject.is_some()
                            || self.listed_children.contains(&digest);
                        if !covered {
                            self.queue.push_back(Want {
                                repo: repo.clone(),
                                digest,
                                tag: None,
                                platforms: Vec::new(),
                                strict: false,
                                pin: false,
                            });
                        }
                    }
                    self.drain().await?;
                }
            }
        }
        // Manifests first, so a reader that streams the bundle knows its images early.
        self.plan.items.sort_by_key(|i| !i.manifest);
        Ok(self.plan)
    }

    async fn cached_tags(&mut self, repo: &RepoKey) -> Result<Vec<(String, String)>, BundleError> {
        if let Some(t) = self.tags.get(repo) {
            return Ok(t.clone());
        }
        let t = self.meta.cached_tags(repo).await?;
        self.tags.insert(repo.clone(), t.clone());
        Ok(t)
    }

    async fn want_entry(&mut self, i: usize, entry: &ImageEntry) -> Result<(), BundleError> {
        let at = format!("image[{i}] ({})", entry.name());
        let routed = self
            .upstreams
            .route(Some(&entry.host), &entry.repo)
            .map_err(|e| BundleError::Request(format!("{at}: {e}")))?;
        let repo = RepoKey {
            upstream: routed.upstream.name.clone(),
            name: routed.repo.to_string(),
        };
        let cached = self.cached_tags(&repo).await?;
        let mut picked: Vec<(String, String)> = Vec::new();
        for tag in &entry.select.tags {
            let Some((_, digest)) = cached.iter().find(|(t, _)| t == tag.as_str()) else {
                return Err(BundleError::Request(format!(
                    "{at}: tag {tag} is not cached (pull or prefetch it first)"
                )));
            };
            picked.push((tag.to_string(), digest.clone()));
        }
        if let Some(re) = &entry.select.tag_regex {
            let matched: Vec<_> = cached
                .iter()
                .filter(|(t, _)| re.is_match(t))
                .filter(|(t, _)| !picked.iter().any(|(p, _)| p == t))
                .cloned()
                .collect();
            if matched.is_empty() && picked.is_empty() && entry.select.digest.is_none() {
                return Err(BundleError::Request(format!(
                    "{at}: no cached tag of {repo} matches tag_regex {:?}",
                    re.as_str()
                )));
            }
            picked.extend(matched);
        }
        for (tag, digest) in picked {
            self.queue.push_back(Want {
                repo: repo.clone(),
                digest,
                tag: Some(tag),
                platforms: entry.platforms.clone(),
                strict: true,
                pin: entry.pin,
            });
        }
        if let Some(d) = &entry.select.digest {
            self.queue.push_back(Want {
                repo: repo.clone(),
                digest: d.to_string(),
                tag: None,
                platforms: entry.platforms.clone(),
                strict: true,
                pin: entry.pin,
            });
        }
        Ok(())
    }

    /// `HOST` of an upstream in image names: `docker.io` for Docker Hub, else its URL's
    /// `host[:port]` (what containerd sends as `ns`, and what routes back on import); an
    /// upstream no longer configured is named by its name, which routes too.
    fn host_of(&self, upstream: &str) -> String {
        match self.upstreams.by_name(upstream) {
            Some(u) if u.docker_hub => "docker.io".to_owned(),
            Some(u) => u.host.clone(),
            None => upstream.to_owned(),
        }
    }

    async fn drain(&mut self) -> Result<(), BundleError> {
        while let Some(want) = self.queue.pop_front() {
            self.add(want).await?;
        }
        Ok(())
    }

    async fn add(&mut self, want: Want) -> Result<(), BundleError> {
        let host = self.host_of(&want.repo.upstream);
        let name = match &want.tag {
            Some(t) => format!("{host}/{}:{t}", want.repo.name),
            None => format!("{host}/{}@{}", want.repo.name, want.digest),
        };
        if !self.names.insert(name.clone()) {
            return Ok(());
        }
        let mut items = Vec::new();
        let mut notes = Vec::new();
        let top = self
            .collect(
                &want.repo,
                &want.digest,
                &want.platforms,
                want.strict,
                0,
                &mut items,
                &mut notes,
            )
            .await?;
        let (media_type, size) = match top {
            Ok(t) => t,
            Err(why) if want.strict => return Err(BundleError::Request(format!("{name}: {why}"))),
            Err(why) => {
                self.plan.warnings.push(format!("{name} is not exported: {why}"));
                return Ok(());
            }
        };
        if !notes.is_empty() {
            self.plan
                .warnings
                .push(format!("{name}: exported without {}", notes.join(", ")));
        }
        let mut annotations = BTreeMap::from([
            (CONTAINERD_NAME.to_owned(), name.clone()),
            (REF_NAME.to_owned(), name.clone()),
        ]);
        if want.pin {
            annotations.insert(PIN_ANNOTATION.to_owned(), "true".to_owned());
        }
        self.plan.entries.push(Descriptor {
            media_type,
            digest: want.digest.clone(),
            size,
            annotations,
            platform: None,
        });
        let manifests: Vec<RawDigest> = items.iter().filter(|i| i.manifest).map(|i| i.digest).collect();
        for item in items {
            if !self.plan.needed.insert(item.digest) {
                continue;
            }
            if self.since.contains(&item.digest) {
                self.plan.left_out += 1;
            } else {
                self.plan.items.push(item);
            }
        }
        self.want_referrers(&want.repo, &manifests).await
    }

    /// Queues the referrers of `manifests`: manifests linked in the repository whose
    /// subject they are, and cosign's tags `sha256-<hex>.sig|att|sbom|…`.
    async fn want_referrers(&mut self, repo: &RepoKey, manifests: &[RawDigest]) -> Result<(), BundleError> {
        if !self.referrers.contains_key(repo) {
            let mut by_subject: HashMap<String, Vec<String>> = HashMap::new();
            for (digest, subject) in self.meta.linked_manifests(repo).await? {
                if let Some(s) = subject {
                    by_subject.entry(s).or_default().push(digest);
                }
            }
            self.referrers.insert(repo.clone(), by_subject);
        }
        let tags = self.cached_tags(repo).await?;
        for m in manifests {
            let subject = m.to_string();
            let found = self
                .referrers
                .get(repo)
                .and_then(|r| r.get(&subject))
                .cloned()
                .unwrap_or_default();
            for digest in found {
                self.queue.push_back(Want {
                    repo: repo.clone(),
                    digest,
                    tag: None,
                    platforms: Vec::new(),
                    strict: false,
                    pin: false,
                });
            }
            let prefix = format!("sha256-{}.", m.hex());
            for (tag, digest) in tags.iter().filter(|(t, _)| t.starts_with(&prefix)) {
                self.queue.push_back(Want {
                    repo: repo.clone(),
                    digest: digest.clone(),
                    tag: Some(tag.clone()),
                    platforms: Vec::new(),
                    strict: false,
                    pin: false,
                });
            }
        }
        Ok(())
    }

    /// Adds the manifest `digest` and what it needs to `items`: `Ok((media type, size))`
    /// when it is complete, `Err(why)` when it is not (and `items` is as before). A child
    /// of an index that is not complete is left out and noted, unless a platform filter
    /// asked for it by name (`strict`).
    #[expect(clippy::too_many_arguments)]
    async fn collect(
        &mut self,
        repo: &RepoKey,
        digest: &str,
        platforms: &[Platform],
        strict: bool,
        depth: usize,
        items: &mut Vec<Item>,
        notes: &mut Vec<String>,
    ) -> Result<Result<(String, u64), String>, BundleError> {
        let Some(node) = self.meta.manifest_node(repo, digest).await? else {
            return Ok(Err(format!("manifest {digest} is not cached under {repo}")));
        };
        let Some(raw) = digest.strip_prefix("sha256:").and_then(RawDigest::from_hex) else {
            return Ok(Err(format!("{digest} is not a sha256 digest")));
        };
        let mark = items.len();
        let size = node.body.len() as u64;
        items.push(Item {
            digest: raw,
            size,
            manifest: true,
        });
        if is_index(&node.media_type) || !node.children.is_empty() {
            if depth >= DEPTH_MAX {
                items.truncate(mark);
                return Ok(Err(format!(
                    "index {digest} nests deeper than {DEPTH_MAX} levels"
                )));
            }
            let children = index_children(&node.body);
            let mut exported = 0;
            let mut skipped = Vec::new();
            let mut found: Vec<bool> = vec![false; platforms.len()];
            for (child, platform) in &children {
                self.listed_children.insert(child.clone());
                let label = platform.as_ref().map_or_else(
                    || child.clone(),
                    |(os, arch, variant)| match variant {
                        Some(v) => format!("{os}/{arch}/{v}"),
                        None => format!("{os}/{arch}"),
                    },
                );
                if !platforms.is_empty() {
                    let Some((os, arch, variant)) = platform else {
                        continue;
                    };
                    let hits: Vec<usize> = platforms
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.matches(os, arch, variant.as_deref()))
                        .map(|(i, _)| i)
                        .collect();
                    if hits.is_empty() {
                        continue;
                    }
                    let done =
                        Box::pin(self.collect(repo, child, &[], false, depth + 1, items, notes)).await?;
                    match done {
                        Ok(_) => {
                            exported += 1;
                            hits.iter().for_each(|&i| found[i] = true);
                        }
                        Err(why) => skipped.push(format!("{label} ({why})")),
                    }
                    continue;
                }
                match Box::pin(self.collect(repo, child, &[], false, depth + 1, items, notes)).await? {
                    Ok(_) => exported += 1,
                    Err(_) => skipped.push(label),
                }
            }
            if strict {
                if let Some(i) = found.iter().position(|f| !f) {
                    items.truncate(mark);
                    let why = skipped.join(", ");
                    return Ok(Err(format!(
                        "platform {} of index {digest} is not fully cached{}",
                        platforms[i],
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(": {why}")
                        }
                    )));
                }
            }
            if exported == 0 {
                items.truncate(mark);
                return Ok(Err(format!(
                    "no platform of index {digest} is fully cached{}",
                    if platforms.is_empty() {
                        ""
                    } else {
                        " among those asked for"
                    }
                )));
            }
            if !skipped.is_empty() {
                notes.push(format!(
                    "{} of the {} platforms of {digest} (not fully cached: {})",
                    skipped.len(),
                    children.len(),
                    skipped.join(", ")
                ));
            }
        } else {
            let sizes = self.meta.stored_blob_sizes(node.blobs.clone()).await?;
            for b in &node.blobs {
                let (Some(size), Some(raw)) = (
                    sizes.get(b),
                    b.strip_prefix("sha256:").and_then(RawDigest::from_hex),
                ) else {
                    items.truncate(mark);
                    return Ok(Err(format!(
                        "blob {b} of manifest {digest} is not cached (pull or prefetch the image first)"
                    )));
                };
                items.push(Item {
                    digest: raw,
                    size: *size,
                    manifest: false,
                });
            }
        }
        Ok(Ok((node.media_type, size)))
    }
}
