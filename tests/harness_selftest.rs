//! Proves the test harness itself works, without regcache: the fake upstream serves what
//! it should and misbehaves when told to, the generated images are valid, and the real
//! external programs (docker-registry, skopeo, moto) start and do their job here.

mod common;

use std::time::{Duration, Instant};

use common::external::{skopeo_copy, DockerRegistry, MotoS3};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream, TagsPaging};
use common::images::{
    sha256_digest, Blob, Image, Index, ACCEPT_ALL_MANIFESTS, DOCKER_LAYER_GZIP, DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST,
};
use futures::StreamExt as _;
use reqwest::{header, Method, StatusCode};
use serde_json::Value;

const CREATED: &str = "2024-02-03T04:05:06Z";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

fn header_str(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("response has no {name} header: {resp:?}"))
        .to_str()
        .expect("ASCII header")
        .to_owned()
}

async fn error_code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("OCI error JSON body");
    body["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
        .to_owned()
}

// ----- images ------------------------------------------------------------------------

#[test]
fn images_are_deterministic_and_well_formed() {
    let a = Image::new("det", &[3000, 10], CREATED);
    let b = Image::new("det", &[3000, 10], CREATED);
    assert_eq!(a.manifest.digest, b.manifest.digest);
    let later = Image::new("det", &[3000, 10], "2025-01-01T00:00:00Z");
    assert_ne!(a.manifest.digest, later.manifest.digest);
    assert_eq!(
        a.layers, later.layers,
        "layers depend on the seed, not on created"
    );
    assert_ne!(a.layers[0], Image::new("other", &[3000], CREATED).layers[0]);

    let manifest: Value = serde_json::from_slice(&a.manifest.bytes).expect("manifest JSON");
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    assert_eq!(manifest["config"]["digest"], a.config.digest.as_str());
    assert_eq!(manifest["layers"][1]["size"], a.layers[1].len());
    assert_eq!(manifest["layers"][0]["mediaType"], OCI_LAYER_TAR);
    let config: Value = serde_json::from_slice(&a.config.bytes).expect("config JSON");
    assert_eq!(config["created"], CREATED);
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["rootfs"]["diff_ids"][0], a.layers[0].digest.as_str());
    // A tar of one 3000-byte file: header + 3072 padded + 1024 end blocks.
    assert_eq!(a.layers[0].len(), 512 + 3072 + 1024);
    for blob in std::iter::once(&a.manifest).chain(a.blobs()) {
        assert_eq!(blob.digest, sha256_digest(&blob.bytes));
    }

    let index = Index::new("det-index", &["amd64", "arm64"]);
    let body: Value = serde_json::from_slice(&index.manifest.bytes).expect("index JSON");
    assert_eq!(body["mediaType"], OCI_INDEX);
    assert_eq!(body["manifests"][1]["platform"]["architecture"], "arm64");
    assert_eq!(body["manifests"][1]["platform"]["variant"], "v8");
    let arm = index.image("arm64").expect("arm64 child");
    assert_eq!(body["manifests"][1]["digest"], arm.manifest.digest.as_str());
}

#[test]
fn layers_are_real_tar_and_gzip_archives() {
    let dir = tempfile::tempdir().expect("temp dir");
    let oci = Image::new("tar-check", &[70_000], CREATED);
    let docker = Image::docker("tar-check", &[70_000], CREATED);
    assert_eq!(docker.manifest.media_type, DOCKER_MANIFEST);
    assert_eq!(docker.layers[0].media_type, DOCKER_LAYER_GZIP);
    let config: Value = serde_json::from_slice(&docker.config.bytes).expect("config JSON");
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        oci.layers[0].digest.as_str(),
        "a Docker layer's diff_id is the digest of the tar inside the gzip"
    );
    let tar_path = dir.path().join("layer.tar");
    let gz_path = dir.path().join("layer.tar.gz");
    std::fs::write(&tar_path, &oci.layers[0].bytes).expect("write tar");
    std::fs::write(&gz_path, &docker.layers[0].bytes).expect("write gzip");
    for (flags, path) in [("-tvf", &tar_path), ("-tzvf", &gz_path)] {
        let out = std::process::Command::new("tar")
            .arg(flags)
            .arg(path)
            .output()
            .expect("running tar");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "tar {flags} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            listing.contains("70000") && listing.contains("layer-0.bin"),
            "unexpected listing: {listing}"
        );
    }
}

