//! End to end with real parts: skopeo pulls a known image through regcache from the CNCF
//! registry (`docker-registry`), cold and then warm, and every counter `/metrics` shows is
//! checked against what the registry's own access log says regcache asked of it, against
//! the blob sizes, and against `regcache status --json` run beside the server.

mod common;

use common::app::TestApp;
use common::binary::run_ok_async;
use common::external::{push_image, skopeo_pull, DockerRegistry};
use common::images::Image;
use common::prometheus::{promtool_check_metrics, scrape, Scrape};
use std::collections::BTreeMap;

const REPO: &str = "test/app";
const UPSTREAM: &str = "origin";

/// One request in the registry's access log (combined log format).
#[derive(Debug, Clone)]
struct Logged {
    method: String,
    path: String,
    status: u16,
    bytes: u64,
}

/// The requests regcache made (by its User-Agent), in order.
fn regcache_requests(registry: &DockerRegistry) -> Vec<Logged> {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("\"regcache/"))
        .filter_map(|l| {
            // ... "GET /v2/x/manifests/v1 HTTP/1.1" 200 1234 "referer" "regcache/0.1.0"
            let (_, rest) = l.split_once('"')?;
            let (request, rest) = rest.split_once('"')?;
            let mut req = request.split_whitespace();
            let (method, path) = (req.next()?.to_owned(), req.next()?.to_owned());
            let mut after = rest.split_whitespace();
            let status = after.next()?.parse().ok()?;
            let bytes = after.next()?.parse().unwrap_or(0);
            Some(Logged {
                method,
                path,
                status,
                bytes,
            })
        })
        .collect()
}

fn op_of(l: &Logged) -> &'static str {
    let path = l.path.split('?').next().unwrap_or_default();
    let mut seg = path.rsplit('/');
    let (last, parent) = (seg.next().unwrap_or_default(), seg.next().unwrap_or_default());
    match (parent, last, l.method.as_str()) {
        ("manifests", _, "HEAD") => "manifest_head",
        ("manifests", _, _) => "manifest_get",
        ("blobs", _, "HEAD") => "blob_head",
        ("blobs", _, _) => "blob_get",
        ("tags", "list", _) => "tags",
        ("referrers", _, _) => "referrers",
        _ => "other",
    }
}

/// (op, code) -> requests, as the registry logged them.
fn by_op(logged: &[Logged]) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for l in logged {
        *out.entry((op_of(l).to_owned(), l.status.to_string()))
            .or_default() += 1;
    }
    out
}

/// (op, code) -> requests, as regcache counted them.
fn counted(m: &Scrape) -> BTreeMap<(String, String), u64> {
    m.matching("regcache_upstream_requests_total", &[("upstream", UPSTREAM)])
        .filter(|s| s.value > 0.0)
        .map(|s| ((s.labels["op"].clone(), s.labels["code"].clone()), s.value as u64))
        .collect()
}

fn requests(m: &Scrape, kind: &str, result: &str) -> u64 {
    m.count(
        "regcache_requests_total",
        &[("upstream", UPSTREAM), ("kind", kind), ("result", result)],
    )
}

/// `settle`: the registry writes a line after its response ends; the counts agree once
/// every line is there.
async fn settled(registry: &DockerRegistry, app: &TestApp) -> (Vec<Logged>, Scrape) {
    let last = std::sync::Mutex::new((Vec::new(), Scrape::parse("")));
    common::wait_until_async(
        "the registry's log agrees with regcache's upstream counts",
        std::time::Duration::from_secs(20),
        || async {
            let logged = regcache_requests(registry);
            let m = scrape(&app.client, &app.url("/metrics")).await;
            let agree = by_op(&logged) == counted(&m);
            *last.lock().unwrap() = (logged, m);
            agree
        },
    )
    .await;
    last.into_inner().unwrap()
}

