//! Issue 12, pinning, with real parts: docker-registry as the upstream, the regcache
//! binary serving and running `prefetch`, `pin`, `unpin`, `status`, `repos` and
//! `cleanup run` beside it, skopeo pulling through it. Pinned images (from a list with
//! `pin = true`, or `regcache pin`, also before they are cached) survive ttl expiry,
//! `storage.max_size` eviction and a cleanup policy that takes their unpinned neighbours;
//! `status`, `repos` and the repositories admin API show them pinned; unpinned, they go
//! the way of the others.

mod common;

use common::binary::{Output, Regcache, BIN};
use common::data_dir::{blob_path, count};
use common::external::{skopeo_copy, skopeo_pull, DockerRegistry};
use common::images::Image;
use common::wait_until_async;
use regcache::metadata::now_secs;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Bound on every wait: ttl expiry and deletion, an eviction pass (every 10 s), a job.
const DEADLINE: Duration = Duration::from_secs(60);
const TOKEN: &str = "pins-test-admin-token-0123";

async fn push(registry: &DockerRegistry, work: &Path, repo: &str, image: &Image) {
    let layout = work.join("seed").join(repo.replace('/', "_"));
    image.write_oci_layout(&layout, "v1");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/{repo}:v1", registry.host_port()),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {repo}: {e}"));
}

async fn regcache(args: &[&str]) -> Output {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .unwrap_or_else(|_| panic!("regcache {args:?} did not finish within {DEADLINE:?}"))
        .expect("running regcache");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Three images `test/a`, `test/b`, `test/c` (tag v1) in a fresh registry, and regcache
/// serving in front of it with `settings` added to its config.
struct Setup {
    registry: DockerRegistry,
    server: Regcache,
    work: tempfile::TempDir,
    data_dir: std::path::PathBuf,
    images: [Image; 3],
}

impl Setup {
    async fn start(seed: &str, layer: usize, settings: &str) -> Setup {
        let registry = DockerRegistry::start().await;
        let work = tempfile::tempdir().unwrap();
        let images =
            ["a", "b", "c"].map(|n| Image::new(&format!("{seed}-{n}"), &[layer], "2024-06-01T00:00:00Z"));
        for (n, image) in ["a", "b", "c"].iter().zip(&images) {
            push(&registry, work.path(), &format!("test/{n}"), image).await;
        }
        let data_dir = work.path().join("data");
        let server = Regcache::start(work.path(), seed, |port| {
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
                 [storage.delete]\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
                 [admin]\ntoken = \"{TOKEN}\"\n\
                 [log]\nformat = \"json\"\n\
                 {settings}\n\
                 [[upstream]]\nname = \"cncf\"\nurl = \"{}\"\ndefault = true\n",
                data_dir.display(),
                registry.url()
            )
        })
        .await;
        Setup {
            registry,
            server,
            work,
            data_dir,
            images,
        }
    }

    fn config(&self) -> String {
        self.server.config.to_str().unwrap().to_owned()
    }

    /// `HOST/test/<name>:v1`, the reference `pin` and lists take.
    fn reference(&self, name: &str) -> String {
        format!("{}/test/{name}:v1", self.registry.host_port())
    }

    /// Prefetches `names` (`(name, pin)`) with the binary.
    async fn prefetch(&self, names: &[(&str, bool)]) {
        let list: String = names
            .iter()
            .map(|(n, pin)| format!("[[image]]\nref = \"{}\"\npin = {pin}\n\n", self.reference(n)))
            .collect();
        let path = common::binary::write(self.work.path(), "images.toml", &list);
        regcache(&["prefetch", "--config", &self.config(), &path])
            .await
            .ok();
    }

    fn image(&self, name: &str) -> &Image {
        &self.images[["a", "b", "c"].iter().position(|n| *n == name).unwrap()]
    }

    /// Whether every blob of `name` is in the store.
    fn stored(&self, name: &str) -> bool {
        self.image(name)
            .blobs()
            .all(|b| blob_path(&self.data_dir, &b.digest).exists())
    }

    /// Whether no blob of `name` is in the store and no tag of it is recorded.
    fn gone(&self, name: &str) -> bool {
        self.image(name)
            .blobs()
            .all(|b| !blob_path(&self.data_dir, &b.digest).exists())
            && self.tags(name) == 0
    }

    /// Whether `name`'s tag and its layer are gone (what eviction takes first).
    fn evicted(&self, name: &str) -> bool {
        let layer = &self.image(name).layers[0];
        self.tags(name) == 0 && !blob_path(&self.data_dir, &layer.digest).exists()
    }

    fn tags(&self, name: &str) -> i64 {
        count(
            &self.data_dir,
            &format!("SELECT count(*) FROM tags t JOIN repositories r ON r.id = t.repo_id WHERE r.name = 'test/{name}'"),
        )
    }

    /// Entries of `test/<name>` (tags, manifest links, blob links) that are pinned with no
    /// due time, and all its entries.
    fn pinned_entries(&self, name: &str) -> (i64, i64) {
        let mut pinned = 0;
        let mut all = 0;
        for table in ["tags", "repo_manifests", "repo_blobs"] {
            let q = |extra: &str| {
                count(
                    &self.data_dir,
                    &format!(
                        "SELECT count(*) FROM {table} x JOIN repositories r ON r.id = x.repo_id
                          WHERE r.name = 'test/{name}' {extra}"
                    ),
                )
            };
            pinned += q("AND x.pinned = 1 AND x.expires_at IS NULL");
            all += q("");
        }
        (pinned, all)
    }
}

