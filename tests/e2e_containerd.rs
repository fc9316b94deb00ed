//! End to end with containerd as the client: the CNCF registry (`docker-registry`) is the
//! upstream, seeded by `skopeo`; a private containerd fetches images named after the
//! registry (`127.0.0.1:REGPORT/test/app:…`) with regcache configured as its mirror in a
//! `hosts.toml`. containerd then asks regcache with `?ns=127.0.0.1%3AREGPORT`, and regcache
//! must route by that `ns` to the matching upstream rather than to its default.

mod common;

use common::app::{config_for, TestApp};
use common::containerd::{write_hosts_toml, Containerd, Fetched};
use common::external::{skopeo_copy, DockerRegistry};
use common::images::{Image, Index};
use common::wait_until;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

const REPO: &str = "test/app";

/// A multi-arch OCI index as `REPO:v1` and a single Docker schema 2 image as `REPO:solo`.
struct Seeded {
    index: Index,
    solo: Image,
}

impl Seeded {
    /// Every manifest containerd stores: the index, its children and the single image.
    fn manifest_digests(&self) -> Vec<&str> {
        std::iter::once(&self.index.manifest)
            .chain(self.index.images.iter().map(|(_, i)| &i.manifest))
            .chain(std::iter::once(&self.solo.manifest))
            .map(|b| b.digest.as_str())
            .collect()
    }

