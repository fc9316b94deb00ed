//! Human formatting for CLI tables: sizes, durations, times (ISO 8601 UTC, with how long
//! ago), and tables whose columns fit their widest cell. `--json` bypasses all of it and
//! keeps numbers.

/// `1536` → `1.5 KiB`.
pub(super) fn bytes(n: u64) -> String {
    crate::config::ByteSize::from_bytes(n).approx()
}

/// Seconds as a config-style duration (`0` = never).
pub(super) fn secs(s: i64) -> String {
    match u64::try_from(s) {
        Ok(0) | Err(_) => "0 (never expires)".to_owned(),
        Ok(s) => crate::config::Duration::from_secs(s).to_string(),
    }
}

/// Unix seconds as ISO 8601 UTC, `2024-06-01T00:00:00Z`.
pub(super) fn iso(unix_secs: i64) -> String {
    let (year, month, day) = crate::civil::civil_from_days(unix_secs.div_euclid(86_400));
    let rem = unix_secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// How long before `now` (or after, for a future time): `3 min ago`, `in 2 h`.
pub(super) fn relative(unix_secs: i64, now: i64) -> String {
    let delta = now - unix_secs;
    let a = delta.unsigned_abs();
    let amount = match a {
        0..=59 => format!("{a} s"),
        60..=3599 => format!("{} min", a / 60),
        3600..=86_399 => format!("{} h", a / 3600),
        _ => format!("{} d", a / 86_400),
    };
    if delta >= 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// A time as a table shows it: `2024-06-01T00:00:00Z (3 min ago)`.
pub(super) fn when(unix_secs: i64, now: i64) -> String {
    format!("{} ({})", iso(unix_secs), relative(unix_secs, now))
}

/// An optional time; `-` when there is none.
pub(super) fn when_opt(t: Option<i64>, now: i64) -> String {
    t.map_or_else(|| "-".to_owned(), |t| when(t, now))
}

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    Right,
}

/// A table printed with each column as wide as its widest cell, two spaces apart.
#[derive(Debug)]
pub(super) struct Table {
    header: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(header: &[(&str, Align)]) -> Self {
        Table {
            header: header.iter().map(|(h, a)| ((*h).to_owned(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table, or `empty` (a sentence saying there is nothing) when it has no rows.
    pub(super) fn render(&self, indent: &str, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{indent}{empty}\n");
        }
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain(std::iter::once(&self.header[i].0))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &mut dyn Iterator<Item = &String>| {
            let mut out = indent.to_owned();
            for (i, cell) in cells.enumerate() {
                let (width, align) = (widths.get(i).copied().unwrap_or(0), self.header[i].1);
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
                match align {
                    Align::Left => {
                        out.push_str(cell);
                        out.push_str(&pad);
                    }
                    Align::Right => {
                        out.push_str(&pad);
                        out.push_str(cell);
                    }
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
            out
        };
        let mut out = line(&mut self.header.iter().map(|(h, _)| h));
        for r in &self.rows {
            out.push_str(&line(&mut r.iter()));
        }
        out
    }
}

/// `label  value` lines with the values in one column.
pub(super) fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:<width$}  {value}\n"))
        .collect()
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

    /// Checked against httpdate, an independent formatter of the same instant.
    #[test]
    fn iso_times_agree_with_httpdate() {
        for t in [
            0_i64,
            951_782_400,
            1_717_200_000,
            1_709_164_799,
            4_102_444_800,
            1_234_567_890,
        ] {
            let http = httpdate::fmt_http_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.unsigned_abs()),
            );
            // "Sat, 01 Jun 2024 00:00:00 GMT" → day, month, year, time
            let parts: Vec<&str> = http.split(' ').collect();
            let months = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            let month = months.iter().position(|m| *m == parts[2]).unwrap() + 1;
            let expected = format!("{}-{month:02}-{}T{}Z", parts[3], parts[1], parts[4]);
            assert_eq!(iso(t), expected, "{t}");
        }
        assert_eq!(iso(1_717_200_000), "2024-06-01T00:00:00Z");
        assert_eq!(iso(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(1000, 1000), "0 s ago");
        assert_eq!(relative(1000, 1180), "3 min ago");
        assert_eq!(relative(1000, 1000 + 7300), "2 h ago");
        assert_eq!(relative(1000, 1000 + 3 * 86_400), "3 d ago");
        assert_eq!(relative(1000 + 600, 1000), "in 10 min");
        assert_eq!(
            when(1_717_200_000, 1_717_200_180),
            "2024-06-01T00:00:00Z (3 min ago)"
        );
    }

    #[test]
    fn columns_fit_their_widest_cell_and_empty_tables_say_so() {
        let mut t = Table::new(&[
            ("name", Align::Left),
            ("size", Align::Right),
            ("note", Align::Left),
        ]);
        t.row(vec!["a-rather-long-name".into(), "1 B".into(), "x".into()]);
        t.row(vec!["b".into(), "10.0 KiB".into(), String::new()]);
        let text = t.render("", "nothing");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "name                    size  note");
        assert_eq!(lines[1], "a-rather-long-name       1 B  x");
        assert_eq!(lines[2], "b                   10.0 KiB");
        let empty = Table::new(&[("name", Align::Left)]);
        assert_eq!(
            empty.render("  ", "no repositories are cached"),
            "  no repositories are cached\n"
        );
        let f = fields(&[("a", "1".into()), ("longer label", "2".into())]);
        assert_eq!(f, "a             1\nlonger label  2\n");
    }
}