#[test]
fn a_64_mib_layer_is_quick_to_generate() {
    let started = Instant::now();
    let image = Image::new("big", &[64 << 20], CREATED);
    let elapsed = started.elapsed();
    assert!(image.layers[0].len() > 64 << 20);
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

// ----- fixture upstream --------------------------------------------------------------

#[tokio::test]
async fn fixture_serves_content_with_correct_digests_per_repository() {
    let fx = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("serve", &[1000, 70_000], CREATED);
    fx.add_image("team/app", Some("v1"), &image);
    let other = Image::new("other", &[10], CREATED);
    fx.add_image("team/other", Some("v1"), &other);
    let http = client();
    let base = fx.url();

    let resp = http.get(format!("{base}/v2/")).send().await.expect("GET /v2/");
    assert_eq!(resp.status(), StatusCode::OK);

    let resp = http
        .get(format!("{base}/v2/team/app/manifests/v1"))
        .header(header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header_str(&resp, "content-type"), OCI_MANIFEST);
    assert_eq!(header_str(&resp, "docker-content-digest"), image.manifest.digest);
    assert_eq!(
        header_str(&resp, "content-length"),
        image.manifest.len().to_string()
    );
    let body = resp.bytes().await.expect("manifest body");
    assert_eq!(sha256_digest(&body), image.manifest.digest);

    let resp = http
        .head(format!("{base}/v2/team/app/manifests/{}", image.manifest.digest))
        .send()
        .await
        .expect("HEAD manifest");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header_str(&resp, "content-length"),
        image.manifest.len().to_string()
    );
    assert_eq!(header_str(&resp, "docker-content-digest"), image.manifest.digest);
    assert!(resp.bytes().await.expect("HEAD body").is_empty());

    for blob in image.blobs() {
        let resp = http
            .get(format!("{base}/v2/team/app/blobs/{}", blob.digest))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header_str(&resp, "content-length"), blob.len().to_string());
        let body = resp.bytes().await.expect("blob body");
        assert_eq!(sha256_digest(&body), blob.digest);
    }
    let resp = http
        .head(format!("{base}/v2/team/app/blobs/{}", image.layers[1].digest))
        .send()
        .await
        .expect("HEAD blob");
    assert_eq!(
        header_str(&resp, "content-length"),
        image.layers[1].len().to_string()
    );

    // Isolation: the layer exists, but not in team/other; unknown names and tags.
    let layer = &image.layers[0].digest;
    let resp = http
        .get(format!("{base}/v2/team/other/blobs/{layer}"))
        .send()
        .await
        .expect("GET foreign blob");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
    let resp = http
        .get(format!("{base}/v2/nobody/here/blobs/{layer}"))
        .send()
        .await
        .expect("GET in unknown repo");
    assert_eq!(error_code(resp).await, "NAME_UNKNOWN");
    let resp = http
        .get(format!("{base}/v2/team/app/manifests/nope"))
        .send()
        .await
        .expect("GET unknown tag");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");

    // Counting.
    assert_eq!(fx.blob_gets(layer), 3, "one from team/app, two refused elsewhere");
    assert_eq!(fx.manifest_gets("team/app", "v1"), 1);
    assert_eq!(fx.manifest_heads("team/app", &image.manifest.digest), 1);
    assert_eq!(fx.requests(Method::HEAD, "/blobs/"), 1);
    assert_eq!(fx.log().len(), 10);
    fx.reset_log();
    assert!(fx.log().is_empty());

    // Tag changes take effect at once.
    fx.set_tag("team/app", "v2", &image.manifest.digest);
    fx.remove_tag("team/app", "v1");
    let resp = http
        .get(format!("{base}/v2/team/app/tags/list"))
        .send()
        .await
        .expect("GET tags");
    let tags: Value = resp.json().await.expect("tags JSON");
    assert_eq!(tags["tags"], serde_json::json!(["v2"]));
}

