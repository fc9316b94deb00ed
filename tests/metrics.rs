//! `/metrics` against the in-process fixture upstream: every request kind and result is
//! counted, upstream requests agree with the fixture's own request log, bytes agree with
//! the bodies, 429s and outages are seen, coalesced misses are counted, the token and the
//! separate listener work, and `promtool check metrics` accepts the exposition.

mod common;

use common::app::{ok_bytes, TestApp};
use common::external::free_port;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Image, ACCEPT_ALL_MANIFESTS};
use common::prometheus::{promtool_check_metrics, scrape, Scrape};
use common::wait_until_async;
use regcache::config::Secret;
use reqwest::header::ACCEPT;
use reqwest::Method;
use std::collections::BTreeMap;
use std::time::Duration;

const REPO: &str = "team/app";

/// The operation label regcache should give a request the fixture received.
fn op_of(method: &Method, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or_default();
    let mut seg = path.rsplit('/');
    let (last, parent) = (seg.next().unwrap_or_default(), seg.next().unwrap_or_default());
    match (parent, last, *method == Method::HEAD) {
        ("manifests", _, false) => "manifest_get",
        ("manifests", _, true) => "manifest_head",
        ("blobs", _, false) => "blob_get",
        ("blobs", _, true) => "blob_head",
        ("tags", "list", _) => "tags",
        ("referrers", _, _) => "referrers",
        _ => "other",
    }
}

/// Requests per op the fixture saw.
fn fixture_ops(fixture: &FixtureUpstream) -> BTreeMap<&'static str, u64> {
    let mut ops = BTreeMap::new();
    for r in fixture.log() {
        *ops.entry(op_of(&r.method, &r.path)).or_default() += 1;
    }
    ops
}

fn requests(m: &Scrape, kind: &str, result: &str) -> u64 {
    m.count(
        "regcache_requests_total",
        &[("upstream", "fixture"), ("kind", kind), ("result", result)],
    )
}

/// A GET whose body length is added to `served` when it succeeds.
async fn get(app: &TestApp, path: &str, served: &mut u64) -> reqwest::StatusCode {
    let resp = app
        .client
        .get(app.url(path))
        .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.bytes().await.unwrap();
    if status.is_success() {
        *served += body.len() as u64;
    }
    status
}

#[test]
fn the_test_parser_reads_escapes_and_special_values() {
    let s = Scrape::parse(
        "# HELP a x\n# TYPE a counter\na{k=\"v\\\"q\\\\\\n\",z=\"1\"} 3\nb 1.5\nc_bucket{le=\"+Inf\"} +Inf\n",
    );
    assert_eq!(s.samples[0].labels["k"], "v\"q\\\n");
    assert_eq!(s.count("a", &[("z", "1")]), 3);
    assert_eq!(s.value("b", &[]), 1.5);
    assert!(s.value("c_bucket", &[("le", "+Inf")]).is_infinite());
    assert!(s.names().contains("a"));
}

