//! An access-log line rendered directly, byte for byte in the shape `tracing`'s own
//! formatter gives the same event (text or JSON, `log_writer::Style`), and queued to the
//! log writer. Measured with callgrind on warm tag-manifest GETs: the event through
//! `tracing_subscriber`'s formatter cost about 15 000 instructions a request, a seventh
//! of the whole request; this costs a small fraction of that. With colours (a terminal)
//! or before the subscriber is installed, the line goes through `tracing` instead.

use crate::log_writer::Style;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::SystemTime;

/// What one access-log line says, in the order the fields are written.
#[derive(Debug)]
pub(super) struct Fields<'a> {
    pub upstream: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The path was cut (to `PATH_LOGGED_MAX`): marked with `…`.
    pub path_cut: bool,
    pub status: u16,
    pub size_bytes: u64,
    /// Whole microseconds; written as milliseconds with up to three decimals, the way
    /// `tracing` writes the `f64` `duration_ms` (its shortest round-trip form).
    pub duration_us: u64,
    pub cache_result: &'a str,
    pub client: Option<SocketAddr>,
}

/// A field's value, as each format writes it.
enum Value<'a> {
    /// Text as is (escaped in JSON); `true`: cut, marked with `…`.
    Str(&'a str, bool),
    Num(u64),
    /// Microseconds, written as milliseconds.
    Millis(u64),
    /// Written as text in both formats.
    Addr(Option<SocketAddr>),
}

impl Fields<'_> {
    /// The fields in the order `tracing` writes them (the message comes first).
    fn values(&self) -> [(&'static str, Value<'_>); 8] {
        [
            ("upstream", Value::Str(self.upstream, false)),
            ("http.method", Value::Str(self.method, false)),
            ("http.path", Value::Str(self.path, self.path_cut)),
            ("http.status", Value::Num(u64::from(self.status))),
            ("size_bytes", Value::Num(self.size_bytes)),
            ("duration_ms", Value::Millis(self.duration_us)),
            ("cache.result", Value::Str(self.cache_result, false)),
            ("client.addr", Value::Addr(self.client)),
        ]
    }
}

/// [`render_into`] a new buffer.
#[cfg(test)]
pub(super) fn render(style: Style, at: SystemTime, target: &str, f: &Fields<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + f.path.len());
    render_into(&mut out, style, at, target, f);
    out
}

/// Appends the line for `f` at time `at` to `out`, ending in `\n`:
/// `2024-06-01T00:00:00.000000Z  INFO target: request upstream=… client.addr=…` or
/// `{"timestamp":…,"level":"INFO","fields":{"message":"request",…},"target":…}`.
/// Written as bytes: every piece is ASCII or copied whole from a `str`.
pub(super) fn render_into(out: &mut Vec<u8>, style: Style, at: SystemTime, target: &str, f: &Fields<'_>) {
    let json = style == Style::Json;
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out, at);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
    } else {
        timestamp(out, at);
        out.extend_from_slice(b"  INFO ");
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b": request");
    }
    for (key, value) in f.values() {
        if json {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
        } else {
            out.push(b' ');
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
        }
        match value {
            Value::Str(v, cut) if json => json_string(out, v, cut),
            Value::Str(v, cut) => {
                text_value(out, v);
                if cut {
                    out.extend_from_slice(CUT.as_bytes());
                }
            }
            Value::Num(n) => decimal(out, n),
            Value::Millis(us) => millis(out, us),
            Value::Addr(a) if json => {
                out.push(b'"');
                address(out, a);
                out.push(b'"');
            }
            Value::Addr(a) => address(out, a),
        }
    }
    if json {
        out.extend_from_slice(b"},\"target\":");
        json_string(out, target, false);
        out.push(b'}');
    }
    out.push(b'\n');
}

/// What marks a cut value.
const CUT: &str = "…";

/// A value as the text format writes it, with the control characters a terminal acts on
/// escaped (none reach here from a parsed request; a guard, not a transformation).
fn text_value(out: &mut Vec<u8>, v: &str) {
    if !v.chars().any(char::is_control) {
        out.extend_from_slice(v.as_bytes());
        return;
    }
    for c in v.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
}

/// A JSON string, escaped as serde_json escapes it; `cut`: marked with a final `…`.
/// Bytes of 0x80 and up are parts of UTF-8 characters and are copied as they are.
fn json_string(out: &mut Vec<u8>, v: &str, cut: bool) {
    out.push(b'"');
    let bytes = v.as_bytes();
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.extend_from_slice(escape);
        }
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    if cut {
        out.extend_from_slice(CUT.as_bytes());
    }
    out.push(b'"');
}

/// `n` in decimal, without `core::fmt` (a measurable share of a line's cost).
fn decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `n` zero-padded to `width` digits.
fn padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut n = n;
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// Microseconds as milliseconds, the way Rust writes the `f64` `us / 1000` in its
/// shortest form: `2.233`, `0.05`, `7.0`.
fn millis(out: &mut Vec<u8>, us: u64) {
    decimal(out, us / 1000);
    out.push(b'.');
    let mut frac = us % 1000;
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let mut width = 3;
    while frac % 10 == 0 {
        frac /= 10;
        width -= 1;
    }
    padded(out, frac, width);
}

/// The client's address, `-` when unknown.
fn address(out: &mut Vec<u8>, client: Option<SocketAddr>) {
    match client {
        Some(SocketAddr::V4(a)) => {
            for (i, octet) in a.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                decimal(out, u64::from(*octet));
            }
            out.push(b':');
            decimal(out, u64::from(a.port()));
        }
        Some(a) => {
            let _ = write!(out, "{a}");
        }
        None => out.push(b'-'),
    }
}

