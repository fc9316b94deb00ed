//! Tag lists and referrers: regcache sorts and paginates tag lists itself (`n`, `last`,
//! `Link`) whatever the upstream does with those parameters, follows an upstream's own
//! pages to the end, keeps the lists for when the upstream is gone, and passes the
//! referrers API through (cached, filter included), answering 404 where the upstream has
//! no such API so clients fall back to the tag schema.

mod common;

use std::collections::HashSet;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream, TagsPaging};
use common::images::{Image, OCI_INDEX};
use reqwest::header::{CONTENT_TYPE, LINK};
use reqwest::Method;
use serde_json::Value;

const CREATED: &str = "2024-04-01T00:00:00Z";
const REPO: &str = "acme/app";
/// Tags in no particular order; their byte-wise sort puts digits before upper case before
/// `_` before lower case, and "1.10" before "1.9".
const TAGS: &[&str] = &[
    "v1",
    "latest",
    "1.9",
    "1.10",
    "Beta",
    "_hidden",
    "2024-01-01",
    "a",
];
const SBOM: &str = "application/vnd.example.sbom.v1+json";
const SIGNATURE: &str = "application/vnd.example.signature.v1+json";

fn sorted_tags() -> Vec<String> {
    let mut tags: Vec<String> = TAGS.iter().map(|t| (*t).to_owned()).collect();
    tags.sort();
    tags
}

/// An upstream with `TAGS` on one image in `REPO`.
async fn upstream_with_tags(opts: FixtureOptions) -> (FixtureUpstream, Image) {
    let upstream = FixtureUpstream::start(opts).await;
    let image = Image::new("listing", &[1000], CREATED);
    upstream.add_image(REPO, Some(TAGS[0]), &image);
    for tag in &TAGS[1..] {
        upstream.set_tag(REPO, tag, &image.manifest.digest);
    }
    (upstream, image)
}

/// One page of a tag list: the names and the `Link` header's target, if any.
async fn tags_page(app: &TestApp, path: &str) -> (Vec<String>, Option<String>) {
    let resp = app.get(path).await;
    let link = resp
        .headers()
        .get(LINK)
        .map(|v| v.to_str().expect("ASCII Link").to_owned());
    let body: Value = serde_json::from_slice(&ok_bytes(resp).await).expect("tag list JSON");
    let expected_name = path
        .trim_start_matches("/v2/")
        .split("/tags/list")
        .next()
        .unwrap_or_default();
    assert_eq!(body["name"], expected_name, "{path}: {body}");
    let tags = body["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no tags array in {body}"))
        .iter()
        .map(|t| t.as_str().expect("tag is a string").to_owned())
        .collect();
    (tags, link)
}

/// The path inside `<...>; rel="next"`.
fn next_path(link: &str) -> String {
    assert!(link.ends_with("; rel=\"next\""), "Link is not rel=next: {link}");
    link.strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .map(|(path, _)| path.to_owned())
        .unwrap_or_else(|| panic!("malformed Link: {link}"))
}

/// Follows regcache's `Link` headers from `first` to the end; returns every page.
async fn follow_pages(app: &TestApp, first: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut path = Some(first.to_owned());
    while let Some(p) = path {
        assert!(pages.len() <= TAGS.len(), "pagination does not end: {pages:?}");
        let (tags, link) = tags_page(app, &p).await;
        pages.push(tags);
        path = link.as_deref().map(next_path);
    }
    pages
}

/// What every paging mode of the upstream must give a client of regcache.
async fn check_tag_listing(paging: TagsPaging, upstream_requests_per_listing: usize) {
    let (upstream, _) = upstream_with_tags(FixtureOptions::default().tags_paging(paging.clone())).await;
    let app = TestApp::start(&upstream.url()).await;
    let all = sorted_tags();
    let list = format!("/v2/{REPO}/tags/list");

    let (tags, link) = tags_page(&app, &list).await;
    assert_eq!(tags, all, "{paging:?}: the complete list, sorted");
    assert_eq!(link, None, "{paging:?}: no Link without n");
    assert_eq!(
        upstream.requests(Method::GET, "/tags/list"),
        upstream_requests_per_listing,
        "{paging:?}: upstream tag list requests for one listing"
    );

    let (tags, link) = tags_page(&app, &format!("{list}?n=3")).await;
    assert_eq!(tags, all[..3], "{paging:?}");
    assert_eq!(
        link.as_deref(),
        Some(format!("</v2/{REPO}/tags/list?n=3&last={}>; rel=\"next\"", all[2]).as_str()),
        "{paging:?}"
    );

    let (tags, link) = tags_page(&app, &format!("{list}?n=2&last={}", all[3])).await;
    assert_eq!(tags, all[4..6], "{paging:?}");
    assert!(link.is_some(), "{paging:?}: more follow");

    // The last page has no Link; n larger than what is left is fine.
    let (tags, link) = tags_page(&app, &format!("{list}?n=50&last={}", all[5])).await;
    assert_eq!(tags, all[6..], "{paging:?}");
    assert_eq!(link, None, "{paging:?}");

    // `last` need not be a tag that exists.
    let (tags, _) = tags_page(&app, &format!("{list}?last=1.99")).await;
    assert_eq!(tags, all[2..], "{paging:?}");

    let (tags, link) = tags_page(&app, &format!("{list}?n=0")).await;
    assert!(tags.is_empty(), "{paging:?}: n=0 lists nothing");
    assert_eq!(link, None, "{paging:?}");

    // Following the Links visits every tag exactly once, in order.
    for n in [1, 3, 7, 8] {
        let pages = follow_pages(&app, &format!("{list}?n={n}")).await;
        assert!(pages.iter().all(|p| p.len() <= n), "{paging:?} n={n}: {pages:?}");
        assert_eq!(pages.len(), all.len().div_ceil(n), "{paging:?} n={n}: {pages:?}");
        let flat: Vec<String> = pages.into_iter().flatten().collect();
        assert_eq!(flat, all, "{paging:?} n={n}");
    }
}