#[tokio::test]
async fn fixture_honours_single_ranges() {
    let fx = FixtureUpstream::start(FixtureOptions::default()).await;
    let blob = Blob::random("range", 1000);
    fx.add_blob("r", blob.clone());
    let url = format!("{}/v2/r/blobs/{}", fx.url(), blob.digest);
    let http = client();

    for (range, start, end) in [
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
    ] {
        let resp = http
            .get(&url)
            .header(header::RANGE, range)
            .send()
            .await
            .expect("ranged GET");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header_str(&resp, "content-range"),
            format!("bytes {start}-{end}/1000")
        );
        let body = resp.bytes().await.expect("range body");
        assert_eq!(&body[..], &blob.bytes[start..=end], "{range}");
    }
    let resp = http
        .get(&url)
        .header(header::RANGE, "bytes=5000-")
        .send()
        .await
        .expect("unsatisfiable GET");
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header_str(&resp, "content-range"), "bytes */1000");
}

#[tokio::test]
async fn fixture_corrupts_and_truncates_on_command() {
    let fx = FixtureUpstream::start(FixtureOptions::default()).await;
    let blob = Blob::random("bad", 300_000);
    fx.add_blob("r", blob.clone());
    let url = format!("{}/v2/r/blobs/{}", fx.url(), blob.digest);
    let http = client();

    fx.corrupt_blob(&blob.digest);
    let body = http
        .get(&url)
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body");
    assert_eq!(body.len(), blob.len());
    assert_ne!(sha256_digest(&body), blob.digest);

    fx.heal_blob(&blob.digest);
    let body = http
        .get(&url)
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body");
    assert_eq!(sha256_digest(&body), blob.digest);

    fx.truncate_blob(&blob.digest, 100_000);
    assert_eq!(get_until_error(&url).await, (300_000, 100_000));
    fx.truncate_blob(&blob.digest, 0);
    assert_eq!(get_until_error(&url).await, (300_000, 0));

    let big = Blob::random("big-bad", 20 << 20);
    fx.add_blob("r", big.clone());
    fx.truncate_blob(&big.digest, (10 << 20) + 3);
    let url = format!("{}/v2/r/blobs/{}", fx.url(), big.digest);
    assert_eq!(get_until_error(&url).await, (20 << 20, (10 << 20) + 3));
}

/// GETs `url` and reads the body until it fails: `(Content-Length, bytes received)`.
/// Panics if the body does not fail.
async fn get_until_error(url: &str) -> (usize, usize) {
    let resp = client().get(url).send().await.expect("GET truncated");
    let announced: usize = header_str(&resp, "content-length")
        .parse()
        .expect("numeric Content-Length");
    let mut stream = resp.bytes_stream();
    let mut received = 0;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => received += bytes.len(),
            Err(_) => return (announced, received),
        }
    }
    panic!("a truncated body must end in an error; got all {received} bytes")
}

