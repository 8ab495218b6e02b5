//! One agent process's connection to its edge: dial, TLS, handshake, serve HTTP/2, and
//! reconnect with exponential backoff and jitter when the edge goes away.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use burrow_proto::tunnel::{
    read_message, write_message, ALPN, CONTROL_KEEPALIVE, HEADER_CONTROL, HEADER_KEEPALIVE_MS,
    PROTOCOL_VERSION,
};
use burrow_proto::v1 as pb;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use burrow_edge::relay::LinkBudget;

use super::dial::Dialer;
use super::forward::{local_client, Forwarder, TunnelSpec, LOCAL_CONNECT_TIMEOUT};

/// How long dialing the edge (TCP + TLS) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest reconnect delay; small so a tunnel is back within about a second of the edge
/// returning.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While the edge stays unreachable with the same error, how often the agent says so again
/// (a new error is said at once).
const RETRY_REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// Default HTTP/2 per-stream window, in bytes (`--h2-stream-window`). Small enough that a
/// bulk stream keeps little data queued ahead of other streams in the shared connection's
/// socket buffers (head-of-line delay), large enough for full speed on loopback and LAN.
pub(crate) const DEFAULT_STREAM_WINDOW: u32 = 512 * 1024;
/// Default HTTP/2 connection window (`--h2-connection-window`), in bytes.
pub(crate) const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// HTTP/2 largest frame payload, in bytes.
pub(crate) const MAX_FRAME: u32 = 65_536;
/// Largest request head the edge may send (HTTP/2 header list size), in bytes. The edge
/// itself caps visitors' request heads far lower (16 KiB by default).
const MAX_HEADER_LIST: u32 = 1024 * 1024;
/// Most concurrent streams (visitor requests) the edge may open.
const MAX_STREAMS: u32 = 100_000;
/// How long past twice the interval an edge announces with its keepalives the agent waits for
/// the next one before it drops the connection (`watch_keepalives`).
const KEEPALIVE_SLACK: Duration = Duration::from_secs(1);
/// Longest keepalive interval an edge may announce; a larger value counts as this (so the
/// deadline arithmetic cannot overflow, whatever the header says).
const KEEPALIVE_MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Default number of connections to the edge (`--lanes`). The edge gives each new visitor
/// stream the lane with the fewest streams open, so with four a new visitor almost always
/// finds a lane without a bulk transfer in it (with two, measured in BENCHMARKS.md, it shared
/// one about half the time: a stream's load is unknown when it opens).
pub(crate) const DEFAULT_LANES: u32 = 4;
/// Default of `--lane-retry-secs`: how long an agent waits before asking again for a lane the
/// edge had no room for.
pub(crate) const DEFAULT_LANE_RETRY_SECS: u64 = 30;

/// Where and how to reach the edge.
#[derive(Debug, Clone)]
pub(crate) struct EdgeSpec {
    /// `host:port` of the edge's agent listener.
    pub(crate) addr: String,
    /// Extra CA certificate (PEM) to trust, for self-signed edges.
    pub(crate) ca: Option<PathBuf>,
    /// Skip certificate verification (allowed only for an edge on this machine).
    pub(crate) insecure: bool,
    /// Plain TCP, no TLS (benchmarks; allowed only for an edge on this machine).
    pub(crate) plaintext: bool,
    /// HTTP/2 window of each stream the edge opens (`--h2-stream-window`).
    pub(crate) stream_window: u32,
    /// HTTP/2 window of the whole connection (`--h2-connection-window`).
    pub(crate) connection_window: u32,
    /// Backlog of a WebSocket whose local server stopped reading (`--stall-buffer-bytes`).
    pub(crate) stall_buffer: usize,
    /// Bytes a relay direction moves with data always ready before it yields
    /// (`--relay-yield-bytes`).
    pub(crate) relay_yield: usize,
    /// How long a local server may take nothing with its backlog full before it counts as
    /// stopped (`--stopped-reader-grace-ms`).
    pub(crate) stopped_reader_grace: std::time::Duration,
    /// Connections to open, the first included, when the edge allows as many (`--lanes`).
    pub(crate) lanes: u32,
    /// Pause before asking again for a lane the edge had no room for (`--lane-retry-secs`).
    pub(crate) lane_retry: Duration,
    /// Threads the lanes are spread over, the runtime's own included (`--worker-threads`;
    /// 0: every lane on the runtime's shared pool).
    pub(crate) worker_threads: usize,
    /// TLS toward `https://` targets (`--local-ca`, `--local-insecure`); none without such a
    /// target.
    pub(crate) local_tls: Option<super::dial::LocalTls>,
    /// Standard output carries JSON lines (`--log-format json`): the lines saying the
    /// tunnels are live are JSON objects too.
    pub(crate) json_lines: bool,
}