#[tokio::test]
async fn every_kind_and_result_is_counted_and_agrees_with_the_upstream() {
    let fixture = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-kinds", &[3000, 70_000], "2024-01-01T00:00:00Z");
    fixture.add_image(REPO, Some("v1"), &image);
    let app = TestApp::start(&fixture.url()).await;
    let mut served = 0u64;
    let blobs: Vec<_> = image.blobs().collect();
    let manifest = format!("/v2/{REPO}/manifests/v1");

    // Cold: a miss for the manifest and for every blob.
    assert_eq!(get(&app, &manifest, &mut served).await, 200);
    for b in &blobs {
        assert_eq!(
            get(&app, &format!("/v2/{REPO}/blobs/{}", b.digest), &mut served).await,
            200
        );
    }
    let cold = scrape(&app.client, &app.url("/metrics")).await;
    promtool_check_metrics(&cold.text);
    let image_bytes = image.total_size() as u64;
    assert_eq!(
        cold.count(
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", "fixture")]
        ),
        image_bytes,
        "fetched: the manifest and every blob, once"
    );
    assert_eq!(served, image_bytes);
    assert_eq!(
        cold.count("regcache_served_bytes_total", &[("upstream", "fixture")]),
        served
    );

    // Warm: the tag is revalidated with a HEAD, blobs are hits, a digest is a hit.
    assert_eq!(get(&app, &manifest, &mut served).await, 200);
    for b in &blobs {
        assert_eq!(
            get(&app, &format!("/v2/{REPO}/blobs/{}", b.digest), &mut served).await,
            200
        );
    }
    let by_digest = app
        .head(&format!("/v2/{REPO}/manifests/{}", image.manifest.digest))
        .await;
    assert_eq!(by_digest.status(), 200);
    // Listing: asked upstream each time (misses).
    assert_eq!(
        get(&app, &format!("/v2/{REPO}/tags/list"), &mut served).await,
        200
    );
    assert_eq!(
        get(
            &app,
            &format!("/v2/{REPO}/referrers/{}", image.manifest.digest),
            &mut served
        )
        .await,
        200
    );
    // An unknown tag: the upstream says 404, the client gets an error.
    assert_eq!(
        get(&app, &format!("/v2/{REPO}/manifests/nope"), &mut served).await,
        404
    );
    let before_outage = scrape(&app.client, &app.url("/metrics")).await;

    // Outage: the tag and the tag list are served stale.
    fixture.stop().await;
    assert_eq!(get(&app, &manifest, &mut served).await, 200);
    assert_eq!(
        get(&app, &format!("/v2/{REPO}/tags/list"), &mut served).await,
        200
    );
    let m = scrape(&app.client, &app.url("/metrics")).await;
    promtool_check_metrics(&m.text);

    let n = blobs.len() as u64;
    let expect = [
        ("manifest", "miss", 1),
        ("manifest", "revalidated", 1),
        ("manifest", "hit", 1),
        ("manifest", "stale", 1),
        ("manifest", "error", 1),
        ("blob", "miss", n),
        ("blob", "hit", n),
        ("blob", "revalidated", 0),
        ("blob", "error", 0),
        ("tags", "miss", 1),
        ("tags", "stale", 1),
        ("referrers", "miss", 1),
        ("referrers", "stale", 0),
    ];
    for (kind, result, want) in expect {
        assert_eq!(requests(&m, kind, result), want, "requests {kind}/{result}");
    }

    // Upstream requests by op: what the fixture logged answered (code 200/404), plus the
    // two that found it stopped (code "error").
    let seen = fixture_ops(&fixture);
    for (op, n) in &seen {
        let answered = m
            .matching(
                "regcache_upstream_requests_total",
                &[("upstream", "fixture"), ("op", op)],
            )
            .filter(|s| s.labels["code"] != "error")
            .map(|s| s.value as u64)
            .sum::<u64>();
        assert_eq!(answered, *n, "upstream {op} requests answered");
        let latency = m.count(
            "regcache_upstream_request_duration_seconds_count",
            &[("upstream", "fixture"), ("op", op)],
        );
        let all = m.count(
            "regcache_upstream_requests_total",
            &[("upstream", "fixture"), ("op", op)],
        );
        assert_eq!(latency, all, "{op}: one latency observation per request");
    }
    assert_eq!(seen.get("manifest_get"), Some(&2), "cold tag and the unknown tag");
    assert_eq!(seen.get("manifest_head"), Some(&1));
    assert_eq!(seen.get("blob_get"), Some(&n));
    assert_eq!(
        m.count(
            "regcache_upstream_requests_total",
            &[("upstream", "fixture"), ("op", "manifest_get"), ("code", "404")]
        ),
        1
    );
    assert_eq!(
        m.count(
            "regcache_upstream_requests_total",
            &[("upstream", "fixture"), ("code", "error")]
        ),
        2,
        "the HEAD and the tag list during the outage"
    );
    // Fetched: the image once, plus the tag list and referrers bodies (nothing during the
    // outage); served: every successful body the client received.
    let listing_bytes = m.count(
        "regcache_upstream_fetched_bytes_total",
        &[("upstream", "fixture")],
    ) - image_bytes;
    assert_eq!(
        before_outage.count(
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", "fixture")]
        ),
        image_bytes + listing_bytes
    );
    assert!(
        listing_bytes > 0,
        "the tag list and referrers bodies count as fetched"
    );
    assert_eq!(
        m.count("regcache_served_bytes_total", &[("upstream", "fixture")]),
        served
    );
    // The outage is the last thing the upstream did.
    let last_ok = m.value(
        "regcache_upstream_last_success_timestamp_seconds",
        &[("upstream", "fixture")],
    );
    let last_failed = m.value(
        "regcache_upstream_last_failure_timestamp_seconds",
        &[("upstream", "fixture")],
    );
    assert!(
        last_ok > 1.6e9 && last_failed >= last_ok,
        "{last_ok} {last_failed}"
    );
    assert_eq!(
        m.count("regcache_transfers_in_flight", &[("upstream", "fixture")]),
        0
    );
    assert_eq!(m.count("regcache_transfer_joins_total", &[]), 0);
    assert_eq!(
        m.count("regcache_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1
    );
    // Writes happened, so the writer histograms saw them.
    assert!(m.count("regcache_sqlite_transaction_seconds_count", &[]) > 0);
    assert!(m.count("regcache_sqlite_writer_wait_seconds_count", &[]) > 0);
}

#[tokio::test]
async fn a_blob_cached_for_another_repository_is_revalidated_upstream() {
    let fixture = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-shared", &[5000], "2024-01-01T00:00:00Z");
    fixture.add_image("one/app", Some("v1"), &image);
    fixture.add_image("two/app", Some("v1"), &image);
    let app = TestApp::start(&fixture.url()).await;
    let layer = &image.layers[0];
    ok_bytes(app.get(&format!("/v2/one/app/blobs/{}", layer.digest)).await).await;
    ok_bytes(app.get(&format!("/v2/two/app/blobs/{}", layer.digest)).await).await;
    let m = scrape(&app.client, &app.url("/metrics")).await;
    assert_eq!(requests(&m, "blob", "miss"), 1);
    assert_eq!(requests(&m, "blob", "revalidated"), 1);
    assert_eq!(requests(&m, "blob", "hit"), 0);
    assert_eq!(
        m.count(
            "regcache_upstream_requests_total",
            &[("upstream", "fixture"), ("op", "blob_head"), ("code", "200")]
        ),
        1
    );
}

#[tokio::test]
async fn throttling_is_counted_and_marks_the_upstream_down_without_unreadiness() {
    let fixture = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-429", &[1000], "2024-01-01T00:00:00Z");
    fixture.add_image(REPO, Some("v1"), &image);
    let app = TestApp::start(&fixture.url()).await;
    fixture.fail_with_retry_after(429, 1);
    let resp = app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await;
    assert!(resp.status().as_u16() >= 400, "{}", resp.status());
    let m = scrape(&app.client, &app.url("/metrics")).await;
    let throttled = m.count("regcache_upstream_throttled_total", &[("upstream", "fixture")]);
    assert!(throttled >= 1);
    assert_eq!(
        throttled,
        m.count(
            "regcache_upstream_requests_total",
            &[("upstream", "fixture"), ("code", "429")]
        )
    );
    assert_eq!(
        m.value(
            "regcache_upstream_last_success_timestamp_seconds",
            &[("upstream", "fixture")]
        ),
        0.0
    );
    assert!(
        m.value(
            "regcache_upstream_last_failure_timestamp_seconds",
            &[("upstream", "fixture")]
        ) > 0.0
    );
    let ready = app.get("/readyz").await;
    assert_eq!(
        ready.status(),
        200,
        "a throttling upstream does not make the cache unready"
    );
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["upstreams"][0]["name"], "fixture");
    assert_eq!(body["upstreams"][0]["health"], "down", "{body}");

    fixture.clear_failure();
    ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await).await;
    let body: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(body["upstreams"][0]["health"], "up", "{body}");
}

