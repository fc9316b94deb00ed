//! Issue 12, prefetch, with real parts: docker-registry as the only upstream (seeded by
//! skopeo), the regcache binary's `prefetch` command, and skopeo pulling from a regcache
//! server with `proxy.offline = true` once the registry is gone.
//! - A list with explicit tags, a `tag_regex` and a multi-arch index with a platform
//!   filter: everything it names pulls offline with identical digests; a filtered-out
//!   platform is not cached; a missing tag fails the run, named, while the rest succeed;
//!   `--json` prints one parseable event per line.
//! - Run again, it fetches nothing: one HEAD per tag (and the tag list for the regex).
//! - Beside a running server on S3 (moto): the prefetch leaves the server's temporary
//!   directory alone and the server serves what it fetched.
//! - `[[prefetch]]` in the config runs as a job, listed by `regcache jobs` and the admin
//!   API; a failing list ends `failed`, naming the image.

mod common;

use common::binary::{Output, Regcache, BIN};
use common::data_dir::{blob_path, count};
use common::external::{
    skopeo, skopeo_copy, DockerRegistry, MotoS3, MOTO_ACCESS_KEY, MOTO_REGION, MOTO_SECRET_KEY,
};
use common::images::{assert_layout_has, Image, Index};
use common::wait_until_async;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Bound on every wait: a prefetch, a job, a pull.
const DEADLINE: Duration = Duration::from_secs(90);
const TOKEN: &str = "prefetch-test-admin-token";

/// Pushes `image` to `registry` as `repo:tag` with skopeo.
async fn push(registry: &DockerRegistry, work: &Path, repo: &str, tag: &str, image: &Image) {
    let layout = work.join("seed").join(repo.replace('/', "_")).join(tag);
    image.write_oci_layout(&layout, tag);
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{}/{repo}:{tag}", registry.host_port()),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {repo}:{tag}: {e}"));
}

/// Pushes `index` and every platform below it as `repo:tag`.
async fn push_index(registry: &DockerRegistry, work: &Path, repo: &str, tag: &str, index: &Index) {
    let layout = work.join("seed").join(repo.replace('/', "_")).join(tag);
    index.write_oci_layout(&layout, tag);
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{}/{repo}:{tag}", registry.host_port()),
        &["--all"],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {repo}:{tag}: {e}"));
}

/// Runs the binary with `args` and only `env` set; bounded by `DEADLINE`.
async fn regcache(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
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

/// Every line of a `--json` run, parsed (each must be JSON).
fn events(out: &Output) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{out:#?}")))
        .collect()
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// regcache's own requests to the registry so far, as "METHOD PATH", from its access log.
fn regcache_requests(registry: &DockerRegistry) -> Vec<String> {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("regcache/"))
        .filter_map(|l| {
            let request = l.split('"').nth(1)?;
            let mut parts = request.split(' ');
            Some(format!("{} {}", parts.next()?, parts.next()?))
        })
        .collect()
}

/// A config for the binary: data in `data_dir`, the registry as upstream "cncf".
fn config(port: u16, data_dir: &Path, registry: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
         [log]\nformat = \"json\"\n\
         [admin]\ntoken = \"{TOKEN}\"\n\
         {extra}\n\
         [[upstream]]\nname = \"cncf\"\nurl = \"{registry}\"\ndefault = true\n",
        data_dir.display()
    )
}

/// Pulls `host/reference` with skopeo (`global` options go before `copy`) into a fresh OCI
/// layout and checks it holds `image` byte for byte: the same manifest digest, every blob
/// hashing to its name.
async fn pull_identical(host: &str, reference: &str, image: &Image, out: &Path, global: &[&str]) {
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let mut args: Vec<&str> = vec!["--insecure-policy"];
    args.extend_from_slice(global);
    let src = format!("docker://{host}/{reference}");
    let dst = format!("oci:{}:pulled", out.display());
    args.extend_from_slice(&["copy", "--src-tls-verify=false", "--preserve-digests", &src, &dst]);
    skopeo(&args)
        .await
        .unwrap_or_else(|e| panic!("pulling {reference}: {e}"));
    let index: Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"], image.manifest.digest,
        "{reference}: the manifest digest"
    );
    let digests: Vec<&str> = std::iter::once(image.manifest.digest.as_str())
        .chain(image.blobs().map(|b| b.digest.as_str()))
        .collect();
    assert_layout_has(out, &digests);
}

