//! What the agent shows on standard output: on a terminal, a live status panel redrawn in
//! place; otherwise (or with `--log-format`) one line per event.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::record::{Event, Filter, Recorder, StatusView, Summary};
use super::LogFormat;

/// Environment variable that turns colours off (<https://no-color.org>).
const ENV_NO_COLOR: &str = "NO_COLOR";
/// How often the panel is redrawn when nothing happens (its rates and durations move).
const REDRAW_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest pause between two redraws, however busy the tunnel.
const MIN_REDRAW: Duration = Duration::from_millis(100);
/// HTTP requests the panel lists.
const PANEL_REQUESTS: usize = 8;
/// WebSocket sessions the panel lists.
const PANEL_SOCKETS: usize = 4;

/// Whether the agent will draw the panel (standard output is a terminal and no
/// `--log-format` was asked for); the agent then keeps its own log quiet.
pub(crate) fn panel_wanted(format: Option<LogFormat>) -> bool {
    format.is_none() && std::io::stdout().is_terminal()
}

/// Whether colours may be used: not when `NO_COLOR` is set to anything non-empty.
pub(crate) fn colour_allowed() -> bool {
    std::env::var_os(ENV_NO_COLOR).is_none_or(|v| v.is_empty())
}

/// Starts the panel or the event lines, as `format` and the terminal call for.
pub(crate) fn start(
    rec: Recorder,
    format: Option<LogFormat>,
    inspector: Option<String>,
    shutdown: CancellationToken,
) {
    if panel_wanted(format) {
        let color = colour_allowed();
        // On a thread of its own, like the JSON lines: a terminal that stops taking output
        // (Ctrl-S) blocks only the panel, never a thread that serves tunnels.
        let spawned = std::thread::Builder::new()
            .name("burrow-panel".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt.block_on(run_panel(rec, color, shutdown)),
                    Err(e) => tracing::warn!(err = %e, "cannot start the status panel"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(err = %e, "cannot start the status panel");
        }
        return;
    }
    if let Some(url) = &inspector {
        match format {
            Some(LogFormat::Json) => println!(
                "{}",
                serde_json::json!({ "event": "inspector", "url": url })
            ),
            _ => println!("Inspector {url}"),
        }
    }
    if format == Some(LogFormat::Json) {
        if let Some(rx) = rec.subscribe() {
            // On a thread of its own: when whatever reads standard output stops reading, the
            // writes block only this thread (and lines it falls behind on are skipped), never a
            // thread that serves tunnels.
            let spawned = std::thread::Builder::new()
                .name("burrow-json-lines".into())
                .spawn(move || json_lines(rx, &shutdown));
            if let Err(e) = spawned {
                tracing::warn!(err = %e, "cannot start the JSON event lines");
            }
        }
    }
}

/// One JSON object per finished exchange on standard output, until `shutdown`.
fn json_lines(mut rx: broadcast::Receiver<Event>, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        match rx.blocking_recv() {
            Ok(Event::Exchange {
                summary,
                done: true,
            }) => {
                let mut v = serde_json::to_value(&*summary).unwrap_or_default();
                v["event"] = serde_json::Value::from(if summary.kind == "ws" {
                    "websocket"
                } else {
                    "http"
                });
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{v}");
                let _ = out.flush();
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn run_panel(rec: Recorder, color: bool, shutdown: CancellationToken) {
    let Some(mut rx) = rec.subscribe() else {
        return;
    };
    loop {
        draw(&rec, color);
        tokio::select! {
            () = shutdown.cancelled() => {
                draw(&rec, color);
                return;
            }
            () = tokio::time::sleep(REDRAW_INTERVAL) => {}
            ev = rx.recv() => {
                if matches!(ev, Err(broadcast::error::RecvError::Closed)) {
                    return;
                }
                tokio::time::sleep(MIN_REDRAW).await;
                while rx.try_recv().is_ok() {}
            }
        }
    }
}

fn draw(rec: &Recorder, color: bool) {
    let Some(status) = rec.status() else { return };
    let http = rec.list(
        &Filter {
            kind: Some("http".into()),
            ..Filter::default()
        },
        PANEL_REQUESTS,
    );
    let ws = rec.list(
        &Filter {
            kind: Some("ws".into()),
            ..Filter::default()
        },
        PANEL_SOCKETS,
    );
    let text = render(&status, &http, &ws, color);
    let mut out = std::io::stdout().lock();
    // Home, draw, clear what is left of an older, longer frame.
    let _ = write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"));
    let _ = out.flush();
}

struct Paint(bool);

impl Paint {
    fn wrap(&self, code: &str, s: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(x) if x < 10.0 => format!("{x:.1} ms"),
        Some(x) if x < 10_000.0 => format!("{x:.0} ms"),
        Some(x) => format!("{:.1} s", x / 1000.0),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The panel's text (without cursor movement), for a terminal at least 80 columns wide.
pub(crate) fn render(st: &StatusView, http: &[Summary], ws: &[Summary], color: bool) -> String {
    let p = Paint(color);
    let mut o = String::new();
    let line = |o: &mut String, k: &str, v: &str| o.push_str(&format!("{k:<19}{v}\n"));
    o.push_str(&format!(
        "{}{}\n\n",
        p.wrap("1;36", "burrow"),
        format_args!("{:>68}", "(Ctrl-C to quit)")
    ));
    let status = match st.meta.status.as_str() {
        "online" => p.wrap("32", "online"),
        s => p.wrap("33", s),
    };
    line(&mut o, "Session Status", &status);
    if st.meta.status != "online" {
        if let Some(e) = &st.meta.edge_error {
            line(&mut o, "Last Error", &p.wrap("31", e));
        }
    }
    if !st.meta.team.is_empty() {
        line(&mut o, "Team", &st.meta.team);
    }
    line(&mut o, "Edge", &st.meta.edge);
    if let Some(u) = &st.meta.inspector {
        line(&mut o, "Web Interface", u);
    }
    for (public, local) in &st.meta.forwards {
        line(&mut o, "Forwarding", &format!("{public} -> {local}"));
    }
    o.push('\n');
    line(
        &mut o,
        "Connections",
        &format!(
            "{:<8}{:<8}{:<8}{:<10}{:<10}",
            "open", "total", "req/min", "p50", "p90"
        ),
    );
    line(
        &mut o,
        "",
        &format!(
            "{:<8}{:<8}{:<8}{:<10}{:<10}",
            st.connections_open,
            st.connections_total,
            st.requests_per_minute,
            ms(st.p50_ms),
            ms(st.p90_ms),
        ),
    );
    o.push_str(&format!("\n{}\n", p.wrap("1", "HTTP Requests")));
    o.push_str("-------------\n");
    for s in http {
        let status = match s.status {
            Some(c) if c >= 500 => p.wrap("31", &c.to_string()),
            Some(c) if c >= 400 => p.wrap("33", &c.to_string()),
            Some(c) => p.wrap("32", &c.to_string()),
            None => "...".to_owned(),
        };
        o.push_str(&format!(
            "{:<9} {:<7} {:<38} {} {:>9}\n",
            s.started_at.get(11..19).unwrap_or(""),
            s.method,
            clip(&s.path, 38),
            status,
            ms(s.duration_ms)
        ));
    }
    o.push_str(&format!("\n{}\n", p.wrap("1", "WebSocket Sessions")));
    o.push_str("------------------\n");
    for s in ws {
        let c = s.ws.clone().unwrap_or_default();
        let close = c
            .close_code
            .map(|x| format!("close {x}"))
            .unwrap_or_default();
        o.push_str(&format!(
            "{:<9} {:<30} {:<7} in {:<5} out {:<5} {}\n",
            s.started_at.get(11..19).unwrap_or(""),
            clip(&s.path, 30),
            s.state,
            c.messages_in,
            c.messages_out,
            close
        ));
    }
    o
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::inspect::record::Meta;

    #[test]
    fn the_panel_shows_the_forwarding_url_counters_and_recent_requests_without_colour() {
        let st = StatusView {
            meta: Meta {
                status: "online".into(),
                team: "web".into(),
                edge: "edge.example.com:4443".into(),
                forwards: vec![("https://chat.example.com".into(), "localhost:3000".into())],
                inspector: Some("http://127.0.0.1:4040".into()),
                edge_error: None,
            },
            connections_open: 1,
            connections_total: 42,
            requests_per_minute: 7,
            p50_ms: Some(3.0),
            p90_ms: Some(12.0),
            kept: 0,
            kept_bytes: 0,
        };
        let text = render(&st, &[], &[], false);
        assert!(text.contains("https://chat.example.com -> localhost:3000"));
        assert!(text.contains("42"));
        assert!(!text.contains('\x1b'), "colour codes with colour off");
        assert!(render(&st, &[], &[], true).contains("\x1b[32monline"));
        assert!(!text.contains("Last Error"));
    }

    #[test]
    fn while_the_edge_is_unreachable_the_panel_says_why() {
        let mut st = StatusView {
            meta: Meta {
                status: "reconnecting".into(),
                edge: "edge.example.com:4443".into(),
                edge_error: Some(
                    "cannot connect to edge.example.com:4443: Connection refused".into(),
                ),
                ..Meta::default()
            },
            connections_open: 0,
            connections_total: 0,
            requests_per_minute: 0,
            p50_ms: None,
            p90_ms: None,
            kept: 0,
            kept_bytes: 0,
        };
        let text = render(&st, &[], &[], false);
        assert!(
            text.contains(
                "Last Error         cannot connect to edge.example.com:4443: Connection refused"
            ),
            "{text}"
        );
        st.meta.status = "online".into();
        assert!(!render(&st, &[], &[], false).contains("Last Error"));
    }
}
