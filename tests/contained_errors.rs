//! Faults stay contained and private (I10, I9): a panic fails its request alone with a 500
//! whose error id is in the log, and releases its key (request, shared manifest fetch,
//! tag revalidation, tag-list walk), so the next request for the same thing works; an
//! internal or upstream error's text (paths, I/O messages, upstream URLs and bodies) goes
//! to the log under an error id, and the client gets the OCI code, a plain message and
//! that id. Panics are injected through `regcache::fault` (the test build's
//! `fault-injection` feature).

mod common;

use common::app::{ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::logs;
use serde_json::Value;

const CREATED: &str = "2024-07-01T00:00:00Z";

/// An upstream with one image tagged `v1` in `repo`, and regcache in front of it.
async fn setup(repo: &str) -> (FixtureUpstream, TestApp, Image) {
    logs::capture();
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new(repo, &[2000], CREATED);
    upstream.add_image(repo, Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    (upstream, app, image)
}

/// Asserts a 500 with the OCI error JSON carrying an error id that a log line carries
/// too, next to `logged` (text the client must not see); returns the id.
async fn assert_internal_error(resp: reqwest::Response, logged: &str) -> String {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error JSON");
    assert_eq!(status, 500, "{body}");
    let error = &body["errors"][0];
    assert_eq!(error["code"], "UNKNOWN", "{body}");
    let id = error["detail"]["error_id"]
        .as_str()
        .expect("an error id")
        .to_owned();
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains(&id)),
        "{body}"
    );
    assert!(
        !body.to_string().contains(logged),
        "the answer leaks {logged:?}: {body}"
    );
    let lines = logs::lines_with(&id);
    assert!(
        lines.iter().any(|l| l.to_string().contains(logged)),
        "no log line has error id {id} and {logged:?}: {lines:#?}"
    );
    id
}

#[tokio::test]
async fn a_panic_in_a_blob_request_fails_it_alone_and_the_next_one_works() {
    let repo = "acme/panic-blob";
    let (_upstream, app, image) = setup(repo).await;
    let path = format!("/v2/{repo}/blobs/{}", image.layers[0].digest);
    regcache::fault::panic_once("registry.request", &path);

    assert_internal_error(app.get(&path).await, "fault injected").await;
    assert_eq!(ok_bytes(app.get(&path).await).await, image.layers[0].bytes);
    app.pull(repo, "v1", &image).await;
}

#[tokio::test]
async fn a_panic_in_a_shared_manifest_fetch_releases_the_manifest() {
    let repo = "acme/panic-fetch";
    let (upstream, app, image) = setup(repo).await;
    regcache::fault::panic_once("cache.manifest_fetch", &format!("{repo}:v1"));

    let path = format!("/v2/{repo}/manifests/v1");
    assert_internal_error(app.get_manifest(&path).await, "fault injected").await;
    assert_eq!(
        upstream.manifest_gets(repo, "v1"),
        0,
        "the panic came before the GET"
    );
    app.pull(repo, "v1", &image).await;
}

#[tokio::test]
async fn a_panic_in_a_shared_tag_revalidation_releases_the_tag() {
    let repo = "acme/panic-head";
    let (upstream, app, image) = setup(repo).await;
    app.pull(repo, "v1", &image).await;
    regcache::fault::panic_once("cache.revalidate", &format!("{repo}:v1"));

    let path = format!("/v2/{repo}/manifests/v1");
    assert_internal_error(app.get_manifest(&path).await, "fault injected").await;
    let heads = upstream.manifest_heads(repo, "v1");
    assert_eq!(
        ok_bytes(app.get_manifest(&path).await).await,
        image.manifest.bytes
    );
    assert_eq!(
        upstream.manifest_heads(repo, "v1"),
        heads + 1,
        "revalidated afresh"
    );
}

#[tokio::test]
async fn a_panic_in_a_shared_tag_list_walk_releases_the_repository() {
    let repo = "acme/panic-tags";
    let (_upstream, app, _image) = setup(repo).await;
    regcache::fault::panic_once("cache.tag_list", repo);

    let path = format!("/v2/{repo}/tags/list");
    assert_internal_error(app.get(&path).await, "fault injected").await;
    let body: Value = serde_json::from_slice(&ok_bytes(app.get(&path).await).await).expect("tag list");
    assert_eq!(body["tags"], serde_json::json!(["v1"]));
}

#[tokio::test]
async fn an_unreachable_upstream_is_named_in_the_log_only() {
    let repo = "acme/unreachable";
    let (upstream, app, _image) = setup(repo).await;
    let address = upstream.host_port();
    upstream.stop().await;

    let resp = app.get_manifest(&format!("/v2/{repo}/manifests/v1")).await;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error JSON");
    assert_eq!(
        (status, &body["errors"][0]["code"]),
        (503, &Value::from("UNAVAILABLE")),
        "{body}"
    );
    assert!(
        !body.to_string().contains(&address),
        "the answer names {address}: {body}"
    );
    let id = body["errors"][0]["detail"]["error_id"]
        .as_str()
        .expect("an error id");
    assert!(
        logs::lines_with(id)
            .iter()
            .any(|l| l.to_string().contains(&address)),
        "the log line with {id} names the upstream's address"
    );
}

#[tokio::test]
async fn an_upstream_error_body_is_logged_not_passed_on() {
    let repo = "acme/upstream-body";
    let (upstream, app, _image) = setup(repo).await;
    upstream.fail_with(500);

    let resp = app.get_manifest(&format!("/v2/{repo}/manifests/v1")).await;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error JSON");
    assert_eq!(status, 502, "{body}");
    // The fixture's error body says "failure injected by the fixture".
    assert!(!body.to_string().contains("injected"), "{body}");
    let id = body["errors"][0]["detail"]["error_id"]
        .as_str()
        .expect("an error id");
    assert!(logs::lines_with(id)
        .iter()
        .any(|l| l.to_string().contains("failure injected by the fixture")));
}

#[tokio::test]
async fn a_storage_error_names_no_path_to_the_client() {
    let repo = "acme/storage-error";
    let (_upstream, app, image) = setup(repo).await;
    app.pull(repo, "v1", &image).await;
    // The cached layer's file becomes a symlink to itself: opening it fails with an I/O
    // error (ELOOP) that names its path.
    let layer = &image.layers[0].digest;
    let file = app
        .stored_blob_files()
        .into_iter()
        .find(|f| layer.ends_with(&*f.file_name().unwrap().to_string_lossy()))
        .expect("the layer's file");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&file, &file).unwrap();

    let hex = layer.trim_start_matches("sha256:");
    assert_internal_error(app.get(&format!("/v2/{repo}/blobs/{layer}")).await, hex).await;
}
