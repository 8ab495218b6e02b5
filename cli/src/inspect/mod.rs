//! The agent's inspector: a bounded record of the traffic that went through the tunnels,
//! served as a web page and a JSON API on a loopback address, plus the live terminal panel.
//!
//! # Layout
//! - `record`: the [`Recorder`] handle, the ring of the last exchanges and their JSON shapes.
//! - `tap`: body and WebSocket taps the forwarding path wraps its streams in.
//! - `frame`: a streaming WebSocket frame-header parser (RFC 6455 §5.2) used by the taps.
//! - `server`: the page, the `/api/` JSON API and the server-sent event stream.
//! - `replay`: re-sending a captured request to the local server (page, API, `burrow replay`).
//! - `panel`: the terminal status panel and the one-line-per-event log formats.

use std::net::SocketAddr;
use std::sync::OnceLock;

use anyhow::Context as _;
use clap::Args;
use tokio_util::sync::CancellationToken;

mod frame;
mod panel;
mod record;
mod replay;
mod server;
mod tap;

pub(crate) use panel::{colour_allowed, panel_wanted};
pub(crate) use record::Recorder;
pub(crate) use replay::{run_replay, ReplayArgs};
pub(crate) use tap::TapBody;

/// Default inspector address: loopback only, the port people know from similar tools.
pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:4040";
/// Ports tried after the default one is taken (another agent on this machine).
const FALLBACK_PORTS: std::ops::RangeInclusive<u16> = 4041..=4049;
/// Default number of exchanges (HTTP requests and WebSocket sessions) kept.
pub(crate) const DEFAULT_RING: usize = 500;
/// Default bytes of each request and response body kept.
pub(crate) const DEFAULT_BODY_CAP: usize = 64 * 1024;
/// Bytes of a WebSocket message kept as its preview with `--inspect-payloads`.
pub(crate) const DEFAULT_PREVIEW_CAP: usize = 1024;
/// Frames kept per WebSocket session (the oldest are dropped, the counters keep counting).
pub(crate) const DEFAULT_FRAMES_PER_SESSION: usize = 1000;
/// Most bytes all kept records may hold together (bodies, headers, frames, previews); the
/// oldest records go first. Bounds memory however the other limits combine.
pub(crate) const DEFAULT_MAX_HELD: usize = 64 * 1024 * 1024;

/// Inspector and output options of `burrow http` and `burrow start`.
#[derive(Debug, Clone, Args)]
pub(crate) struct InspectArgs {
    /// Address of the inspector page and JSON API (loopback only) [default: 127.0.0.1:4040,
    /// or the next free port up to 4049].
    #[arg(long, value_name = "ADDR")]
    pub(crate) inspect: Option<String>,
    /// Do not record traffic or serve the inspector.
    #[arg(long, conflicts_with_all = ["inspect", "inspect_payloads"])]
    pub(crate) no_inspect: bool,
    /// Keep a preview (up to 1 KiB) of each WebSocket message; by default only counts, sizes
    /// and timing are kept.
    #[arg(long)]
    pub(crate) inspect_payloads: bool,
    /// Exchanges the inspector keeps (older ones are dropped).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RING)]
    pub(crate) inspect_keep: usize,
    /// Bytes of each request and response body the inspector keeps.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BODY_CAP)]
    pub(crate) inspect_body_cap: usize,
    /// Output: a live panel on a terminal, else one line per event (`plain` or `json`).
    #[arg(long, value_name = "FORMAT")]
    pub(crate) log_format: Option<LogFormat>,
}

/// How the agent reports traffic on standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One human-readable line per event.
    Plain,
    /// One JSON object per line per event.
    Json,
}

/// Settings of the recorder, validated before anything binds.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Exchanges kept in the ring; 0 keeps none (counters only, for `--no-inspect`).
    pub(crate) ring: usize,
    /// Bytes kept of each body.
    pub(crate) body_cap: usize,
    /// Bytes kept of each WebSocket message; 0 keeps no content at all.
    pub(crate) preview_cap: usize,
    /// Frames kept per WebSocket session.
    pub(crate) frames_per_session: usize,
    /// Bytes all records may hold together.
    pub(crate) max_held: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ring: DEFAULT_RING,
            body_cap: DEFAULT_BODY_CAP,
            preview_cap: 0,
            frames_per_session: DEFAULT_FRAMES_PER_SESSION,
            max_held: DEFAULT_MAX_HELD,
        }
    }
}

