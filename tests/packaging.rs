//! What operators install beside the binary: the systemd unit passes `systemd-analyze
//! verify` (and scores as well sandboxed by `systemd-analyze security`), the alert rules
//! pass `promtool check rules` and their own `promtool test rules` cases, and every
//! metric the Grafana dashboard and the alerts query is one `/metrics` serves.

mod common;

use common::app::TestApp;
use common::binary::BIN;
use common::external::require_tool;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::prometheus::scrape;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const CONTRIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib");

/// Runs `program args` in `dir`; returns (success, stdout + stderr).
fn run(program: &str, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(require_tool(program))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_systemd_unit_verifies_and_is_sandboxed() {
    let unit = std::fs::read_to_string(format!("{CONTRIB}/systemd/regcache.service")).unwrap();
    for line in [
        "User=regcache",
        "StateDirectory=regcache",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ExecStart=/usr/bin/regcache serve --config /etc/regcache/config.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit sets {line}");
    }
    let sysusers = std::fs::read_to_string(format!("{CONTRIB}/systemd/regcache.sysusers")).unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u regcache ")),
        "{sysusers}"
    );
    // verify checks that ExecStart's program exists: point it at the binary just built.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("regcache.service"),
        unit.replace("/usr/bin/regcache", BIN),
    )
    .unwrap();
    let (ok, out) = run("systemd-analyze", &["verify", "./regcache.service"], dir.path());
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify:\n{out}");
    let (ok, out) = run(
        "systemd-analyze",
        &["security", "--offline=yes", "--no-pager", "./regcache.service"],
        dir.path(),
    );
    assert!(ok, "systemd-analyze security:\n{out}");
    let level: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for regcache.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    // 0 is fully locked down, 10 is unprotected; under 2 systemd rates it "OK".
    assert!(level <= 2.0, "exposure level {level}:\n{out}");
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = Path::new(CONTRIB).join("prometheus");
    let (ok, out) = run("promtool", &["check", "rules", "alerts.yml"], &dir);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run("promtool", &["test", "rules", "alerts_test.yml"], &dir);
    assert!(ok, "promtool test rules:\n{out}");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    for alert in [
        "RegcacheUpstreamFailing",
        "RegcacheDeletesFailing",
        "RegcacheStorageNearBound",
        "RegcacheDiskNearlyFull",
        "RegcacheJobsFailing",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert}");
    }
}

/// Every `regcache_*` or `process_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\b(?:regcache|process)_[a-z0-9_]+\b").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// Every PromQL expression in the dashboard: panel targets and template queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_served() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{CONTRIB}/grafana/regcache.json")).unwrap())
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels
        .iter()
        .map(|p| p["id"].as_u64().expect("panel id"))
        .collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let used_by_dashboard: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used_by_dashboard.len() >= 20, "{used_by_dashboard:?}");
    let alerts = std::fs::read_to_string(format!("{CONTRIB}/prometheus/alerts.yml")).unwrap();
    let used_by_alerts: BTreeSet<String> = alerts
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:") || l.starts_with("          "))
        .flat_map(metric_names)
        .collect();
    assert!(used_by_alerts.len() >= 6, "{used_by_alerts:?}");

    // A server that has done some of everything the metrics describe.
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("packaging", &[20_000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.storage.max_size = Some("1GiB".parse().unwrap());
    })
    .await;
    app.pull("team/app", "v1", &image).await;
    app.pull("team/app", "v1", &image).await;
    let served = scrape(&app.client, &app.url("/metrics")).await.names();
    for name in used_by_dashboard.iter().chain(&used_by_alerts) {
        assert!(
            served.contains(name),
            "{name} is queried but not served; served: {served:#?}"
        );
    }
}
