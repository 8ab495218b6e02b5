//! How results are shown: aligned tables for people, JSON for scripts.
//!
//! JSON field names are part of the command's interface: scripts depend on them, so they are
//! spelled out in the view structs of each command module and only ever added to.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use burrow_proto::v1::{Role, TokenKind};

/// The `--output` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns.
    Table,
    /// Pretty-printed JSON; `tunnel watch` prints one JSON object per line.
    Json,
}

/// A table printed with columns padded to their widest cell.
#[derive(Debug)]
pub(crate) struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table; the last column is not padded so lines carry no trailing spaces.
    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(self.rows.iter()) {
            let last = row.len().saturating_sub(1);
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i < last {
                    let pad = widths.get(i).copied().unwrap_or(0) - cell.chars().count();
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub(crate) fn print(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        std::io::stdout()
            .lock()
            .write_all(self.render().as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))
    }
}

/// Prints a value as pretty JSON on standard output.
pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    outln!("{text}")?;
    Ok(())
}

/// Prints a value as one line of JSON (for streams).
pub(crate) fn print_json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string(value)?;
    outln!("{text}")?;
    Ok(())
}

/// A protobuf timestamp as a UTC time (`None` for an unset or impossible one).
pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    DateTime::from_timestamp(ts.seconds, nanos).filter(|t| t.timestamp() != 0)
}

/// RFC 3339 in UTC with seconds, for JSON.
pub(crate) fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    time(ts).map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// A short UTC time for tables, or `empty` when unset.
pub(crate) fn short_time(ts: Option<&prost_types::Timestamp>, empty: &str) -> String {
    time(ts).map_or_else(
        || empty.to_owned(),
        |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
    )
}

/// `yes`/`no` for tables.
pub(crate) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// A cell that shows `-` when empty.
pub(crate) fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// The stable name of a role (`owner`, `admin`, `member`; `none` when unset).
pub(crate) fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Owner) => "owner",
        Ok(Role::Admin) => "admin",
        Ok(Role::Member) => "member",
        Ok(Role::Unspecified) | Err(_) => "none",
    }
}

/// The stable name of a token kind (`agent`, `api`, `edge`).
pub(crate) fn kind_name(kind: i32) -> &'static str {
    match TokenKind::try_from(kind) {
        Ok(TokenKind::Agent) => "agent",
        Ok(TokenKind::Api) => "api",
        Ok(TokenKind::Edge) => "edge",
        Ok(TokenKind::Unspecified) | Err(_) => "unknown",
    }
}

/// Bytes as a short human number (`12.3 MiB`).
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut t = Table::new(&["NAME", "ROLE"]);
        t.row(vec!["alice@example.com".into(), "owner".into()]);
        t.row(vec!["bo".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAME               ROLE\nalice@example.com  owner\nbo\n"
        );
    }

    #[test]
    fn unset_timestamps_are_none() {
        assert_eq!(rfc3339(None), None);
        let zero = prost_types::Timestamp::default();
        assert_eq!(rfc3339(Some(&zero)), None);
        let t = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        assert_eq!(rfc3339(Some(&t)).as_deref(), Some("2023-11-14T22:13:20Z"));
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
