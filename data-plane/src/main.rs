//! `burrow-edge`: parses flags into a [`Config`], binds, and runs the edge until SIGINT or
//! SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use burrow_edge::{Config, ControlConfig, Limits, Listeners, TlsIdentity};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Burrow edge worker: serves visitors at NAME.<domain> through agents' tunnels.
///
/// Examples:
///   # with the control plane
///   BURROW_EDGE_TOKEN=brw_edge_… burrow-edge --control http://127.0.0.1:50051 \
///       --domain localhost --self-signed --self-signed-out edge-ca.pem
///   # alone on one machine, agents authenticated by a fixed token
///   burrow-edge --standalone-token-file agent-token.txt --self-signed --self-signed-out edge-ca.pem
///
/// Log (standard output): $RUST_LOG sets the filter (info); $BURROW_LOG_QUEUE_LINES (8192)
/// is how many lines may wait for the output before new ones are dropped and counted;
/// $NO_COLOR turns colours off (they are used only on a terminal).
#[derive(Debug, Parser)]
#[command(name = "burrow-edge", version, verbatim_doc_comment)]
struct Args {
    /// Stable name of this edge.
    #[arg(long, env = "BURROW_EDGE_NAME", default_value = "edge-1")]
    name: String,
    /// Domain tunnels live under (visitors open NAME.<domain>).
    #[arg(long, env = "BURROW_EDGE_DOMAIN", default_value = "localhost")]
    domain: String,
    /// Plain-HTTP visitor listener; "off" disables it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// HTTPS visitor listener (needs --tls-cert/--tls-key or --self-signed).
    #[arg(long)]
    https: Option<String>,
    /// Agent listener (TLS).
    #[arg(long, default_value = "127.0.0.1:4443")]
    agent_listen: String,
    /// Admin listener serving /metrics (Prometheus), /healthz and /readyz over plain HTTP;
    /// "off" disables it. Keep it off the public network.
    #[arg(long, env = "BURROW_EDGE_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
    admin_addr: String,
    /// Most connections served at once on the admin listener.
    #[arg(long, default_value_t = Limits::default().admin_max_connections)]
    admin_max_connections: usize,
    /// Public visitor URL template, `{sub}` replaced by the subdomain.
    #[arg(long)]
    public_url: Option<String>,
    /// Control-plane URL.
    #[arg(long, env = "BURROW_CONTROL")]
    control: Option<String>,
    /// Edge token for the control plane, from the environment only: a command-line value
    /// would be readable by every local user in /proc/*/cmdline, so `--edge-token` is refused.
    #[arg(long, env = "BURROW_EDGE_TOKEN", hide_env_values = true, hide = true)]
    edge_token: Option<String>,
    /// File holding the edge token (instead of BURROW_EDGE_TOKEN).
    #[arg(long)]
    edge_token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// control plane.
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// Run without a control plane: accept agents presenting the token in this file.
    #[arg(long, conflicts_with = "control")]
    standalone_token_file: Option<PathBuf>,
    /// Certificate (PEM) for the HTTPS visitor listener.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for the HTTPS visitor listener.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Certificate (PEM) for the agent listener (defaults to --tls-cert).
    #[arg(long, requires = "agent_key")]
    agent_cert: Option<PathBuf>,
    /// Private key (PEM) for the agent listener.
    #[arg(long, requires = "agent_cert")]
    agent_key: Option<PathBuf>,
    /// Generate a certificate authority that lives only in this process, and certificates it
    /// signs for localhost, 127.0.0.1, ::1, <domain> and each NAME.<domain> a client asks for
    /// (local use only).
    #[arg(long)]
    self_signed: bool,
    /// Serve agents over plain TCP, no TLS (benchmarks on one machine only; agents need
    /// `burrow http --edge-plaintext`).
    #[arg(long)]
    agent_plaintext: bool,
    /// Write the generated authority's certificate here: give it to agents (`burrow http
    /// --edge-ca FILE`) and to clients (`curl --cacert FILE`, Python `ssl` cafile, Node `ca`).
    #[arg(long, requires = "self_signed")]
    self_signed_out: Option<PathBuf>,
    /// Keepalive ping interval toward idle visitor WebSockets, in seconds (0 disables).
    #[arg(long, default_value_t = 30)]
    ws_ping_interval: u64,
    /// Seconds of silence after which a visitor WebSocket is closed (0 never closes).
    #[arg(long, default_value_t = 75)]
    ws_idle_timeout: u64,
    /// Most WebSockets open at once through one tunnel, when the control plane sets no limit
    /// (0: unlimited). Over it, visitors get 429 before the upgrade.
    #[arg(long, default_value_t = 0)]
    default_max_websockets_per_tunnel: u32,
    /// Most new visitor requests (upgrades included) per second to one tunnel, when the
    /// control plane sets no limit (0: unlimited). Over it, visitors get 429.
    #[arg(long, default_value_t = 0)]
    default_max_requests_per_second_per_tunnel: u32,
    /// Most bytes per second in each direction of one WebSocket, when the control plane sets
    /// no limit (0: unlimited). Excess is slowed; see --ws-rate-limit-grace.
    #[arg(long, default_value_t = 0)]
    default_max_websocket_bytes_per_second: u64,
    /// Seconds a WebSocket may stay over its tunnel's byte rate before the edge closes it
    /// with 1008 and a reason (shorter bursts are only slowed).
    #[arg(long, default_value_t = 10)]
    ws_rate_limit_grace: u64,
    /// Seconds a visitor may take to send its request headers.
    #[arg(long, default_value_t = 10)]
    header_read_timeout: u64,
    /// Largest visitor request head (request line and headers) in bytes. A larger one gets a
    /// page naming this setting: 414 when the request line alone is larger, else 431.
    #[arg(long, default_value_t = 16 * 1024)]
    max_header_bytes: usize,
    /// Most headers in one visitor request.
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// Most visitor connections at once.
    #[arg(long, default_value_t = 10_000)]
    max_visitor_connections: usize,
    /// Seconds between keepalives on agent connections: an agent that sends nothing for that
    /// long after one is dropped, and agents reconnect when they stop for twice that long.
    #[arg(long, default_value_t = 10)]
    agent_keepalive: u64,
    /// HTTP/2 flow-control window of each stream from an agent, in bytes: bounds how far one
    /// bulk download runs ahead of small messages on the agent's shared connection.
    #[arg(long, default_value_t = Limits::default().h2_stream_window)]
    h2_stream_window: u32,
    /// HTTP/2 flow-control window of a whole agent connection, in bytes.
    #[arg(long, default_value_t = Limits::default().h2_connection_window)]
    h2_connection_window: u32,
    /// Seconds a tunnel remembers a verified basic-auth credential (by its SHA-256), so a
    /// browser opening several connections pays argon2 once (0: once per connection only).
    #[arg(long, default_value_t = Limits::default().basic_auth_cache_ttl.as_secs())]
    basic_auth_cache_ttl: u64,
    /// Most verified basic-auth credentials one tunnel remembers.
    #[arg(long, default_value_t = Limits::default().basic_auth_cache_entries)]
    basic_auth_cache_entries: usize,
    /// Most argon2 password verifications running at once; others wait. Bounds the memory a
    /// flood of wrong passwords can take.
    #[arg(long, default_value_t = Limits::default().basic_auth_max_concurrent_verifications)]
    basic_auth_max_concurrent_verifications: usize,
    /// Largest argon2 memory cost (KiB) a tunnel policy's password hash may ask for.
    #[arg(long, default_value_t = Limits::default().basic_auth_max_hash_memory_kib)]
    basic_auth_max_hash_memory_kib: u32,
    /// Largest argon2 time cost (passes) a tunnel policy's password hash may ask for.
    #[arg(long, default_value_t = Limits::default().basic_auth_max_hash_passes)]
    basic_auth_max_hash_passes: u32,
    /// Most entries in each list of a tunnel policy (users, addresses, origins, header rules).
    #[arg(long, default_value_t = Limits::default().policy_max_rules)]
    policy_max_rules: usize,
    /// Worker threads serving visitors and agents, each with an event loop of its own; every
    /// connection stays on the thread it was handed to when accepted, and a visitor's stream
    /// prefers an agent lane on its own thread, so a message crosses the edge without waking
    /// another thread. Default: one per CPU. 0: one shared pool of workers instead.
    #[arg(long, default_value_t = Limits::default().worker_threads)]
    worker_threads: usize,
    /// Where agents should connect (host:port), as announced to the control plane and shown
    /// by `burrow tunnel list`; defaults to the --agent-listen address as bound. Set it when
    /// the edge listens on 0.0.0.0 or behind NAT.
    #[arg(long)]
    agent_addr: Option<String>,
    /// Most agent connections open at once; the next agent waits for a free slot.
    #[arg(long, default_value_t = Limits::default().max_agent_connections)]
    max_agent_connections: usize,
    /// Most tunnels one agent connection may bind; more in its hello refuse the connection.
    #[arg(long, default_value_t = Limits::default().max_tunnels_per_agent)]
    max_tunnels_per_agent: usize,
    /// Most connections (lanes) one agent may use, its first included. New visitor streams go
    /// to the lane with the fewest streams open (then the fewest bytes lately), so a bulk
    /// transfer on one lane does not delay other visitors' messages queued behind it in the
    /// same TCP stream. Each lane counts against --max-agent-connections. 1: no lanes.
    #[arg(long, default_value_t = Limits::default().max_agent_lanes)]
    max_agent_lanes: usize,
    /// Seconds the TLS handshake plus the agent's hello may take.
    #[arg(long, default_value_t = Limits::default().agent_handshake_timeout.as_secs())]
    agent_handshake_timeout: u64,
    /// Milliseconds an agent holding a name has to answer a liveness probe when another agent
    /// of the same team asks for that name: if it answers, the newcomer is refused ("in use by
    /// a live tunnel of your team"); if not, it is taken to be dead and the newcomer gets the
    /// name at once.
    #[arg(long, default_value_t = Limits::default().takeover_probe_timeout.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    takeover_probe_timeout_ms: u64,
    /// Seconds the edge waits for the agent's response head to a visitor request (504 after).
    #[arg(long, default_value_t = Limits::default().upstream_response_timeout.as_secs())]
    upstream_response_timeout: u64,
    /// Largest HTTP/2 frame payload on agent connections, in bytes (16384 to 16777215).
    #[arg(long, default_value_t = Limits::default().h2_max_frame_size)]
    h2_max_frame_size: u32,
    /// Largest response head an agent may send, in bytes (HTTP/2 header list size: names,
    /// values and 32 bytes per field; at least 16384). A larger one gets the visitor a 502.
    #[arg(long, default_value_t = Limits::default().agent_max_header_list_bytes)]
    agent_max_header_list_bytes: u32,
    /// Largest relay buffer of an upgraded (WebSocket) connection, in bytes: each direction
    /// starts at 4 KiB, grows to this under bulk transfer and goes back to 4 KiB after a short
    /// read or a second without data, so a connection's relay holds at most twice this.
    #[arg(long, default_value_t = Limits::default().relay_buffer_bytes)]
    relay_buffer_bytes: usize,
    /// Bytes a WebSocket relay moves in one direction, while its source keeps data ready,
    /// before it lets the other connections on its worker thread run. A bulk transfer then
    /// holds back a small message of another visitor by one chunk at most, not by up to 8 MiB
    /// (Tokio's cooperative budget of 128 reads). Smaller favours latency under load, larger
    /// throughput; 0 never yields.
    #[arg(long, default_value_t = Limits::default().relay_yield_bytes)]
    relay_yield_bytes: usize,
    /// Bytes the edge keeps reading from the agent for a visitor that reads nothing (per
    /// WebSocket and per response body). When they are full and came in small frames (under
    /// 1 KiB on average), the edge ends that WebSocket (1008) or response rather than leave
    /// the small frames to HTTP/2, whose budget for them is shared by the agent's whole
    /// connection. 0 turns this off.
    #[arg(long, default_value_t = Limits::default().stall_buffer_bytes)]
    stall_buffer_bytes: usize,
    /// Milliseconds a visitor may take nothing while its backlog (--stall-buffer-bytes) is
    /// full before it counts as stopped. Stopped readers may hold at most half of the agent
    /// connection's HTTP/2 window (--h2-connection-window), one stream window each; the edge
    /// ends the WebSocket (1008) or response of one more, so they cannot freeze every tunnel
    /// on the agent's connection.
    #[arg(long, default_value_t = Limits::default().stopped_reader_grace.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    stopped_reader_grace_ms: u64,
    /// Seconds one direction of a WebSocket may keep going after the other ended before the
    /// edge drops the connection.
    #[arg(long, default_value_t = Limits::default().ws_close_timeout.as_secs())]
    ws_close_timeout: u64,
    /// Seconds a cached agent authorization from the control plane is trusted at most (the
    /// control plane's own expiry may be shorter; 0: ask every time).
    #[arg(long, default_value_t = Limits::default().authorization_cache_ttl.as_secs())]
    authorization_cache_ttl: u64,
    /// Most cached agent authorizations.
    #[arg(long, default_value_t = Limits::default().authorization_cache_entries)]
    authorization_cache_entries: usize,
    /// Seconds a disconnected tunnel shows the "offline" page (503) rather than "unknown"
    /// (404); the control plane's reconnect grace, when it announces one, wins.
    #[arg(long, default_value_t = Limits::default().offline_grace.as_secs())]
    offline_grace: u64,
    /// Seconds shutdown waits for in-flight connections to finish.
    #[arg(long, default_value_t = Limits::default().drain_timeout.as_secs())]
    drain_timeout: u64,
    /// Seconds each call to the control plane may take (connecting included).
    #[arg(long, default_value_t = Limits::default().control_call_timeout.as_secs())]
    control_call_timeout: u64,
    /// Seconds an admin client may take to send its request head.
    #[arg(long, default_value_t = Limits::default().admin_header_timeout.as_secs())]
    admin_header_timeout: u64,
}