#[tokio::test]
async fn tags_are_sorted_and_paginated_when_upstream_honours_n_and_last() {
    check_tag_listing(TagsPaging::Honour, 1).await;
}

#[tokio::test]
async fn tags_are_paginated_by_regcache_when_upstream_ignores_n_and_last() {
    check_tag_listing(TagsPaging::IgnoreParams, 1).await;
}

#[tokio::test]
async fn upstream_pages_are_followed_to_the_complete_list() {
    // Eight tags in pages of two: four upstream requests make one complete list.
    check_tag_listing(TagsPaging::Paginate { page_size: 2 }, 4).await;
}

#[tokio::test]
async fn tags_seen_before_are_listed_while_upstream_is_down() {
    let (upstream, image) = upstream_with_tags(FixtureOptions::default()).await;
    let app = TestApp::start(&upstream.url()).await;
    let all = sorted_tags();
    let list = format!("/v2/{REPO}/tags/list");
    assert_eq!(tags_page(&app, &list).await.0, all);

    upstream.stop().await;
    // Added while unreachable, so regcache cannot know it yet.
    upstream.set_tag(REPO, "zz-new", &image.manifest.digest);
    assert_eq!(tags_page(&app, &list).await.0, all, "listed from the cache");
    let pages = follow_pages(&app, &format!("{list}?n=3")).await;
    assert_eq!(pages.concat(), all, "pagination works on the cached list");

    // A repository never listed before has nothing to fall back on.
    let (status, code) = error_code(app.get("/v2/acme/other/tags/list").await).await;
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"));

    upstream.restart().await;
    let (tags, _) = tags_page(&app, &list).await;
    assert!(
        tags.contains(&"zz-new".to_owned()),
        "listed again from upstream: {tags:?}"
    );
}

#[tokio::test]
async fn offline_mode_never_contacts_the_upstream() {
    let (upstream, image) = upstream_with_tags(FixtureOptions::default()).await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| c.proxy.offline = true).await;
    let (status, code) = error_code(app.get(&format!("/v2/{REPO}/tags/list")).await).await;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));
    let (status, code) = error_code(app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    let (status, code) = error_code(
        app.get(&format!("/v2/{REPO}/blobs/{}", image.layers[0].digest))
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    let _ = app
        .get(&format!("/v2/{REPO}/referrers/{}", image.manifest.digest))
        .await;
    assert!(upstream.log().is_empty(), "upstream asked: {:?}", upstream.log());
}

#[tokio::test]
async fn offline_mode_lists_what_was_cached_without_asking_upstream() {
    let (upstream, image) = upstream_with_tags(FixtureOptions::default()).await;
    let sbom = Image::artifact("listing-sbom", &image.manifest, SBOM);
    upstream.add_referrer(REPO, &sbom);
    let mut app = TestApp::start(&upstream.url()).await;
    let all = sorted_tags();
    let list = format!("/v2/{REPO}/tags/list");
    let referrers = format!("/v2/{REPO}/referrers/{}", image.manifest.digest);
    assert_eq!(tags_page(&app, &list).await.0, all);
    ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await).await;
    let referrers_body = ok_bytes(app.get(&referrers).await).await;

    app.restart_with(|c| c.proxy.offline = true).await;
    upstream.reset_log();
    upstream.set_tag(REPO, "zz-new", &image.manifest.digest);

    assert_eq!(tags_page(&app, &list).await.0, all);
    assert_eq!(follow_pages(&app, &format!("{list}?n=5")).await.concat(), all);
    let manifest = ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await).await;
    assert_eq!(manifest, image.manifest.bytes);
    assert_eq!(ok_bytes(app.get(&referrers).await).await, referrers_body);
    assert!(upstream.log().is_empty(), "upstream asked: {:?}", upstream.log());
}

