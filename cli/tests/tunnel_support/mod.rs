//! Shared helpers of the tunnel tests: an in-process edge on 127.0.0.1:0, the real `burrow`
//! agent binary, local servers, and a visitor that sends `Host: NAME.localhost:PORT`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use burrow_edge::{Config, ControlConfig, Limits, Listeners, TlsIdentity};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Name of every test edge (edge tokens are made for it).
pub const TEST_EDGE_NAME: &str = "test-edge";

/// Longest an agent may take to print its public URL.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running in-process edge.
pub struct Edge {
    pub http: SocketAddr,
    /// HTTPS visitor listener, when started with one.
    pub https: Option<SocketAddr>,
    pub agent: SocketAddr,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin: SocketAddr,
    /// PEM file of the edge's self-signed agent certificate, for `--edge-ca`.
    pub ca_file: PathBuf,
    /// Whether the agent listener speaks plain TCP (agents then connect with
    /// `--edge-plaintext`).
    pub agent_plaintext: bool,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub dir: Arc<tempfile::TempDir>,
}

impl Edge {
    /// Stops the edge and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A self-signed identity for `localhost`.
pub fn identity() -> TlsIdentity {
    TlsIdentity::self_signed(&["localhost".to_owned(), "*.localhost".to_owned()]).unwrap()
}

/// Starts an edge with `control`, binding fresh ports unless `agent_addr` is given (to
/// restart an edge on the same agent port).
pub async fn start_edge(
    control: ControlConfig,
    identity: TlsIdentity,
    agent_addr: Option<SocketAddr>,
    tweak: impl FnOnce(&mut Limits),
) -> Edge {
    start_edge_with(control, identity, agent_addr, false, tweak).await
}

/// Like [`start_edge`], optionally with an HTTPS visitor listener presenting `identity`.
pub async fn start_edge_with(
    control: ControlConfig,
    identity: TlsIdentity,
    agent_addr: Option<SocketAddr>,
    with_https: bool,
    tweak: impl FnOnce(&mut Limits),
) -> Edge {
    start_edge_full(control, identity, agent_addr, with_https, false, tweak).await
}

/// Like [`start_edge_with`], optionally with a plain-TCP agent listener (`agent_plaintext`);
/// [`spawn_agent`] then connects with `--edge-plaintext`.
pub async fn start_edge_full(
    control: ControlConfig,
    identity: TlsIdentity,
    agent_addr: Option<SocketAddr>,
    with_https: bool,
    agent_plaintext: bool,
    tweak: impl FnOnce(&mut Limits),
) -> Edge {
    let visitors: SocketAddr = "127.0.0.1:0".parse().unwrap();
    start_edge_on(
        control,
        identity,
        agent_addr,
        with_https,
        agent_plaintext,
        visitors,
        tweak,
    )
    .await
}

/// Like [`start_edge_full`], with the visitor listeners bound on `visitors` (e.g. `[::1]:0`
/// for IPv6 visitors).
pub async fn start_edge_on(
    control: ControlConfig,
    identity: TlsIdentity,
    agent_addr: Option<SocketAddr>,
    with_https: bool,
    agent_plaintext: bool,
    visitors: SocketAddr,
    tweak: impl FnOnce(&mut Limits),
) -> Edge {
    let https = if with_https {
        Some(TcpListener::bind(visitors).await.unwrap())
    } else {
        None
    };
    let https_addr = https.as_ref().map(|l| l.local_addr().unwrap());
    let http = TcpListener::bind(visitors).await.unwrap();
    let agent = TcpListener::bind(agent_addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let http_addr = http.local_addr().unwrap();
    let agent_addr = agent.local_addr().unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ca_file = dir.path().join("edge-ca.pem");
    std::fs::write(&ca_file, &identity.cert_pem).unwrap();
    // As `burrow-edge` runs on a two-CPU machine: connections on worker threads of their own.
    let mut limits = Limits {
        worker_threads: 2,
        ..Limits::default()
    };
    tweak(&mut limits);
    let config = Config {
        name: TEST_EDGE_NAME.into(),
        domain: "localhost".into(),
        public_url_template: None,
        agent_addr: None,
        control,
        agent_tls: identity.clone(),
        agent_plaintext,
        visitor_tls: with_https.then(|| identity.clone()),
        limits,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(burrow_edge::run(
        config,
        Listeners {
            http: Some(http),
            https,
            agent,
            admin: Some(admin),
        },
        shutdown.clone(),
    ));
    Edge {
        http: http_addr,
        https: https_addr,
        agent: agent_addr,
        admin: admin_addr,
        ca_file,
        agent_plaintext,
        shutdown,
        task,
        dir,
    }
}

/// Agent token used by standalone edges in tests.
pub const STANDALONE_TOKEN: &str = "brw_agent_test_standalone_secret";

/// An edge without a control plane that accepts [`STANDALONE_TOKEN`].
pub async fn standalone_edge() -> Edge {
    standalone_edge_with(|_| {}).await
}

/// Settings of an edge without a control plane that accepts [`STANDALONE_TOKEN`].
pub fn standalone_control() -> ControlConfig {
    ControlConfig::Standalone {
        agent_tokens: vec![STANDALONE_TOKEN.to_owned().into()],
    }
}

/// Like [`standalone_edge`], with `tweak` applied to the limits.
pub async fn standalone_edge_with(tweak: impl FnOnce(&mut Limits)) -> Edge {
    start_edge(standalone_control(), identity(), None, tweak).await
}

/// A standalone edge and an agent serving `sub` from the local server at `local`.
pub async fn standalone_tunnel(local: SocketAddr, sub: &str) -> (Edge, Agent) {
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", sub],
    )
    .await;
    (edge, agent)
}

/// A running `burrow` agent process.
pub struct Agent {
    pub child: Child,
    /// Public URLs printed so far.
    pub urls: Vec<String>,
    /// Lines the agent printed on stdout after the URLs.
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// Lines the agent printed on stderr.
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub ready_rx: tokio::sync::mpsc::Receiver<String>,
    _home: tempfile::TempDir,
}

impl Agent {
    /// The subdomain of the first public URL.
    pub fn subdomain(&self) -> String {
        let u = &self.urls[0];
        let host = u.split("://").nth(1).unwrap();
        host.split('.').next().unwrap().to_owned()
    }

    /// Waits for the next "Forwarding" line (after a reconnect).
    pub async fn next_ready(&mut self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(timeout, self.ready_rx.recv())
            .await
            .ok()
            .flatten()
    }

    pub async fn stderr_text(&self) -> String {
        self.stderr.lock().await.join("\n")
    }
}

/// Spawns `burrow <args>` with the token in `BURROW_TOKEN`, without waiting. Trusts the
/// edge's certificate (`--edge-ca`), or uses `--edge-plaintext` for a plain-TCP edge.
pub fn spawn_agent(edge: &Edge, token: &str, args: &[&str]) -> (Child, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow"));
    cmd.args(args)
        .arg("--edge")
        .arg(format!("localhost:{}", edge.agent.port()));
    if edge.agent_plaintext {
        cmd.arg("--edge-plaintext");
    } else {
        cmd.arg("--edge-ca").arg(&edge.ca_file);
    }
    let child = cmd
        .env("BURROW_TOKEN", token)
        .env("BURROW_CONFIG", home.path().join("config.toml"))
        // BURROW_TEST_AGENT_LOG sets the agents' log filter, e.g. `info,hyper_util=trace`.
        .env(
            "BURROW_LOG",
            std::env::var("BURROW_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, home)
}

/// Starts `burrow <args>` and waits until it prints its public URL(s), or fails with its
/// stderr.
/// The public URL in a line saying a tunnel is live: `Forwarding URL -> LOCAL`, or with
/// `--log-format json` `{"event":"forwarding","url":URL,…}`.
pub fn forwarding_url(line: &str) -> Option<String> {
    if let Some(rest) = line.strip_prefix("Forwarding ") {
        return Some(rest.split(' ').next().unwrap_or("").to_owned());
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["event"] == "forwarding").then(|| v["url"].as_str().unwrap_or("").to_owned())
}

pub async fn start_agent(edge: &Edge, token: &str, args: &[&str]) -> Agent {
    match try_start_agent(edge, token, args).await {
        Ok(a) => a,
        Err(e) => panic!("agent did not come up: {e}"),
    }
}

/// Like [`start_agent`], but returns the agent's error output (and exit) when it fails.
pub async fn try_start_agent(edge: &Edge, token: &str, args: &[&str]) -> Result<Agent, String> {
    let (mut child, home) = spawn_agent(edge, token, args);
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_lines = Arc::new(Mutex::new(Vec::new()));
    let out_lines = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(64);
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::channel::<()>(1);
    {
        let err_lines = Arc::clone(&err_lines);
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = r.next_line().await {
                err_lines.lock().await.push(l);
            }
            let _ = exit_tx.send(()).await;
        });
    }
    {
        let out_lines = Arc::clone(&out_lines);
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if let Some(url) = forwarding_url(&l) {
                    let _ = ready_tx.send(url).await;
                }
                out_lines.lock().await.push(l);
            }
        });
    }
    let first = tokio::select! {
        u = ready_rx.recv() => u,
        _ = exit_rx.recv() => None,
        _ = tokio::time::sleep(AGENT_READY_TIMEOUT) => None,
    };
    let Some(first) = first else {
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        return Err(format!(
            "exit {status:?}; stderr:\n{}",
            err_lines.lock().await.join("\n")
        ));
    };
    let mut urls = vec![first];
    while let Ok(u) = ready_rx.try_recv() {
        urls.push(u);
    }
    Ok(Agent {
        child,
        urls,
        stdout: out_lines,
        stderr: err_lines,
        ready_rx,
        _home: home,
    })
}