#[tokio::test]
async fn fixture_bearer_auth_challenge_and_token_flow() {
    let fx = FixtureUpstream::start(FixtureOptions::default().basic_auth("alice", "s3cret")).await;
    let image = Image::new("auth", &[100], CREATED);
    fx.add_image("private/app", Some("v1"), &image);
    let http = client();
    let base = fx.url();

    let resp = http.get(format!("{base}/v2/")).send().await.expect("GET /v2/");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header_str(&resp, "www-authenticate"),
        format!("Bearer realm=\"{base}/token\",service=\"fixture\"")
    );
    let manifest_url = format!("{base}/v2/private/app/manifests/v1");
    let resp = http.get(&manifest_url).send().await.expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = header_str(&resp, "www-authenticate");
    assert!(
        challenge.ends_with(",scope=\"repository:private/app:pull\""),
        "{challenge}"
    );

    let token_url = format!("{base}/token?service=fixture&scope=repository:private/app:pull");
    let resp = http.get(&token_url).send().await.expect("anonymous token");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http
        .get(&token_url)
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .expect("bad token request");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http
        .get(&token_url)
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .expect("token request");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.expect("token JSON");
    assert_eq!(body["expires_in"], 300);
    let token = body["token"].as_str().expect("token string").to_owned();

    let resp = http
        .get(&manifest_url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("authorised GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.expect("manifest");
    assert_eq!(sha256_digest(&body), image.manifest.digest);

    // A token for another repository does not open this one.
    let other = http
        .get(format!(
            "{base}/token?service=fixture&scope=repository:other:pull"
        ))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .expect("token for other")
        .json::<Value>()
        .await
        .expect("token JSON");
    let other = other["token"].as_str().expect("token string");
    let resp = http
        .get(&manifest_url)
        .bearer_auth(other)
        .send()
        .await
        .expect("GET with wrong scope");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(fx.token_requests(), 4);
    assert_eq!(fx.tokens_issued(), 2);
    fx.expire_tokens();
    let resp = http
        .get(&manifest_url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET with expired token");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// Follows `Link` headers from `path`, returning every tag and the number of pages.
async fn all_tags(base: &str, path: &str) -> (Vec<String>, usize) {
    let http = client();
    let mut next = Some(path.to_owned());
    let mut tags = Vec::new();
    let mut pages = 0;
    while let Some(path) = next.take() {
        let resp = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET tags page");
        assert_eq!(resp.status(), StatusCode::OK);
        next = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix('<'))
            .and_then(|v| v.split_once('>'))
            .map(|(p, _)| p.to_owned());
        let body: Value = resp.json().await.expect("tags JSON");
        for tag in body["tags"].as_array().expect("tags array") {
            tags.push(tag.as_str().expect("tag string").to_owned());
        }
        pages += 1;
    }
    (tags, pages)
}

#[tokio::test]
async fn fixture_tag_listing_modes() {
    let image = Image::new("tags", &[10], CREATED);
    let names = ["a", "b", "c", "d", "e"];
    let expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();

    let honour = FixtureUpstream::start(FixtureOptions::default()).await;
    let paginate =
        FixtureUpstream::start(FixtureOptions::default().tags_paging(TagsPaging::Paginate { page_size: 2 }))
            .await;
    let ignore =
        FixtureUpstream::start(FixtureOptions::default().tags_paging(TagsPaging::IgnoreParams)).await;
    for fx in [&honour, &paginate, &ignore] {
        for tag in names {
            fx.add_image("r", Some(tag), &image);
        }
    }
    assert_eq!(
        all_tags(&honour.url(), "/v2/r/tags/list?n=2").await,
        (expected.clone(), 3)
    );
    assert_eq!(
        all_tags(&honour.url(), "/v2/r/tags/list?n=2&last=c").await,
        (vec!["d".to_owned(), "e".to_owned()], 1)
    );
    assert_eq!(
        all_tags(&honour.url(), "/v2/r/tags/list").await,
        (expected.clone(), 1)
    );
    assert_eq!(
        all_tags(&paginate.url(), "/v2/r/tags/list").await,
        (expected.clone(), 3)
    );
    assert_eq!(
        all_tags(&paginate.url(), "/v2/r/tags/list?n=100").await,
        (expected.clone(), 3)
    );
    assert_eq!(
        all_tags(&ignore.url(), "/v2/r/tags/list?n=2").await,
        (expected, 1)
    );
}

#[tokio::test]
async fn fixture_referrers_api() {
    let image = Image::new("subject", &[10], CREATED);
    let sbom = Image::artifact("sbom", &image.manifest, "application/spdx+json");
    let sig = Image::artifact("sig", &image.manifest, "application/vnd.dev.cosign");
    let http = client();

    let fx = FixtureUpstream::start(FixtureOptions::default()).await;
    fx.add_image("r", Some("v1"), &image);
    fx.add_referrer("r", &sbom);
    fx.add_referrer("r", &sig);
    let url = format!("{}/v2/r/referrers/{}", fx.url(), image.manifest.digest);
    let resp = http.get(&url).send().await.expect("GET referrers");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header_str(&resp, "content-type"), OCI_INDEX);
    let body: Value = resp.json().await.expect("referrers JSON");
    assert_eq!(body["manifests"].as_array().expect("manifests").len(), 2);
    let resp = http
        .get(format!("{url}?artifactType=application/spdx%2Bjson"))
        .send()
        .await
        .expect("GET filtered referrers");
    assert_eq!(header_str(&resp, "oci-filters-applied"), "artifactType");
    let body: Value = resp.json().await.expect("referrers JSON");
    assert_eq!(body["manifests"][0]["digest"], sbom.manifest.digest.as_str());
    assert_eq!(body["manifests"][0]["artifactType"], "application/spdx+json");
    assert_eq!(body["manifests"].as_array().expect("manifests").len(), 1);

    let without = FixtureUpstream::start(FixtureOptions::default().without_referrers()).await;
    without.add_image("r", Some("v1"), &image);
    let resp = http
        .get(format!(
            "{}/v2/r/referrers/{}",
            without.url(),
            image.manifest.digest
        ))
        .send()
        .await
        .expect("GET referrers");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn fixture_failures_and_delays() {
    let fx = FixtureUpstream::start(FixtureOptions::default()).await;
    let http = client();
    let url = format!("{}/v2/", fx.url());

    fx.fail_with(500);
    let resp = http.get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    fx.fail_with(429);
    let resp = http.get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header_str(&resp, "retry-after"), "1");
    assert_eq!(error_code(resp).await, "TOOMANYREQUESTS");
    fx.clear_failure();
    assert_eq!(http.get(&url).send().await.expect("GET").status(), StatusCode::OK);

    fx.fail_next(2, 503);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(http.get(&url).send().await.expect("GET").status().as_u16());
    }
    assert_eq!(statuses, [503, 503, 200]);

    fx.fail_matching("/blobs/", 502);
    assert_eq!(http.get(&url).send().await.expect("GET").status(), StatusCode::OK);
    let blob_url = format!("{}/v2/r/blobs/{}", fx.url(), sha256_digest(b""));
    assert_eq!(
        http.get(&blob_url).send().await.expect("GET").status(),
        StatusCode::BAD_GATEWAY
    );
    fx.clear_failure();

    fx.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(http.get(&url).send().await.expect("GET").status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn fixture_slow_transfer_then_stop_and_restart() {
    let fx = FixtureUpstream::start(FixtureOptions::default()).await;
    let blob = Blob::random("slow", 64 * 1024);
    fx.add_blob("r", blob.clone());
    fx.slow_blob(&blob.digest, 1024, Duration::from_millis(50));
    let http = client();
    let url = format!("{}/v2/r/blobs/{}", fx.url(), blob.digest);

    let resp = http.get(&url).send().await.expect("GET slow blob");
    let mut stream = resp.bytes_stream();
    let first = stream
        .next()
        .await
        .expect("a first chunk")
        .expect("first chunk ok");
    assert!(first.len() < blob.len(), "the transfer is in progress");
    assert_eq!(fx.blob_gets(&blob.digest), 1);

    let started = Instant::now();
    fx.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stop() must not wait for bodies"
    );
    assert!(!fx.is_running());
    let mut rest = 0;
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => rest += bytes.len(),
            Err(_) => failed = true,
        }
    }
    assert!(
        failed && first.len() + rest < blob.len(),
        "the transfer was cut off"
    );
    let err = http
        .get(format!("{}/v2/", fx.url()))
        .send()
        .await
        .expect_err("a stopped fixture refuses connections");
    assert!(err.is_connect(), "{err:?}");

    fx.restart().await;
    fx.heal_blob(&blob.digest);
    let body = http
        .get(&url)
        .send()
        .await
        .expect("GET after restart")
        .bytes()
        .await;
    assert_eq!(sha256_digest(&body.expect("body")), blob.digest);
}

