//! Issue 12, chained caches: an upstream with `ns` (a regional regcache in front of several
//! registries) is asked with `?ns=<registry>` on every request, so one edge cache mirrors
//! several registries through one regional cache.
//! - In process, against the fixture upstream: manifests, blobs, every page of a tag list
//!   (whose `Link` does not carry `ns`) and referrers all carry it, once; `ns = docker.io`
//!   names repositories Docker Hub's way (`library/`).
//! - End to end: two regcache binaries in a chain, edge → regional → two docker-registry
//!   instances standing for docker.io and ghcr.io; skopeo pulls through the edge by path
//!   prefix, containerd through the edge by `hosts.toml` (the README's layout), and the
//!   regional cache, which has no default upstream, only answers because `ns` arrives.

mod common;

use common::app::TestApp;
use common::binary::Regcache;
use common::containerd::{write_hosts_toml, Containerd};
use common::data_dir::count;
use common::external::{skopeo_copy, skopeo_pull, DockerRegistry};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream, TagsPaging};
use common::images::{assert_layout_has, Image};
use std::path::Path;

#[tokio::test]
async fn every_request_to_a_chained_upstream_carries_its_ns_once() {
    let regional =
        FixtureUpstream::start(FixtureOptions::default().tags_paging(TagsPaging::Paginate { page_size: 1 }))
            .await;
    let image = Image::new("chain-ns", &[2048, 1024], "2024-07-01T00:00:00Z");
    let signature = Image::artifact("chain-ns-sig", &image.manifest, "application/vnd.example.sig");
    regional.add_image("library/alpine", Some("3.20"), &image);
    regional.add_image("library/alpine", Some("3.19"), &image);
    regional.add_referrer("library/alpine", &signature);
    let app = TestApp::start_with(&[("hub", &regional.url())], |c| {
        c.upstream[0].ns = Some("docker.io".into());
    })
    .await;

    app.pull("alpine", "3.20", &image).await;
    let tags: serde_json::Value = app.get("/v2/alpine/tags/list").await.json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["3.19", "3.20"]));
    let referrers = app
        .get(&format!("/v2/alpine/referrers/{}", image.manifest.digest))
        .await;
    assert!(referrers.status().is_success());
    let body: serde_json::Value = referrers.json().await.unwrap();
    assert_eq!(body["manifests"][0]["digest"], signature.manifest.digest);

    let log = regional.log();
    let kinds = ["/manifests/", "/blobs/", "/tags/list", "/referrers/"];
    for kind in kinds {
        assert!(
            log.iter().any(|r| r.path.contains(kind)),
            "no {kind} request: {log:#?}"
        );
    }
    assert!(
        log.iter().filter(|r| r.path.contains("/tags/list")).count() >= 2,
        "the tag list was read in pages"
    );
    for r in &log {
        assert!(
            r.path_only().starts_with("/v2/library/alpine/"),
            "Docker Hub naming: {}",
            r.path
        );
        let query = r.path.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let ns: Vec<&str> = query.split('&').filter(|p| p.starts_with("ns=")).collect();
        assert_eq!(ns, ["ns=docker.io"], "{} {}", r.method, r.path);
    }
}

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

fn server(port: u16, data_dir: &Path, upstreams: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshutdown_grace = \"5s\"\n\
         [log]\nformat = \"json\"\n{upstreams}",
        data_dir.display()
    )
}

