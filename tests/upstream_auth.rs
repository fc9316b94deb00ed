//! How regcache talks to upstreams: the bearer-token dance from `WWW-Authenticate`
//! (anonymous or with Basic credentials at the token realm), tokens cached per repository
//! and renewed when refused, refused credentials turned into DENIED with nothing stored,
//! blob redirects to another host followed without the credentials, and an `Accept`
//! header naming every manifest type.

mod common;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream, RequestRecord};
use common::images::{Image, Index, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use regcache::config::Secret;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::Method;

const CREATED: &str = "2024-05-01T00:00:00Z";
const REPO: &str = "acme/app";
const USER: &str = "user";
const PASSWORD: &str = "pass";
/// `Basic base64("user:pass")`.
const BASIC_USER_PASS: &str = "Basic dXNlcjpwYXNz";

fn image() -> Image {
    Image::new("upstream-auth", &[4000, 300], CREATED)
}

async fn pull(app: &TestApp, repo: &str, image: &Image) {
    app.pull(repo, "v1", image).await;
}

fn with_credentials(password: &str) -> impl FnOnce(&mut regcache::config::Config) {
    let password = password.to_owned();
    move |c| {
        c.upstream[0].username = Some(USER.into());
        c.upstream[0].password = Some(Secret::new(password));
    }
}

/// Requests other than to the token endpoint.
fn registry_requests(upstream: &FixtureUpstream) -> Vec<RequestRecord> {
    upstream
        .log()
        .into_iter()
        .filter(|r| r.path_only() != "/token")
        .collect()
}

/// Nothing is recorded in SQLite or storage.
fn assert_nothing_recorded(app: &TestApp) {
    for table in [
        "repositories",
        "manifests",
        "tags",
        "blobs",
        "repo_blobs",
        "tag_lists",
    ] {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM {table}")),
            0,
            "rows in {table}"
        );
    }
    assert!(
        app.stored_blob_files().is_empty(),
        "{:?}",
        app.stored_blob_files()
    );
    assert_eq!(app.tmp_files(), 0);
}

#[tokio::test]
async fn anonymous_tokens_are_fetched_once_per_repository_and_reused() {
    let upstream = FixtureUpstream::start(FixtureOptions::default().anonymous_tokens()).await;
    let image = image();
    let other = Image::new("upstream-auth-other", &[100], CREATED);
    upstream.add_image(REPO, Some("v1"), &image);
    upstream.add_image("acme/other", Some("v1"), &other);
    let app = TestApp::start(&upstream.url()).await;

    pull(&app, REPO, &image).await;
    // Again: the tag is revalidated with a HEAD, which needs the token too.
    pull(&app, REPO, &image).await;
    let by_digest = format!("/v2/{REPO}/manifests/{}", image.manifest.digest);
    ok_bytes(app.get_manifest(&by_digest).await).await;
    assert_eq!(
        upstream.token_requests(),
        1,
        "one token for every request on {REPO}"
    );
    assert_eq!(upstream.tokens_issued(), 1);
    assert!(
        upstream.manifest_heads(REPO, "v1") >= 1,
        "the tag was revalidated"
    );
    let requests = registry_requests(&upstream);
    let (challenged, rest) = requests.split_first().expect("requests upstream");
    assert_eq!(
        challenged.authorization(),
        None,
        "the first request meets the challenge"
    );
    for r in rest {
        assert_eq!(
            r.authorization(),
            Some("Bearer fixture-token-1"),
            "{} {}",
            r.method,
            r.path
        );
    }

    // Scopes are per repository: another one needs its own token, once.
    pull(&app, "acme/other", &other).await;
    pull(&app, "acme/other", &other).await;
    assert_eq!(upstream.token_requests(), 2);

    // A token the upstream no longer accepts is renewed, and the request still succeeds.
    upstream.expire_tokens();
    let extra = Image::new("upstream-auth-extra", &[200], CREATED);
    upstream.add_image(REPO, Some("v2"), &extra);
    let body = ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/v2")).await).await;
    assert_eq!(body, extra.manifest.bytes);
    assert_eq!(upstream.token_requests(), 3);
}

#[tokio::test]
async fn basic_credentials_are_sent_to_the_token_realm_only() {
    let upstream = FixtureUpstream::start(FixtureOptions::default().basic_auth(USER, PASSWORD)).await;
    let image = image();
    upstream.add_image(REPO, Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], with_credentials(PASSWORD)).await;

    pull(&app, REPO, &image).await;
    pull(&app, REPO, &image).await;
    assert_eq!(upstream.token_requests(), 1);
    let tokens: Vec<RequestRecord> = upstream
        .log()
        .into_iter()
        .filter(|r| r.path_only() == "/token")
        .collect();
    assert_eq!(tokens[0].authorization(), Some(BASIC_USER_PASS));
    assert!(
        tokens[0].path.contains("scope=repository%3Aacme%2Fapp%3Apull"),
        "token asked for the challenge's scope: {}",
        tokens[0].path
    );
    for r in registry_requests(&upstream) {
        assert!(
            !r.authorization().is_some_and(|a| a.starts_with("Basic")),
            "the password went to {} {}",
            r.method,
            r.path
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 3);
}