/// Where [`say`] writes.
#[derive(Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// The queued writers of standard output and error (`burrow_edge::logs`), once the agent has
/// set them up.
static OUTPUT: std::sync::OnceLock<(burrow_edge::logs::Lines, burrow_edge::logs::Lines)> =
    std::sync::OnceLock::new();

/// Makes [`say`] queue its lines on these writers (standard output, standard error).
pub(crate) fn set_output(stdout: burrow_edge::logs::Lines, stderr: burrow_edge::logs::Lines) {
    let _ = OUTPUT.set((stdout, stderr));
}

/// Writes `text` (whole lines) to standard output or error through the queue a thread of its
/// own writes out: these lines come from threads that serve tunnels, and an output nobody
/// reads (a full pipe, a terminal paused with Ctrl-S) must not block them.
pub(crate) fn say(stream: Stream, text: &str) {
    use tracing_subscriber::fmt::MakeWriter as _;
    let Some((out, err)) = OUTPUT.get() else {
        let _ = match stream {
            Stream::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
            Stream::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
        };
        return;
    };
    let lines = match stream {
        Stream::Stdout => out,
        Stream::Stderr => err,
    };
    let _ = lines.make_writer().write_all(text.as_bytes());
}

/// The agent's worker threads beyond the runtime's own, started with the first extra lane.
static LANE_THREADS: std::sync::OnceLock<Option<burrow_edge::shards::Shards>> =
    std::sync::OnceLock::new();

/// Runs lane `i`'s task on thread `i mod threads`, where 0 is the runtime the first connection
/// runs on: each lane, and every stream it carries, stays on one thread. The edge hands the
/// agent connections it accepts to its own threads in turn, so lanes opened in order land on
/// its threads in the same rotation, and a visitor stream, which prefers a lane on its own edge
/// thread, then tends to meet the same agent thread as the other streams of that edge thread.
fn spawn_lane<F>(threads: usize, i: usize, lane: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let slot = i % threads.max(1);
    let extra = LANE_THREADS.get_or_init(|| {
        let n = threads.saturating_sub(1);
        if n == 0 {
            return None;
        }
        burrow_edge::shards::Shards::start(n, "burrow")
            .map_err(|e| tracing::warn!(err = %e, "cannot start worker threads; lanes share one"))
            .ok()
    });
    match extra {
        Some(threads) if slot > 0 => {
            threads.handle(slot - 1).spawn(lane);
        }
        _ => {
            tokio::spawn(lane);
        }
    }
}

/// The byte stream to the edge: TLS, or plain TCP in `--edge-plaintext` mode.
trait EdgeIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> EdgeIo for T {}