#[tokio::test]
async fn a_prefetched_list_pulls_offline_with_identical_digests_and_a_second_run_only_asks_heads() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let app1 = Image::new("prefetch-app-1", &[3000, 20_000], "2024-05-01T00:00:00Z");
    let app2 = Image::new("prefetch-app-2", &[4000], "2024-05-02T00:00:00Z");
    let tools: Vec<(&str, Image)> = ["v1.0", "v1.1", "v2.0"]
        .into_iter()
        .map(|t| {
            (
                t,
                Image::new(&format!("prefetch-tools-{t}"), &[2500], "2024-05-03T00:00:00Z"),
            )
        })
        .collect();
    let multi = Index::new("prefetch-multi", &["amd64", "arm64", "arm"]);
    push(&registry, w, "test/app", "1.0", &app1).await;
    push(&registry, w, "test/app", "2.0", &app2).await;
    for (tag, image) in &tools {
        push(&registry, w, "test/tools", tag, image).await;
    }
    push_index(&registry, w, "test/multi", "v1", &multi).await;

    let host = registry.host_port();
    let list = common::binary::write(
        w,
        "images.toml",
        &format!(
            "[[image]]\nref = \"{host}/test/app\"\ntags = [\"1.0\", \"2.0\", \"missing\"]\n\n\
             [[image]]\nref = \"{host}/test/tools\"\ntag_regex = '^v1\\.'\n\n\
             [[image]]\nref = \"{host}/test/multi:v1\"\nplatforms = [\"linux/amd64\", \"linux/arm64\"]\n"
        ),
    );
    let data_dir = w.join("data");
    let cfg = common::binary::write(w, "cli.toml", &config(0, &data_dir, &registry.url(), ""));

    let out = regcache(&["prefetch", "--config", &cfg, &list, "--json"], &[]).await;
    out.assert_failure_naming(&[
        &format!("{host}/test/app:missing"),
        "not found upstream",
        "1 of 6 images failed",
    ]);
    let ev = events(&out);
    // What must be cached: both app tags, the regex's two tags, and two of three platforms.
    let (amd64, arm64, arm) = (
        multi.image("amd64").unwrap(),
        multi.image("arm64").unwrap(),
        multi.image("arm").unwrap(),
    );
    let wanted: Vec<&Image> = vec![&app1, &app2, &tools[0].1, &tools[1].1, amd64, arm64];
    let blobs: u64 = wanted.iter().map(|i| i.blobs().count() as u64).sum();
    let bytes: u64 = wanted
        .iter()
        .flat_map(|i| i.blobs())
        .map(|b| b.len() as u64)
        .sum();
    let planned = of_kind(&ev, "planned");
    assert_eq!(planned.len(), 1, "{ev:#?}");
    assert_eq!(
        (
            planned[0]["images"].as_u64(),
            planned[0]["blobs_to_fetch"].as_u64()
        ),
        (Some(6), Some(blobs))
    );
    assert_eq!(planned[0]["bytes_to_fetch"], bytes);
    assert_eq!(of_kind(&ev, "blob").len() as u64, blobs);
    let mut images: Vec<&str> = of_kind(&ev, "image")
        .iter()
        .map(|e| e["image"].as_str().unwrap())
        .collect();
    images.sort_unstable();
    let expected: Vec<String> = ["app:1.0", "app:2.0", "multi:v1", "tools:v1.0", "tools:v1.1"]
        .iter()
        .map(|r| format!("{host}/test/{r}"))
        .collect();
    assert_eq!(images, expected);
    let multi_event = of_kind(&ev, "image")
        .into_iter()
        .find(|e| e["image"] == format!("{host}/test/multi:v1"))
        .unwrap();
    assert_eq!(multi_event["digest"], multi.manifest.digest);
    assert_eq!(
        multi_event["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64/v8"])
    );
    let failed = of_kind(&ev, "failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["image"], format!("{host}/test/app:missing"));
    let summary = ev.last().unwrap();
    assert_eq!(summary["event"], "summary", "the summary comes last");
    assert_eq!(
        (
            summary["images"].as_u64(),
            summary["images_fetched"].as_u64(),
            summary["images_failed"].as_u64(),
            summary["blobs_fetched"].as_u64(),
            summary["bytes_fetched"].as_u64(),
        ),
        (Some(6), Some(5), Some(1), Some(blobs), Some(bytes))
    );
    // The filtered-out platform and the tag the regex does not match are not cached.
    assert_eq!(
        count(
            &data_dir,
            &format!(
                "SELECT count(*) FROM repo_manifests WHERE digest = '{}'",
                arm.manifest.digest
            )
        ),
        0
    );
    for b in arm.blobs() {
        assert!(
            !blob_path(&data_dir, &b.digest).exists(),
            "arm blob {} stored",
            b.digest
        );
    }
    assert_eq!(
        count(&data_dir, "SELECT count(*) FROM tags WHERE name = 'v2.0'"),
        0
    );
    for b in wanted.iter().flat_map(|i| i.blobs()) {
        assert!(
            blob_path(&data_dir, &b.digest).exists(),
            "blob {} stored",
            b.digest
        );
    }
    assert!(
        std::fs::read_dir(data_dir.join("cli-tmp"))
            .unwrap()
            .next()
            .is_none(),
        "the run's temporary directory is gone"
    );

    // Again: nothing is fetched, every cached tag costs one HEAD.
    let before = regcache_requests(&registry).len();
    let again = regcache(&["prefetch", "--config", &cfg, &list, "--json"], &[]).await;
    again.assert_failure_naming(&["test/app:missing"]);
    let summary = events(&again).last().cloned().unwrap();
    assert_eq!(
        (
            summary["manifests_fetched"].as_u64(),
            summary["blobs_fetched"].as_u64(),
            summary["images_current"].as_u64(),
            summary["blobs_skipped"].as_u64(),
        ),
        (Some(0), Some(0), Some(5), Some(blobs)),
        "{summary:#}"
    );
    let mut asked: Vec<String> = regcache_requests(&registry)[before..].to_vec();
    asked.sort();
    let mut expected: Vec<String> = [
        "HEAD /v2/test/app/manifests/1.0",
        "HEAD /v2/test/app/manifests/2.0",
        "GET /v2/test/app/manifests/missing",
        "HEAD /v2/test/multi/manifests/v1",
        "GET /v2/test/tools/tags/list?n=1000",
        "HEAD /v2/test/tools/manifests/v1.0",
        "HEAD /v2/test/tools/manifests/v1.1",
    ]
    .map(str::to_owned)
    .to_vec();
    expected.sort();
    assert_eq!(asked, expected, "the second run's upstream requests");

    // The upstream is gone; a server with proxy.offline = true serves every image.
    drop(registry);
    let serve = w.join("serve");
    std::fs::create_dir_all(&serve).unwrap();
    let unreachable = "http://127.0.0.1:9";
    let server = Regcache::start(&serve, "offline", |port| {
        config(port, &data_dir, unreachable, "[proxy]\noffline = true\n")
    })
    .await;
    let edge = server.base.trim_start_matches("http://").to_owned();
    pull_identical(&edge, "test/app:1.0", &app1, &w.join("p/app1"), &[]).await;
    pull_identical(&edge, "test/app:2.0", &app2, &w.join("p/app2"), &[]).await;
    pull_identical(&edge, "test/tools:v1.0", &tools[0].1, &w.join("p/t10"), &[]).await;
    pull_identical(&edge, "test/tools:v1.1", &tools[1].1, &w.join("p/t11"), &[]).await;
    pull_identical(
        &edge,
        "test/multi:v1",
        amd64,
        &w.join("p/amd64"),
        &["--override-arch", "amd64"],
    )
    .await;
    pull_identical(
        &edge,
        "test/multi:v1",
        arm64,
        &w.join("p/arm64"),
        &["--override-arch", "arm64", "--override-variant", "v8"],
    )
    .await;
    let index = skopeo(&[
        "--insecure-policy",
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{edge}/test/multi:v1"),
    ])
    .await
    .unwrap();
    assert_eq!(index.stdout, multi.manifest.bytes, "the index is cached whole");
    std::fs::create_dir_all(w.join("p")).unwrap();
    let filtered = skopeo(&[
        "--insecure-policy",
        "--override-arch",
        "arm",
        "--override-variant",
        "v7",
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{edge}/test/multi:v1"),
        &format!("oci:{}:x", w.join("p/arm").display()),
    ])
    .await;
    assert!(filtered.is_err(), "the filtered-out platform pulled offline");
}