#[tokio::test]
async fn an_edge_cache_mirrors_two_registries_through_one_regional_cache() {
    let hub = DockerRegistry::start().await;
    let ghcr = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let app = Image::new("chain-hub-app", &[3000, 9000], "2024-07-02T00:00:00Z");
    let tool = Image::new("chain-ghcr-tool", &[4000], "2024-07-03T00:00:00Z");
    let lib = Image::new("chain-hub-lib", &[5000], "2024-07-04T00:00:00Z");
    let cli = Image::new("chain-ghcr-cli", &[6000], "2024-07-05T00:00:00Z");
    push(&hub, w, "test/app", &app).await;
    push(&hub, w, "test/lib", &lib).await;
    push(&ghcr, w, "team/tool", &tool).await;
    push(&ghcr, w, "team/cli", &cli).await;

    // The regional cache knows the registries by the names containerd sends in ns, and has
    // no default: a request without ns finds no upstream.
    let regional_data = w.join("regional-data");
    std::fs::create_dir_all(w.join("regional")).unwrap();
    let regional = Regcache::start(&w.join("regional"), "regional", |port| {
        server(
            port,
            &regional_data,
            &format!(
                "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n\
                 [[upstream]]\nname = \"ghcr.io\"\nurl = \"{}\"\n",
                hub.url(),
                ghcr.url()
            ),
        )
    })
    .await;
    let edge_data = w.join("edge-data");
    std::fs::create_dir_all(w.join("edge")).unwrap();
    let edge = Regcache::start(&w.join("edge"), "edge", |port| {
        server(
            port,
            &edge_data,
            &format!(
                "[[upstream]]\nname = \"docker.io\"\nurl = \"{r}\"\nns = \"docker.io\"\ndefault = true\n\
                 [[upstream]]\nname = \"ghcr.io\"\nurl = \"{r}\"\nns = \"ghcr.io\"\n",
                r = regional.base
            ),
        )
    })
    .await;
    let without_ns = reqwest::get(format!("{}/v2/test/app/manifests/v1", regional.base))
        .await
        .unwrap();
    assert_eq!(
        without_ns.status(),
        404,
        "the regional cache has no default upstream"
    );

    // skopeo through the edge: the default upstream (docker.io) and a path prefix (ghcr.io).
    skopeo_pull(&edge.base, "test/app", &app, &w.join("pulled-app")).await;
    skopeo_pull(&edge.base, "ghcr.io/team/tool", &tool, &w.join("pulled-tool")).await;

    // containerd at the edge site, configured as README "Chained caches" shows: one
    // hosts.toml per registry, each pointing at the edge cache.
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(
        hosts.path(),
        "docker.io",
        "https://registry-1.docker.io",
        &edge.base,
    );
    write_hosts_toml(hosts.path(), "ghcr.io", "https://ghcr.io", &edge.base);
    let containerd = Containerd::start().await;
    for (reference, image, ns) in [
        ("docker.io/test/lib:v1", &lib, "docker.io"),
        ("ghcr.io/team/cli:v1", &cli, "ghcr.io"),
    ] {
        let fetched = containerd.fetch(hosts.path(), reference, &[]).await;
        assert!(!fetched.requests.is_empty(), "{}", fetched.stderr);
        for url in &fetched.requests {
            assert!(
                url.starts_with(&edge.base) && url.ends_with(&format!("?ns={ns}")),
                "containerd asked {url} for {reference}:\n{}",
                fetched.stderr
            );
        }
        let content = containerd.content_digests().await;
        for d in std::iter::once(&image.manifest.digest).chain(image.blobs().map(|b| &b.digest)) {
            assert!(content.contains(d), "{reference}: {d} fetched");
        }
    }
    assert_layout_has(
        &w.join("pulled-app"),
        &app.blobs().map(|b| b.digest.as_str()).collect::<Vec<_>>(),
    );

    // Both caches hold each image under the upstream its registry maps to.
    for (data, what) in [(&edge_data, "edge"), (&regional_data, "regional")] {
        let repos = |upstream: &str| {
            count(
                data,
                &format!(
                    "SELECT count(*) FROM repositories r JOIN tags t ON t.repo_id = r.id WHERE r.upstream = '{upstream}'"
                ),
            )
        };
        assert_eq!((repos("docker.io"), repos("ghcr.io")), (2, 2), "{what}");
    }
    // The registries were asked by the regional cache only.
    for (registry, repos) in [
        (&hub, ["test/app", "test/lib"]),
        (&ghcr, ["team/tool", "team/cli"]),
    ] {
        let log = registry.log();
        for repo in repos {
            assert!(
                log.lines()
                    .any(|l| l.contains(&format!("GET /v2/{repo}/manifests/v1")) && l.contains("regcache/")),
                "{repo} was not fetched from its registry"
            );
        }
    }
}