#[tokio::test]
async fn cold_then_warm_pull_agrees_with_the_registry_and_with_status() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("e2e-metrics", &[300_000, 1_200_000], "2024-03-01T10:00:00Z");
    push_image(&registry, work.path(), REPO, &image).await;
    let data_dir = work.path().join("data");
    let app = TestApp::start_with(&[(UPSTREAM, &registry.url())], |c| {
        c.server.data_dir = data_dir.clone();
    })
    .await;
    let cli = work.path().join("cli.toml");
    std::fs::write(&cli, format!("[server]\ndata_dir = \"{}\"\n", data_dir.display())).unwrap();
    let blobs = image.blobs().count() as u64;
    let blob_bytes: u64 = image.blobs().map(|b| b.len() as u64).sum();
    let image_bytes = image.total_size() as u64;

    // Cold.
    skopeo_pull(&app.base, REPO, &image, &work.path().join("cold")).await;
    let (logged, m) = settled(&registry, &app).await;
    promtool_check_metrics(&m.text);
    let gets: Vec<&Logged> = logged.iter().filter(|l| l.method == "GET").collect();
    assert_eq!(
        gets.iter().filter(|l| op_of(l) == "manifest_get").count(),
        1,
        "{logged:#?}"
    );
    assert_eq!(
        gets.iter().filter(|l| op_of(l) == "blob_get").count() as u64,
        blobs,
        "one upstream GET per blob: {logged:#?}"
    );
    let upstream_bytes: u64 = gets.iter().map(|l| l.bytes).sum();
    assert_eq!(upstream_bytes, image_bytes, "the registry sent the image once");
    assert_eq!(
        m.count("regcache_upstream_fetched_bytes_total", &[("upstream", UPSTREAM)]),
        upstream_bytes
    );
    assert_eq!(requests(&m, "manifest", "miss"), 1);
    assert_eq!(requests(&m, "blob", "miss"), blobs);
    for result in ["hit", "revalidated", "stale", "error"] {
        assert_eq!(requests(&m, "manifest", result), 0, "manifest {result}");
        assert_eq!(requests(&m, "blob", result), 0, "blob {result}");
    }
    assert_eq!(
        m.count("regcache_served_bytes_total", &[("upstream", UPSTREAM)]),
        image_bytes,
        "skopeo received the manifest and every blob once"
    );
    for op in ["manifest_get", "blob_get"] {
        let n: u64 = by_op(&logged)
            .iter()
            .filter(|((o, _), _)| o == op)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            m.count(
                "regcache_upstream_request_duration_seconds_count",
                &[("upstream", UPSTREAM), ("op", op)]
            ),
            n,
            "{op} latency observations"
        );
    }
    assert_eq!(
        m.count("regcache_upstream_throttled_total", &[("upstream", UPSTREAM)]),
        0
    );
    assert_eq!(
        m.count("regcache_transfers_in_flight", &[("upstream", UPSTREAM)]),
        0
    );

    // What is stored: the blobs, as `regcache status` sees them too.
    let status: serde_json::Value = serde_json::from_slice(
        &run_ok_async(&["status", "--json", "--config", cli.to_str().unwrap()])
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(m.count("regcache_stored_blobs", &[]), blobs);
    assert_eq!(status["blobs"]["count"], blobs);
    assert_eq!(m.count("regcache_stored_bytes", &[]), blob_bytes);
    assert_eq!(status["blobs"]["bytes"], blob_bytes);
    assert_eq!(m.count("regcache_repositories", &[]), 1);
    assert_eq!(status["repositories"], 1);
    assert_eq!(m.count("regcache_deletes_pending", &[]), 0);
    assert_eq!(status["pending_deletes"]["count"], 0);

    // Warm: the registry sees one HEAD (the tag's revalidation) and nothing else.
    let cold_lines = logged.len();
    skopeo_pull(&app.base, REPO, &image, &work.path().join("warm")).await;
    let (logged, m) = settled(&registry, &app).await;
    promtool_check_metrics(&m.text);
    let warm: Vec<&Logged> = logged[cold_lines..].iter().collect();
    assert_eq!(warm.len(), 1, "{warm:#?}");
    assert_eq!(op_of(warm[0]), "manifest_head");
    assert_eq!(warm[0].status, 200);
    assert_eq!(
        m.count(
            "regcache_upstream_requests_total",
            &[("upstream", UPSTREAM), ("op", "manifest_head"), ("code", "200")]
        ),
        1
    );
    assert_eq!(
        m.count("regcache_upstream_fetched_bytes_total", &[("upstream", UPSTREAM)]),
        image_bytes,
        "nothing fetched for the warm pull"
    );
    assert_eq!(requests(&m, "manifest", "revalidated"), 1);
    assert_eq!(requests(&m, "manifest", "miss"), 1);
    assert_eq!(requests(&m, "blob", "hit"), blobs);
    assert_eq!(requests(&m, "blob", "miss"), blobs);
    assert_eq!(
        m.count("regcache_served_bytes_total", &[("upstream", UPSTREAM)]),
        2 * image_bytes
    );
    let ok = m.value(
        "regcache_upstream_last_success_timestamp_seconds",
        &[("upstream", UPSTREAM)],
    );
    assert!(ok > 1.6e9);
    assert_eq!(
        m.value(
            "regcache_upstream_last_failure_timestamp_seconds",
            &[("upstream", UPSTREAM)]
        ),
        0.0
    );
}
