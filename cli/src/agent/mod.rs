//! Agent subcommands: `http`, `start`, `authtoken`.
//!
//! # Layout
//! - `target`: parsing the local target and the `--host-header` mode.
//! - `session`: the connection to the edge (TLS, handshake, HTTP/2, reconnects).
//! - `forward`: serving the edge's streams by forwarding them to local servers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config;

pub(crate) mod dial;
mod forward;
mod session;
mod target;

use forward::TunnelSpec;
use session::EdgeSpec;
use target::{HostHeader, Target};

/// Environment variable holding the agent token.
const ENV_TOKEN: &str = "BURROW_TOKEN";
/// Edge address used when neither `--edge` nor the config file names one.
const DEFAULT_EDGE: &str = "localhost:4443";

/// Subcommands that run tunnels.
#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Expose a local HTTP/WebSocket server at a public URL.
    ///
    /// Examples:
    ///   burrow http 3000                          # random name → localhost:3000
    ///   burrow http 3000 --subdomain chat         # http(s)://chat.<domain>
    ///   burrow http 127.0.0.1:8080 --host-header preserve
    ///   burrow http http://app.internal:9000 --edge edge.example.com:4443
    ///   burrow http https://localhost:8443 --local-ca rootCA.pem   # HTTPS dev server (mkcert)
    ///   burrow http https://localhost:8443 --local-insecure        # …with a self-signed cert
    ///   burrow http 3000 --edge localhost:4443 --edge-ca edge-ca.pem   # self-signed edge
    ///   burrow http 3000 --basic-auth-file users.txt --allow-ip 10.0.0.0/8
    ///   burrow http 3000 --allow-origin https://app.example.com --request-header-add X-From:burrow
    ///
    /// The agent token comes from $BURROW_TOKEN, --token-file, or `burrow authtoken add`.
    /// Log: $BURROW_LOG sets the filter (info); $BURROW_LOG_QUEUE_LINES (8192) is how many
    /// lines may wait for standard error before new ones are dropped and counted; $NO_COLOR.
    #[command(verbatim_doc_comment)]
    Http(HttpArgs),
    /// Run every tunnel listed in a TOML file.
    ///
    /// Example file:
    ///   edge = "localhost:4443"
    ///   edge_ca = "edge-ca.pem"
    ///   local_ca = "rootCA.pem"              # for https:// targets (or local_insecure = true)
    ///   [[tunnel]]
    ///   target = "3000"
    ///   subdomain = "chat"
    ///   [[tunnel]]
    ///   target = "localhost:8080"
    ///   host_header = "preserve"
    ///   basic_auth_file = ["users.txt"]      # or basic_auth = ["user:pass"]
    ///   allow_ip = ["10.0.0.0/8", "2001:db8::/32"]
    ///   allow_origin = ["https://app.example.com"]
    ///   request_header_add = ["X-From:burrow"]
    #[command(verbatim_doc_comment)]
    Start(StartArgs),
    /// Store the agent token in the config file.
    #[command(subcommand)]
    Authtoken(AuthtokenCommand),
    /// Re-send a request the inspector captured to the local server, optionally edited.
    ///
    /// Examples:
    ///   burrow replay 12
    ///   burrow replay 12 -X PUT --path /v2/hook -H 'X-Debug: 1' --body '{"ok":true}'
    #[command(verbatim_doc_comment)]
    Replay(crate::inspect::ReplayArgs),
}

impl AgentCommand {
    /// Whether the agent runs its lanes on worker threads of its own (`--worker-threads`, not
    /// 0), so the runtime that drives the first connection needs only one thread.
    pub(crate) fn own_threads(&self) -> bool {
        let edge = match self {
            Self::Http(a) => &a.edge,
            Self::Start(a) => &a.edge,
            _ => return false,
        };
        edge.worker_threads != Some(0)
    }
}