/// RFC 3339 UTC with microseconds, as `tracing_subscriber`'s `SystemTime` timer writes it.
fn timestamp(out: &mut Vec<u8>, at: SystemTime) {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (year, month, day) = crate::civil::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    // Years before 1970 or after 9999 do not occur; the casts cannot lose anything.
    padded(out, year as u64, 4);
    out.push(b'-');
    padded(out, month as u64, 2);
    out.push(b'-');
    padded(out, day as u64, 2);
    out.push(b'T');
    padded(out, (rem / 3600) as u64, 2);
    out.push(b':');
    padded(out, (rem % 3600 / 60) as u64, 2);
    out.push(b':');
    padded(out, (rem % 60) as u64, 2);
    out.push(b'.');
    padded(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// What `tracing_subscriber`'s formatter writes for the same event.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn through_tracing(style: Style, f: &Fields<'_>) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false);
        let emit = || {
            tracing::info!(
                target: "regcache::access",
                upstream = %f.upstream,
                http.method = %f.method,
                http.path = %format_args!("{}{}", f.path, if f.path_cut { "…" } else { "" }),
                http.status = f.status,
                size_bytes = f.size_bytes,
                duration_ms = f.duration_us as f64 / 1e3,
                cache.result = %f.cache_result,
                client.addr = %f.client.map_or("-".to_owned(), |a| a.to_string()),
                "request"
            );
        };
        match style {
            Style::Text => tracing::subscriber::with_default(builder.finish(), emit),
            Style::Json => tracing::subscriber::with_default(builder.json().finish(), emit),
        }
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// The line without its timestamp, which differs between the two renderings.
    fn untimed(line: &str) -> String {
        let start = line.find(|c: char| c.is_ascii_digit()).expect("a timestamp");
        let end = start + line[start..].find('Z').expect("the timestamp's end") + 1;
        format!("{}{}", &line[..start], &line[end..])
    }

    #[test]
    fn lines_are_the_ones_tracing_writes() {
        let cases = [
            Fields {
                upstream: "origin",
                method: "GET",
                path: "/v2/team/app/manifests/v1",
                path_cut: false,
                status: 200,
                size_bytes: 401,
                duration_us: 1940,
                cache_result: "revalidated",
                client: Some("127.0.0.1:57000".parse().unwrap()),
            },
            Fields {
                upstream: "-",
                method: "HEAD",
                path: "/v2/a%22b/\"quoted\\\"/blobs/sha256:0",
                path_cut: true,
                status: 404,
                size_bytes: 0,
                duration_us: 1000,
                cache_result: "error",
                client: None,
            },
            Fields {
                upstream: "hub",
                method: "DELETE",
                path: "/v2/x/manifests/\u{e9}t\u{e9}",
                path_cut: false,
                status: 503,
                size_bytes: u64::MAX,
                duration_us: 123_456_789,
                cache_result: "-",
                client: Some("[2001:db8::1]:443".parse().unwrap()),
            },
        ];
        let at = SystemTime::now();
        for f in &cases {
            for style in [Style::Text, Style::Json] {
                let ours = String::from_utf8(render(style, at, "regcache::access", f)).unwrap();
                let theirs = through_tracing(style, f);
                assert_eq!(untimed(&ours), untimed(&theirs), "{style:?}");
                if style == Style::Json {
                    let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
                    let path = v["fields"]["http.path"].as_str().unwrap();
                    assert!(path.starts_with(f.path) && path.ends_with('…') == f.path_cut);
                }
            }
        }
    }

    #[test]
    fn json_escapes_control_characters_as_serde_json_does() {
        // Not in the text comparison: there `tracing` writes field values raw, and
        // this guard escapes them. No parsed request path carries them.
        let f = Fields {
            upstream: "u",
            method: "GET",
            path: "/v2/\u{1}a\tb\u{1f}c\u{7f}d\"\\",
            path_cut: false,
            status: 200,
            size_bytes: 1,
            duration_us: 1,
            cache_result: "hit",
            client: None,
        };
        let at = SystemTime::now();
        let ours = String::from_utf8(render(Style::Json, at, "regcache::access", &f)).unwrap();
        assert_eq!(untimed(&ours), untimed(&through_tracing(Style::Json, &f)));
        let text = String::from_utf8(render(Style::Text, at, "regcache::access", &f)).unwrap();
        assert!(
            text.contains("http.path=/v2/\\u{1}a\\u{9}b\\u{1f}c\\u{7f}d\"\\ "),
            "{text}"
        );
    }

    #[test]
    fn milliseconds_are_written_as_rust_writes_the_float() {
        for us in [
            0,
            1,
            10,
            50,
            100,
            999,
            1000,
            1001,
            2233,
            7000,
            12_340,
            86_400_000_123,
        ] {
            let mut s = Vec::new();
            millis(&mut s, us);
            assert_eq!(s, format!("{:?}", us as f64 / 1e3).into_bytes(), "{us}");
        }
        let mut s = Vec::new();
        for n in [0, 7, 10, 65_535, u64::MAX] {
            s.clear();
            decimal(&mut s, n);
            assert_eq!(s, n.to_string().into_bytes());
        }
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        let mut s = Vec::new();
        timestamp(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_717_200_000_000_007),
        );
        assert_eq!(s, b"2024-06-01T00:00:00.000007Z");
        s.clear();
        timestamp(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399),
        );
        assert_eq!(s, b"2000-02-29T23:59:59.000000Z");
    }
}
