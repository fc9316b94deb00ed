//! Bundles on every storage backend, driven through the library beside running caches:
//! export streams from the memory backend and from S3 (moto), import writes to S3 (a
//! 20 MiB layer goes up as a multipart upload), and what was pulled together with an
//! image (its referrers: an SBOM naming it as `subject`, a cosign-style signature tag)
//! travels with it and is served offline, the referrers API included. The upstream is
//! the in-process fixture, which serves the referrers API docker-registry 2.8 lacks.

mod common;

use std::sync::Arc;

use common::app::{config_for, ok_bytes, TestApp};
use common::bundles::{bundle_blobs, bundle_names};
use common::external::{MotoS3, MOTO_ACCESS_KEY, MOTO_REGION, MOTO_SECRET_KEY};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use regcache::bundle::{ExportOptions, ExportSelection, ImportOptions};
use regcache::config::{Backend, Config, S3Config, Secret};
use regcache::metadata::Metadata;

const REPO: &str = "team/app";
const MIB: usize = 1024 * 1024;

fn s3(c: &mut Config, moto: &MotoS3, prefix: &str) {
    c.storage.backend = Backend::S3;
    c.storage.s3 = Some(S3Config {
        bucket: moto.bucket().to_owned(),
        region: MOTO_REGION.into(),
        endpoint: Some(moto.endpoint()),
        allow_http: true,
        access_key_id: Some(MOTO_ACCESS_KEY.into()),
        secret_access_key: Some(Secret::new(MOTO_SECRET_KEY)),
        secret_access_key_file: None,
        prefix: prefix.into(),
    });
}

async fn export(app: &TestApp, selection: ExportSelection, out: &std::path::Path) {
    let options = ExportOptions {
        selection,
        output: out.to_owned(),
        since: None,
    };
    regcache::bundle::export(
        &app.config,
        app.cache().metadata(),
        app.cache().store(),
        &options,
        Arc::new(()),
    )
    .await
    .expect("export");
}

fn digests(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).expect("referrers index");
    v["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn bundles_stream_from_memory_and_s3_into_s3_with_their_referrers() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("backends", &[20 * MIB, 50_000], "2024-06-01T00:00:00Z");
    let sbom = Image::artifact("sbom", &image.manifest, "application/spdx+json");
    let signature = Image::new("signature", &[300], "2024-06-01T00:00:00Z");
    let sig_tag = format!("sha256-{}.sig", image.manifest.hex());
    upstream.add_image(REPO, Some("v1"), &image);
    upstream.add_referrer(REPO, &sbom);
    upstream.add_image(REPO, Some(&sig_tag), &signature);
    let host = upstream.host_port();

    // A cache on the memory backend pulls the image, finds its referrers, and pulls them.
    let source = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.storage.backend = Backend::Memory;
    })
    .await;
    source.pull(REPO, "v1", &image).await;
    let referrers = format!("/v2/{REPO}/referrers/{}", image.manifest.digest);
    let listed = ok_bytes(source.get(&referrers).await).await;
    assert_eq!(digests(&listed), std::slice::from_ref(&sbom.manifest.digest));
    source.pull(REPO, &sbom.manifest.digest, &sbom).await;
    source.pull(REPO, &sig_tag, &signature).await;

    // Only v1 is asked for: its referrers come with it.
    let work = tempfile::tempdir().unwrap();
    let from_memory = work.path().join("memory.tar");
    let list = regcache::imagelist::parse(&format!("[[image]]\nref = \"{host}/{REPO}:v1\"\n")).unwrap();
    export(&source, ExportSelection::List(list), &from_memory).await;
    assert_eq!(
        bundle_names(&from_memory),
        [
            format!("{host}/{REPO}:{sig_tag}"),
            format!("{host}/{REPO}:v1"),
            format!("{host}/{REPO}@{}", sbom.manifest.digest),
        ]
    );

    // Into a fresh site on S3, offline; imported beside nothing, through the library.
    let moto = MotoS3::start("regcache-bundles").await;
    let dir = tempfile::tempdir().unwrap();
    let mut site = config_for(&[("fixture", &upstream.url())], dir.path());
    site.proxy.offline = true;
    s3(&mut site, &moto, "site");
    drop(upstream);
    let meta = Metadata::open(&dir.path().join("regcache.db")).unwrap();
    let store = regcache::storage::build(&site.storage, dir.path()).unwrap();
    let report = regcache::bundle::import(
        &site,
        &meta,
        &store,
        &from_memory,
        &ImportOptions::default(),
        Arc::new(()),
    )
    .await
    .expect("import into S3");
    assert_eq!(report.images.len(), 3, "{report:?}");
    let blobs = image.blobs().count() + sbom.blobs().count() + signature.blobs().count();
    assert_eq!(report.blobs_committed as usize, blobs, "{report:?}");
    drop(meta);

    let app = TestApp::start_config(site.clone(), Some(dir)).await;
    app.pull(REPO, "v1", &image).await;
    app.pull(REPO, &sig_tag, &signature).await;
    app.pull(REPO, &sbom.manifest.digest, &sbom).await;
    let offline = ok_bytes(app.get(&referrers).await).await;
    assert_eq!(
        digests(&offline),
        std::slice::from_ref(&sbom.manifest.digest),
        "found offline"
    );

    // And out of S3 again: the same content.
    let from_s3 = work.path().join("s3.tar");
    export(&app, ExportSelection::All, &from_s3).await;
    assert_eq!(bundle_blobs(&from_s3), bundle_blobs(&from_memory));
    assert_eq!(bundle_names(&from_s3), bundle_names(&from_memory));
}