/// Options shared by `http` and `start`.
#[derive(Debug, Args)]
pub(crate) struct EdgeArgs {
    /// Edge agent address (host:port); default from the config file, else localhost:4443.
    #[arg(long)]
    edge: Option<String>,
    /// CA certificate (PEM) to trust for the edge, e.g. the file written by
    /// `burrow-edge --self-signed-out`.
    #[arg(long)]
    edge_ca: Option<PathBuf>,
    /// File holding the agent token (`-` for standard input).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Do not verify the edge's certificate. Refused unless the edge is on this machine
    /// (localhost, 127.0.0.1, ::1); prefer --edge-ca.
    #[arg(long, conflicts_with = "edge_ca")]
    insecure: bool,
    /// Connect without TLS, for benchmarks against `burrow-edge --agent-plaintext`. Refused
    /// unless the edge is on this machine.
    #[arg(long, conflicts_with_all = ["edge_ca", "insecure"])]
    edge_plaintext: bool,
    /// HTTP/2 flow-control window of each visitor stream toward this agent, in bytes. It
    /// bounds how far a bulk transfer runs ahead of small messages on the shared connection
    /// (head-of-line delay) and, on long round trips, the throughput of one stream
    /// (window / round trip).
    #[arg(long, default_value_t = session::DEFAULT_STREAM_WINDOW,
          value_parser = clap::value_parser!(u32).range(65_535..=0x7fff_ffff))]
    h2_stream_window: u32,
    /// HTTP/2 flow-control window of the whole connection to the edge, in bytes: what every
    /// visitor stream together may have in flight toward this agent. Local servers that stop
    /// reading may hold at most half of it (see --stopped-reader-grace-ms).
    #[arg(long, default_value_t = session::DEFAULT_CONNECTION_WINDOW,
          value_parser = clap::value_parser!(u32).range(65_535..=0x7fff_ffff))]
    h2_connection_window: u32,
    /// Bytes the agent keeps reading from the edge for a local server that reads nothing (per
    /// WebSocket and per request body). When they are full and came in small frames (under
    /// 1 KiB on average), the agent ends that WebSocket (1008) or request (the visitor gets a
    /// 502) rather than leave the small frames to HTTP/2, whose budget for them is shared by
    /// every tunnel on the connection. 0 turns this off.
    #[arg(long, default_value_t = burrow_edge::relay::DEFAULT_STALL_BUFFER)]
    stall_buffer_bytes: usize,
    /// Bytes a WebSocket relay moves in one direction, while its source keeps data ready,
    /// before it lets the other connections on its worker thread run, so a bulk transfer holds
    /// back a small message of another visitor by one chunk at most. Smaller favours latency
    /// under load, larger throughput; 0 never yields.
    #[arg(long, default_value_t = burrow_edge::relay::DEFAULT_YIELD_AFTER)]
    relay_yield_bytes: usize,
    /// Milliseconds a local server may take nothing while its backlog (--stall-buffer-bytes)
    /// is full before it counts as stopped. Stopped local servers may hold at most half of
    /// the connection's HTTP/2 window, one stream window each; the agent ends the WebSocket
    /// (1008) or request (502) of one more, so they cannot freeze every tunnel of the agent.
    #[arg(long, default_value_t = burrow_edge::relay::DEFAULT_STOPPED_READER_GRACE.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    stopped_reader_grace_ms: u64,
    /// Connections (lanes) to the edge, the first included. The edge sends each new visitor
    /// to the lane with the fewest streams open (then the fewest bytes lately), so a big
    /// download or upload on one lane does not delay other visitors' messages queued behind it
    /// in one TCP stream. The edge may allow fewer (`burrow-edge --max-agent-lanes`). 1: one
    /// connection.
    #[arg(long, default_value_t = session::DEFAULT_LANES,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    lanes: u32,
    /// Seconds to wait before asking again for a lane the edge had no room for (its
    /// --max-agent-lanes, or few of its agent connections left).
    #[arg(long, default_value_t = session::DEFAULT_LANE_RETRY_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    lane_retry_secs: u64,
    /// Threads serving the lanes, each with an event loop of its own: lane I runs on thread
    /// I mod N together with every visitor stream, local connection and relay it carries, so
    /// a message crosses the agent without waking another thread. Default: one per CPU, at
    /// most --lanes. 0: one shared pool of workers instead.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=256))]
    worker_threads: Option<u32>,
    /// CA certificate (PEM) to trust, besides the system's, for an https:// local target
    /// with a private or self-signed certificate (mkcert's rootCA.pem, say).
    #[arg(long)]
    local_ca: Option<PathBuf>,
    /// Do not verify the certificate of an https:// local target (a dev server's self-signed
    /// one); the traffic is still encrypted. Prefer --local-ca.
    #[arg(long, conflicts_with = "local_ca")]
    local_insecure: bool,
    #[command(flatten)]
    inspect: crate::inspect::InspectArgs,
}