#[tokio::test]
async fn a_prefetch_beside_a_running_server_on_s3_leaves_its_downloads_alone() {
    let moto = MotoS3::start("regcache-prefetch").await;
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let image = Image::new("prefetch-s3", &[5000, 30_000], "2024-05-04T00:00:00Z");
    let index = Index::new("prefetch-s3-multi", &["amd64", "arm64"]);
    push(&registry, w, "team/app", "v1", &image).await;
    push_index(&registry, w, "team/multi", "v1", &index).await;
    let data_dir = w.join("data");
    let s3 = format!(
        "[storage]\nbackend = \"s3\"\n\
         [storage.s3]\nbucket = \"{}\"\nregion = \"{MOTO_REGION}\"\nendpoint = \"{}\"\n\
         allow_http = true\naccess_key_id = \"{MOTO_ACCESS_KEY}\"\nsecret_access_key = \"{MOTO_SECRET_KEY}\"\n\
         [proxy]\noffline = true\n",
        moto.bucket(),
        moto.endpoint()
    );
    let server = Regcache::start(w, "s3", |port| config(port, &data_dir, &registry.url(), &s3)).await;
    // Stands for a download of the running server: a prefetch must not touch it.
    let marker = data_dir.join("tmp").join("in-flight.part");
    std::fs::write(&marker, b"a download of the server").unwrap();
    let list = common::binary::write(
        w,
        "images.toml",
        &format!(
            "[[image]]\nref = \"cncf/team/app:v1\"\n\n[[image]]\nref = \"{}/team/multi:v1\"\n",
            registry.host_port()
        ),
    );
    let cfg = server.config.to_str().unwrap().to_owned();
    // The server is offline; this one command is not.
    let out = regcache(
        &["prefetch", "--config", &cfg, &list],
        &[("REGCACHE_PROXY__OFFLINE", "false")],
    )
    .await
    .ok();
    assert!(out.stdout.contains("2 fetched"), "{out:#?}");
    assert!(
        marker.exists(),
        "the prefetch emptied the server's temporary directory"
    );
    assert_eq!(
        count(&data_dir, "SELECT count(*) FROM blobs"),
        (image.blobs().count() + index.images.iter().map(|(_, i)| i.blobs().count()).sum::<usize>()) as i64
    );
    let status = regcache(&["status", "--json", "--config", &cfg], &[])
        .await
        .ok()
        .json();
    assert_eq!(status["tags"], 2);

    drop(registry);
    let host = server.base.trim_start_matches("http://").to_owned();
    pull_identical(&host, "team/app:v1", &image, &w.join("p/app"), &[]).await;
    let all = w.join("p/all");
    std::fs::create_dir_all(w.join("p")).unwrap();
    skopeo(&[
        "--insecure-policy",
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{host}/team/multi:v1"),
        &format!("oci:{}:v1", all.display()),
    ])
    .await
    .unwrap_or_else(|e| panic!("pulling every platform offline: {e}"));
    let digests: Vec<&str> = std::iter::once(index.manifest.digest.as_str())
        .chain(index.blobs().map(|b| b.digest.as_str()))
        .collect();
    assert_layout_has(&all, &digests);
}

