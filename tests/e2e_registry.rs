//! End to end with real parts: the CNCF registry (`docker-registry`) as the upstream,
//! seeded by `skopeo`, and `skopeo` pulling through regcache. The same suite runs on the
//! filesystem backend and on S3 (a `moto` server on loopback).

mod common;

use common::app::{config_for, TestApp};
use common::external::{skopeo_copy, DockerRegistry, MotoS3, MOTO_ACCESS_KEY, MOTO_REGION, MOTO_SECRET_KEY};
use common::images::{assert_layout_has, Image, Index};
use regcache::config::{Backend, Config, S3Config, Secret};
use std::path::Path;

/// Upstream blob GETs regcache made, counted from the registry's access log.
fn upstream_blob_gets(registry: &DockerRegistry) -> usize {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:") && l.contains("regcache/"))
        .count()
}

struct Seeded {
    multi: Index,
    layered: Image,
    big: Image,
}

async fn seed(registry: &DockerRegistry) -> Seeded {
    let work = tempfile::tempdir().unwrap();
    let multi = Index::new("e2e-multi", &["amd64", "arm64"]);
    let layered = Image::new(
        "e2e-layered",
        &[300_000, 1_500_000, 2_500_000],
        "2024-03-01T10:00:00Z",
    );
    let big = Image::new("e2e-big", &[64 * 1024 * 1024], "2024-03-02T10:00:00Z");
    let host = registry.host_port();
    for (name, tag, write) in [
        (
            "multi",
            "v1",
            Box::new(|d: &Path| multi.write_oci_layout(d, "v1")) as Box<dyn Fn(&Path)>,
        ),
        (
            "layered",
            "v1",
            Box::new(|d: &Path| layered.write_oci_layout(d, "v1")),
        ),
        ("big", "v1", Box::new(|d: &Path| big.write_oci_layout(d, "v1"))),
    ] {
        let dir = work.path().join(name);
        write(&dir);
        skopeo_copy(
            &format!("oci:{}:{tag}", dir.display()),
            &format!("docker://{host}/test/{name}:{tag}"),
            &["--all"],
        )
        .await
        .unwrap_or_else(|e| panic!("seeding test/{name}: {e}"));
    }
    Seeded { multi, layered, big }
}

/// Pulls every seeded image through regcache into fresh OCI layouts and checks them.
async fn pull_all(app: &TestApp, seeded: &Seeded) {
    let host = app.base.trim_start_matches("http://").to_owned();
    let out = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "multi",
            std::iter::once(seeded.multi.manifest.digest.as_str())
                .chain(seeded.multi.blobs().map(|b| b.digest.as_str()))
                .chain(
                    seeded
                        .multi
                        .images
                        .iter()
                        .map(|(_, i)| i.manifest.digest.as_str()),
                )
                .collect(),
        ),
        (
            "layered",
            std::iter::once(seeded.layered.manifest.digest.as_str())
                .chain(seeded.layered.blobs().map(|b| b.digest.as_str()))
                .collect(),
        ),
        (
            "big",
            std::iter::once(seeded.big.manifest.digest.as_str())
                .chain(seeded.big.blobs().map(|b| b.digest.as_str()))
                .collect(),
        ),
    ];
    for (name, digests) in cases {
        let dir = out.path().join(name);
        skopeo_copy(
            &format!("docker://{host}/test/{name}:v1"),
            &format!("oci:{}:v1", dir.display()),
            &["--all"],
        )
        .await
        .unwrap_or_else(|e| panic!("pulling test/{name} through regcache: {e}"));
        assert_layout_has(&dir, &digests);
    }
}

fn distinct_blobs(seeded: &Seeded) -> usize {
    // Index::blobs() also lists the child manifests, which are not blobs here.
    let mut all: Vec<&str> = seeded
        .multi
        .images
        .iter()
        .flat_map(|(_, image)| image.blobs())
        .chain(seeded.layered.blobs())
        .chain(seeded.big.blobs())
        .map(|b| b.digest.as_str())
        .collect();
    all.sort_unstable();
    all.dedup();
    all.len()
}

async fn suite(storage: impl FnOnce(&mut Config)) {
    let registry = DockerRegistry::start().await;
    let seeded = seed(&registry).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&[("cncf", &registry.url())], dir.path());
    storage(&mut config);
    let mut app = TestApp::start_config(config, Some(dir)).await;

    pull_all(&app, &seeded).await;
    let cold = upstream_blob_gets(&registry);
    assert_eq!(
        cold,
        distinct_blobs(&seeded),
        "each blob fetched from upstream exactly once"
    );

    pull_all(&app, &seeded).await;
    assert_eq!(
        upstream_blob_gets(&registry),
        cold,
        "second pull: zero upstream blob GETs"
    );

    // Restart on the same data, with the upstream gone: everything is still served.
    app.restart_with(|_| {}).await;
    drop(registry);
    pull_all(&app, &seeded).await;
    assert_eq!(
        app.count("SELECT count(*) FROM blobs") as usize,
        distinct_blobs(&seeded)
    );
}

#[tokio::test]
async fn skopeo_pulls_through_regcache_on_the_filesystem() {
    suite(|_| {}).await;
}

#[tokio::test]
async fn skopeo_pulls_through_regcache_on_s3() {
    let moto = MotoS3::start("regcache-e2e").await;
    let endpoint = moto.endpoint();
    let bucket = moto.bucket().to_owned();
    suite(move |c| {
        c.storage.backend = Backend::S3;
        c.storage.s3 = Some(S3Config {
            bucket,
            region: MOTO_REGION.into(),
            endpoint: Some(endpoint),
            allow_http: true,
            access_key_id: Some(MOTO_ACCESS_KEY.into()),
            secret_access_key: Some(Secret::new(MOTO_SECRET_KEY)),
            secret_access_key_file: None,
            prefix: "cache".into(),
        });
    })
    .await;
    drop(moto);
}
