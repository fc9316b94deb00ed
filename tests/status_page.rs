//! The status page `GET /`: references nothing the browser would fetch (so no load can
//! fail), is rendered by headless Chromium (Debian's `chromium`) with no console message
//! at all (checked against a page that does log one), its sections and figures in the DOM, and
//! a phone-sized screenshot written for people to look at (its path is printed). Behind
//! the admin token when one is set, on the admin listener when that is separate.

mod common;

use base64::Engine as _;
use common::app::TestApp;
use common::binary::run_ok_async;
use common::external::{free_port, require_tool};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::wait_until_async;
use regcache::config::Secret;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Bound on one Chromium run; it starts in about 3 s on an idle machine.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);
const TOKEN: &str = "status-page-admin-token";

/// What one headless Chromium run printed.
struct ChromiumRun {
    stdout: String,
    /// Console messages Chromium logged (`--enable-logging=stderr`): lines with
    /// `:CONSOLE` in their prefix, e.g. `INFO:CONSOLE:12] "msg", source: url (12)`.
    console: Vec<String>,
}

/// Headless Chromium on `url` with the flags that work in this sandbox, a fresh profile,
/// console messages logged to stderr, and `extra` (`--dump-dom`, `--screenshot=PATH`).
async fn chromium(url: &str, extra: &[&str]) -> ChromiumRun {
    let binary = require_tool("chromium");
    let profile = tempfile::tempdir().unwrap();
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let child = tokio::process::Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=412,1600",
            &profile_arg,
        ])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting chromium");
    let out = tokio::time::timeout(CHROMIUM_TIMEOUT, child.wait_with_output())
        .await
        .expect("chromium finished in time")
        .expect("waiting for chromium");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "chromium {extra:?} {url}: {}\n{stderr}",
        out.status
    );
    ChromiumRun {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        console: stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .map(str::to_owned)
            .collect(),
    }
}

/// A CLI config for the server's data dir and upstream (for `regcache purge`).
fn cli_config(dir: &Path, data_dir: &Path, upstream: &str) -> String {
    let path = dir.join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\ndata_dir = \"{}\"\n[[upstream]]\nname = \"fixture\"\nurl = \"{upstream}\"\n",
            data_dir.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn the_page_renders_in_chromium_without_console_messages() {
    // The detector first: a page that logs an error must be caught, so a quiet run
    // below means a quiet page, not a Chromium that stopped logging.
    let noisy = format!(
        "data:text/html;base64,{}",
        base64::engine::general_purpose::STANDARD
            .encode("<!doctype html><title>t</title><script>console.error('probe-error')</script>")
    );
    let control = chromium(&noisy, &["--dump-dom"]).await;
    assert!(
        control.console.iter().any(|l| l.contains("probe-error")),
        "Chromium's console logging is not visible here: {:?}",
        control.console
    );

    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("status-page", &[30_000, 250_000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    upstream.add_image(
        "team/tool",
        Some("v1"),
        &Image::new("status-tool", &[9_000], "2024-01-01T00:00:00Z"),
    );
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cli = cli_config(dir.path(), &data_dir, &upstream.url());
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.server.data_dir = data_dir.clone();
        c.storage.max_size = Some("10MiB".parse().unwrap());
    })
    .await;
    app.pull("team/app", "v1", &image).await;
    app.pull("team/app", "v1", &image).await;
    let tool = upstream_tool_manifest(&app).await;
    assert!(tool > 0);
    // A job in the list: a purge of a repository nothing is cached under.
    run_ok_async(&["purge", "fixture/nothing/here", "--config", &cli]).await;
    wait_until_async("the purge job ran", Duration::from_secs(30), || async {
        app.count("SELECT count(*) FROM jobs WHERE state = 'succeeded'") == 1
    })
    .await;

    let url = app.url("/");
    // Nothing for the browser to fetch beside the page, so nothing can fail to load
    // (Chromium logs script errors to the console, not failed loads).
    let served = app.get("/").await.text().await.unwrap();
    for fetches in [" src=", "<script", "@import", "url(", "<iframe", "<object"] {
        assert!(
            !served.contains(fetches),
            "the page fetches something ({fetches}):\n{served}"
        );
    }
    let links: Vec<&str> = served.match_indices("<link").map(|(i, _)| &served[i..]).collect();
    assert!(
        links
            .iter()
            .all(|l| l.starts_with("<link rel=\"icon\" href=\"data:,\">")),
        "only the empty inline icon (which stops the /favicon.ico request): {links:?}"
    );
    let dom = chromium(&url, &["--dump-dom"]).await;
    assert!(dom.console.is_empty(), "console messages: {:#?}", dom.console);
    for needle in [
        "Savings since start",
        "hit ratio",
        "Storage",
        "of 10.0 MiB",
        "Upstreams",
        "<b>fixture</b> <span class=\"up\">up</span>",
        "Largest repositories",
        "fixture/team/app",
        "Most pulled since start",
        "Deletes",
        "Recent jobs",
        "<b>purge</b> <span class=\"up\">succeeded</span>",
    ] {
        assert!(
            dom.stdout.contains(needle),
            "{needle:?} not rendered:\n{}",
            dom.stdout
        );
    }
    // team/app pulled twice, team/tool once: ranked in that order.
    let app_at = dom.stdout.find("fixture/team/app</td><td class=\"num\">2<");
    let tool_at = dom.stdout.find("fixture/team/tool</td><td class=\"num\">1<");
    assert!(
        app_at.is_some() && tool_at.is_some() && app_at < tool_at,
        "{}",
        dom.stdout
    );
    assert!(!dom.stdout.contains("<script"), "no script on the page");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let run = chromium(&url, &[&format!("--screenshot={}", shot.display())]).await;
    assert!(run.console.is_empty(), "console messages: {:#?}", run.console);
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!(
        "status page screenshot (412 px wide, a phone): {}",
        shot.display()
    );
    eprintln!(
        "status page screenshot (412 px wide, a phone): {}",
        shot.display()
    );
}

/// Pulls `team/tool:v1`'s manifest once; returns its size.
async fn upstream_tool_manifest(app: &TestApp) -> usize {
    let resp = app.get_manifest("/v2/team/tool/manifests/v1").await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap().len()
}

#[tokio::test]
async fn the_page_needs_the_admin_token_when_one_is_set() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.admin.token = Some(Secret::new(TOKEN));
    })
    .await;
    let resp = app.get("/").await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));
    let page = |req: reqwest::RequestBuilder| async move { req.send().await.unwrap() };
    let basic = page(app.client.get(app.url("/")).basic_auth("admin", Some(TOKEN))).await;
    assert_eq!(basic.status(), 200);
    assert!(basic.text().await.unwrap().contains("Savings since start"));
    let bearer = page(app.client.get(app.url("/")).bearer_auth(TOKEN)).await;
    assert_eq!(bearer.status(), 200);
    let wrong = page(
        app.client
            .get(app.url("/"))
            .basic_auth("admin", Some("not-the-token!!!")),
    )
    .await;
    assert_eq!(wrong.status(), 401);
    // Health needs no credentials.
    assert_eq!(app.get("/readyz").await.status(), 200);

    // With the admin API on its own listener, the page moves there.
    let port = free_port();
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.admin.listen = Some(format!("127.0.0.1:{port}"));
    })
    .await;
    let on_registry = app.get("/").await;
    assert_ne!(on_registry.status(), 200, "not on the registry's listener");
    let on_admin = reqwest::get(format!("http://127.0.0.1:{port}/")).await.unwrap();
    assert_eq!(on_admin.status(), 200);
    assert!(on_admin.text().await.unwrap().contains("Savings since start"));
}