/// Exit code for a configuration that cannot work (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    // Log lines go out from a thread of their own (`burrow_edge::logs`): a stalled reader of
    // standard output must not stall the threads that serve visitors.
    let queue = match burrow_edge::logs::queue_lines_from_env() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let (lines, _flush) = burrow_edge::logs::to(burrow_edge::logs::Output::Stdout, queue);
    tracing_subscriber::fmt()
        .with_writer(lines)
        .with_timer(burrow_edge::logs::Timestamps)
        // Colour only on a terminal, and not with NO_COLOR set (https://no-color.org): a log
        // piped to a file or a collector gets plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // With worker threads of their own, the runtime here only accepts connections and talks to
    // the control plane: one thread is enough.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.limits.worker_threads > 0 {
        builder.worker_threads(1);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(serve(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn read_secret(path: &PathBuf) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let s = s.trim().to_owned();
    anyhow::ensure!(!s.is_empty(), "{} is empty", path.display());
    Ok(s)
}

fn build_config(args: &Args) -> anyhow::Result<Config> {
    let control = match (&args.control, &args.standalone_token_file) {
        (Some(url), None) => {
            let token = match (&args.edge_token, &args.edge_token_file) {
                (_, Some(f)) => read_secret(f)?,
                (Some(_), None) if std::env::var_os("BURROW_EDGE_TOKEN").is_none() => {
                    anyhow::bail!(
                        "--edge-token would expose the token to every local user in the process \
                         list: use BURROW_EDGE_TOKEN or --edge-token-file instead"
                    )
                }
                (Some(t), None) => t.clone(),
                (None, None) => anyhow::bail!(
                    "--control needs an edge token: set BURROW_EDGE_TOKEN or --edge-token-file"
                ),
            };
            let ca_pem = match &args.control_ca {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
                ),
                None => None,
            };
            ControlConfig::Remote {
                url: url.clone(),
                edge_token: token.into(),
                ca_pem,
            }
        }
        (None, Some(f)) => ControlConfig::Standalone {
            agent_tokens: vec![read_secret(f)?.into()],
        },
        _ => anyhow::bail!("give either --control URL or --standalone-token-file FILE"),
    };
    let generated = if args.self_signed {
        let id = TlsIdentity::self_signed(&burrow_edge::tls::self_signed_names(&args.domain))?;
        if let Some(out) = &args.self_signed_out {
            std::fs::write(out, &id.cert_pem)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
        }
        Some(id)
    } else {
        None
    };
    let visitor_tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(TlsIdentity::from_files(c, k)?),
        _ => generated.clone(),
    };
    let agent_tls = match (&args.agent_cert, &args.agent_key) {
        (Some(c), Some(k)) => TlsIdentity::from_files(c, k)?,
        _ => match visitor_tls.clone().or(generated) {
            Some(id) => id,
            // Unused in plaintext mode; keeps the type simple.
            None if args.agent_plaintext => TlsIdentity::self_signed(&["localhost".to_owned()])?,
            None => anyhow::bail!(
                "the agent listener needs a certificate: --agent-cert/--agent-key, --tls-cert/--tls-key or --self-signed"
            ),
        },
    };
    Ok(Config {
        name: args.name.clone(),
        domain: args.domain.clone(),
        public_url_template: args.public_url.clone(),
        agent_addr: args.agent_addr.clone(),
        control,
        agent_tls,
        agent_plaintext: args.agent_plaintext,
        visitor_tls,
        limits: limits(args),
    })
}