    /// Configs and layers of every image, each once.
    fn blob_digests(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self
            .index
            .images
            .iter()
            .flat_map(|(_, i)| i.blobs())
            .chain(self.solo.blobs())
            .map(|b| b.digest.as_str())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// What containerd's content store must hold after fetching both tags, sorted.
    fn all_digests(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .manifest_digests()
            .into_iter()
            .chain(self.blob_digests())
            .map(str::to_owned)
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

async fn seed(registry: &DockerRegistry) -> Seeded {
    let work = tempfile::tempdir().unwrap();
    let index = Index::new("ctr-index", &["amd64", "arm64"]);
    let solo = Image::docker("ctr-solo", &[200_000, 50_000], "2024-05-01T00:00:00Z");
    let host = registry.host_port();

    let layout = work.path().join("index");
    index.write_oci_layout(&layout, "v1");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{host}/{REPO}:v1"),
        &["--all"],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {REPO}:v1: {e}"));

    let dir = work.path().join("solo");
    solo.write_skopeo_dir(&dir);
    skopeo_copy(
        &format!("dir:{}", dir.display()),
        &format!("docker://{host}/{REPO}:solo"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("seeding {REPO}:solo: {e}"));
    Seeded { index, solo }
}

/// Access-log lines of the registry for requests regcache made (`GET /v2/…/blobs/…`).
fn upstream_blob_gets(registry: &DockerRegistry) -> Vec<String> {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:") && l.contains("regcache/"))
        .map(str::to_owned)
        .collect()
}

/// Access-log lines of requests containerd sent to the registry itself, bypassing the
/// mirror (its user agent is `containerd/<version>`).
fn direct_containerd_requests(registry: &DockerRegistry) -> Vec<String> {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("containerd/"))
        .map(str::to_owned)
        .collect()
}

/// Fetches both tags into `containerd` and checks that every registry request went to
/// regcache with `?ns=<registry host, URL-encoded>` and that containerd holds exactly the
/// seeded content.
///
/// A successful fetch alone proves nothing: when the mirror answers an error (a 404 for a
/// namespace regcache does not route, say), containerd silently retries at `server`, the
/// registry itself, and the fetch succeeds anyway. Hence the check on every request URL.
async fn fetch_through_mirror(
    containerd: &Containerd,
    hosts_dir: &Path,
    registry: &DockerRegistry,
    app: &TestApp,
    seeded: &Seeded,
) {
    let host = registry.host_port();
    let expected_query = format!("?ns={}", host.replace(':', "%3A"));
    let fetches: [(String, &[&str]); 2] = [
        (format!("{host}/{REPO}:v1"), &["--all-platforms"]),
        (format!("{host}/{REPO}:solo"), &[]),
    ];
    for (reference, extra) in &fetches {
        let Fetched { requests, stderr } = containerd.fetch(hosts_dir, reference, extra).await;
        assert!(
            !requests.is_empty(),
            "ctr logged no registry requests for {reference}:\n{stderr}"
        );
        for url in &requests {
            assert!(
                url.starts_with(&format!("{}/v2/{REPO}/", app.base)) && url.ends_with(&expected_query),
                "containerd asked {url} for {reference}; every request must go to regcache \
                 ({}) with {expected_query}:\n{stderr}",
                app.base
            );
        }
        // For the report: the exact URL containerd sent (visible with --nocapture).
        println!("containerd's first request for {reference}: {}", requests[0]);
    }
    assert_eq!(
        containerd.content_digests().await,
        seeded.all_digests(),
        "containerd's content store holds exactly the seeded manifests and blobs"
    );
}

#[tokio::test]
async fn containerd_pulls_through_regcache_as_a_mirror_routed_by_ns() {
    let registry = DockerRegistry::start().await;
    let seeded = seed(&registry).await;

    // The default upstream is a listener that nobody must ever connect to: a request
    // routed by default instead of by `ns` would show up here.
    let trap = TcpListener::bind("127.0.0.1:0").expect("binding the trap upstream");
    let trap_url = format!("http://{}", trap.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&[("hub", &trap_url), ("cncf", &registry.url())], dir.path());
    let app = TestApp::start_config(config, Some(dir)).await;

    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &registry.host_port(), &registry.url(), &app.base);

    let containerd = Containerd::start().await;
    fetch_through_mirror(&containerd, hosts.path(), &registry, &app, &seeded).await;

    // regcache cached it all under upstream "cncf", and under no other.
    let in_repo = |table: &str, digest: &str| {
        format!(
            "SELECT count(*) FROM {table} t JOIN repositories r ON r.id = t.repo_id \
             WHERE r.upstream = 'cncf' AND r.name = '{REPO}' AND t.digest = '{digest}'"
        )
    };
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM repositories WHERE upstream = 'cncf' AND name = '{REPO}'"
        )),
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM repositories WHERE upstream <> 'cncf'"),
        0
    );
    for digest in seeded.blob_digests() {
        wait_until(
            &format!("{digest} is cached and linked to {REPO}"),
            Duration::from_secs(5),
            || {
                app.count(&format!("SELECT count(*) FROM blobs WHERE digest = '{digest}'")) == 1
                    && app.count(&in_repo("repo_blobs", digest)) == 1
            },
        );
    }
    for digest in seeded.manifest_digests() {
        assert_eq!(
            app.count(&in_repo("repo_manifests", digest)),
            1,
            "manifest {digest}"
        );
    }
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM tags t JOIN repositories r ON r.id = t.repo_id \
             WHERE r.upstream = 'cncf' AND r.name = '{REPO}' AND t.name IN ('v1', 'solo')"
        )),
        2
    );

    // regcache fetched each blob from the registry exactly once.
    let blobs = seeded.blob_digests();
    wait_until(
        "the registry logged regcache's blob GETs",
        Duration::from_secs(5),
        || upstream_blob_gets(&registry).len() >= blobs.len(),
    );
    let cold = upstream_blob_gets(&registry);
    for digest in &blobs {
        let gets = cold
            .iter()
            .filter(|l| l.contains(&format!("/v2/{REPO}/blobs/{digest} ")))
            .count();
        assert_eq!(
            gets, 1,
            "upstream GETs of {digest}; regcache's blob GETs:\n{cold:#?}"
        );
    }
    assert_eq!(cold.len(), blobs.len(), "no other blob GETs:\n{cold:#?}");

    // A fresh containerd (empty content store) fetches everything again: all from the
    // cache, zero further upstream blob GETs.
    drop(containerd);
    let containerd = Containerd::start().await;
    assert!(containerd.content_digests().await.is_empty());
    fetch_through_mirror(&containerd, hosts.path(), &registry, &app, &seeded).await;
    assert_eq!(
        upstream_blob_gets(&registry),
        cold,
        "second fetch: zero further upstream blob GETs"
    );

    // containerd never fell back to the registry, and the default upstream was never
    // contacted.
    let direct = direct_containerd_requests(&registry);
    assert!(
        direct.is_empty(),
        "containerd talked to the registry directly:\n{direct:#?}"
    );
    trap.set_nonblocking(true).unwrap();
    match trap.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the default upstream was contacted (from {peer})"),
        Err(e) => panic!("checking the trap upstream: {e}"),
    }
}