#[tokio::test]
async fn refused_credentials_are_denied_and_nothing_is_stored() {
    let upstream = FixtureUpstream::start(FixtureOptions::default().basic_auth(USER, PASSWORD)).await;
    let image = image();
    upstream.add_image(REPO, Some("v1"), &image);
    let wrong = TestApp::start_with(&[("fixture", &upstream.url())], with_credentials("wrong")).await;
    let none = TestApp::start(&upstream.url()).await;

    for app in [&wrong, &none] {
        for path in [
            format!("/v2/{REPO}/manifests/v1"),
            format!("/v2/{REPO}/manifests/{}", image.manifest.digest),
            format!("/v2/{REPO}/blobs/{}", image.layers[0].digest),
            format!("/v2/{REPO}/tags/list"),
        ] {
            let (status, code) = error_code(app.get_manifest(&path).await).await;
            assert_eq!((status, code.as_str()), (403, "DENIED"), "{path}");
        }
        assert_nothing_recorded(app);
    }
    assert_eq!(upstream.tokens_issued(), 0);
    assert!(
        upstream
            .log()
            .iter()
            .filter(|r| r.path_only() == "/token")
            .any(|r| r.authorization() == Some("Basic dXNlcjp3cm9uZw==")),
        "the wrong password was tried at the token realm"
    );
}

#[tokio::test]
async fn blob_redirects_are_followed_without_forwarding_credentials() {
    let registry = FixtureUpstream::start(FixtureOptions::default().anonymous_tokens()).await;
    let cdn = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = image();
    registry.add_image(REPO, Some("v1"), &image);
    cdn.add_image(REPO, None, &image);
    registry.redirect_blobs_to(&cdn.url());
    let app = TestApp::start(&registry.url()).await;

    pull(&app, REPO, &image).await;
    for blob in image.blobs() {
        assert_eq!(registry.blob_gets(&blob.digest), 1, "{}", blob.digest);
        assert_eq!(cdn.blob_gets(&blob.digest), 1, "{}", blob.digest);
    }
    let cdn_log = cdn.log();
    assert_eq!(
        cdn_log.len(),
        image.blobs().count(),
        "only blob GETs reach the CDN: {cdn_log:?}"
    );
    for r in &cdn_log {
        assert_eq!(r.authorization(), None, "credentials forwarded to {}", r.path);
    }
    let registry_blob_gets: Vec<RequestRecord> = registry
        .log()
        .into_iter()
        .filter(|r| r.method == Method::GET && r.path_only().contains("/blobs/"))
        .collect();
    assert_eq!(registry_blob_gets.len(), image.blobs().count());
    for r in &registry_blob_gets {
        assert!(
            r.authorization().is_some_and(|a| a.starts_with("Bearer ")),
            "the registry itself gets the token: {}",
            r.path
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 3);

    // Cached: neither host is asked again.
    pull(&app, REPO, &image).await;
    assert_eq!(cdn.log().len(), cdn_log.len());
}

#[tokio::test]
async fn manifest_requests_accept_every_manifest_type() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let oci = Index::new("upstream-auth-oci", &["amd64", "arm64"]);
    let docker = Index::docker("upstream-auth-docker", &["amd64", "arm64"]);
    upstream.add_index("acme/oci", Some("v1"), &oci);
    upstream.add_index("acme/docker", Some("v1"), &docker);
    let app = TestApp::start(&upstream.url()).await;

    for (repo, index, media_type) in [
        ("acme/oci", &oci, OCI_INDEX),
        ("acme/docker", &docker, DOCKER_MANIFEST_LIST),
    ] {
        // Twice: a fetch (GET) and then a revalidation (HEAD).
        for _ in 0..2 {
            let resp = app.get_manifest(&format!("/v2/{repo}/manifests/v1")).await;
            assert_eq!(
                resp.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
                Some(media_type.as_bytes()),
                "{repo}: the index is cached whole"
            );
            assert_eq!(ok_bytes(resp).await, index.manifest.bytes);
        }
        let child = &index.images[1].1.manifest;
        let body = ok_bytes(
            app.get_manifest(&format!("/v2/{repo}/manifests/{}", child.digest))
                .await,
        )
        .await;
        assert_eq!(body, child.bytes);
        assert_eq!(upstream.manifest_gets(repo, "v1"), 1, "{repo}");
        assert_eq!(upstream.manifest_heads(repo, "v1"), 1, "{repo}");
    }

    let manifest_requests: Vec<RequestRecord> = upstream
        .log()
        .into_iter()
        .filter(|r| r.path_only().contains("/manifests/"))
        .collect();
    assert_eq!(manifest_requests.len(), 6);
    for r in &manifest_requests {
        let accept: Vec<String> = r
            .headers
            .get_all(ACCEPT)
            .iter()
            .flat_map(|v| v.to_str().expect("ASCII Accept").split(','))
            .map(|t| t.split(';').next().unwrap_or_default().trim().to_owned())
            .collect();
        for t in [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST] {
            assert!(
                accept.iter().any(|a| a == t),
                "{} {} lacks {t}: {accept:?}",
                r.method,
                r.path
            );
        }
    }
}