/// Accepts any certificate but still checks the handshake signatures: `--insecure` (only ever
/// for an edge on a loopback address, where there is no network to attack) and
/// `--local-insecure` (a local server's self-signed certificate).
#[derive(Debug)]
pub(crate) struct AnyCertificate(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether `addr` (`host:port`) names this machine.
fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a connection attempt failed.
enum Failure {
    /// Retrying cannot help (bad token, name refused, …).
    Fatal(anyhow::Error),
    /// Worth another try after a pause.
    Retry(anyhow::Error),
}

fn tls_connector(edge: &EdgeSpec) -> anyhow::Result<TlsConnector> {
    if edge.insecure {
        return insecure_connector(edge);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &edge.ca {
        Some(path) => super::dial::add_pem_certs(&mut roots, path, "--edge-ca")?,
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "no trusted CA certificates found on this system; give --edge-ca FILE"
            );
        }
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(burrow_edge::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A connector that skips certificate verification, for an edge on this machine only.
fn insecure_connector(edge: &EdgeSpec) -> anyhow::Result<TlsConnector> {
    let provider = burrow_edge::tls::crypto_provider();
    anyhow::ensure!(
            is_loopback(&edge.addr),
            "--insecure is only allowed for an edge on this machine (localhost, 127.0.0.1, ::1); give --edge-ca FILE for {}",
            edge.addr
        );
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

fn server_name(addr: &str) -> anyhow::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|_| anyhow::anyhow!("{host:?} is not a valid edge host name"))
}

/// Runs the tunnels until `shutdown` or a fatal error.
pub(crate) async fn run(
    edge: EdgeSpec,
    token: String,
    tunnels: Vec<TunnelSpec>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let connector = if edge.plaintext {
        anyhow::ensure!(
            is_loopback(&edge.addr),
            "--edge-plaintext is only allowed for an edge on this machine (localhost, 127.0.0.1, ::1)"
        );
        None
    } else {
        Some(tls_connector(&edge)?)
    };
    let name = server_name(&edge.addr)?;
    let instance = {
        let b: [u8; 16] = rand::random();
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    };
    // Tunnels the edge ended for good are removed from this list and never bound again.
    let live: Arc<Mutex<Vec<TunnelSpec>>> = Arc::new(Mutex::new(tunnels));
    let mut delay = BACKOFF_START;
    let mut attempt_ok_once = false;
    let mut failures = RetryReport::default();
    loop {
        let specs = live.lock().map(|l| l.clone()).unwrap_or_default();
        if specs.is_empty() {
            anyhow::bail!("every tunnel was ended by the edge");
        }
        let outcome = connect_once(
            &edge,
            connector.as_ref(),
            &name,
            &token,
            &instance,
            specs,
            Arc::clone(&live),
            &shutdown,
            attempt_ok_once,
        )
        .await;
        if outcome.is_ok() {
            failures = RetryReport::default();
        }
        match outcome {
            Ok(served) => {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                if served {
                    attempt_ok_once = true;
                    delay = BACKOFF_START;
                }
                crate::inspect::recorder().set_reconnecting();
                say(
                    Stream::Stderr,
                    "connection to the edge lost; reconnecting\n",
                );
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                let error = format!("{e:#}");
                crate::inspect::recorder().set_edge_error(&edge.addr, &error);
                let said = failures.failed(&edge.addr, &error, Instant::now());
                if let Some(line) = said {
                    say(Stream::Stderr, &format!("{line}\n"));
                }
            }
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.5;
        let pause = delay.mul_f64(jitter);
        delay = (delay * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// What the agent has said about failed attempts to reach the edge since it last reached it:
/// the first failure and every new error are said at once; the same error again only every
/// [`RETRY_REPORT_INTERVAL`], with the count, so an edge that is down for an hour costs a line
/// every half minute rather than one per attempt.
#[derive(Debug, Default)]
struct RetryReport {
    /// Failed attempts in a row.
    attempts: u64,
    /// When the first of them failed.
    since: Option<Instant>,
    /// The last error said, and when.
    said: Option<(String, Instant)>,
}

impl RetryReport {
    /// Counts a failed attempt; returns the line to print, if one is due.
    fn failed(&mut self, edge: &str, error: &str, now: Instant) -> Option<String> {
        self.attempts += 1;
        let since = *self.since.get_or_insert(now);
        let line = match &self.said {
            Some((last, at)) if last == error => {
                if now.saturating_duration_since(*at) < RETRY_REPORT_INTERVAL {
                    return None;
                }
                format!(
                    "still cannot reach the edge at {edge} after {} attempts in {} s: {error}; retrying",
                    self.attempts,
                    now.saturating_duration_since(since).as_secs()
                )
            }
            _ => format!("cannot reach the edge at {edge}: {error}; retrying"),
        };
        self.said = Some((error.to_owned(), now));
        Some(line)
    }
}

/// One connection: returns `Ok(true)` when tunnels were served and then the connection ended.
#[allow(clippy::too_many_arguments)]
async fn connect_once(
    edge: &EdgeSpec,
    connector: Option<&TlsConnector>,
    name: &ServerName<'static>,
    token: &str,
    instance: &str,
    specs: Vec<TunnelSpec>,
    live: Arc<Mutex<Vec<TunnelSpec>>>,
    shutdown: &CancellationToken,
    reconnecting: bool,
) -> Result<bool, Failure> {
    let mut tls = dial(edge, connector, name).await?;
    let hello = pb::AgentHello {
        protocol_version: PROTOCOL_VERSION,
        token: token.to_owned(),
        tunnels: specs
            .iter()
            .map(|s| pb::TunnelRequest {
                subdomain: s.subdomain.clone(),
                local_addr: s.target.to_string(),
                key: s.key.clone(),
                policy: s.policy.clone(),
            })
            .collect(),
        agent_instance: instance.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        lane_key: String::new(),
    };
    write_message(&mut tls, &hello)
        .await
        .map_err(|e| Failure::Retry(e.into()))?;
    let answer: pb::EdgeHello = read_message(&mut tls)
        .await
        .map_err(|e| Failure::Retry(e.into()))?;
    if !answer.error.is_empty() {
        let err = anyhow::anyhow!("the edge refused the tunnel: {}", answer.error);
        return Err(match answer.error_code.as_str() {
            "UNAVAILABLE" | "INTERNAL" => Failure::Retry(err),
            // Someone may still hold the name in a grace period after our own reconnect.
            "ALREADY_EXISTS" if reconnecting => Failure::Retry(err),
            _ => Failure::Fatal(err),
        });
    }

    let mut urls = HashMap::new();
    let mut pinned = Vec::new();
    for b in &answer.tunnels {
        let local = specs
            .iter()
            .find(|s| s.key == b.key)
            .map(|s| s.target.to_string())
            .unwrap_or_default();
        urls.insert(b.key.clone(), (local, b.public_urls.clone()));
        if b.pinned_policy {
            pinned.push(b.subdomain.clone());
        }
    }
    let printed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let conn_cancel = shutdown.child_token();
    let ready_urls = urls;
    let printed2 = Arc::clone(&printed);
    // Set once the edge says the tunnels are routable: by then it knows the session, so
    // extra lanes can join it.
    let (routable_tx, mut routable_rx) = tokio::sync::watch::channel(false);
    let team = answer.team.clone();
    let edge_addr = edge.addr.clone();
    let json_lines = edge.json_lines;
    let closed_cancel = conn_cancel.clone();
    let dialer = Arc::new(Dialer::new(LOCAL_CONNECT_TIMEOUT, edge.local_tls.clone()));
    let forwarder = Arc::new(Forwarder {
        tunnels: specs
            .iter()
            .map(|s| (s.key.clone(), Arc::new(s.clone())))
            .collect(),
        client: local_client(Arc::clone(&dialer)),
        dialer,
        stall_buffer: edge.stall_buffer,
        relay_yield: edge.relay_yield,
        stop: shutdown.clone(),
        on_ready: Box::new(move || {
            if printed2.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let _ = routable_tx.send(true);
            let forwards = ready_urls.values();
            let forwards = forwards.flat_map(|(l, p)| p.iter().map(|u| (u.clone(), l.clone())));
            crate::inspect::recorder().set_online(&edge_addr, &team, forwards.collect());
            use std::fmt::Write as _;
            let mut out = String::new();
            let mut keys: Vec<_> = ready_urls.keys().collect();
            keys.sort();
            for k in keys {
                let (local, public) = &ready_urls[k];
                for u in public {
                    let _ = if json_lines {
                        let line =
                            serde_json::json!({ "event": "forwarding", "url": u, "local": local });
                        writeln!(out, "{line}")
                    } else {
                        writeln!(out, "Forwarding {u} -> {local}")
                    };
                }
            }
            for sub in &pinned {
                let _ = if json_lines {
                    let line = serde_json::json!({ "event": "pinned_policy", "subdomain": sub });
                    writeln!(out, "{line}")
                } else {
                    writeln!(
                        out,
                        "Policy pinned on the reservation of {sub} applies too (set by a team admin; visitors must pass it and this tunnel's own rules)"
                    )
                };
            }
            if json_lines {
                let line =
                    serde_json::json!({ "event": "online", "team": team, "edge": edge_addr });
                let _ = writeln!(out, "{line}");
            } else if !team.is_empty() {
                let _ = writeln!(out, "Team {team}; press Ctrl-C to stop");
            }
            say(Stream::Stdout, &out);
        }),
        on_closed: Box::new(move |key, reason| {
            say(
                Stream::Stderr,
                &format!("tunnel ended by the edge: {reason}\n"),
            );
            if let Ok(mut l) = live.lock() {
                l.retain(|s| s.key != key);
                if l.is_empty() {
                    closed_cancel.cancel();
                }
            }
        }),
    });

    let done_rx = serve(tls, edge, Arc::clone(&forwarder), conn_cancel.clone());
    // Extra lanes live as long as this connection.
    let lanes_cancel = conn_cancel.child_token();
    let wanted = edge.lanes.min(answer.lanes).max(1);
    if wanted > 1 && !answer.lane_key.is_empty() {
        let (edge, connector, name) = (edge.clone(), connector.cloned(), name.clone());
        let (instance, key) = (instance.to_owned(), answer.lane_key.clone());
        let (forwarder, cancel) = (Arc::clone(&forwarder), lanes_cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = routable_rx.wait_for(|r| *r) => if r.is_err() { return },
            }
            // One after another, so the edge accepts them in this order (see `spawn_lane`).
            for i in 1..wanted {
                let (answered, first_answer) = tokio::sync::oneshot::channel();
                spawn_lane(
                    edge.worker_threads,
                    i as usize,
                    keep_lane(
                        edge.clone(),
                        (connector.clone(), name.clone()),
                        instance.clone(),
                        key.clone(),
                        Arc::clone(&forwarder),
                        cancel.clone(),
                        answered,
                    ),
                );
                let _ = tokio::time::timeout(DIAL_TIMEOUT, first_answer).await;
            }
        });
    }
    let _lanes_end = lanes_cancel.drop_guard();
    let result = done_rx.await;
    let served = printed.load(std::sync::atomic::Ordering::SeqCst);
    if conn_cancel.is_cancelled() && !shutdown.is_cancelled() {
        return Err(Failure::Fatal(anyhow::anyhow!(
            "every tunnel was ended by the edge"
        )));
    }
    if let Ok(Err(e)) = result {
        // Says why before "connection to the edge lost" (an h2 GOAWAY names its reason).
        tracing::warn!(err = %e, "the connection to the edge ended with an error");
    }
    Ok(served)
}

/// Dials the edge's agent listener: TCP, then TLS unless `connector` is `None`.
async fn dial(
    edge: &EdgeSpec,
    connector: Option<&TlsConnector>,
    name: &ServerName<'static>,
) -> Result<Box<dyn EdgeIo>, Failure> {
    let dial = async {
        let tcp = TcpStream::connect(&edge.addr)
            .await
            .with_context(|| format!("cannot connect to {}", edge.addr))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn EdgeIo> = match connector {
            Some(c) => Box::new(
                c.connect(name.clone(), burrow_edge::tls::buffered(tcp))
                    .await
                    .context("TLS handshake with the edge failed")?,
            ),
            None => Box::new(tcp),
        };
        Ok::<_, anyhow::Error>(io)
    };
    match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
        Err(_) => Err(Failure::Retry(anyhow::anyhow!("timed out"))),
        Ok(Err(e)) => {
            let cert_problem = e.chain().any(|c| c.to_string().contains("certificate"));
            Err(if cert_problem {
                Failure::Fatal(e.context(
                    "the edge's certificate is not trusted (self-signed edges need --edge-ca FILE)",
                ))
            } else {
                Failure::Retry(e)
            })
        }
        Ok(Ok(t)) => Ok(t),
    }
}

/// Serves HTTP/2 (the agent as server) on a connection whose hellos are done, on its own task
/// (driving it inline would slow every round trip); the receiver says how it ended. An edge
/// whose keepalives stop is dropped (`watch_keepalives`).
fn serve(
    io: Box<dyn EdgeIo>,
    edge: &EdgeSpec,
    forwarder: Arc<Forwarder>,
    cancel: CancellationToken,
) -> tokio::sync::oneshot::Receiver<anyhow::Result<()>> {
    let mut builder = hyper::server::conn::http2::Builder::new(burrow_edge::exec::Executor);
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .initial_stream_window_size(edge.stream_window)
        .initial_connection_window_size(edge.connection_window)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buf_size(edge.stream_window as usize);
    // What this connection's relays may leave waiting in h2 as small frames.
    let small_frames = LinkBudget::new(
        edge.connection_window,
        edge.stream_window,
        edge.stopped_reader_grace,
    );
    let keepalives = Arc::new(Keepalives::default());
    let seen = Arc::clone(&keepalives);
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        if req.headers().get(HEADER_CONTROL).map(|v| v.as_bytes())
            == Some(CONTROL_KEEPALIVE.as_bytes())
        {
            seen.arrived(req.headers().get(HEADER_KEEPALIVE_MS));
        }
        let fw = Arc::clone(&forwarder);
        let budget = Arc::clone(&small_frames);
        async move { Ok::<_, std::convert::Infallible>(fw.handle(req, budget).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // Cancelled by `cancel`, or by the keepalive watch alone when the edge goes silent: one
    // token, so the connection's task watches one (it is polled whenever the connection is).
    let stop = cancel.child_token();
    let ended = CancellationToken::new();
    tokio::spawn(watch_keepalives(keepalives, stop.clone(), ended.clone()));
    tokio::spawn(async move {
        let _ended = ended.drop_guard();
        tokio::pin!(conn);
        let r = tokio::select! {
            r = conn.as_mut() => r.map_err(anyhow::Error::from),
            () = burrow_edge::gate::Cancelled::new(&stop) => {
                if cancel.is_cancelled() {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await {
                        Ok(r) => r.map_err(anyhow::Error::from),
                        Err(_) => Ok(()),
                    }
                } else {
                    Err(anyhow::anyhow!(
                        "the edge's keepalives stopped (nothing for twice its interval)"
                    ))
                }
            }
        };
        let _ = done_tx.send(r);
    });
    done_rx
}

/// The edge's keepalives on one connection, as the agent saw them.
#[derive(Default)]
struct Keepalives {
    /// When the last one came and the interval it announced; `None` until the first (an edge
    /// that sends none is not watched).
    last: Mutex<Option<(tokio::time::Instant, Duration)>>,
}

impl Keepalives {
    /// Notes a keepalive with its `burrow-keepalive-ms` header (ignored when unreadable).
    fn arrived(&self, interval_ms: Option<&http::HeaderValue>) {
        let interval = interval_ms
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms).min(KEEPALIVE_MAX_INTERVAL));
        if let (Some(interval), Ok(mut last)) = (interval, self.last.lock()) {
            *last = Some((tokio::time::Instant::now(), interval));
        }
    }

    /// When the connection counts as dead if no keepalive came meanwhile.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        let last = *self.last.lock().ok()?;
        last.map(|(at, interval)| at + interval * 2 + KEEPALIVE_SLACK)
    }
}

/// Cancels `silent` once the edge's keepalives stop: no keepalive for twice the interval the
/// last one announced, plus [`KEEPALIVE_SLACK`]. A frozen edge, or a connection that died
/// without a reset, is then left within seconds instead of when TCP gives up. Ends with the
/// connection (`ended`).
async fn watch_keepalives(
    seen: Arc<Keepalives>,
    silent: CancellationToken,
    ended: CancellationToken,
) {
    // How often to look while the edge has sent no keepalive yet.
    const UNWATCHED_POLL: Duration = Duration::from_secs(5);
    loop {
        let wake = seen
            .deadline()
            .unwrap_or_else(|| tokio::time::Instant::now() + UNWATCHED_POLL);
        tokio::select! {
            () = ended.cancelled() => return,
            () = tokio::time::sleep_until(wake) => {}
        }
        if seen
            .deadline()
            .is_some_and(|d| tokio::time::Instant::now() >= d)
        {
            tracing::warn!(
                "no keepalive from the edge for twice its interval; dropping the connection"
            );
            silent.cancel();
            return;
        }
    }
}

/// Keeps one extra lane to the edge open until `cancel` (the first connection ended or the
/// agent stops), opening it again with backoff when it drops. `via` is the TLS connector
/// (`None`: plain TCP) and the edge's name to verify.
async fn keep_lane(
    edge: EdgeSpec,
    via: (Option<TlsConnector>, ServerName<'static>),
    instance: String,
    lane_key: String,
    forwarder: Arc<Forwarder>,
    cancel: CancellationToken,
    answered: tokio::sync::oneshot::Sender<()>,
) {
    // Dropped at the first answer of the edge, or when this task ends before one.
    let mut answered = Some(answered);
    let (connector, name) = via;
    let mut delay = BACKOFF_START;
    while !cancel.is_cancelled() {
        let attempt = async {
            let mut io = dial(&edge, connector.as_ref(), &name)
                .await
                .map_err(|f| match f {
                    Failure::Fatal(e) | Failure::Retry(e) => e,
                })?;
            let hello = pb::AgentHello {
                protocol_version: PROTOCOL_VERSION,
                agent_instance: instance.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                lane_key: lane_key.clone(),
                ..Default::default()
            };
            write_message(&mut io, &hello).await?;
            let answer: pb::EdgeHello = read_message(&mut io).await?;
            Ok::<_, anyhow::Error>((io, answer))
        };
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            r = attempt => r,
        };
        answered.take();
        match outcome {
            Ok((_, answer)) if answer.error_code == "RESOURCE_EXHAUSTED" => {
                // The session is at the edge's lane limit or the edge near its connection
                // limit: ask again later, when room may have freed up.
                tracing::debug!(err = %answer.error, "the edge has no room for an extra lane now");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(edge.lane_retry) => continue,
                }
            }
            Ok((_, answer)) if !answer.error.is_empty() => {
                // The session is gone: the first connection's own loop reconnects.
                tracing::debug!(err = %answer.error, "the edge refused an extra lane");
                return;
            }
            Ok((io, _)) => {
                delay = BACKOFF_START;
                let done = serve(io, &edge, Arc::clone(&forwarder), cancel.clone());
                if let Ok(Err(e)) = done.await {
                    tracing::debug!(err = %e, "a lane to the edge ended with an error");
                }
            }
            Err(e) => tracing::debug!(err = %format!("{e:#}"), "cannot open a lane to the edge"),
        }
        let pause = delay.mul_f64(rand::random::<f64>() * 0.5 + 0.5);
        delay = (delay * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_edge_is_said_once_then_every_interval_and_a_new_error_at_once() {
        let refused = "cannot connect to 127.0.0.1:1: Connection refused";
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = RetryReport::default();
        let first = r.failed("127.0.0.1:1", refused, at(0));
        assert_eq!(
            first.as_deref(),
            Some("cannot reach the edge at 127.0.0.1:1: cannot connect to 127.0.0.1:1: Connection refused; retrying")
        );
        // One attempt a second for just under the interval: nothing more is said.
        for s in 1..30 {
            assert_eq!(r.failed("127.0.0.1:1", refused, at(s * 1000 - 1)), None);
        }
        let again = r
            .failed("127.0.0.1:1", refused, at(30_000))
            .unwrap_or_default();
        assert!(
            again.starts_with("still cannot reach the edge at 127.0.0.1:1 after 31 attempts in 30 s: cannot connect"),
            "{again}"
        );
        assert_eq!(r.failed("127.0.0.1:1", refused, at(31_000)), None);
        // Another error is news.
        let other = r.failed("127.0.0.1:1", "TLS handshake failed", at(32_000));
        assert_eq!(
            other.as_deref(),
            Some("cannot reach the edge at 127.0.0.1:1: TLS handshake failed; retrying")
        );
        // After the edge was reached, the next failure is said at once again.
        let mut r = RetryReport::default();
        assert!(r.failed("e:1", refused, at(40_000)).is_some());
    }

    fn header(v: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(v).unwrap_or_else(|_| http::HeaderValue::from_static("x"))
    }

    #[tokio::test]
    async fn a_keepalive_sets_the_deadline_to_twice_its_interval_plus_the_slack() {
        let k = Keepalives::default();
        assert!(k.deadline().is_none(), "no keepalive yet: not watched");
        let before = tokio::time::Instant::now();
        k.arrived(Some(&header("300")));
        let d = k.deadline().map(|d| d.duration_since(before));
        assert!(
            d.is_some_and(|d| d >= Duration::from_millis(1600) && d < Duration::from_millis(1700)),
            "{d:?}"
        );
    }

    #[tokio::test]
    async fn unreadable_or_absurd_intervals_never_panic_or_arm_the_watch_wrongly() {
        let k = Keepalives::default();
        for bad in ["", "0", "-5", "ten", "1.5"] {
            k.arrived(Some(&header(bad)));
            assert!(k.deadline().is_none(), "{bad:?} armed the watch");
        }
        k.arrived(None);
        assert!(k.deadline().is_none());
        // The largest u64 is capped, not multiplied into an overflow.
        k.arrived(Some(&header(&u64::MAX.to_string())));
        let d = k
            .deadline()
            .map(|d| d.duration_since(tokio::time::Instant::now()));
        assert!(
            d.is_some_and(
                |d| d > KEEPALIVE_MAX_INTERVAL && d <= KEEPALIVE_MAX_INTERVAL * 2 + KEEPALIVE_SLACK
            ),
            "{d:?}"
        );
    }
}