/// The subdomain asked for (`""`: a random one), checked here so a typo gets a clear answer
/// before any connection; `what` names the flag or key.
fn subdomain_arg(name: Option<&str>, what: &str) -> anyhow::Result<String> {
    let Some(name) = name else {
        return Ok(String::new());
    };
    let label = name.trim();
    anyhow::ensure!(
        !label.is_empty(),
        "{what} is empty: give a name such as `chat`, or leave it out for a random one"
    );
    let ok = label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    anyhow::ensure!(
        ok,
        "{what} {label:?} is not a valid subdomain: use 1-63 letters, digits or hyphens, not \
         starting or ending with a hyphen (just the name: `chat`, not `chat.example.com`)"
    );
    Ok(label.to_ascii_lowercase())
}

#[derive(Debug, Args)]
pub(crate) struct HttpArgs {
    /// Local server: a port (3000), host:port, http://host:port or https://host:port.
    target: String,
    /// Subdomain to bind; a random free one when omitted.
    #[arg(long)]
    subdomain: Option<String>,
    /// Host header the local server sees: rewrite (its own host:port), preserve (the
    /// visitor's), or a fixed value.
    #[arg(long, default_value = "rewrite")]
    host_header: String,
    #[command(flatten)]
    policy: Box<crate::policy::PolicyArgs>,
    #[command(flatten)]
    edge: EdgeArgs,
}