/// Every limit and timeout, from the flags.
fn limits(args: &Args) -> Limits {
    Limits {
        ws_ping_interval: (args.ws_ping_interval > 0)
            .then(|| Duration::from_secs(args.ws_ping_interval)),
        ws_idle_timeout: (args.ws_idle_timeout > 0)
            .then(|| Duration::from_secs(args.ws_idle_timeout)),
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        ws_rate_limit_grace: Duration::from_secs(args.ws_rate_limit_grace),
        default_max_websockets_per_tunnel: args.default_max_websockets_per_tunnel,
        default_max_requests_per_second_per_tunnel: args.default_max_requests_per_second_per_tunnel,
        default_max_websocket_bytes_per_second: args.default_max_websocket_bytes_per_second,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        max_visitor_connections: args.max_visitor_connections,
        agent_keepalive_interval: Duration::from_secs(args.agent_keepalive),
        h2_stream_window: args.h2_stream_window,
        h2_connection_window: args.h2_connection_window,
        admin_max_connections: args.admin_max_connections,
        basic_auth_cache_ttl: Duration::from_secs(args.basic_auth_cache_ttl),
        basic_auth_cache_entries: args.basic_auth_cache_entries,
        basic_auth_max_concurrent_verifications: args.basic_auth_max_concurrent_verifications,
        basic_auth_max_hash_memory_kib: args.basic_auth_max_hash_memory_kib,
        basic_auth_max_hash_passes: args.basic_auth_max_hash_passes,
        policy_max_rules: args.policy_max_rules,
        worker_threads: args.worker_threads,
        max_agent_connections: args.max_agent_connections,
        max_agent_lanes: args.max_agent_lanes,
        max_tunnels_per_agent: args.max_tunnels_per_agent,
        agent_handshake_timeout: Duration::from_secs(args.agent_handshake_timeout),
        takeover_probe_timeout: Duration::from_millis(args.takeover_probe_timeout_ms),
        upstream_response_timeout: Duration::from_secs(args.upstream_response_timeout),
        h2_max_frame_size: args.h2_max_frame_size,
        agent_max_header_list_bytes: args.agent_max_header_list_bytes,
        relay_buffer_bytes: args.relay_buffer_bytes,
        relay_yield_bytes: args.relay_yield_bytes,
        stall_buffer_bytes: args.stall_buffer_bytes,
        stopped_reader_grace: Duration::from_millis(args.stopped_reader_grace_ms),
        ws_close_timeout: Duration::from_secs(args.ws_close_timeout),
        authorization_cache_ttl: Duration::from_secs(args.authorization_cache_ttl),
        authorization_cache_entries: args.authorization_cache_entries,
        offline_grace: Duration::from_secs(args.offline_grace),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        control_call_timeout: Duration::from_secs(args.control_call_timeout),
        admin_header_timeout: Duration::from_secs(args.admin_header_timeout),
    }
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for {what} on {addr}: {e}"))
}

