//! The status page's HTML: one document with inline CSS (light and dark), no script, no
//! external resource, every dynamic string escaped. Narrow screens get stacked figures
//! and tables that scroll sideways.

use super::{UpstreamView, View};
use crate::metadata::Job;
use std::fmt::Write as _;

const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1b1f24;--muted:#5f6b7a;--bg:#f4f6f8;--card:#fff;--line:#dde2e8;\
--ok:#1a7f37;--bad:#c62828;--bar:#2f6fdb}\
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ee;--muted:#9aa5b1;--bg:#0f1216;--card:#171b21;--line:#2a313a}}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}\
main{max-width:980px;margin:0 auto;padding:12px}\
h1{font-size:1.3rem;margin:6px 0 12px}h2{font-size:1.02rem;margin:0 0 8px}\
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px;margin:0 0 12px}\
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(135px,1fr));gap:10px}\
.stat b{display:block;font-size:1.3rem}.stat span,.muted{color:var(--muted);font-size:.85rem}\
.bar{height:10px;background:var(--line);border-radius:5px;overflow:hidden;margin:8px 0}\
.bar i{display:block;height:100%;background:var(--bar)}.bar i.full{background:var(--bad)}\
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.9rem}\
th,td{text-align:left;padding:5px 6px;border-bottom:1px solid var(--line);white-space:nowrap}\
th{color:var(--muted);font-weight:600}.num{text-align:right}\
.up{color:var(--ok)}.down{color:var(--bad)}.unknown{color:var(--muted)}\
.wrap{white-space:normal;word-break:break-word}code{font-size:.85em}\
.item{padding:6px 0;border-bottom:1px solid var(--line)}.item:last-child{border-bottom:0}";

/// The whole page.
pub(super) fn render(v: &View) -> String {
    let mut o = String::with_capacity(16 * 1024);
    o.push_str(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>regcache status</title><link rel=\"icon\" href=\"data:,\"><style>",
    );
    o.push_str(STYLE);
    let _ = write!(
        o,
        "</style></head><body><main><h1>regcache <span class=\"muted\">{} &middot; up {}</span></h1>",
        esc(v.version),
        duration(v.uptime_secs)
    );
    savings(&mut o, v);
    storage(&mut o, v);
    upstreams(&mut o, v);
    repositories(&mut o, v);
    deletes(&mut o, v);
    jobs(&mut o, v);
    o.push_str(
        "<p class=\"muted\">Counts since start, except storage, deletes and jobs (from the \
         database, at most 10 s old). Machine-readable: <code>/metrics</code>, \
         <code>/readyz</code>.</p></main></body></html>",
    );
    o
}

fn savings(o: &mut String, v: &View) {
    o.push_str("<section><h2>Savings since start</h2>");
    if !v.metrics_enabled {
        o.push_str("<p class=\"muted\">Request counting is off (<code>metrics.enabled = false</code>).</p></section>");
        return;
    }
    let [hit, revalidated, miss, stale, error] = v.served;
    let from_cache = hit + revalidated + stale;
    let ratio = if from_cache + miss == 0 {
        "&ndash;".to_owned()
    } else {
        format!("{:.1}%", from_cache as f64 * 100.0 / (from_cache + miss) as f64)
    };
    o.push_str("<div class=\"grid\">");
    stat(o, &ratio, "hit ratio");
    stat(
        o,
        &bytes(v.served_bytes.saturating_sub(v.fetched_bytes)),
        "bytes saved",
    );
    stat(o, &bytes(v.served_bytes), "served to clients");
    stat(o, &bytes(v.fetched_bytes), "fetched upstream");
    stat(o, &from_cache.to_string(), "answered from cache");
    stat(o, &miss.to_string(), "fetched (misses)");
    stat(o, &stale.to_string(), "stale (upstream down)");
    stat(o, &error.to_string(), "errors");
    o.push_str("</div></section>");
}

fn storage(o: &mut String, v: &View) {
    o.push_str("<section><h2>Storage</h2>");
    match &v.gauges {
        Ok(g) => {
            match v.max_size {
                Some(max) if max > 0 => {
                    let pct = g.blob_bytes as f64 * 100.0 / max as f64;
                    let _ = write!(
                        o,
                        "<div>{} of {} (<b>{pct:.1}%</b>)</div><div class=\"bar\"><i{} style=\"width:{:.1}%\"></i></div>",
                        bytes(g.blob_bytes),
                        bytes(max),
                        if pct >= 90.0 { " class=\"full\"" } else { "" },
                        pct.min(100.0)
                    );
                }
                _ => {
                    let _ = write!(
                        o,
                        "<div>{} stored <span class=\"muted\">(no <code>storage.max_size</code>: the disk is the bound)</span></div>",
                        bytes(g.blob_bytes)
                    );
                }
            }
            let _ = write!(
                o,
                "<div class=\"muted\">{} blobs &middot; {} repositories &middot; {} multipart uploads open</div>",
                g.blobs, g.repositories, g.open_uploads
            );
        }
        Err(e) => {
            let _ = write!(o, "<p class=\"down\">Could not read the database: {}</p>", esc(e));
        }
    }
    o.push_str("</section>");
}

fn upstreams(o: &mut String, v: &View) {
    o.push_str("<section><h2>Upstreams</h2>");
    for u in &v.upstreams {
        upstream_item(o, u, v.now);
    }
    o.push_str("</section>");
}