#[tokio::test]
async fn concurrent_misses_join_one_transfer() {
    let fixture = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-join", &[400_000], "2024-01-01T00:00:00Z");
    fixture.add_image(REPO, Some("v1"), &image);
    let layer = image.layers[0].clone();
    // Slow enough that every client arrives while the download runs.
    fixture.slow_blob(&layer.digest, 16 * 1024, Duration::from_millis(100));
    let app = TestApp::start(&fixture.url()).await;
    let path = format!("/v2/{REPO}/blobs/{}", layer.digest);
    let first = tokio::spawn({
        let (client, url) = (app.client.clone(), app.url(&path));
        async move { client.get(url).send().await.unwrap().bytes().await.unwrap() }
    });
    let metrics_url = app.url("/metrics");
    wait_until_async(
        "the first client's transfer is in flight",
        Duration::from_secs(20),
        || async {
            scrape(&app.client, &metrics_url)
                .await
                .value("regcache_transfers_in_flight", &[("upstream", "fixture")])
                == 1.0
        },
    )
    .await;
    const JOINERS: usize = 4;
    let joiners: Vec<_> = (0..JOINERS)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url(&path));
            tokio::spawn(async move { client.get(url).send().await.unwrap().bytes().await.unwrap() })
        })
        .collect();
    assert_eq!(first.await.unwrap(), layer.bytes);
    for j in joiners {
        assert_eq!(j.await.unwrap(), layer.bytes);
    }
    let m = scrape(&app.client, &metrics_url).await;
    assert_eq!(fixture.blob_gets(&layer.digest), 1);
    assert_eq!(m.count("regcache_transfer_joins_total", &[]), JOINERS as u64);
    assert_eq!(
        m.count("regcache_transfers_in_flight", &[("upstream", "fixture")]),
        0
    );
    assert_eq!(requests(&m, "blob", "miss"), 1 + JOINERS as u64);
    assert_eq!(
        m.count("regcache_served_bytes_total", &[("upstream", "fixture")]),
        (1 + JOINERS as u64) * layer.len() as u64
    );
    assert_eq!(
        m.count(
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", "fixture")]
        ),
        layer.len() as u64
    );
}

