//! The Prometheus text exposition format (version 0.0.4): `# HELP` and `# TYPE` once per
//! family, then its samples; label values escaped; histograms as cumulative `_bucket`
//! lines with `le`, then `_sum` and `_count`. Writing only: what to write is `families`'.

use crate::counters::HistogramSnapshot;
use std::fmt::Write as _;

/// What `GET /metrics` answers with.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy)]
pub(super) enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// A metrics page being written.
#[derive(Debug, Default)]
pub(super) struct Exposition {
    out: String,
}

/// Label pairs of one sample.
pub(super) type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    /// Starts a family. Every sample written until the next family must belong to it.
    pub(super) fn family(&mut self, name: &str, kind: Type, help: &str) {
        let kind = match kind {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        };
        // HELP text escapes only backslashes and newlines.
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of an integer count.
    pub(super) fn int(&mut self, name: &str, labels: Labels<'_>, value: u64) {
        self.name_and_labels(name, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// One sample of a real value (seconds, ratios).
    pub(super) fn real(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.name_and_labels(name, labels, None);
        self.out.push(' ');
        push_float(&mut self.out, value);
        self.out.push('\n');
    }

    /// A histogram's buckets, sum and count.
    pub(super) fn histogram(&mut self, name: &str, labels: Labels<'_>, h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (le, n) in &h.buckets {
            let mut bound = String::new();
            push_float(&mut bound, *le);
            self.name_and_labels(&bucket, labels, Some(&bound));
            let _ = writeln!(self.out, " {n}");
        }
        self.name_and_labels(&bucket, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", h.count);
        self.real(&format!("{name}_sum"), labels, h.sum_secs);
        self.int(&format!("{name}_count"), labels, h.count);
    }

    fn name_and_labels(&mut self, name: &str, labels: Labels<'_>, le: Option<&str>) {
        self.out.push_str(name);
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            push_escaped(&mut self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }

    pub(super) fn finish(self) -> String {
        self.out
    }
}

/// Label values escape backslash, double quote and newline.
fn push_escaped(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn push_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        // Rust prints f64 without an exponent and with the shortest exact digits.
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_escaped_labels_and_histograms() {
        let mut e = Exposition::default();
        e.family("x_total", Type::Counter, "Things.\nMore");
        e.int("x_total", &[("a", "q\"uo\\te\nnl")], 3);
        e.family("h_seconds", Type::Histogram, "Latency.");
        e.histogram(
            "h_seconds",
            &[("op", "get")],
            &HistogramSnapshot {
                buckets: vec![(0.005, 1), (1.0, 2)],
                count: 3,
                sum_secs: 2.5,
            },
        );
        e.family("g", Type::Gauge, "A gauge.");
        e.real("g", &[], 0.000_05);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\\nMore\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"uo\\\\te\\nnl\"} 3\n\
             # HELP h_seconds Latency.\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{op=\"get\",le=\"0.005\"} 1\n\
             h_seconds_bucket{op=\"get\",le=\"1\"} 2\n\
             h_seconds_bucket{op=\"get\",le=\"+Inf\"} 3\n\
             h_seconds_sum{op=\"get\"} 2.5\n\
             h_seconds_count{op=\"get\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 0.00005\n"
        );
    }
}