#[tokio::test]
async fn fixture_redirects_blobs_and_records_authorization() {
    let origin = FixtureUpstream::start(FixtureOptions::default().anonymous_tokens()).await;
    let cdn = FixtureUpstream::start(FixtureOptions::default()).await;
    let blob = Blob::random("redirected", 5000);
    origin.add_blob("r", blob.clone());
    cdn.add_blob("r", blob.clone());
    origin.redirect_blobs_to(&cdn.url());
    let http = client();

    let token: Value = http
        .get(format!(
            "{}/token?service=fixture&scope=repository:r:pull",
            origin.url()
        ))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token JSON");
    let token = token["token"].as_str().expect("token string");
    let resp = http
        .get(format!("{}/v2/r/blobs/{}", origin.url(), blob.digest))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET redirected blob");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.url().port(), Some(cdn.addr().port()));
    assert_eq!(sha256_digest(&resp.bytes().await.expect("body")), blob.digest);

    let at_origin = origin.log();
    let last = at_origin.last().expect("origin saw the request");
    assert_eq!(last.authorization(), Some(format!("Bearer {token}").as_str()));
    let at_cdn = cdn.log();
    assert_eq!(at_cdn.len(), 1);
    assert_eq!(at_cdn[0].path_only(), format!("/v2/r/blobs/{}", blob.digest));
    assert_eq!(
        at_cdn[0].authorization(),
        None,
        "reqwest drops credentials across hosts"
    );
}

