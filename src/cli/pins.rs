//! `regcache pin [REF]` and `regcache unpin REF`: pin an image (exempt from ttl expiry,
//! size eviction and cleanup policies) or make it ordinary again, by `HOST/REPO:TAG` or
//! `HOST/REPO@DIGEST` with HOST resolved to an upstream as containerd's `ns` is. Works on
//! the data dir's SQLite, beside a running server or not.

use super::ops::open_metadata;
use crate::config::Config;
use crate::imagelist::ImageRef;
use crate::metadata::{now_secs, PinnedRows, RepoKey};
use crate::upstream::Upstreams;
use anyhow::Context;

/// The repository and the pinned reference (tag or digest) `arg` names.
fn resolve(config: &Config, arg: &str) -> anyhow::Result<(ImageRef, RepoKey, String)> {
    let image: ImageRef = arg
        .parse()
        .map_err(|e: String| anyhow::anyhow!("image reference: {e}"))?;
    let upstreams = Upstreams::from_config(config).context("building the upstream clients")?;
    let routed = upstreams
        .route(Some(&image.host), &image.repo)
        .with_context(|| format!("image reference {arg:?}"))?;
    let key = RepoKey {
        upstream: routed.upstream.name.clone(),
        name: routed.repo.to_string(),
    };
    let reference = match (&image.tag, &image.digest) {
        (Some(t), _) => t.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => anyhow::bail!("image reference {arg:?} names no tag or digest"),
    };
    Ok((image, key, reference))
}

fn rows(r: &PinnedRows) -> String {
    format!(
        "{} tags, {} manifests, {} blob links",
        r.tags, r.manifests, r.blob_links
    )
}

pub(super) async fn pin(config: &Config, arg: Option<&str>, json: bool) -> anyhow::Result<()> {
    let Some(arg) = arg else {
        return list(config, json).await;
    };
    let (image, key, reference) = resolve(config, arg)?;
    let meta = open_metadata(config).await?;
    let out = meta.pin(&key, &reference, now_secs()).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "image": image.to_string(), "repository": key.to_string(), "reference": reference, "outcome": out })
        );
        return Ok(());
    }
    let verb = if out.new { "pinned" } else { "already pinned:" };
    if out.repository_deleting {
        println!("{verb} {image} ({key}); the repository is being deleted: the pin takes effect if it is cached again");
    } else if !out.cached {
        println!(
            "{verb} {image} ({key}); not cached yet: the pin takes effect when it is cached (by a pull or `regcache prefetch`)"
        );
    } else {
        println!(
            "{verb} {image} ({key}); exempt from expiry, eviction and cleanup policies ({} newly pinned)",
            rows(&out.pinned)
        );
    }
    Ok(())
}

pub(super) async fn unpin(config: &Config, arg: &str, json: bool) -> anyhow::Result<()> {
    let (image, key, reference) = resolve(config, arg)?;
    let meta = open_metadata(config).await?;
    let out = meta.unpin(&key, &reference, now_secs()).await?;
    anyhow::ensure!(out.existed, "{image} ({key}) is not pinned; nothing changed");
    if json {
        println!(
            "{}",
            serde_json::json!({ "image": image.to_string(), "repository": key.to_string(), "reference": reference, "outcome": out })
        );
    } else {
        println!(
            "unpinned {image} ({key}): {} are ordinary entries again, due at now + ttl unless used",
            rows(&out.unpinned)
        );
    }
    Ok(())
}

async fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let meta = open_metadata(config).await?;
    let pins = meta.pins().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pins)?);
        return Ok(());
    }
    println!("{:<60} {:<12} {:>12}", "pin", "cached", "since");
    for p in &pins {
        let sep = if p.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        println!(
            "{:<60} {:<12} {:>12}",
            format!("{}/{}{sep}{}", p.upstream, p.repository, p.reference),
            if p.cached { "yes" } else { "not yet" },
            p.created_at
        );
    }
    Ok(())
}