/// The digests and artifact types listed in a referrers index.
fn listed(body: &[u8]) -> HashSet<(String, String)> {
    let index: Value = serde_json::from_slice(body).expect("referrers index JSON");
    assert_eq!(index["mediaType"], OCI_INDEX, "{index}");
    index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests in {index}"))
        .iter()
        .map(|m| {
            (
                m["digest"].as_str().expect("digest").to_owned(),
                m["artifactType"].as_str().expect("artifactType").to_owned(),
            )
        })
        .collect()
}

/// `path` with `?artifactType=<filter>`, URL-encoded, when a filter is given.
fn with_filter(path: &str, filter: Option<&str>) -> String {
    match filter {
        Some(f) => {
            let query = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("artifactType", f)
                .finish();
            format!("{path}?{query}")
        }
        None => path.to_owned(),
    }
}

#[tokio::test]
async fn referrers_are_passed_through_filtered_and_cached() {
    let (upstream, image) = upstream_with_tags(FixtureOptions::default()).await;
    let sbom = Image::artifact("listing-sbom", &image.manifest, SBOM);
    let signature = Image::artifact("listing-signature", &image.manifest, SIGNATURE);
    upstream.add_referrer(REPO, &sbom);
    upstream.add_referrer(REPO, &signature);
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/{REPO}/referrers/{}", image.manifest.digest);
    let get = |filter: Option<&'static str>| app.client.get(app.url(&with_filter(&path, filter))).send();
    let direct = |filter: Option<&'static str>| {
        let path = format!("/v2/{REPO}/referrers/{}", image.manifest.digest);
        let url = format!("{}{}", upstream.url(), with_filter(&path, filter));
        app.client.get(url).send()
    };
    let upstream_all = ok_bytes(direct(None).await.expect("direct referrers")).await;
    let upstream_sbom = ok_bytes(direct(Some(SBOM)).await.expect("direct referrers")).await;
    upstream.reset_log();

    let resp = get(None).await.expect("referrers");
    assert_eq!(
        resp.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(OCI_INDEX.as_bytes())
    );
    let all = ok_bytes(resp).await;
    assert_eq!(all, upstream_all, "the upstream's index, passed through");
    assert_eq!(
        listed(&all),
        HashSet::from([
            (sbom.manifest.digest.clone(), SBOM.to_owned()),
            (signature.manifest.digest.clone(), SIGNATURE.to_owned()),
        ])
    );

    let resp = get(Some(SBOM)).await.expect("filtered referrers");
    assert_eq!(
        resp.headers().get("oci-filters-applied").map(|v| v.as_bytes()),
        Some(&b"artifactType"[..])
    );
    let filtered = ok_bytes(resp).await;
    assert_eq!(filtered, upstream_sbom);
    assert_eq!(
        listed(&filtered),
        HashSet::from([(sbom.manifest.digest.clone(), SBOM.to_owned())])
    );
    let passed_on = upstream.log().iter().any(|r| {
        r.path_only()
            .ends_with(&format!("/referrers/{}", image.manifest.digest))
            && url::form_urlencoded::parse(r.path.split_once('?').map_or("", |(_, q)| q).as_bytes())
                .any(|(k, v)| k == "artifactType" && v == SBOM)
    });
    assert!(passed_on, "artifactType passed upstream: {:?}", upstream.log());

    // Cached: with the upstream gone both answers are still given, unchanged.
    upstream.stop().await;
    assert_eq!(ok_bytes(get(None).await.expect("referrers")).await, all);
    let resp = get(Some(SBOM)).await.expect("filtered referrers");
    assert!(resp.headers().contains_key("oci-filters-applied"));
    assert_eq!(ok_bytes(resp).await, filtered);
    assert_eq!(app.count("SELECT count(*) FROM referrers"), 2);
}

#[tokio::test]
async fn referrers_are_404_when_the_upstream_has_no_referrers_api() {
    let (upstream, image) = upstream_with_tags(FixtureOptions::default().without_referrers()).await;
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/{REPO}/referrers/{}", image.manifest.digest);
    for query in ["", "?artifactType=application%2Fvnd.example.sbom.v1%2Bjson"] {
        let resp = app.get(&format!("{path}{query}")).await;
        assert_eq!(
            resp.status(),
            404,
            "{path}{query}: clients fall back to the tag schema"
        );
    }
    assert_eq!(upstream.requests(Method::GET, "/referrers/"), 2);
    assert_eq!(
        app.count("SELECT count(*) FROM referrers"),
        0,
        "a missing API is not cached as an empty list"
    );
}
