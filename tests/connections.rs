//! Clients that hold resources (issue 11, point 3): the header, idle and send timeouts
//! close what they must and nothing else, the connection cap refuses at once, a stalled
//! reader holds no thread of the blocking pool, and a port in use fails before the
//! database exists. Timeouts are configured short; every wait polls with a deadline.

mod common;

use common::app::{config_for, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::held::{connect, keep_alive_get, read_until_closed, HeldResponse};
use common::images::{Image, ACCEPT_ALL_MANIFESTS};
use common::wait_until_async;
use regcache::config::Duration as CfgDuration;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Longest a condition may take on a loaded 2-core machine before a test fails.
const DEADLINE: Duration = Duration::from_secs(15);
/// A timeout the test does not exercise: far longer than any test runs.
const NEVER_SECS: u64 = 3600;
/// The layer a stalled reader holds: far more than the pinned 64 KiB receive buffer and
/// the server's send buffer (loopback autotuning stops at a few MiB) take.
const BIG_LAYER_BYTES: usize = 32 << 20;

fn secs(n: u64) -> CfgDuration {
    CfgDuration::from_secs(n)
}

/// An upstream with one image whose layer is `BIG_LAYER_BYTES`.
async fn upstream_with_big_image() -> (FixtureUpstream, Image) {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("held", &[BIG_LAYER_BYTES], "2024-01-01T00:00:00Z");
    upstream.add_image("big/app", Some("v1"), &image);
    (upstream, image)
}

/// A client that sends part of its headers (or nothing, or a byte at a time) is closed
/// once `server.header_timeout` has passed since it connected, however it dribbles.
#[tokio::test]
async fn slow_headers_are_closed_after_the_header_timeout() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.server.header_timeout = secs(1);
        c.server.idle_timeout = secs(NEVER_SECS);
        c.server.send_timeout = secs(NEVER_SECS);
    })
    .await;
    let started = Instant::now();
    let mut silent = connect(&app.base).await;
    let mut partial = connect(&app.base).await;
    partial.write_all(b"GET /v2/ HTTP/1.1\r\nHo").await.unwrap();
    let mut dribbling = connect(&app.base).await;
    let dribble = async {
        // One byte every 100 ms, forever: each byte is progress, none completes the
        // headers; the server must close it all the same.
        let header = b"GET /v2/ HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for byte in header {
            tick.tick().await;
            if dribbling.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    };
    let closed = tokio::time::timeout(DEADLINE, async {
        tokio::join!(
            read_until_closed(&mut silent),
            read_until_closed(&mut partial),
            dribble
        )
    })
    .await;
    let (silent_got, partial_got, ()) = closed.expect("slow-header connections are closed by the server");
    assert!(
        silent_got.is_empty() && partial_got.is_empty(),
        "no response was sent"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed by the header timeout, not at once"
    );
    // A client that sends its request at once is served within the same timeout.
    let resp = app.get("/v2/").await;
    assert_eq!(resp.status(), 200);
}

/// A keep-alive connection is closed `server.idle_timeout` after its last response, and
/// the (shorter) header timeout does not apply while it is idle.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let mut app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.server.header_timeout = secs(1);
        c.server.idle_timeout = secs(3);
        c.server.send_timeout = secs(NEVER_SECS);
    })
    .await;
    let mut conn = connect(&app.base).await;
    let (status, body) = keep_alive_get(&mut conn, "/v2/").await;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, b"{}");
    let idle_from = Instant::now();
    // Past the header timeout, the idle connection is still open and serves again.
    let early = tokio::time::timeout(Duration::from_millis(1500), read_until_closed(&mut conn)).await;
    assert!(early.is_err(), "an idle connection outlives the header timeout");
    let (status, _) = keep_alive_get(&mut conn, "/v2/").await;
    assert!(status.contains(" 200 "), "{status}");
    let idle_from_2 = Instant::now();
    let got = tokio::time::timeout(DEADLINE, read_until_closed(&mut conn))
        .await
        .expect("the idle connection is closed by the server");
    assert!(got.is_empty());
    assert!(
        idle_from_2.elapsed() >= Duration::from_millis(2900),
        "closed by the idle timeout"
    );
    assert!(idle_from.elapsed() >= Duration::from_secs(4));
    // Shutdown does not wait for idle connections.
    let _idle = connect(&app.base).await;
    let stopping = Instant::now();
    app.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "graceful shutdown closed the idle connection"
    );
}

/// A client that stops reading a blob is cut off after `server.send_timeout`, and what
/// its response held (the eviction hold on the blob, the connection) is released.
#[tokio::test]
async fn a_stalled_reader_is_closed_after_the_send_timeout() {
    let (upstream, image) = upstream_with_big_image().await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.server.send_timeout = secs(2);
    })
    .await;
    app.pull("big/app", "v1", &image).await;
    let layer = &image.layers[0];
    let held = HeldResponse::get(&app.base, &format!("/v2/big/app/blobs/{}", layer.digest)).await;
    assert_eq!(held.status, 200);
    let cache = app.server().cache().clone();
    assert_eq!(
        cache.blobs_being_served(),
        vec![layer.digest.clone()],
        "the stalled response holds the blob"
    );
    // The client's pooled keep-alive connection from the pull stays open beside it.
    let open_before = app.server().open_connections();
    wait_until_async(
        "the stalled reader's connection is closed and its blob released",
        DEADLINE,
        || {
            let served = cache.blobs_being_served();
            let open = app.server().open_connections();
            async move { served.is_empty() && open == open_before - 1 }
        },
    )
    .await;
    let content_length = held.content_length;
    let got = held.rest_until_closed().await;
    assert!(
        got.len() < content_length,
        "the body was cut short, not completed"
    );
    // The server itself is fine.
    app.pull("big/app", "v1", &image).await;
}