#[tokio::test]
async fn pinned_images_survive_ttl_expiry_and_once_unpinned_expire_at_now_plus_ttl() {
    const TTL: i64 = 2;
    let s = Setup::start("pins-ttl", 3000, &format!("[proxy]\nttl = \"{TTL}s\"\n")).await;
    let cfg = s.config();
    // c is pinned before anything of it is cached.
    let out = regcache(&["pin", "--config", &cfg, &s.reference("c")]).await.ok();
    assert!(out.stdout.contains("not cached yet"), "{out:#?}");
    s.prefetch(&[("a", true), ("b", false)]).await;
    skopeo_pull(&s.server.base, "test/c", s.image("c"), &s.work.path().join("c")).await;
    // Pulled again from the cache, a second later: that pull records uses, flushed every
    // few seconds, and a use must not give a pinned entry a due time again.
    let cached = now_secs();
    wait_until_async("a second has passed", DEADLINE, || async { now_secs() > cached }).await;
    let pulled = now_secs();
    skopeo_pull(&s.server.base, "test/c", s.image("c"), &s.work.path().join("c2")).await;
    wait_until_async("the second pull's uses are recorded", DEADLINE, || async {
        s.tags("c") == 0
            || count(
                &s.data_dir,
                "SELECT coalesce(min(t.last_used_at), 0) FROM tags t JOIN repositories r ON r.id = t.repo_id
              WHERE r.name = 'test/c'",
            ) >= pulled
    })
    .await;
    assert_eq!(
        s.tags("c"),
        1,
        "a use gave the pinned image a due time again, and it expired"
    );

    wait_until_async(
        "the unpinned image expired and was collected",
        DEADLINE,
        || async { s.gone("b") },
    )
    .await;
    for name in ["a", "c"] {
        assert!(s.stored(name), "{name} was collected although pinned");
        let (pinned, all) = s.pinned_entries(name);
        assert_eq!(
            (pinned, all),
            (4, 4),
            "{name}: tag, manifest and two blob links pinned"
        );
    }
    // status, repos and the repositories admin API show them pinned.
    let status = regcache(&["status", "--json", "--config", &cfg])
        .await
        .ok()
        .json();
    assert_eq!(
        (status["pins"].as_u64(), status["pins_not_cached"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(
        (
            status["pinned_tags"].as_u64(),
            status["pinned_blobs"]["count"].as_u64()
        ),
        (Some(2), Some(4))
    );
    let repos = regcache(&["repos", "--json", "--config", &cfg]).await.ok().json();
    let pinned_tags = |list: &Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["pinned_tags"].as_u64().unwrap())
    };
    assert_eq!(pinned_tags(&repos, "test/a"), Some(1));
    let detail = regcache(&["repos", "--json", "--config", &cfg, "cncf/test/c"])
        .await
        .ok()
        .json();
    assert_eq!(detail["tags"][0]["pinned"], true, "{detail:#}");
    let api: Value = reqwest::Client::new()
        .get(format!("{}/api/v1/repositories", s.server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pinned_tags(&api, "test/a"), Some(1));
    assert_eq!(pinned_tags(&api, "test/c"), Some(1));
    let pins = regcache(&["pin", "--json", "--config", &cfg]).await.ok().json();
    assert_eq!(pins.as_array().unwrap().len(), 2);
    assert!(
        pins.as_array().unwrap().iter().all(|p| p["cached"] == true),
        "{pins:#}"
    );

    // Unpinned: ordinary entries again, due at now + ttl, then collected.
    let from = now_secs();
    for name in ["a", "c"] {
        let out = regcache(&["unpin", "--config", &cfg, &s.reference(name)])
            .await
            .ok();
        assert!(out.stdout.contains("unpinned"), "{out:#?}");
    }
    let to = now_secs();
    let due: Vec<Option<i64>> = {
        let db = common::data_dir::db(&s.data_dir);
        let mut stmt = db
            .prepare(
                "SELECT expires_at FROM tags UNION ALL SELECT expires_at FROM repo_manifests
                 UNION ALL SELECT expires_at FROM repo_blobs",
            )
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    for d in due {
        // An entry may already have gone; one still there is due at unpin time + ttl.
        let d = d.expect("an unpinned entry has a due time");
        assert!(
            (from + TTL..=to + TTL).contains(&d),
            "due at {d}, not in [{}, {}]",
            from + TTL,
            to + TTL
        );
    }
    wait_until_async(
        "the unpinned images expired and were collected",
        DEADLINE,
        || async { s.gone("a") && s.gone("c") },
    )
    .await;
    regcache(&["unpin", "--config", &cfg, &s.reference("a")])
        .await
        .assert_failure_naming(&["is not pinned"]);
}

#[tokio::test]
async fn pinned_images_are_never_evicted_and_once_unpinned_are() {
    // Each image is a config and one 40 000-byte layer; the bound holds one of them.
    let s = Setup::start(
        "pins-evict",
        40_000,
        "[storage]\nmax_size = \"50KiB\"\nlow_watermark_percent = 90\n",
    )
    .await;
    let cfg = s.config();
    s.prefetch(&[("a", true)]).await;
    s.prefetch(&[("b", false)]).await;
    // Over the bound: the least recently used blobs go, except the pinned ones (a is older).
    wait_until_async("an eviction", DEADLINE, || async {
        s.evicted("a") || s.evicted("b")
    })
    .await;
    assert!(s.stored("a") && s.tags("a") == 1, "a pinned image was evicted");
    wait_until_async("the unpinned image was evicted", DEADLINE, || async {
        s.gone("b")
    })
    .await;
    assert!(s.stored("a"), "a pinned image was evicted");
    assert_eq!(s.pinned_entries("a"), (4, 4));

    regcache(&["unpin", "--config", &cfg, &s.reference("a")])
        .await
        .ok();
    // Fetched again, b is the most recently used: over the bound, the unpinned a goes.
    s.prefetch(&[("b", false)]).await;
    // Eviction stops once under the low watermark: a's layer and everything naming it go
    // (its small config may stay linked until it expires).
    wait_until_async("the unpinned image was evicted", DEADLINE, || async {
        s.evicted("a")
    })
    .await;
    assert!(s.stored("b"));
}

#[tokio::test]
async fn a_cleanup_policy_keeps_pinned_tags_and_deletes_them_once_unpinned() {
    let policy =
        "[[cleanup.policy]]\nname = \"all\"\nrepositories = \"cncf/**\"\nkeep_n = 0\ncadence = \"1d\"\n";
    let s = Setup::start("pins-cleanup", 3000, policy).await;
    let cfg = s.config();
    s.prefetch(&[("a", true), ("b", false)]).await;
    // A tag used in the second of the evaluation counts as pulled since: evaluate later.
    let cached = now_secs();
    wait_until_async("a second has passed", DEADLINE, || async { now_secs() > cached }).await;

    let plan = regcache(&["cleanup", "run", "--dry-run", "--json", "--config", &cfg])
        .await
        .ok()
        .json();
    let decision = |repo: &str| {
        plan.as_array()
            .unwrap()
            .iter()
            .find(|p| p["repository"] == format!("cncf/test/{repo}"))
            .map(|p| p["decisions"][0].clone())
            .unwrap()
    };
    assert_eq!(decision("b")["delete"], true);
    assert_eq!(decision("a")["delete"], false);
    assert!(decision("a")["reason"].as_str().unwrap().contains("pinned"));

    let run = |what: &'static str| {
        let cfg = cfg.clone();
        async move {
            let jobs = regcache(&["cleanup", "run", "--json", "--config", &cfg])
                .await
                .ok()
                .json();
            for id in jobs["jobs"].as_array().unwrap() {
                let id = id.as_i64().unwrap().to_string();
                wait_until_async(what, DEADLINE, || async {
                    let job = regcache(&["jobs", "--json", "--config", &cfg, &id])
                        .await
                        .ok()
                        .json();
                    job["state"] == "succeeded"
                })
                .await;
            }
        }
    };
    run("the cleanup jobs succeeded").await;
    assert_eq!(s.tags("b"), 0, "the policy deleted the unpinned tag");
    assert_eq!(s.tags("a"), 1, "the policy deleted a pinned tag");
    assert!(s.stored("a"));
    assert_eq!(s.pinned_entries("a"), (4, 4));
    wait_until_async("the unpinned image's blobs were deleted", DEADLINE, || async {
        s.gone("b")
    })
    .await;

    regcache(&["unpin", "--config", &cfg, &s.reference("a")])
        .await
        .ok();
    run("the cleanup jobs after unpinning succeeded").await;
    wait_until_async("the unpinned image was cleaned up", DEADLINE, || async {
        s.gone("a")
    })
    .await;
}
