//! What the client commands print: aligned tables and `key: value` lines
//! for people, the server's JSON for scripts, spinners on stderr while a
//! long call runs (only when stderr is a terminal), and the small parsers of
//! flag values the commands share.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// A table: a header row and rows of cells, printed with columns aligned.
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text: columns two spaces apart, the last one unpadded.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(n) {
                if i + 1 == n {
                    line.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print_out(&self.render());
    }
}

/// `key: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n", width = width + 1, k = format!("{k}:")))
        .collect()
}

/// Write to stdout; a closed pipe (`| head`) is not an error worth a panic.
pub fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Pretty JSON on stdout.
pub fn print_json(value: &Value) {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    print_out(&format!("{text}\n"));
}

/// A spinner on stderr while `msg` is under way; hidden unless stderr is a
/// terminal, so scripts and logs see nothing.
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
    );
    bar.set_message(msg.into());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// An RFC 3339 timestamp shortened for a table: `2024-05-01 12:00:03`.
pub fn short_time(ts: &str) -> String {
    let ts = ts.replacen('T', " ", 1);
    match ts.find('.') {
        Some(dot) => ts[..dot].to_owned(),
        None => ts.trim_end_matches('Z').to_owned(),
    }
}

/// Sizes for people: `512 B`, `3.4 MiB`.
pub fn bytes(n: u64) -> String {
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

/// `KEY=VALUE` flags.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty name"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Seconds, plain (`300`) or with units (`5m`, `1h30m`).
pub fn parse_seconds(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{s:?} is not a duration (300, 5m, 1h): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_leave_the_last_unpadded() {
        let mut t = Table::new(&["ID", "STATE", "NOTE"]);
        t.row(vec!["sb-1".into(), "running".into(), "x".into()]);
        t.row(vec!["sb-22222".into(), "paused".into(), String::new()]);
        assert_eq!(
            t.render(),
            "ID        STATE    NOTE\nsb-1      running  x\nsb-22222  paused\n"
        );
    }

    #[test]
    fn fields_align_values() {
        assert_eq!(
            fields(&[("id", "a".into()), ("state", "b".into())]),
            "id:     a\nstate:  b\n"
        );
    }

    #[test]
    fn values_for_people() {
        assert_eq!(
            short_time("2024-05-01T12:00:03.123Z"),
            "2024-05-01 12:00:03"
        );
        assert_eq!(short_time("2024-05-01T12:00:03Z"), "2024-05-01 12:00:03");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 400 * 1024), "3.4 MiB");
    }

    #[test]
    fn flag_values_parse_or_say_why_not() {
        assert_eq!(parse_pair("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_pair("nope").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_pair("=v").is_err());
        assert_eq!(parse_seconds("300").unwrap(), 300);
        assert_eq!(parse_seconds("5m").unwrap(), 300);
        assert_eq!(parse_seconds("1h 30m").unwrap(), 5400);
        assert!(parse_seconds("soon").is_err());
    }
}