async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    let http = if args.http == "off" {
        None
    } else {
        Some(bind(&args.http, "visitors").await?)
    };
    let https = match &args.https {
        Some(a) => Some(bind(a, "HTTPS visitors").await?),
        None => None,
    };
    let agent = bind(&args.agent_listen, "agents").await?;
    let admin = if args.admin_addr == "off" {
        None
    } else {
        Some(bind(&args.admin_addr, "the admin endpoints (/metrics)").await?)
    };
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        s.cancel();
    });
    let listeners = Listeners {
        http,
        https,
        agent,
        admin,
    };
    burrow_edge::run(config, listeners, shutdown).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn limits_from(flags: &[&str]) -> Limits {
        limits(&Args::try_parse_from(["burrow-edge"].iter().chain(flags)).unwrap())
    }

    #[test]
    fn the_flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn without_flags_every_limit_keeps_its_default() {
        assert_eq!(
            format!("{:?}", limits_from(&[])),
            format!("{:?}", Limits::default())
        );
    }

    #[test]
    fn each_limit_flag_reaches_the_limits() {
        let l = limits_from(&[
            "--max-agent-connections=7",
            "--max-tunnels-per-agent=8",
            "--max-agent-lanes=3",
            "--worker-threads=5",
            "--agent-handshake-timeout=9",
            "--upstream-response-timeout=10",
            "--h2-max-frame-size=32768",
            "--agent-max-header-list-bytes=65536",
            "--relay-buffer-bytes=11",
            "--ws-close-timeout=12",
            "--authorization-cache-ttl=13",
            "--authorization-cache-entries=14",
            "--offline-grace=15",
            "--drain-timeout=16",
            "--control-call-timeout=17",
            "--admin-header-timeout=18",
            "--stall-buffer-bytes=19",
            "--stopped-reader-grace-ms=20",
            "--relay-yield-bytes=21",
            "--takeover-probe-timeout-ms=22",
        ]);
        let secs = Duration::from_secs;
        assert_eq!(l.max_agent_connections, 7);
        assert_eq!(l.max_tunnels_per_agent, 8);
        assert_eq!(l.max_agent_lanes, 3);
        assert_eq!(l.worker_threads, 5);
        assert_eq!(l.agent_handshake_timeout, secs(9));
        assert_eq!(l.upstream_response_timeout, secs(10));
        assert_eq!(l.h2_max_frame_size, 32_768);
        assert_eq!(l.agent_max_header_list_bytes, 65_536);
        assert_eq!(l.relay_buffer_bytes, 11);
        assert_eq!(l.relay_yield_bytes, 21);
        assert_eq!(l.ws_close_timeout, secs(12));
        assert_eq!(l.authorization_cache_ttl, secs(13));
        assert_eq!(l.authorization_cache_entries, 14);
        assert_eq!(l.offline_grace, secs(15));
        assert_eq!(l.drain_timeout, secs(16));
        assert_eq!(l.control_call_timeout, secs(17));
        assert_eq!(l.admin_header_timeout, secs(18));
        assert_eq!(l.stall_buffer_bytes, 19);
        assert_eq!(l.stopped_reader_grace, Duration::from_millis(20));
        assert_eq!(l.takeover_probe_timeout, Duration::from_millis(22));
    }
}