#[tokio::test]
async fn prefetch_lists_in_the_config_run_as_jobs_listed_by_the_cli_and_the_admin_api() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let image = Image::new("prefetch-job", &[4000], "2024-05-05T00:00:00Z");
    push(&registry, w, "team/job", "v1", &image).await;
    let good = common::binary::write(
        w,
        "good.toml",
        "[[image]]\nref = \"cncf/team/job:v1\"\npin = true\n",
    );
    let bad = common::binary::write(w, "bad.toml", "[[image]]\nref = \"cncf/team/job:nope\"\n");
    let data_dir = w.join("data");
    let lists = format!(
        "[jobs]\nmax_attempts = 1\n\
         [[prefetch]]\nname = \"good\"\nlist = \"{good}\"\ncadence = \"1h\"\n\
         [[prefetch]]\nname = \"bad\"\nlist = \"{bad}\"\ncadence = \"1h\"\n"
    );
    let server = Regcache::start(w, "jobs", |port| config(port, &data_dir, &registry.url(), &lists)).await;
    let cfg = server.config.to_str().unwrap().to_owned();
    let jobs = || async {
        regcache(&["jobs", "--json", "--config", &cfg], &[])
            .await
            .ok()
            .json()
            .as_array()
            .cloned()
            .unwrap()
    };
    wait_until_async("both prefetch jobs have ended", DEADLINE, || async {
        let j = jobs().await;
        j.len() == 2
            && j.iter()
                .all(|j| j["state"] == "succeeded" || j["state"] == "failed")
    })
    .await;
    let listed = jobs().await;
    let by_name = |n: &str| listed.iter().find(|j| j["args"]["name"] == n).cloned().unwrap();
    let good_job = by_name("good");
    assert_eq!(
        (good_job["kind"].as_str(), good_job["state"].as_str()),
        (Some("prefetch"), Some("succeeded"))
    );
    assert_eq!(good_job["result"]["images_fetched"], 1, "{good_job:#}");
    assert_eq!(good_job["result"]["blobs_fetched"], image.blobs().count());
    let bad_job = by_name("bad");
    assert_eq!(bad_job["state"], "failed");
    let error = bad_job["error"].as_str().unwrap();
    assert!(
        error.contains("cncf/team/job:nope") && error.contains("not found upstream"),
        "{error}"
    );
    // The admin API lists the same jobs.
    let api: Vec<Value> = reqwest::Client::new()
        .get(format!("{}/api/v1/jobs", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_kinds: Vec<&str> = api.iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert_eq!(api_kinds, ["prefetch", "prefetch"]);
    // The image is cached and pinned, as the list says.
    assert_eq!(
        count(
            &data_dir,
            "SELECT count(*) FROM tags WHERE name = 'v1' AND pinned = 1"
        ),
        1
    );
    for b in image.blobs() {
        assert!(blob_path(&data_dir, &b.digest).exists());
    }
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_key_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let data_dir = w.join("data");
    let good = common::binary::write(
        w,
        "good.toml",
        "[[image]]\nref = \"docker.io/library/alpine:3.20\"\n",
    );
    let bad = common::binary::write(
        w,
        "bad.toml",
        "[[image]]\nref = \"docker.io/a\"\ntags = [\"ok\", \"-bad\"]\n",
    );
    let cfg = |extra: &str, name: &str| {
        common::binary::write(w, name, &config(0, &data_dir, "http://127.0.0.1:9", extra))
    };
    let plain = cfg("", "plain.toml");
    regcache(&["prefetch", "--config", &plain, &bad], &[])
        .await
        .assert_failure_naming(&["`image[0].tags[1]`", "bad.toml"]);
    let offline = cfg("[proxy]\noffline = true\n", "offline.toml");
    regcache(&["prefetch", "--config", &offline, &good], &[])
        .await
        .assert_failure_naming(&["proxy.offline"]);
    let memory = cfg("[storage]\nbackend = \"memory\"\n", "memory.toml");
    regcache(&["prefetch", "--config", &memory, &good], &[])
        .await
        .assert_failure_naming(&["storage.backend", "[[prefetch]]"]);
    assert!(!data_dir.exists(), "a refused prefetch created the data dir");
    let listed = cfg(&format!("[[prefetch]]\nlist = \"{bad}\"\n"), "listed.toml");
    regcache(&["check-config", "--config", &listed], &[])
        .await
        .assert_failure_naming(&["prefetch[0].list", "`image[0].tags[1]`"]);
    regcache(&["serve", "--config", &listed], &[])
        .await
        .assert_failure_naming(&["prefetch[0].list", "`image[0].tags[1]`"]);
    for bad_ref in ["alpine:3", "docker.io/library/alpine", "quay.io/a:b"] {
        let out = regcache(&["pin", "--config", &plain, bad_ref], &[]).await;
        assert!(!out.status.success(), "{bad_ref}: {out:#?}");
        assert!(
            out.stderr.contains(bad_ref) || out.stderr.contains("image reference"),
            "{out:#?}"
        );
    }
}