/// A local HTTP test server: `/hello` says hello, `/echo` streams the request body back,
/// `/headers` answers the request headers as `name: value` lines, `/status/N` answers N,
/// `/big-head/N` answers with an `x-big` header of N bytes.
pub async fn local_http_server() -> SocketAddr {
    local_http_server_on("127.0.0.1:0").await.unwrap()
}

/// [`local_http_server`] listening on `bind` (`None` when that address cannot be bound, e.g.
/// `[::1]:0` on a machine without IPv6).
pub async fn local_http_server_on(bind: &str) -> Option<SocketAddr> {
    let listener = TcpListener::bind(bind).await.ok()?;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(local_handler);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Some(addr)
}

/// For a WebSocket upgrade request to a hyper server: echoes text and binary messages on the
/// upgraded connection once the 101 is out, and returns the `Sec-WebSocket-Accept` value the
/// caller's 101 must carry (`None`: not an upgrade request).
pub fn spawn_ws_echo(req: &mut hyper::Request<hyper::body::Incoming>) -> Option<String> {
    use futures::{SinkExt as _, StreamExt as _};
    let key = req.headers().get("sec-websocket-key")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(up) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(up),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(m)) = ws.next().await {
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                return;
            }
        }
    });
    Some(accept)
}

/// One request to an agent's inspector API at `base` (`http://127.0.0.1:PORT`) with `Host:
/// host`; returns the status and the JSON body (`null` when it is not JSON).
pub async fn inspector_api(
    base: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    host: &str,
) -> (u16, serde_json::Value) {
    let addr = base.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// A local WebSocket server that echoes data messages (tokio-tungstenite answers close
/// frames itself).
pub async fn local_ws_echo() -> SocketAddr {
    use futures::{SinkExt as _, StreamExt as _};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type LocalBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn local_handler(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<LocalBody>, std::convert::Infallible> {
    let full = |s: String| Full::new(Bytes::from(s)).map_err(|n| match n {}).boxed();
    let path = req.uri().path().to_owned();
    let resp = if path == "/hello" {
        hyper::Response::new(full(format!("hello from {} {}", req.method(), req.uri())))
    } else if path == "/echo" {
        let mut r = hyper::Response::new(req.into_body().boxed());
        r.headers_mut()
            .insert("x-echo", http::HeaderValue::from_static("1"));
        r
    } else if path == "/headers" {
        let mut s = String::new();
        for (k, v) in req.headers() {
            s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        hyper::Response::new(full(s))
    } else if let Some(n) = path.strip_prefix("/big-head/") {
        let mut r = hyper::Response::new(full("big head".into()));
        let v = "b".repeat(n.parse().unwrap());
        r.headers_mut()
            .insert("x-big", http::HeaderValue::from_str(&v).unwrap());
        r
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = hyper::Response::new(full(format!("status {code}")));
        *r.status_mut() = code.parse::<u16>().unwrap().try_into().unwrap();
        r
    } else {
        let mut r = hyper::Response::new(full("not found".into()));
        *r.status_mut() = http::StatusCode::NOT_FOUND;
        r
    };
    Ok(resp)
}

/// Sends one request to the edge's HTTP listener as a visitor of `sub`.
pub async fn visit(
    edge: &Edge,
    sub: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{sub}.localhost:{}", edge.http.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("the edge answered in time")
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}
pub mod control;

/// The value of header `name` (any case) in an HTTP head.
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Reads an HTTP head (request or answer) from `s` byte by byte, so nothing after it is
/// consumed; `None` when the stream ends or fails first. Lossy UTF-8.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.ok()?;
        head.push(b[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A local server's 101 answer to the WebSocket upgrade request `head`, with `extra` header
/// lines (each ending in CRLF).
pub fn switching_protocols(head: &str, extra: &str) -> String {
    let key = header_value(head, "sec-websocket-key").unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    )
}