#[tokio::test]
async fn the_token_guards_metrics_and_a_separate_listener_serves_them() {
    let fixture = FixtureUpstream::start(FixtureOptions::default()).await;
    let token = "metrics-token-0123456789";
    let app = TestApp::start_with(&[("fixture", &fixture.url())], |c| {
        c.metrics.token = Some(Secret::new(token));
    })
    .await;
    let resp = app.get("/metrics").await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let wrong = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("metrics-token-012345678X")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    promtool_check_metrics(&right.text().await.unwrap());

    // metrics.listen: /metrics moves there (with /livez and /readyz); the registry's
    // listener no longer serves it.
    let (app, port) = start_with_metrics_listener(&fixture).await;
    assert_eq!(app.get("/metrics").await.status(), 404);
    let other = format!("http://127.0.0.1:{port}");
    let m = scrape(&app.client, &format!("{other}/metrics")).await;
    promtool_check_metrics(&m.text);
    for path in ["/livez", "/readyz"] {
        assert_eq!(
            app.client
                .get(format!("{other}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(app.get(path).await.status(), 200);
    }
}

/// An app whose metrics listen on a port of their own.
async fn start_with_metrics_listener(fixture: &FixtureUpstream) -> (TestApp, u16) {
    let port = free_port();
    let app = TestApp::start_with(&[("fixture", &fixture.url())], |c| {
        c.metrics.listen = Some(format!("127.0.0.1:{port}"));
    })
    .await;
    (app, port)
}

#[tokio::test]
async fn with_metrics_off_nothing_is_counted_or_served() {
    let fixture = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-off", &[1000], "2024-01-01T00:00:00Z");
    fixture.add_image(REPO, Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &fixture.url())], |c| {
        c.metrics.enabled = false;
    })
    .await;
    app.pull(REPO, "v1", &image).await;
    assert_eq!(app.get("/metrics").await.status(), 404);
    assert_eq!(
        app.get("/readyz").await.status(),
        200,
        "health does not depend on metrics"
    );
}

#[test]
fn bad_metrics_and_access_log_settings_name_their_key() {
    for (var, value, key) in [
        ("REGCACHE_METRICS__TOKEN", "too-short", "metrics.token"),
        ("REGCACHE_METRICS__LISTEN", "nowhere", "metrics.listen"),
        // The registry's own default address.
        ("REGCACHE_METRICS__LISTEN", "127.0.0.1:5000", "metrics.listen"),
        ("REGCACHE_METRICS__ENABLED", "\"sometimes\"", "metrics.enabled"),
        ("REGCACHE_LOG__ACCESS", "\"maybe\"", "log.access"),
    ] {
        let err = regcache::config::load(None, vec![(var.to_owned(), value.to_owned())])
            .expect_err(&format!("{var}={value} is refused"));
        assert!(
            err.to_string().contains(&format!("`{key}`")),
            "{var}={value}: {err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("c.toml");
    std::fs::write(
        &both,
        "[metrics]\ntoken = \"0123456789abcdef0123\"\ntoken_file = \"/x\"\n",
    )
    .unwrap();
    let err = regcache::config::load(Some(&both), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("`metrics.token_file`"), "{err}");
    let ok = regcache::config::load(
        None,
        vec![(
            "REGCACHE_METRICS__TOKEN".to_owned(),
            "0123456789abcdef".to_owned(),
        )],
    )
    .unwrap();
    assert_eq!(ok.metrics.token.unwrap().expose(), "0123456789abcdef");
}