#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    /// The tunnels file.
    #[arg(long, default_value = "burrow.toml")]
    config: PathBuf,
    #[command(flatten)]
    edge: EdgeArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuthtokenCommand {
    /// Read an agent token from standard input (or --token-file) and save it.
    Add {
        /// File holding the token; standard input when omitted.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

/// The `burrow start` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelsFile {
    edge: Option<String>,
    edge_ca: Option<PathBuf>,
    local_ca: Option<PathBuf>,
    #[serde(default)]
    local_insecure: bool,
    #[serde(default)]
    tunnel: Vec<TunnelEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelEntry {
    target: String,
    subdomain: Option<String>,
    host_header: Option<String>,
    // The tunnel's policy: the same keys as the `burrow http` flags.
    #[serde(default)]
    basic_auth: Vec<String>,
    /// Relative to the tunnels file.
    #[serde(default)]
    basic_auth_file: Vec<PathBuf>,
    #[serde(default)]
    allow_ip: Vec<String>,
    #[serde(default)]
    deny_ip: Vec<String>,
    #[serde(default)]
    allow_origin: Vec<String>,
    #[serde(default)]
    request_header_add: Vec<String>,
    #[serde(default)]
    request_header_remove: Vec<String>,
    #[serde(default)]
    response_header_add: Vec<String>,
    #[serde(default)]
    response_header_remove: Vec<String>,
}

impl TunnelEntry {
    /// The entry's policy keys as the flags `burrow http` takes; files are found relative to
    /// `base`.
    fn policy_args(&self, base: &Path) -> crate::policy::PolicyArgs {
        crate::policy::PolicyArgs {
            basic_auth: self.basic_auth.clone(),
            basic_auth_file: self.basic_auth_file.iter().map(|p| base.join(p)).collect(),
            allow_ip: self.allow_ip.clone(),
            deny_ip: self.deny_ip.clone(),
            allow_origin: self.allow_origin.clone(),
            request_header_add: self.request_header_add.clone(),
            request_header_remove: self.request_header_remove.clone(),
            response_header_add: self.response_header_add.clone(),
            response_header_remove: self.response_header_remove.clone(),
        }
    }
}

/// The policy the flags describe (passwords hashed here), or `None` when none was given.
fn tunnel_policy(
    args: &crate::policy::PolicyArgs,
) -> anyhow::Result<Option<burrow_proto::v1::TunnelPolicy>> {
    if args.is_empty() {
        return Ok(None);
    }
    args.to_proto().map(Some)
}

pub(crate) async fn run(cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    // The live panel owns the terminal: only warnings are logged under it.
    let level = match &cmd {
        AgentCommand::Http(HttpArgs { edge, .. }) | AgentCommand::Start(StartArgs { edge, .. })
            if crate::inspect::panel_wanted(edge.inspect.log_format) =>
        {
            "warn"
        }
        _ => "info",
    };
    // Log lines (one per request and WebSocket session) go out from a thread of their own
    // (`burrow_edge::logs`): a stalled reader of standard error must not stall the tunnels.
    let queue = burrow_edge::logs::queue_lines_from_env().map_err(anyhow::Error::msg)?;
    let (lines, _flush) = burrow_edge::logs::to(burrow_edge::logs::Output::Stderr, queue);
    // The agent's own status lines (the public URLs, reconnects) go through queues too.
    let (out, _out_flush) = burrow_edge::logs::to(burrow_edge::logs::Output::Stdout, queue);
    session::set_output(out, lines.clone());
    let _ = tracing_subscriber::fmt()
        .with_writer(lines)
        .with_timer(burrow_edge::logs::Timestamps)
        .with_target(false)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && crate::inspect::colour_allowed(),
        )
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BURROW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .try_init();
    match cmd {
        AgentCommand::Http(a) => {
            let spec = TunnelSpec::new(
                "0".to_owned(),
                subdomain_arg(a.subdomain.as_deref(), "--subdomain")?,
                Target::parse(&a.target)?,
                &HostHeader::parse(&a.host_header)?,
                tunnel_policy(&a.policy)?,
            )?;
            run_tunnels(&a.edge, None, vec![spec]).await
        }
        AgentCommand::Start(a) => {
            let text = std::fs::read_to_string(&a.config)
                .with_context(|| format!("cannot read {}", a.config.display()))?;
            let file: TunnelsFile = toml::from_str(&text)
                .with_context(|| format!("{} is not a valid tunnels file", a.config.display()))?;
            anyhow::ensure!(
                !file.tunnel.is_empty(),
                "{} lists no [[tunnel]]",
                a.config.display()
            );
            let base = a.config.parent().unwrap_or(Path::new("."));
            let mut specs = Vec::new();
            for (i, t) in file.tunnel.iter().enumerate() {
                let which = || format!("tunnel {}", i + 1);
                specs.push(
                    TunnelSpec::new(
                        i.to_string(),
                        subdomain_arg(t.subdomain.as_deref(), "subdomain").with_context(which)?,
                        Target::parse(&t.target).with_context(which)?,
                        &HostHeader::parse(t.host_header.as_deref().unwrap_or("rewrite"))
                            .with_context(which)?,
                        tunnel_policy(&t.policy_args(base)).with_context(which)?,
                    )
                    .with_context(which)?,
                );
            }
            let file_edge = FileEdge {
                edge: file.edge,
                edge_ca: file.edge_ca.map(|p| base.join(p)),
                local_ca: file.local_ca.map(|p| base.join(p)),
                local_insecure: file.local_insecure,
            };
            run_tunnels(&a.edge, Some(file_edge), specs).await
        }
        AgentCommand::Replay(a) => crate::inspect::run_replay(a).await,
        AgentCommand::Authtoken(AuthtokenCommand::Add { token_file }) => {
            let path = token_file.unwrap_or_else(|| PathBuf::from("-"));
            let token = config::read_token_file(&path)?;
            if !token.starts_with("brw_agent_") {
                eprintln!("warning: this does not look like an agent token (brw_agent_…)");
            }
            let mut cfg = config::load()?;
            cfg.authtoken = Some(token);
            let saved = config::save(&cfg)?;
            println!("Agent token saved to {}", saved.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Edge settings from a tunnels file.
struct FileEdge {
    edge: Option<String>,
    edge_ca: Option<PathBuf>,
    local_ca: Option<PathBuf>,
    local_insecure: bool,
}

async fn run_tunnels(
    args: &EdgeArgs,
    file: Option<FileEdge>,
    specs: Vec<TunnelSpec>,
) -> anyhow::Result<ExitCode> {
    let user = config::load()?;
    let token = match (std::env::var(ENV_TOKEN), &args.token_file) {
        (Ok(t), _) if !t.trim().is_empty() => t.trim().to_owned(),
        (_, Some(f)) => config::read_token_file(f)?,
        _ => user.authtoken.clone().context(
            "no agent token: set BURROW_TOKEN, pass --token-file FILE, or run `burrow authtoken add`",
        )?,
    };
    let (file_edge, file_ca, file_local_ca, file_local_insecure) = match file {
        Some(f) => (f.edge, f.edge_ca, f.local_ca, f.local_insecure),
        None => (None, None, None, false),
    };
    let local_ca = args.local_ca.clone().or(file_local_ca);
    let local_insecure = args.local_insecure || file_local_insecure;
    anyhow::ensure!(
        !(local_insecure && local_ca.is_some()),
        "--local-insecure and --local-ca (local_insecure and local_ca in the tunnels file) \
         cannot be used together"
    );
    let local_tls = if specs.iter().any(|s| s.target.tls) {
        Some(dial::LocalTls::new(local_ca.as_deref(), local_insecure)?)
    } else {
        if local_ca.is_some() || local_insecure {
            eprintln!(
                "warning: --local-ca and --local-insecure only apply to https:// targets; \
                 no tunnel has one"
            );
        }
        None
    };
    let edge = EdgeSpec {
        addr: args
            .edge
            .clone()
            .or(file_edge)
            .or(user.edge.clone())
            .unwrap_or_else(|| DEFAULT_EDGE.to_owned()),
        ca: args.edge_ca.clone().or(file_ca),
        insecure: args.insecure,
        plaintext: args.edge_plaintext,
        stream_window: args.h2_stream_window,
        connection_window: args.h2_connection_window,
        stall_buffer: args.stall_buffer_bytes,
        relay_yield: args.relay_yield_bytes,
        stopped_reader_grace: std::time::Duration::from_millis(args.stopped_reader_grace_ms),
        lanes: args.lanes,
        lane_retry: std::time::Duration::from_secs(args.lane_retry_secs),
        // A thread without a lane would idle: no more threads than lanes.
        worker_threads: args
            .worker_threads
            .map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                |n| n as usize,
            )
            .min(args.lanes as usize),
        local_tls,
        json_lines: args.inspect.log_format == Some(crate::inspect::LogFormat::Json),
    };
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    #[cfg(unix)]
    {
        let s = shutdown.clone();
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::spawn(async move {
                term.recv().await;
                s.cancel();
            });
        }
    }
    crate::inspect::start(&args.inspect, &shutdown, edge.local_tls.clone()).await?;
    session::run(edge, token, specs, shutdown.clone()).await?;
    if shutdown.is_cancelled() {
        // A signal ended the agent: say so once the tunnels are down.
        session::say(session::Stream::Stderr, "Stopped: the tunnels are closed\n");
    }
    Ok(ExitCode::SUCCESS)
}