// ----- real programs -----------------------------------------------------------------

#[tokio::test]
async fn skopeo_seeds_docker_registry_from_oci_layouts() {
    let registry = DockerRegistry::start().await;
    let layout = tempfile::tempdir().expect("temp dir");
    let index = Index::new("selftest-multi", &["amd64", "arm64"]);
    let single = Image::new("selftest-3layer", &[1 << 20, 4096, 100], CREATED);
    let docker = Image::docker("selftest-docker", &[50_000], CREATED);
    let docker_list = Index::docker("selftest-docker-list", &["amd64", "arm64"]);
    // One layout can hold several tags.
    index.write_oci_layout(layout.path(), "v1");
    single.write_oci_layout(layout.path(), "single");
    // Docker media types go through skopeo's dir: format instead.
    let docker_dir = tempfile::tempdir().expect("temp dir");
    let docker_list_dir = tempfile::tempdir().expect("temp dir");
    docker.write_skopeo_dir(docker_dir.path());
    docker_list.write_skopeo_dir(docker_list_dir.path());
    let src = |tag: &str| format!("oci:{}:{tag}", layout.path().display());
    let dst = |repo: &str| format!("docker://{}/{repo}", registry.host_port());

    skopeo_copy(&src("v1"), &dst("test/multi:v1"), &["--all"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    skopeo_copy(&src("single"), &dst("test/single:v1"), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir_src = |dir: &tempfile::TempDir| format!("dir:{}", dir.path().display());
    skopeo_copy(&dir_src(&docker_dir), &dst("test/docker:v1"), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    skopeo_copy(
        &dir_src(&docker_list_dir),
        &dst("test/docker-list:v1"),
        &["--all"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let http = client();
    let base = registry.url();
    let resp = http
        .get(format!("{base}/v2/test/multi/manifests/v1"))
        .header(header::ACCEPT, OCI_INDEX)
        .send()
        .await
        .expect("GET index");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header_str(&resp, "content-type"), OCI_INDEX);
    assert_eq!(header_str(&resp, "docker-content-digest"), index.manifest.digest);
    assert_eq!(resp.bytes().await.expect("index body"), index.manifest.bytes);
    for blob in index.blobs() {
        let kind = if blob.media_type == OCI_MANIFEST {
            "manifests"
        } else {
            "blobs"
        };
        let resp = http
            .head(format!("{base}/v2/test/multi/{kind}/{}", blob.digest))
            .header(header::ACCEPT, OCI_MANIFEST)
            .send()
            .await
            .expect("HEAD child");
        assert_eq!(resp.status(), StatusCode::OK, "{kind} {}", blob.digest);
    }

    let resp = http
        .get(format!("{base}/v2/test/docker-list/manifests/v1"))
        .header(header::ACCEPT, DOCKER_MANIFEST_LIST)
        .send()
        .await
        .expect("GET manifest list");
    assert_eq!(header_str(&resp, "content-type"), DOCKER_MANIFEST_LIST);
    assert_eq!(
        header_str(&resp, "docker-content-digest"),
        docker_list.manifest.digest
    );

    let arm = docker_list.image("arm64").expect("arm64 child");
    for (repo, image) in [
        ("test/single", &single),
        ("test/docker", &docker),
        ("test/docker-list", arm),
    ] {
        let reference = if repo == "test/docker-list" {
            image.manifest.digest.clone()
        } else {
            "v1".to_owned()
        };
        let resp = http
            .get(format!("{base}/v2/{repo}/manifests/{reference}"))
            .header(header::ACCEPT, ACCEPT_ALL_MANIFESTS)
            .send()
            .await
            .expect("GET manifest");
        assert_eq!(header_str(&resp, "content-type"), image.manifest.media_type);
        assert_eq!(
            header_str(&resp, "docker-content-digest"),
            image.manifest.digest,
            "skopeo must copy {repo} without rewriting its manifest"
        );
        for blob in image.blobs() {
            let body = http
                .get(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
                .send()
                .await
                .expect("GET blob")
                .bytes()
                .await
                .expect("blob body");
            assert_eq!(sha256_digest(&body), blob.digest);
        }
    }
}

#[tokio::test]
async fn skopeo_pulls_from_the_fixture_through_its_token_flow() {
    // A real client against the fake upstream: checks the fixture speaks the protocol
    // (challenge, token, manifests, blobs) and survives skopeo's TLS-first probe.
    let fx = FixtureUpstream::start(FixtureOptions::default().basic_auth("bob", "pw")).await;
    let index = Index::new("skopeo-pull", &["amd64", "arm64"]);
    fx.add_index("team/multi", Some("v1"), &index);
    let out = tempfile::tempdir().expect("temp dir");
    let src = format!("docker://{}/team/multi:v1", fx.host_port());
    let dst = format!("dir:{}", out.path().display());
    skopeo_copy(&src, &dst, &["--all", "--src-creds", "bob:pw"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let top = std::fs::read(out.path().join("manifest.json")).expect("manifest.json");
    assert_eq!(sha256_digest(&top), index.manifest.digest);
    for blob in index.blobs() {
        let name = if blob.media_type == OCI_MANIFEST {
            format!("{}.manifest.json", blob.hex())
        } else {
            blob.hex().to_owned()
        };
        let bytes = std::fs::read(out.path().join(&name)).expect("copied file");
        assert_eq!(sha256_digest(&bytes), blob.digest, "{name}");
    }
    assert!(fx.tokens_issued() >= 1);
    for blob in index.blobs().filter(|b| b.media_type != OCI_MANIFEST) {
        assert_eq!(fx.blob_gets(&blob.digest), 1, "{}", blob.digest);
    }
}

#[tokio::test]
async fn docker_registry_proxy_mode_pulls_through() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("proxied", &[2000], CREATED);
    upstream.add_image("library/thing", Some("v1"), &image);
    let proxy = DockerRegistry::start_proxy(&upstream.url()).await;
    let resp = client()
        .get(format!("{}/v2/library/thing/manifests/v1", proxy.url()))
        .header(header::ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("GET through proxy");
    assert_eq!(resp.status(), StatusCode::OK, "{}", proxy.log());
    assert_eq!(header_str(&resp, "docker-content-digest"), image.manifest.digest);
    assert!(
        upstream.manifest_gets("library/thing", "v1") + upstream.manifest_heads("library/thing", "v1") >= 1
    );
}

#[tokio::test]
async fn moto_s3_starts_with_its_bucket_and_restarts_empty() {
    let mut moto = MotoS3::start("regcache-selftest").await;
    let http = client();
    let bucket_url = format!("{}/{}", moto.endpoint(), moto.bucket());
    let resp = http.head(&bucket_url).send().await.expect("HEAD bucket");
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = http
        .head(format!("{}/no-such-bucket", moto.endpoint()))
        .send()
        .await
        .expect("HEAD missing bucket");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = http
        .put(format!("{bucket_url}/hello.txt"))
        .body("hi")
        .send()
        .await
        .expect("PUT object");
    assert!(resp.status().is_success(), "{}", resp.status());

    moto.stop();
    let err = http.head(&bucket_url).send().await.expect_err("moto is down");
    assert!(err.is_connect(), "{err:?}");
    moto.start_again().await;
    let resp = http.head(&bucket_url).send().await.expect("HEAD bucket again");
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = http
        .head(format!("{bucket_url}/hello.txt"))
        .send()
        .await
        .expect("HEAD old object");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "moto restarts empty");
}