/// Past `server.max_connections`, a new connection is answered 503 and closed at once
/// instead of waiting; once a connection closes, new ones are served again.
#[tokio::test]
async fn the_connection_cap_refuses_quickly() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.server.max_connections = 2;
        c.server.header_timeout = secs(NEVER_SECS);
    })
    .await;
    let first = connect(&app.base).await;
    let _second = connect(&app.base).await;
    wait_until_async("both connections are open", DEADLINE, || {
        let open = app.server().open_connections();
        async move { open == 2 }
    })
    .await;
    let asked = Instant::now();
    let mut third = connect(&app.base).await;
    let answer = tokio::time::timeout(DEADLINE, read_until_closed(&mut third))
        .await
        .expect("the refused connection is closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("UNAVAILABLE"), "{answer}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "refused at once, not queued"
    );
    drop(first);
    wait_until_async("the closed connection frees its place", DEADLINE, || {
        let open = app.server().open_connections();
        async move { open < 2 }
    })
    .await;
    assert_eq!(app.get("/v2/").await.status(), 200);
}

/// Stalled readers of a cached blob hold no thread of the blocking pool: with a pool of
/// two threads and four stalled readers, `/v2/`, a tag's manifest (SQLite, on that pool)
/// and a blob HEAD are still answered.
#[test]
fn stalled_readers_do_not_hold_the_blocking_pool() {
    const BLOCKING_THREADS: usize = 2;
    const STALLED: usize = 4;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (upstream, image) = upstream_with_big_image().await;
        let small = Image::new("small", &[1000], "2024-01-01T00:00:00Z");
        upstream.add_image("small/app", Some("v1"), &small);
        let app = TestApp::start(&upstream.url()).await;
        app.pull("big/app", "v1", &image).await;
        app.pull("small/app", "v1", &small).await;
        let blob = format!("/v2/big/app/blobs/{}", image.layers[0].digest);
        let mut held = Vec::new();
        for _ in 0..STALLED {
            let h = HeldResponse::get(&app.base, &blob).await;
            assert_eq!(h.status, 200);
            held.push(h);
        }
        // Each stalled response has filled its client's receive buffer: the server is
        // blocked on every one of them.
        for h in &held {
            wait_until_async(
                "a stalled response filled the receive buffer",
                DEADLINE,
                || async {
                    let mut probe = vec![0u8; 64 << 10];
                    h.stream.peek(&mut probe).await.unwrap_or(0) >= 32 << 10
                },
            )
            .await;
        }
        // Twice: the second round comes well after any blocked thread would have blocked.
        for _ in 0..2 {
            let probes = async {
                assert_eq!(app.get("/v2/").await.status(), 200);
                let manifest = app
                    .client
                    .get(app.url("/v2/small/app/manifests/v1"))
                    .header(reqwest::header::ACCEPT, ACCEPT_ALL_MANIFESTS)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(manifest.status(), 200);
                assert_eq!(app.head(&blob).await.status(), 200);
            };
            tokio::time::timeout(Duration::from_secs(5), probes)
                .await
                .expect("requests are answered while readers stall");
        }
        drop(held);
    });
}

/// A port in use fails start-up with an error naming the key and the address, before the
/// data directory or the database is created.
#[tokio::test]
async fn a_port_in_use_names_the_key_and_creates_no_database() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut config = config_for(&[("fixture", "http://127.0.0.1:9")], &data_dir);
    config.server.listen = taken_addr.clone();
    let err = regcache::server::start(config.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.listen") && err.contains(&taken_addr),
        "{err}"
    );
    assert!(!data_dir.exists(), "nothing was created: {err}");

    config.server.listen = "127.0.0.1:0".into();
    config.admin.listen = Some(taken_addr.clone());
    let err = regcache::server::start(config).await.unwrap_err().to_string();
    assert!(err.contains("admin.listen") && err.contains(&taken_addr), "{err}");
    assert!(!data_dir.exists(), "nothing was created: {err}");
}

/// HTTP/2 without TLS (prior knowledge) is served beside HTTP/1.1 on the same port.
#[tokio::test]
async fn h2c_clients_are_served() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("h2c", &[100_000], "2024-01-01T00:00:00Z");
    upstream.add_image("h2c/app", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    common::app::pull_image(&h2, &app.base, "h2c/app", "v1", &image).await;
    let resp = h2.get(app.url("/v2/")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
}

/// An HTTP/2 client that reads the socket but never opens its flow-control window for a
/// blob stream stalls the response without ever refusing a write; the send timeout
/// closes it all the same and releases the blob.
#[tokio::test]
async fn an_h2_stream_stalled_by_flow_control_is_closed_after_the_send_timeout() {
    let (upstream, image) = upstream_with_big_image().await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.server.send_timeout = secs(2);
    })
    .await;
    app.pull("big/app", "v1", &image).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let layer = &image.layers[0];
    // The response is held, its body never read: the client's stream window (a few MiB)
    // runs out long before the 32 MiB layer does.
    let held = h2
        .get(app.url(&format!("/v2/big/app/blobs/{}", layer.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(held.version(), reqwest::Version::HTTP_2);
    let cache = app.server().cache().clone();
    assert_eq!(cache.blobs_being_served(), vec![layer.digest.clone()]);
    wait_until_async(
        "the stalled HTTP/2 stream is ended and its blob released",
        DEADLINE,
        || {
            let served = cache.blobs_being_served();
            async move { served.is_empty() }
        },
    )
    .await;
    let body = held.bytes().await;
    assert!(body.is_err(), "the body was cut short, not completed");
}
