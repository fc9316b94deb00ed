//! The committed OCI layouts under `fixtures/oci/` served by the fixture upstream and
//! pulled through regcache: a multi-platform index and a single image, byte for byte.

mod common;

use common::app::{ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{sha256_digest, Image, Index};
use std::path::Path;

const LAYOUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/oci/sample");

fn generate(dir: &Path) {
    Index::new("fixture-sample-index", &["amd64", "arm64"]).write_oci_layout(dir, "multi");
    Image::new("fixture-sample-image", &[3000, 5000], "2023-06-01T12:00:00Z").write_oci_layout(dir, "single");
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The committed layout is exactly what the generator writes, so it can be regenerated
/// (`REGCACHE_REGENERATE_FIXTURES=1 cargo test --test fixture_layouts`) and reviewed.
#[test]
fn committed_layout_matches_the_generator() {
    if std::env::var_os("REGCACHE_REGENERATE_FIXTURES").is_some() {
        let _ = std::fs::remove_dir_all(LAYOUT);
        generate(Path::new(LAYOUT));
    }
    let fresh = tempfile::tempdir().unwrap();
    generate(fresh.path());
    let committed = files(Path::new(LAYOUT));
    assert!(
        committed.iter().any(|(name, _)| name == "index.json"),
        "fixtures/oci/sample is committed"
    );
    assert_eq!(committed, files(fresh.path()));
}

#[tokio::test]
async fn committed_layouts_pull_through_byte_for_byte() {
    let upstream = FixtureUpstream::start(FixtureOptions::default().anonymous_tokens()).await;
    upstream.add_oci_layout("fixtures/sample", Path::new(LAYOUT));
    let app = TestApp::start(&upstream.url()).await;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(LAYOUT).join("index.json")).unwrap()).unwrap();
    let mut pulled = 0;
    for tag in ["multi", "single"] {
        let top = ok_bytes(
            app.get_manifest(&format!("/v2/fixtures/sample/manifests/{tag}"))
                .await,
        )
        .await;
        let expected = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            sha256_digest(&top),
            expected,
            "tag {tag} resolves to the committed manifest"
        );
        let mut manifests = vec![top];
        while let Some(body) = manifests.pop() {
            let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
            for child in m["manifests"].as_array().into_iter().flatten() {
                let d = child["digest"].as_str().unwrap();
                let b = ok_bytes(
                    app.get_manifest(&format!("/v2/fixtures/sample/manifests/{d}"))
                        .await,
                )
                .await;
                assert_eq!(sha256_digest(&b), d);
                manifests.push(b);
            }
            for blob in m["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(m.get("config"))
            {
                let d = blob["digest"].as_str().unwrap();
                let b = ok_bytes(app.get(&format!("/v2/fixtures/sample/blobs/{d}")).await).await;
                assert_eq!(sha256_digest(&b), d);
                let on_disk = std::fs::read(Path::new(LAYOUT).join("blobs/sha256").join(&d[7..])).unwrap();
                assert_eq!(b.as_ref(), on_disk.as_slice());
                pulled += 1;
            }
        }
    }
    assert!(
        pulled >= 6,
        "two platforms and one image, each with config and layers: {pulled}"
    );
}
