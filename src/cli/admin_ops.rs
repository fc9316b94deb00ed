//! `regcache purge | jobs | repos | delete-repo | cleanup run`: the admin API's work from
//! the command line, against the data dir. Jobs are queued into the same SQLite, so a
//! running server picks them up.

use super::format::{bytes, when, when_opt, Align, Table};
use super::ops::{open_metadata, scheduler_for};
use crate::config::Config;
use crate::metadata::{now_secs, Job, RepoKey};
use crate::oci::RepoName;
use crate::upstream::Upstreams;
use anyhow::Context;

/// A repository argument → the key the database uses, routed as a pull is: a leading
/// upstream name selects that upstream, anything else is the default upstream's
/// repository, and Docker Hub names get `library/` (`alpine` → `docker.io/library/alpine`).
fn repo_key(config: &Config, arg: &str) -> anyhow::Result<RepoKey> {
    let name: RepoName = arg.parse().with_context(|| {
        format!("repository {arg:?} is not a repository name (UPSTREAM/REPO, e.g. docker.io/library/alpine)")
    })?;
    let upstreams = Upstreams::from_config(config).context("reading the configured upstreams")?;
    let routed = upstreams
        .route(None, &name)
        .with_context(|| format!("repository {arg:?}"))?;
    Ok(RepoKey {
        upstream: routed.upstream.name.clone(),
        name: routed.repo.to_string(),
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

pub(super) async fn jobs(config: &Config, id: Option<i64>, json: bool) -> anyhow::Result<()> {
    let meta = open_metadata(config).await?;
    let now = now_secs();
    if let Some(id) = id {
        let job = meta
            .job(id)
            .await?
            .with_context(|| format!("there is no job {id}; `regcache jobs` lists them"))?;
        if json {
            println!("{}", serde_json::to_string_pretty(&job)?);
        } else {
            print!("{}", job_detail(&job, now));
        }
        return Ok(());
    }
    let jobs = meta.jobs(None, 100).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    let mut table = Table::new(&[
        ("id", Align::Right),
        ("kind", Align::Left),
        ("state", Align::Left),
        ("runs", Align::Right),
        ("finished", Align::Left),
        ("args", Align::Left),
    ]);
    for j in &jobs {
        table.row(vec![
            j.id.to_string(),
            j.kind.clone(),
            j.state.clone(),
            j.runs.to_string(),
            when_opt(j.finished_at, now),
            j.args.to_string(),
        ]);
    }
    print!("{}", table.render("", "no jobs yet"));
    Ok(())
}

/// One job. `runs` counts every run; `attempts` (in JSON) counts the runs that ended in
/// an error, which are what `max_attempts` bounds, so they are said as failed runs.
fn job_detail(j: &Job, now: i64) -> String {
    let text = |v: Option<&serde_json::Value>| v.map_or_else(|| "-".to_owned(), ToString::to_string);
    let mut out = format!("job {} ({})\n", j.id, j.kind);
    let rows = [
        ("state", j.state.clone()),
        ("args", j.args.to_string()),
        (
            "runs",
            format!(
                "{} ({} failed; the job fails after {} failed runs)",
                j.runs, j.attempts, j.max_attempts
            ),
        ),
        ("progress", j.progress.to_string()),
        ("result", text(j.result.as_ref())),
        ("error", j.error.clone().unwrap_or_else(|| "-".to_owned())),
        ("created", when(j.created_at, now)),
        ("started", when_opt(j.started_at, now)),
        ("finished", when_opt(j.finished_at, now)),
    ];
    for line in super::format::fields(&rows).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

pub(super) async fn repos(config: &Config, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let meta = open_metadata(config).await?;
    let now = now_secs();
    if let Some(name) = name {
        let key = repo_key(config, name)?;
        let detail = meta
            .repository(&key)
            .await?
            .with_context(|| format!("repository {key} is not cached; `regcache repos` lists what is"))?;
        if json {
            println!("{}", serde_json::to_string_pretty(&detail)?);
            return Ok(());
        }
        let s = &detail.summary;
        println!(
            "{}/{} ({}): {} tags, {} manifests, {} blobs ({} stored)",
            s.upstream,
            s.name,
            s.state,
            s.tag_count,
            s.manifest_count,
            s.blob_count,
            bytes(s.bytes)
        );
        let mut table = Table::new(&[
            ("tag", Align::Left),
            ("digest", Align::Left),
            ("image size", Align::Right),
            ("image created", Align::Left),
            ("last pulled", Align::Left),
            ("pinned", Align::Left),
        ]);
        for t in &detail.tags {
            table.row(vec![
                t.name.clone(),
                t.digest.clone(),
                bytes(t.size),
                when_opt(t.created, now),
                when(t.last_pulled, now),
                if t.pinned { "yes" } else { "" }.to_owned(),
            ]);
        }
        print!("{}", table.render("  ", "no tags cached"));
        return Ok(());
    }
    let repos = meta.repositories(100_000).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&repos)?);
        return Ok(());
    }
    let mut table = Table::new(&[
        ("repository", Align::Left),
        ("state", Align::Left),
        ("tags", Align::Right),
        ("blobs", Align::Right),
        ("stored", Align::Right),
        ("last pulled", Align::Left),
        ("pinned tags", Align::Right),
    ]);
    for r in &repos {
        table.row(vec![
            format!("{}/{}", r.upstream, r.name),
            r.state.clone(),
            r.tag_count.to_string(),
            r.blob_count.to_string(),
            bytes(r.bytes),
            when(r.last_pulled, now),
            r.pinned_tags.to_string(),
        ]);
    }
    print!("{}", table.render("", "no repositories are cached"));
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
        if plans.is_empty() {
            println!("no cached repository matches a cleanup policy: nothing would be deleted");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(upstreams: &str) -> Config {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, upstreams.as_bytes()).unwrap();
        crate::config::load(Some(f.path()), Vec::new()).unwrap()
    }

    #[test]
    fn a_repository_without_an_upstream_is_the_default_upstreams_as_for_a_pull() {
        let hub = crate::config::load(None, Vec::new()).unwrap();
        for arg in [
            "hello",
            "library/hello",
            "docker.io/hello",
            "docker.io/library/hello",
        ] {
            let key = repo_key(&hub, arg).unwrap();
            assert_eq!(
                (key.upstream.as_str(), key.name.as_str()),
                ("docker.io", "library/hello"),
                "{arg}"
            );
        }
        let two = config(
            "[[upstream]]\nname = \"local\"\nurl = \"http://127.0.0.1:5001\"\ndefault = true\n\
             [[upstream]]\nname = \"ghcr\"\nurl = \"https://ghcr.io\"\n",
        );
        let key = repo_key(&two, "ghcr/owner/img").unwrap();
        assert_eq!((key.upstream.as_str(), key.name.as_str()), ("ghcr", "owner/img"));
        let key = repo_key(&two, "team/app").unwrap();
        assert_eq!((key.upstream.as_str(), key.name.as_str()), ("local", "team/app"));
        let e = repo_key(&two, "Bad Name").unwrap_err();
        assert!(format!("{e:#}").contains("UPSTREAM/REPO"), "{e:#}");
    }
}
