//! Human formatting for CLI tables.

/// `1536` → `1.5 KiB`.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds as a config-style duration (`0` = never).
pub(super) fn secs(s: i64) -> String {
    match u64::try_from(s) {
        Ok(0) | Err(_) => "0 (never expires)".to_owned(),
        Ok(s) => crate::config::Duration::from_secs(s).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(secs(0), "0 (never expires)");
        assert_eq!(secs(90), "1m30s");
    }
}
