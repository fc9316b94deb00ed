//! What an upstream or an anonymous client can make the listings grow to (I10): an
//! upstream's tag list is read up to `TAG_PAGES_MAX` pages and `TAG_LIST_MAX_BYTES`,
//! concurrent requests for one repository share one upstream walk, and stored referrers
//! answers are bounded per repository and expire with the ttl.

mod common;

use common::app::{ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream, TagsPaging};
use common::images::Image;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

const CREATED: &str = "2024-08-01T00:00:00Z";

/// An upstream paginating by `page_size` whatever regcache asks, with `tags` on one
/// image in `repo`.
async fn upstream_with_tags(repo: &str, tags: &[String], page_size: usize) -> FixtureUpstream {
    let upstream =
        FixtureUpstream::start(FixtureOptions::default().tags_paging(TagsPaging::Paginate { page_size }))
            .await;
    let image = Image::new(repo, &[100], CREATED);
    upstream.add_image(repo, None, &image);
    for tag in tags {
        upstream.set_tag(repo, tag, &image.manifest.digest);
    }
    upstream
}

async fn tag_list(app: &TestApp, repo: &str) -> Vec<String> {
    let body: Value =
        serde_json::from_slice(&ok_bytes(app.get(&format!("/v2/{repo}/tags/list")).await).await)
            .expect("JSON");
    serde_json::from_value(body["tags"].clone()).expect("tags")
}

#[tokio::test]
async fn a_tag_list_is_read_up_to_the_page_bound() {
    let repo = "acme/many-pages";
    let tags: Vec<String> = (0..regcache::upstream::TAG_PAGES_MAX + 20)
        .map(|i| format!("t{i:04}"))
        .collect();
    let upstream = upstream_with_tags(repo, &tags, 1).await;
    let app = TestApp::start(&upstream.url()).await;

    let listed = tag_list(&app, repo).await;
    assert_eq!(
        listed,
        tags[..regcache::upstream::TAG_PAGES_MAX],
        "the first pages"
    );
    assert_eq!(
        upstream.requests(Method::GET, "/tags/list"),
        regcache::upstream::TAG_PAGES_MAX
    );
}

#[tokio::test]
async fn a_tag_list_is_read_up_to_the_byte_bound() {
    let repo = "acme/long-tags";
    // 128-character tags (the longest the grammar allows): 131 bytes each in the JSON,
    // so 80 000 of them are 10 MB, past the 8 MiB bound, in pages of 5000.
    let tags: Vec<String> = (0..80_000)
        .map(|i| format!("{i:06}-{}", "x".repeat(121)))
        .collect();
    let upstream = upstream_with_tags(repo, &tags, 5000).await;
    let app = TestApp::start(&upstream.url()).await;

    let listed = tag_list(&app, repo).await;
    let json_bytes: usize = listed.iter().map(|t| t.len() + 3).sum();
    assert!(
        json_bytes <= regcache::upstream::TAG_LIST_MAX_BYTES,
        "{} tags, {json_bytes} bytes",
        listed.len()
    );
    assert!(
        listed.len() >= 55_000,
        "whole pages up to the bound: {}",
        listed.len()
    );
    assert_eq!(listed, tags[..listed.len()], "the first pages, in order");
}

#[tokio::test]
async fn concurrent_tag_list_requests_share_one_upstream_walk() {
    let repo = "acme/shared-walk";
    let tags: Vec<String> = (0..6).map(|i| format!("v{i}")).collect();
    let upstream = upstream_with_tags(repo, &tags, 2).await;
    let app = TestApp::start(&upstream.url()).await;
    // Each page takes a second: the eight requests below all arrive while the first
    // walk is on its first page, however loaded the machine.
    upstream.set_delay(Duration::from_secs(1));

    let lists = futures::future::join_all((0..8).map(|_| tag_list(&app, repo))).await;
    for list in &lists {
        assert_eq!(list, &tags);
    }
    assert_eq!(
        upstream.requests(Method::GET, "/tags/list"),
        3,
        "one walk of three pages for eight requests"
    );
}

/// Asks for `subject`'s referrers under `repo`, filtered by `artifact_type`.
async fn referrers(app: &TestApp, repo: &str, subject: &str, artifact_type: &str) {
    let path = format!("/v2/{repo}/referrers/{subject}?artifactType={artifact_type}");
    ok_bytes(app.get(&path).await).await;
}

#[tokio::test]
async fn stored_referrers_answers_are_bounded_per_repository() {
    use futures::StreamExt;
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("referrers-bound", &[100], CREATED);
    upstream.add_image("acme/a", Some("v1"), &image);
    upstream.add_image("acme/b", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let subject = &image.manifest.digest;

    // An anonymous client inventing artifact types, eight requests at a time.
    let max = regcache::metadata::REFERRERS_PER_REPO_MAX as usize;
    futures::stream::iter(0..max + 40)
        .for_each_concurrent(8, |i| {
            let app = &app;
            async move { referrers(app, "acme/a", subject, &format!("application/x.invented.{i}")).await }
        })
        .await;
    referrers(&app, "acme/b", subject, "application/x.sbom").await;

    let per_repo = |repo: &str| {
        app.count(&format!(
            "SELECT count(*) FROM referrers f JOIN repositories r ON r.id = f.repo_id WHERE r.name = '{repo}'"
        ))
    };
    assert_eq!(per_repo("acme/a"), max as i64, "the oldest went past the bound");
    assert_eq!(per_repo("acme/b"), 1, "another repository keeps its own");
    // The newest answer is kept.
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM referrers WHERE artifact_type = 'application/x.invented.{}'",
            max + 39
        )),
        1
    );
}

#[tokio::test]
async fn stored_referrers_answers_expire_with_the_ttl() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("referrers-ttl", &[100], CREATED);
    upstream.add_image("acme/a", Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.ttl = regcache::config::Duration::from_secs(2);
    })
    .await;
    for t in ["application/x.sbom", "application/x.signature", ""] {
        referrers(&app, "acme/a", &image.manifest.digest, t).await;
    }
    assert_eq!(
        app.count("SELECT count(*) FROM referrers WHERE expires_at IS NOT NULL"),
        3
    );
    // Expiry never removes repository rows, so the answers cannot go by a cascade.

    common::wait_until_async(
        "the referrers answers expired",
        Duration::from_secs(30),
        || async { app.count("SELECT count(*) FROM referrers") == 0 },
    )
    .await;
}
