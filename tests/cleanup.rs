//! Cleanup policies (design problems 3 and 4): evaluation is a query on the `created` times
//! recorded when images were cached (no upstream request per tag), deletion is
//! compare-and-delete (a tag moved or pulled since evaluation is kept), and a cleanup of an
//! empty or vanished repository succeeds once with nothing deleted and is not queued again
//! before its cadence.
//!
//! The server runs in-process; `regcache cleanup run` is the real binary working on the
//! same data directory, whose jobs the running server picks up.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::app::{ok_bytes, TestApp};
use common::binary::run_ok_async;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Image, ACCEPT_ALL_MANIFESTS};
use common::wait_until_async;
use regcache::cache::ActiveBlobs;
use regcache::config::Config;
use regcache::metadata::{now_secs, Metadata, RepoKey};
use regcache::scheduler::{JobSettings, Scheduler, SchedulerSettings};
use serde_json::{json, Value};

const TOKEN: &str = "cleanup-test-admin-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(30);
const DAY: i64 = 86_400;

/// The tags every policy repository has, with the age of their image's `created`.
const TAGS: &[(&str, i64)] = &[
    ("v1", 60 * DAY),
    ("v2", 50 * DAY),
    ("v3", 40 * DAY),
    ("v4", 20 * DAY),
    ("v5", 10 * DAY),
    ("v6", DAY),
    ("main", 30 * DAY),
    ("latest", DAY / 2),
    ("pr-v7", 90 * DAY),
];

/// Three policies, one repository each, and what each must delete.
const POLICIES: &str = r#"
[[cleanup.policy]]
name = "keep-two"
repositories = "fixture/apps/keep2"
keep_n = 2

[[cleanup.policy]]
name = "older-than"
repositories = "fixture/apps/old"
keep_n = 0
older_than = "25d"

[[cleanup.policy]]
name = "regexes"
repositories = "fixture/apps/regex"
keep_n = 1
older_than = "15d"
name_regex_delete = "v.*|main"
name_regex_keep = "main|latest"
"#;

/// (repository, policy, tags deleted). Newest first: latest v6 v5 v4 main v3 v2 v1 pr-v7.
const EXPECTED: &[(&str, &str, &[&str])] = &[
    // Keeps the two newest candidates (every tag is one).
    (
        "apps/keep2",
        "keep-two",
        &["main", "pr-v7", "v1", "v2", "v3", "v4", "v5"],
    ),
    // Everything created more than 25 days ago.
    ("apps/old", "older-than", &["main", "pr-v7", "v1", "v2", "v3"]),
    // Candidates v1..v6 (main is kept by name_regex_keep; the anchored "v.*" does not match
    // pr-v7); v6 is the newest, v5 is younger than 15 days.
    ("apps/regex", "regexes", &["v1", "v2", "v3", "v4"]),
];

// ----- helpers ------------------------------------------------------------------------------

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
fn rfc3339(secs: i64) -> String {
    let (y, m, d) = regcache::civil::civil_from_days(secs.div_euclid(DAY));
    let rem = secs.rem_euclid(DAY);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[test]
fn rfc3339_formats_known_instants() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(1_714_521_600), "2024-05-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400 + 3_723), "2000-02-29T01:02:03Z");
}

/// A test's world: the fixture upstream, regcache in-process, and the config file the CLI
/// reads (the same config the server runs with).
struct World {
    upstream: FixtureUpstream,
    app: TestApp,
    config_path: PathBuf,
    /// repository → tag → (manifest digest, created).
    images: BTreeMap<String, BTreeMap<String, (String, i64)>>,
}

fn write_config(dir: &Path, upstream: &str, policies: &str) -> PathBuf {
    let path = dir.join("regcache.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
             [storage.delete]\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
             [proxy]\nrevalidate_timeout = \"2s\"\nread_timeout = \"5s\"\n\
             [admin]\ntoken = \"{TOKEN}\"\n\
             [[upstream]]\nname = \"fixture\"\nurl = \"{upstream}\"\ndefault = true\n\
             {policies}",
            dir.join("data").display()
        ),
    )
    .expect("writing the config");
    path
}

