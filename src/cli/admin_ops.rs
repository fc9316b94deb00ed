//! `regcache purge | jobs | repos | delete-repo | cleanup run`: the admin API's work from
//! the command line, against the data dir. Jobs are queued into the same SQLite, so a
//! running server picks them up.

use super::format::bytes;
use super::ops::{open_metadata, scheduler_for};
use crate::config::Config;
use crate::metadata::{now_secs, Job, RepoKey};
use crate::oci::RepoName;
use anyhow::Context;

/// `upstream/repo` → the key the database uses (Docker Hub names get `library/`).
fn repo_key(config: &Config, arg: &str) -> anyhow::Result<RepoKey> {
    let (upstream, name) = arg
        .split_once('/')
        .with_context(|| format!("repository {arg:?} must be written <upstream>/<repository>"))?;
    let u = config
        .upstream
        .iter()
        .find(|u| u.name == upstream)
        .with_context(|| format!("repository {arg:?}: no upstream is named {upstream:?}"))?;
    let name: RepoName = name.parse().with_context(|| format!("repository {arg:?}"))?;
    let hub = url::Url::parse(&u.url)
        .ok()
        .and_then(|url| {
            url.host_str()
                .map(|h| matches!(h, "registry-1.docker.io" | "docker.io" | "index.docker.io"))
        })
        .unwrap_or(false);
    let name = if hub { name.with_library_prefix() } else { name };
    Ok(RepoKey {
        upstream: upstream.to_owned(),
        name: name.to_string(),
    })
}

fn print_job_queued(id: i64, what: &str, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::json!({ "job": id }));
    } else {
        println!("queued job {id}: {what} (see `regcache jobs {id}`; a running server does the work)");
    }
    Ok(())
}

pub(super) async fn purge(config: &Config, repo: Option<&str>, json: bool) -> anyhow::Result<()> {
    let repo = repo.map(|r| repo_key(config, r)).transpose()?;
    let meta = open_metadata(config).await?;
    let args = match &repo {
        Some(r) => serde_json::json!({ "upstream": r.upstream, "repository": r.name }),
        None => serde_json::json!({}),
    };
    let (id, _) = meta
        .enqueue_job(
            "purge",
            args,
            None,
            i64::from(config.jobs.max_attempts),
            now_secs(),
        )
        .await?;
    let what = repo.map_or_else(|| "purge everything".to_owned(), |r| format!("purge {r}"));
    print_job_queued(id, &what, json)
}

fn time(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.to_string())
}

pub(super) async fn jobs(config: &Config, id: Option<i64>, json: bool) -> anyhow::Result<()> {
    let meta = open_metadata(config).await?;
    if let Some(id) = id {
        let job = meta.job(id).await?.with_context(|| format!("no job {id}"))?;
        if json {
            println!("{}", serde_json::to_string_pretty(&job)?);
        } else {
            print_job(&job);
        }
        return Ok(());
    }
    let jobs = meta.jobs(None, 100).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    println!(
        "{:>6}  {:<18} {:<10} {:>8}  {:<12} args",
        "id", "kind", "state", "attempts", "finished"
    );
    for j in &jobs {
        println!(
            "{:>6}  {:<18} {:<10} {:>8}  {:<12} {}",
            j.id,
            j.kind,
            j.state,
            j.attempts,
            time(j.finished_at),
            j.args
        );
    }
    Ok(())
}

fn print_job(j: &Job) {
    println!("job {} ({})", j.id, j.kind);
    println!("  state       {}", j.state);
    println!("  args        {}", j.args);
    println!(
        "  attempts    {} of {} (runs {})",
        j.attempts, j.max_attempts, j.runs
    );
    println!("  progress    {}", j.progress);
    println!(
        "  result      {}",
        j.result
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    );
    println!("  error       {}", j.error.as_deref().unwrap_or("-"));
    println!(
        "  created {}  started {}  finished {}",
        j.created_at,
        time(j.started_at),
        time(j.finished_at)
    );
}

pub(super) async fn repos(config: &Config, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let meta = open_metadata(config).await?;
    if let Some(name) = name {
        let key = repo_key(config, name)?;
        let detail = meta
            .repository(&key)
            .await?
            .with_context(|| format!("repository {key} is not cached"))?;
        if json {
            println!("{}", serde_json::to_string_pretty(&detail)?);
            return Ok(());
        }
        let s = &detail.summary;
        println!(
            "{}/{} ({}): {} tags, {} manifests, {} blobs, {}",
            s.upstream,
            s.name,
            s.state,
            s.tag_count,
            s.manifest_count,
            s.blob_count,
            bytes(s.bytes)
        );
        println!(
            "  {:<30} {:<73} {:>10} {:>12} {:>12} {:>6}",
            "tag", "digest", "size", "created", "last pulled", "pinned"
        );
        for t in &detail.tags {
            println!(
                "  {:<30} {:<73} {:>10} {:>12} {:>12} {:>6}",
                t.name,
                t.digest,
                bytes(t.size),
                time(t.created),
                t.last_pulled,
                if t.pinned { "yes" } else { "" }
            );
        }
        return Ok(());
    }
    let repos = meta.repositories(100_000).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&repos)?);
        return Ok(());
    }
    println!(
        "{:<50} {:<17} {:>6} {:>6} {:>10} {:>12} {:>6}",
        "repository", "state", "tags", "blobs", "bytes", "last pulled", "pinned"
    );
    for r in &repos {
        println!(
            "{:<50} {:<17} {:>6} {:>6} {:>10} {:>12} {:>6}",
            format!("{}/{}", r.upstream, r.name),
            r.state,
            r.tag_count,
            r.blob_count,
            bytes(r.bytes),
            r.last_pulled,
            r.pinned_tags
        );
    }
    Ok(())
}

pub(super) async fn delete_repo(config: &Config, name: &str, json: bool) -> anyhow::Result<()> {
    let key = repo_key(config, name)?;
    let meta = open_metadata(config).await?;
    let id = meta
        .schedule_repo_delete(&key, i64::from(config.jobs.max_attempts), now_secs())
        .await?
        .with_context(|| format!("repository {key} is not cached"))?;
    print_job_queued(id, &format!("delete repository {key} (no longer served)"), json)
}

pub(super) async fn cleanup_run(config: &Config, dry_run: bool, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.cleanup.policy.is_empty(),
        "no cleanup policies are configured ([[cleanup.policy]] in the config file)"
    );
    let s = scheduler_for(config).await?;
    if dry_run {
        let plans = crate::scheduler::jobs::dry_run_cleanups(&s)
            .await
            .map_err(anyhow::Error::msg)?;
        if json {
            let out: Vec<_> = plans
                .iter()
                .map(|(p, r, d)| serde_json::json!({ "policy": p, "repository": r.to_string(), "decisions": d }))
                .collect();
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        for (policy, repo, decisions) in &plans {
            let doomed = decisions.iter().filter(|d| d.delete).count();
            println!(
                "policy {policy} on {repo}: would delete {doomed} of {} tags",
                decisions.len()
            );
            for d in decisions.iter().filter(|d| d.delete) {
                println!("  delete {:<30} {}  ({})", d.tag, d.digest, d.reason);
            }
        }
        return Ok(());
    }
    let ids = crate::scheduler::jobs::queue_cleanups(&s, true)
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::json!({ "jobs": ids }));
    } else {
        println!("queued {} cleanup jobs: {ids:?}", ids.len());
    }
    Ok(())
}