impl InspectArgs {
    /// The recorder settings these flags ask for.
    pub(crate) fn settings(&self) -> anyhow::Result<Settings> {
        anyhow::ensure!(
            (1..=100_000).contains(&self.inspect_keep),
            "--inspect-keep must be from 1 to 100000"
        );
        anyhow::ensure!(
            self.inspect_body_cap <= 16 * 1024 * 1024,
            "--inspect-body-cap must be at most 16777216 (16 MiB)"
        );
        Ok(Settings {
            ring: self.inspect_keep,
            body_cap: self.inspect_body_cap,
            preview_cap: if self.inspect_payloads {
                DEFAULT_PREVIEW_CAP
            } else {
                0
            },
            frames_per_session: DEFAULT_FRAMES_PER_SESSION,
            max_held: DEFAULT_MAX_HELD,
        })
    }

    /// The inspector address, refused unless it is a loopback address: the page shows
    /// request bodies and can replay requests, so it must not be reachable from elsewhere.
    pub(crate) fn addr(&self) -> anyhow::Result<SocketAddr> {
        parse_addr(self.inspect.as_deref().unwrap_or(DEFAULT_ADDR))
    }
}

/// Parses an inspector address (`4040`, `localhost:4040`, `127.0.0.1:4040`, `[::1]:4040`),
/// refusing any address that is not loopback.
pub(crate) fn parse_addr(given: &str) -> anyhow::Result<SocketAddr> {
    let text = given.trim();
    let text = if text.starts_with("localhost:") {
        text.replacen("localhost", "127.0.0.1", 1)
    } else if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() {
        format!("127.0.0.1:{text}")
    } else {
        text.to_owned()
    };
    let addr: SocketAddr = text
        .parse()
        .with_context(|| format!("--inspect {given:?} is not an address like 127.0.0.1:4040"))?;
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--inspect {addr}: the inspector only listens on a loopback address (127.0.0.1 or [::1])"
    );
    Ok(addr)
}

static GLOBAL: OnceLock<Recorder> = OnceLock::new();

/// The process's recorder; a disabled one (every call a no-op) until [`start`] installs one.
///
/// An agent process has exactly one inspector, installed before any tunnel starts, so the
/// forwarding path reaches it here instead of threading a handle through every layer.
pub(crate) fn recorder() -> Recorder {
    GLOBAL.get().cloned().unwrap_or_else(Recorder::disabled)
}

/// Sets up the recorder, the inspector server and the terminal output for an agent run.
///
/// Returns the recorder (also installed for [`recorder`]). The server and panel stop when
/// `shutdown` is cancelled.
pub(crate) async fn start(
    args: &InspectArgs,
    shutdown: &CancellationToken,
    local_tls: Option<crate::agent::dial::LocalTls>,
) -> anyhow::Result<Recorder> {
    let format = args.log_format;
    if args.no_inspect {
        // Counters for the panel and log lines only: no exchange is kept.
        let rec = Recorder::new(Settings {
            ring: 0,
            body_cap: 0,
            ..Settings::default()
        });
        let _ = GLOBAL.set(rec.clone());
        panel::start(rec.clone(), format, None, shutdown.clone());
        return Ok(rec);
    }
    let settings = args.settings()?;
    let addr = args.addr()?;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Some(l),
        // Another agent holds the default port: take the next free one, like similar tools.
        Err(_) if args.inspect.is_none() => {
            let mut found = None;
            for port in FALLBACK_PORTS {
                if let Ok(l) = tokio::net::TcpListener::bind((addr.ip(), port)).await {
                    found = Some(l);
                    break;
                }
            }
            found
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot listen on {addr} for the inspector (use another --inspect ADDR or --no-inspect)"
            )))
        }
    };
    let Some(listener) = listener else {
        eprintln!(
            "warning: ports 4040-4049 are all taken; the inspector is off (use --inspect ADDR)"
        );
        let rec = Recorder::new(Settings {
            ring: 0,
            body_cap: 0,
            ..settings
        });
        let _ = GLOBAL.set(rec.clone());
        panel::start(rec.clone(), format, None, shutdown.clone());
        return Ok(rec);
    };
    let local = listener.local_addr().context("inspector address")?;
    let rec = Recorder::new(settings);
    let _ = GLOBAL.set(rec.clone());
    let url = format!("http://{local}");
    rec.set_inspector_url(&url);
    tokio::spawn(server::serve(
        listener,
        rec.clone(),
        shutdown.clone(),
        local_tls,
    ));
    tokio::spawn(rec.clone().flush_loop(shutdown.clone()));
    panel::start(rec.clone(), format, Some(url), shutdown.clone());
    Ok(rec)
}