fn load_config(path: &Path) -> Config {
    regcache::config::load(Some(path), Vec::new()).expect("the test config loads")
}

impl World {
    /// Starts the fixture upstream and regcache with `policies`.
    async fn start(policies: &str) -> World {
        let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = write_config(dir.path(), &upstream.url(), policies);
        let app = TestApp::start_config(load_config(&config_path), Some(dir)).await;
        World {
            upstream,
            app,
            config_path,
            images: BTreeMap::new(),
        }
    }

    /// Adds `TAGS` to `repo` upstream, one image per tag (one seed per repository, so the
    /// tags share their layers and differ by config), created `age` before now.
    fn add_tags(&mut self, repo: &str) {
        let now = now_secs();
        for (tag, age) in TAGS {
            let created = now - age;
            let image = Image::new(&format!("cleanup/{repo}"), &[1_500, 2_500], &rfc3339(created));
            self.upstream.add_image(repo, Some(tag), &image);
            self.images
                .entry(repo.to_owned())
                .or_default()
                .insert((*tag).to_owned(), (image.manifest.digest.clone(), created));
        }
    }

    /// Pulls `repo:tag` through regcache as a client does: the manifest by tag, then the
    /// config blob (which records the image's `created`) and the layers.
    async fn pull(&self, repo: &str, tag: &str) -> Value {
        let body = ok_bytes(
            self.app
                .get_manifest(&format!("/v2/{repo}/manifests/{tag}"))
                .await,
        )
        .await;
        let manifest: Value = serde_json::from_slice(&body).expect("manifest JSON");
        let layers = manifest["layers"].as_array().expect("layers").iter();
        for blob in std::iter::once(&manifest["config"]).chain(layers) {
            let digest = blob["digest"].as_str().expect("blob digest");
            ok_bytes(self.app.get(&format!("/v2/{repo}/blobs/{digest}")).await).await;
        }
        manifest
    }

    /// Pulls every tag of `repo` and checks the recorded `created` times.
    async fn cache_all(&self, repo: &str) {
        for tag in self.images[repo].keys() {
            self.pull(repo, tag).await;
        }
        let recorded = self.recorded_tags(repo);
        let expected: BTreeMap<String, (String, Option<i64>)> = self.images[repo]
            .iter()
            .map(|(t, (d, c))| (t.clone(), (d.clone(), Some(*c))))
            .collect();
        assert_eq!(
            recorded, expected,
            "tags of {repo} and their recorded created times"
        );
    }

    /// The `tags` table for `repo` with each manifest's recorded `created`.
    fn recorded_tags(&self, repo: &str) -> BTreeMap<String, (String, Option<i64>)> {
        let db = self.app.db();
        let mut stmt = db
            .prepare(
                "SELECT t.name, t.digest, m.created FROM tags t
                   JOIN repositories r ON r.id = t.repo_id JOIN manifests m ON m.digest = t.digest
                  WHERE r.upstream = 'fixture' AND r.name = ?1",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([repo], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .expect("query tags");
        rows.collect::<Result<_, _>>().expect("tag rows")
    }

    async fn admin_get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .app
            .client
            .get(self.app.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("admin JSON"))
    }

    async fn job(&self, id: i64) -> Value {
        let (status, job) = self.admin_get(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "{job}");
        job
    }

    /// Waits until job `id` is finished, and returns it.
    async fn finished_job(&self, id: i64) -> Value {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let job = self.job(id).await;
            if matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "job {id} did not finish: {job:#}"
            );
            tokio::time::sleep(common::POLL_INTERVAL).await;
        }
    }

    /// `regcache <args> --config F`, which must succeed; its stdout.
    async fn cli(&self, args: &[&str]) -> String {
        let config = self.config_path.to_str().expect("UTF-8 path");
        let args: Vec<&str> = args.iter().copied().chain(["--config", config]).collect();
        let out = run_ok_async(&args).await;
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    fn count(&self, sql: &str) -> i64 {
        self.app.count(sql)
    }
}