/// One upstream as two short lines rather than a wide table row: readable on a phone.
fn upstream_item(o: &mut String, u: &UpstreamView, now: i64) {
    let health = u.health.label();
    let _ = write!(
        o,
        "<div class=\"item\"><b>{}</b> <span class=\"{health}\">{health}</span> \
         <span class=\"muted\">{}</span><div class=\"muted\">last answer {} &middot; last failure {} \
         &middot; {} requests &middot; {} &times; 429 &middot; {} fetched</div></div>",
        esc(&u.name),
        esc(&u.host),
        ago_ms(u.last_success_ms, now),
        ago_ms(u.last_failure_ms, now),
        u.requests,
        u.throttled,
        bytes(u.fetched_bytes)
    );
}

fn repositories(o: &mut String, v: &View) {
    o.push_str("<section><h2>Largest repositories</h2>");
    match &v.largest {
        Ok((list, at)) if !list.is_empty() => {
            o.push_str(
                "<div class=\"scroll\"><table><tr><th>repository</th><th class=\"num\">size</th>\
                 <th class=\"num\">blobs</th></tr>",
            );
            for r in list.iter() {
                let _ = write!(
                    o,
                    "<tr><td class=\"wrap\">{}/{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    esc(&r.upstream),
                    esc(&r.name),
                    bytes(r.bytes),
                    r.blobs
                );
            }
            let _ = write!(
                o,
                "</table></div><p class=\"muted\">Ranked {} (redone at most every 10 min).</p>",
                ago_secs(*at, v.now)
            );
        }
        Ok(_) => o.push_str("<p class=\"muted\">Nothing cached yet.</p>"),
        Err(e) => {
            let _ = write!(o, "<p class=\"down\">Could not rank: {}</p>", esc(e));
        }
    }
    o.push_str("</section><section><h2>Most pulled since start</h2>");
    if v.most_pulled.is_empty() {
        o.push_str("<p class=\"muted\">No manifest pulled yet.</p>");
    } else {
        o.push_str(
            "<div class=\"scroll\"><table><tr><th>repository</th><th class=\"num\">manifest GETs</th></tr>",
        );
        for (repo, n) in &v.most_pulled {
            let _ = write!(
                o,
                "<tr><td class=\"wrap\">{}</td><td class=\"num\">{n}</td></tr>",
                esc(&repo.to_string())
            );
        }
        o.push_str("</table></div>");
    }
    o.push_str("</section>");
}

fn deletes(o: &mut String, v: &View) {
    o.push_str("<section><h2>Deletes</h2>");
    if let Ok(g) = &v.gauges {
        o.push_str("<div class=\"grid\">");
        stat(o, &g.deletes_pending.to_string(), "pending");
        stat(o, &g.deletes_deferred.to_string(), "deferred (deletes off)");
        stat(o, &g.deletes_failing.to_string(), "failing");
        o.push_str("</div>");
        if let Some(f) = &g.oldest_failing {
            let _ = write!(
                o,
                "<p class=\"wrap\"><span class=\"down\">Oldest failing</span>: <code>{}</code>, queued {}, \
                 {} attempts: {}</p>",
                esc(&f.digest),
                ago_secs(f.since, v.now),
                f.attempts,
                esc(&f.last_error)
            );
        }
    }
    o.push_str("</section>");
}

fn jobs(o: &mut String, v: &View) {
    o.push_str("<section><h2>Recent jobs</h2>");
    match &v.jobs {
        Ok(list) if !list.is_empty() => {
            for j in list {
                job_item(o, j, v.now);
            }
        }
        Ok(_) => o.push_str("<p class=\"muted\">No jobs yet.</p>"),
        Err(e) => {
            let _ = write!(o, "<p class=\"down\">Could not list jobs: {}</p>", esc(e));
        }
    }
    o.push_str("</section>");
}

/// Errors shown per job, at most (the whole one is in `regcache jobs ID`).
const JOB_ERROR_CHARS: usize = 200;

fn job_item(o: &mut String, j: &Job, now: i64) {
    let class = match j.state.as_str() {
        "failed" => "down",
        "succeeded" => "up",
        _ => "unknown",
    };
    let _ = write!(
        o,
        "<div class=\"item\">#{} <b>{}</b> <span class=\"{class}\">{}</span> \
         <span class=\"muted\">created {}, {} run(s)</span>",
        j.id,
        esc(&j.kind),
        esc(&j.state),
        ago_secs(j.created_at, now),
        j.runs
    );
    if let Some(e) = &j.error {
        let e: String = e.chars().take(JOB_ERROR_CHARS).collect();
        let _ = write!(o, "<div class=\"wrap down\"><code>{}</code></div>", esc(&e));
    }
    o.push_str("</div>");
}

fn stat(o: &mut String, value: &str, label: &str) {
    let _ = write!(
        o,
        "<div class=\"stat\"><b>{value}</b><span>{}</span></div>",
        esc(label)
    );
}

/// Text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Bytes in binary units, as `regcache status` prints them.
fn bytes(n: u64) -> String {
    crate::config::ByteSize::from_bytes(n).approx()
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ago_secs(at: i64, now: i64) -> String {
    format!("{} ago", duration(u64::try_from(now - at).unwrap_or(0)))
}

fn ago_ms(at_ms: u64, now: i64) -> String {
    if at_ms == 0 {
        return "never".to_owned();
    }
    ago_secs(i64::try_from(at_ms / 1000).unwrap_or(0), now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_units() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(ago_ms(0, 100), "never");
        assert_eq!(ago_secs(40, 100), "1 min ago");
    }
}