/// Waits until the wall clock is past second `secs`: last-used times are whole seconds,
/// and a use in the second of an evaluation counts as after it.
async fn wait_past_second(secs: i64) {
    wait_until_async(
        "the clock passes a second boundary",
        Duration::from_secs(3),
        || async move { now_secs() > secs },
    )
    .await;
}

fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("{v} is a list"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect();
    out.sort();
    out
}

/// The tags a repository keeps when `deleted` go, sorted.
fn remaining(deleted: &[&str]) -> Vec<String> {
    TAGS.iter()
        .map(|t| t.0)
        .filter(|t| !deleted.contains(t))
        .map(str::to_owned)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

async fn policy_world() -> World {
    let mut world = World::start(POLICIES).await;
    for (repo, ..) in EXPECTED {
        world.add_tags(repo);
    }
    for (repo, ..) in EXPECTED {
        world.cache_all(repo).await;
    }
    world
}

// ----- policies, run on demand --------------------------------------------------------------

#[tokio::test]
async fn policies_delete_exactly_the_tags_they_select_without_asking_upstream() {
    let world = policy_world().await;
    // Every tag was used before this second; the evaluation comes in a later one.
    wait_past_second(now_secs()).await;
    world.upstream.reset_log();

    let out = world.cli(&["cleanup", "run", "--json"]).await;
    let queued: Value = serde_json::from_str(&out).expect("cleanup run --json prints JSON");
    let ids: Vec<i64> = queued["jobs"]
        .as_array()
        .expect("job ids")
        .iter()
        .map(|v| v.as_i64().expect("id"))
        .collect();
    assert_eq!(
        ids.len(),
        EXPECTED.len(),
        "one job per matching repository: {queued}"
    );

    let mut results = BTreeMap::new();
    for id in ids {
        let job = world.finished_job(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["kind"], "cleanup");
        assert_eq!(job["attempts"], 0, "{job:#}");
        let repo = job["args"]["repository"].as_str().expect("repository").to_owned();
        results.insert(repo, job);
    }
    for (repo, policy, deleted) in EXPECTED {
        let job = &results[*repo];
        let result = &job["result"];
        assert_eq!(result["policy"], *policy, "{job:#}");
        assert_eq!(result["evaluated"], TAGS.len(), "{job:#}");
        assert_eq!(
            sorted(&result["deleted"]),
            *deleted,
            "tags {policy} deleted from {repo}"
        );
        assert_eq!(sorted(&result["kept_moved"]), Vec::<String>::new(), "{job:#}");
        assert_eq!(sorted(&result["kept_pulled"]), Vec::<String>::new(), "{job:#}");
        assert_eq!(result["unlinked"]["tags"], deleted.len(), "{job:#}");

        // What remains, in SQLite and as the admin API shows it.
        let left = remaining(deleted);
        let recorded: Vec<String> = world.recorded_tags(repo).into_keys().collect();
        assert_eq!(recorded, left, "tags left in {repo}");
        let (status, detail) = world
            .admin_get(&format!("/api/v1/repositories/fixture/{repo}"))
            .await;
        assert_eq!(status, 200, "{detail}");
        let mut shown: Vec<String> = detail["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .map(|t| t["name"].as_str().expect("name").to_owned())
            .collect();
        shown.sort();
        assert_eq!(shown, left, "tags the admin API shows for {repo}");
        for t in detail["tags"].as_array().expect("tags") {
            let name = t["name"].as_str().expect("name");
            assert_eq!(t["created"], world.images[*repo][name].1, "{t}");
        }
    }

    // Evaluation read recorded metadata only: nothing was asked of the upstream.
    let asked: Vec<String> = world
        .upstream
        .log()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(asked.is_empty(), "cleanup made upstream requests: {asked:?}");

    // The deleted tags' configs (only they used them) leave storage; the layers every tag
    // of a repository shares stay while a tag remains.
    for (repo, _, deleted) in EXPECTED {
        let left = remaining(deleted);
        let image_of = |tag: &str| {
            let created = world.images[*repo][tag].1;
            Image::new(&format!("cleanup/{repo}"), &[1_500, 2_500], &rfc3339(created))
        };
        for tag in *deleted {
            let config = image_of(tag).config.digest;
            let path = world
                .app
                .data_dir()
                .join("store/blobs/sha256")
                .join(&config[7..9])
                .join(&config[7..]);
            wait_until_async(
                &format!("the config of {repo}:{tag} is deleted"),
                DEADLINE,
                || {
                    let gone = !path.exists();
                    async move { gone }
                },
            )
            .await;
        }
        let kept = image_of(&left[0]);
        for blob in kept.blobs() {
            let d = &blob.digest;
            let path = world
                .app
                .data_dir()
                .join("store/blobs/sha256")
                .join(&d[7..9])
                .join(&d[7..]);
            assert!(path.exists(), "{repo}: blob {d} of a remaining tag is stored");
        }
    }
}

#[tokio::test]
async fn dry_run_lists_what_would_be_deleted_and_why_and_changes_nothing() {
    let world = policy_world().await;
    wait_past_second(now_secs()).await;
    world.upstream.reset_log();
    let tags_before: Vec<_> = EXPECTED.iter().map(|(r, ..)| world.recorded_tags(r)).collect();

    let out = world.cli(&["cleanup", "run", "--dry-run", "--json"]).await;
    let plans: Value = serde_json::from_str(&out).expect("--dry-run --json prints JSON");
    let plans = plans.as_array().expect("a list of plans");
    assert_eq!(plans.len(), EXPECTED.len(), "{plans:#?}");
    for (repo, policy, deleted) in EXPECTED {
        let plan = plans
            .iter()
            .find(|p| p["repository"] == format!("fixture/{repo}"))
            .unwrap_or_else(|| panic!("a plan for {repo}: {plans:#?}"));
        assert_eq!(plan["policy"], *policy);
        let decisions = plan["decisions"].as_array().expect("decisions");
        assert_eq!(decisions.len(), TAGS.len(), "{plan:#}");
        let mut doomed: Vec<&str> = decisions
            .iter()
            .filter(|d| d["delete"] == true)
            .map(|d| d["tag"].as_str().expect("tag"))
            .collect();
        doomed.sort_unstable();
        assert_eq!(doomed, *deleted, "{policy} on {repo}");
        for d in decisions {
            let tag = d["tag"].as_str().expect("tag");
            let (digest, created) = &world.images[*repo][tag];
            assert_eq!(d["digest"], *digest, "{d}");
            assert_eq!(d["created"], *created, "{d}");
            assert!(
                d["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "a reason: {d}"
            );
        }
    }
    let reason = |repo: &str, tag: &str| -> String {
        let plan = plans
            .iter()
            .find(|p| p["repository"] == format!("fixture/{repo}"))
            .expect("plan");
        let d = plan["decisions"]
            .as_array()
            .expect("decisions")
            .iter()
            .find(|d| d["tag"] == tag)
            .expect("decision");
        d["reason"].as_str().expect("reason").to_owned()
    };
    assert!(
        reason("apps/keep2", "latest").contains("among the 2 newest"),
        "{}",
        reason("apps/keep2", "latest")
    );
    assert!(
        reason("apps/keep2", "v5").contains("keep_n"),
        "{}",
        reason("apps/keep2", "v5")
    );
    assert!(
        reason("apps/old", "v4").contains("within older_than"),
        "{}",
        reason("apps/old", "v4")
    );
    assert!(
        reason("apps/old", "v3").contains("older than"),
        "{}",
        reason("apps/old", "v3")
    );
    assert!(
        reason("apps/regex", "main").contains("name_regex_keep"),
        "{}",
        reason("apps/regex", "main")
    );
    assert!(
        reason("apps/regex", "pr-v7").contains("does not match name_regex_delete"),
        "{}",
        reason("apps/regex", "pr-v7")
    );
    assert!(
        reason("apps/regex", "v5").contains("within older_than"),
        "{}",
        reason("apps/regex", "v5")
    );

    // The human form says the same.
    let human = world.cli(&["cleanup", "run", "--dry-run"]).await;
    assert!(
        human.contains("policy keep-two on fixture/apps/keep2: would delete 7 of 9 tags"),
        "{human}"
    );

    // Nothing changed: no job, no recorded run, every tag and blob in place, no request
    // upstream.
    let tags_after: Vec<_> = EXPECTED.iter().map(|(r, ..)| world.recorded_tags(r)).collect();
    assert_eq!(tags_after, tags_before);
    assert_eq!(world.count("SELECT count(*) FROM jobs"), 0);
    assert_eq!(world.count("SELECT count(*) FROM cleanup_runs"), 0);
    assert_eq!(world.count("SELECT count(*) FROM pending_deletes"), 0);
    assert!(world.upstream.log().is_empty(), "{:?}", world.upstream.log());
}

// ----- compare-and-delete ------------------------------------------------------------------

/// Opens the data dir's database beside the server, and a job for the compare-and-delete to
/// record its hand-overs under (cancelled, so no worker runs it).
async fn meta_and_job(world: &World) -> (Metadata, i64) {
    let path = world.app.data_dir().join("regcache.db");
    let meta = tokio::task::spawn_blocking(move || Metadata::open(&path))
        .await
        .expect("join")
        .expect("open the database");
    // Due only tomorrow, so no worker claims it before it is cancelled.
    let (job, _) = meta
        .enqueue_job(
            "cleanup",
            json!({ "test": "compare-and-delete" }),
            None,
            1,
            now_secs() + DAY,
        )
        .await
        .expect("enqueue");
    let cancelled = meta.cancel_job(job, now_secs()).await.expect("cancel");
    assert!(
        matches!(cancelled, regcache::metadata::CancelOutcome::Cancelled(_)),
        "{cancelled:?}"
    );
    (meta, job)
}

fn repo_key(name: &str) -> RepoKey {
    RepoKey {
        upstream: "fixture".into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn compare_and_delete_keeps_a_moved_tag_and_a_tag_pulled_since_evaluation() {
    const REPO: &str = "apps/cad";
    let mut world = World::start("").await;
    let images: BTreeMap<&str, Image> = ["moved", "pulled", "control"]
        .into_iter()
        .map(|t| {
            (
                t,
                Image::new(&format!("cad/{t}"), &[1_000], "2024-01-10T00:00:00Z"),
            )
        })
        .collect();
    for (tag, image) in &images {
        world.upstream.add_image(REPO, Some(tag), image);
        world.pull(REPO, tag).await;
    }
    world.app.stop().await;
    let (meta, job) = meta_and_job(&world).await;
    let repo = repo_key(REPO);

    // Evaluate, as a cleanup job does.
    wait_past_second(now_secs()).await;
    let evaluated_at = now_secs();
    let evaluated = meta
        .tags_for_cleanup(&repo)
        .await
        .expect("tags")
        .expect("repository");
    let doomed: Vec<(String, String)> = evaluated
        .iter()
        .map(|t| (t.name.clone(), t.digest.clone()))
        .collect();
    assert_eq!(doomed.len(), 3, "{evaluated:?}");
    for t in &evaluated {
        assert_eq!(t.digest, images[t.name.as_str()].manifest.digest);
    }

    // Between evaluation and deletion: "moved" now names a new image upstream and is pulled
    // through regcache; "pulled" is pulled, unchanged. Both in a later second.
    world.app.restart_with(|_| {}).await;
    wait_past_second(evaluated_at).await;
    let moved_to = Image::new("cad/moved-again", &[1_000], "2024-02-10T00:00:00Z");
    world.upstream.add_image(REPO, Some("moved"), &moved_to);
    world.pull(REPO, "moved").await;
    world.pull(REPO, "pulled").await;
    // Last-used times are buffered (flushed every 5 s and at shutdown): stop to flush.
    world.app.stop().await;
    let recorded = world.recorded_tags(REPO);
    assert_eq!(recorded["moved"].0, moved_to.manifest.digest);

    let outcome = meta
        .delete_tags_if_unchanged(job, &repo, doomed, evaluated_at, now_secs())
        .await
        .expect("compare-and-delete");
    assert_eq!(outcome.deleted, ["control"], "{outcome:?}");
    assert_eq!(outcome.kept_moved, ["moved"], "{outcome:?}");
    assert_eq!(outcome.kept_pulled, ["pulled"], "{outcome:?}");
    assert!(outcome.missing.is_empty(), "{outcome:?}");
    let left = world.recorded_tags(REPO);
    assert_eq!(left.keys().collect::<Vec<_>>(), ["moved", "pulled"]);
    assert_eq!(
        left["moved"].0, moved_to.manifest.digest,
        "the moved tag keeps its new digest"
    );
    assert_eq!(left["pulled"].0, images["pulled"].manifest.digest);
    // The control's config and layer, which only it used, were handed to deletion under the
    // job.
    let handed = meta.handed_blobs(job).await.expect("handed blobs");
    assert_eq!(handed.handed, 2, "{handed:?}");
}

#[tokio::test]
async fn a_pull_in_the_same_second_as_the_evaluation_keeps_the_tag() {
    const REPO: &str = "apps/same-second";
    let world = World::start("").await;
    let image = Image::new("same-second", &[1_000], "2024-01-10T00:00:00Z");
    world.upstream.add_image(REPO, Some("t"), &image);
    world.pull(REPO, "t").await;
    let cached_in = now_secs();
    let (meta, job) = meta_and_job(&world).await;
    let repo = repo_key(REPO);
    wait_past_second(cached_in).await;

    // Evaluate early in a second and pull right after, within that same second.
    let mut attempts = 0;
    let (evaluated_at, doomed) = loop {
        attempts += 1;
        assert!(attempts <= 10, "never evaluated and pulled within one second");
        wait_until_async("early in a second", Duration::from_secs(2), || async {
            let since_epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970");
            since_epoch.subsec_millis() < 300
        })
        .await;
        let evaluated_at = now_secs();
        let evaluated = meta
            .tags_for_cleanup(&repo)
            .await
            .expect("tags")
            .expect("repository");
        world.pull(REPO, "t").await;
        if now_secs() == evaluated_at {
            let doomed: Vec<(String, String)> = evaluated
                .iter()
                .map(|t| (t.name.clone(), t.digest.clone()))
                .collect();
            break (evaluated_at, doomed);
        }
    };
    let mut world = world;
    world.app.stop().await;

    let outcome = meta
        .delete_tags_if_unchanged(job, &repo, doomed, evaluated_at, now_secs())
        .await
        .expect("compare-and-delete");
    assert_eq!(outcome.kept_pulled, ["t"], "pulled after evaluation: {outcome:?}");
    assert!(outcome.deleted.is_empty(), "{outcome:?}");
    assert_eq!(world.recorded_tags(REPO).len(), 1);
}

// ----- nothing to do ------------------------------------------------------------------------

/// A scheduler over the data dir, as `regcache cleanup run` builds one.
async fn scheduler_for(config: &Config) -> Scheduler {
    let path = config.server.data_dir.join("regcache.db");
    let meta = tokio::task::spawn_blocking(move || Metadata::open(&path))
        .await
        .expect("join")
        .expect("open the database");
    Scheduler {
        meta,
        store: regcache::storage::build(&config.storage, &config.server.data_dir).expect("storage"),
        settings: SchedulerSettings::from_config(config),
        tmp_dir: Some(config.server.data_dir.join("tmp")),
        active: Arc::new(ActiveBlobs::default()),
        deletes_due: Arc::default(),
        jobs: JobSettings::from_config(config),
        jobs_due: Arc::default(),
        uses: None,
        shutdown: tokio_util::sync::CancellationToken::new(),
    }
}

/// Cleanup jobs of `repo`, as (id, state).
fn cleanup_jobs(world: &World, repo: &str) -> Vec<(i64, String)> {
    let db = world.app.db();
    let mut stmt = db
        .prepare(
            "SELECT id, state FROM jobs WHERE kind = 'cleanup' AND json_extract(args, '$.repository') = ?1 ORDER BY id",
        )
        .expect("prepare");
    let rows = stmt
        .query_map([repo], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query");
    rows.collect::<Result<_, _>>().expect("jobs")
}

#[tokio::test]
async fn cleanup_of_an_empty_or_deleted_repository_succeeds_once_and_is_not_requeued() {
    const EMPTY: &str = "apps/empty";
    const GONE: &str = "apps/gone";
    let mut world = World::start(
        "[[cleanup.policy]]\nname = \"everything\"\nrepositories = \"fixture/apps/*\"\ncadence = \"1d\"\n",
    )
    .await;
    // "empty" is cached without any tag (a manifest by digest); "gone" has a tag and is
    // deleted before its cleanup runs.
    let untagged = Image::new("empty-repo", &[1_000], "2024-01-10T00:00:00Z");
    world.upstream.add_image(EMPTY, None, &untagged);
    ok_bytes(
        world
            .app
            .get_manifest(&format!("/v2/{EMPTY}/manifests/{}", untagged.manifest.digest))
            .await,
    )
    .await;
    let tagged = Image::new("gone-repo", &[1_000], "2024-01-10T00:00:00Z");
    world.upstream.add_image(GONE, Some("v1"), &tagged);
    world.pull(GONE, "v1").await;
    let resp = world
        .app
        .client
        .get(
            world
                .app
                .url(&format!("/v2/{EMPTY}/manifests/{}", untagged.manifest.digest)),
        )
        .header(reqwest::header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(world.count("SELECT count(*) FROM repositories"), 2);

    // With the server stopped (no worker), queue the cleanups through the library, then
    // delete "gone" before they run.
    world.app.stop().await;
    let config = load_config(&world.config_path);
    let scheduler = scheduler_for(&config).await;
    let ids = regcache::scheduler::jobs::queue_cleanups(&scheduler, false)
        .await
        .expect("queue cleanups");
    assert_eq!(ids.len(), 2, "one cleanup per repository: {ids:?}");
    let again = regcache::scheduler::jobs::queue_cleanups(&scheduler, false)
        .await
        .expect("queue cleanups");
    assert!(again.is_empty(), "queued again before the cadence: {again:?}");
    let delete_job = scheduler
        .meta
        .schedule_repo_delete(&repo_key(GONE), 5, now_secs())
        .await
        .expect("schedule delete")
        .expect("gone is cached");

    // The server runs them (its own cadence loop, at start, finds nothing due).
    world.app.restart_with(|_| {}).await;
    let delete = world.finished_job(delete_job).await;
    assert_eq!(delete["state"], "succeeded", "{delete:#}");
    for (repo, id) in [(EMPTY, ids[0]), (GONE, ids[1])] {
        let job = world.finished_job(id).await;
        assert_eq!(job["args"]["repository"], repo, "{job:#}");
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["attempts"], 0, "{job:#}");
        assert_eq!(job["runs"], 1, "{job:#}");
        assert!(job["error"].is_null(), "{job:#}");
        assert_eq!(job["result"]["deleted"], json!([]), "{job:#}");
        assert_eq!(job["result"]["evaluated"], 0, "{job:#}");
    }
    let gone_job = world.job(ids[1]).await;
    assert!(
        gone_job["result"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("gone")),
        "{gone_job:#}"
    );
    assert_eq!(
        world.count("SELECT count(*) FROM repositories"),
        1,
        "gone is deleted"
    );

    // Not queued again before the cadence: not by the library, not by the server's loop.
    let again = regcache::scheduler::jobs::queue_cleanups(&scheduler, false)
        .await
        .expect("queue cleanups");
    assert!(again.is_empty(), "queued again before the cadence: {again:?}");
    assert_eq!(cleanup_jobs(&world, EMPTY), [(ids[0], "succeeded".to_owned())]);
    assert_eq!(cleanup_jobs(&world, GONE), [(ids[1], "succeeded".to_owned())]);

    // Only the cadence held it back: forced (as `cleanup run` does), the empty repository
    // gets one more cleanup, which again succeeds with nothing deleted; the deleted one none.
    let forced = regcache::scheduler::jobs::queue_cleanups(&scheduler, true)
        .await
        .expect("queue cleanups");
    assert_eq!(forced.len(), 1, "{forced:?}");
    let job = world.finished_job(forced[0]).await;
    assert_eq!(job["args"]["repository"], EMPTY, "{job:#}");
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["deleted"], json!([]), "{job:#}");
    assert_eq!(cleanup_jobs(&world, GONE).len(), 1);
}
