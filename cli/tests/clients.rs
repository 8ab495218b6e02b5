//! Outside WebSocket clients and servers through real tunnels.
//!
//! Each test starts one of the servers in `tests/clients` (Node `ws`, Python `websockets`,
//! Socket.io, Express), puts it behind a real tunnel — the control plane, an edge and the
//! `burrow` agent binary — and runs an outside client (Node, Python, headless Chromium)
//! against the edge with `Host: NAME.localhost:PORT`. The client script asserts the behaviour
//! and prints `OK <scenario> …`; the test asserts that line and a zero exit.
//!
//! The programs are installed by `scripts/install-test-clients.sh`. A test whose runtime is
//! missing (no `node`, no `tests/clients/node_modules`, no `tests/clients/.venv`, no
//! Chromium) says so on stderr and passes without checking anything, unless
//! `BURROW_REQUIRE_TEST_CLIENTS=1` is set, when it fails; CI installs them all.
//!
//! Every child process is killed when its handle drops, every wait is bounded, and every
//! port is picked by the OS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod tunnel_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tunnel_support::control::{start_control, ControlPlane};
use tunnel_support::{start_agent, start_edge_with, Agent, Edge};

/// Longest a server script may take to print `LISTENING <port>`.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a client script may run; the scripts give up on their own after
/// `CLIENT_SCRIPT_TIMEOUT`, this only catches a script that hangs regardless.
const CLIENT_RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The overall deadline each client script is given (`--timeout-ms`).
const CLIENT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(45);

// === the outside programs ===

/// `tests/clients` at the workspace root.
fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients")
}

/// A runtime a scenario needs.
#[derive(Clone, Copy, Debug)]
enum Runtime {
    /// `node` on PATH and the pinned packages in `tests/clients/node_modules`.
    Node,
    /// The venv with the pinned `websockets` in `tests/clients/.venv`.
    Python,
    /// Chromium, at `$CHROMIUM` or `/usr/bin/chromium`.
    Chromium,
}

impl Runtime {
    /// Why this runtime cannot be used here, if it cannot.
    fn missing(self) -> Option<String> {
        let dir = clients_dir();
        match self {
            Runtime::Node => {
                let node = std::process::Command::new("node")
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if !matches!(node, Ok(s) if s.success()) {
                    return Some("`node` is not on PATH".into());
                }
                for package in [
                    "ws",
                    "socket.io",
                    "socket.io-client",
                    "express",
                    "playwright-core",
                ] {
                    if !dir.join("node_modules").join(package).is_dir() {
                        return Some(format!(
                            "tests/clients/node_modules/{package} is missing \
                             (run scripts/install-test-clients.sh)"
                        ));
                    }
                }
                None
            }
            Runtime::Python => (!python().is_file()).then(|| {
                "tests/clients/.venv is missing (run scripts/install-test-clients.sh)".into()
            }),
            Runtime::Chromium => {
                (!chromium().is_file()).then(|| format!("{} is missing", chromium().display()))
            }
        }
    }
}

fn python() -> PathBuf {
    clients_dir().join(".venv/bin/python")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Set (to anything but `0`) to make a missing runtime fail the test instead of skipping it,
/// so a CI machine whose install step quietly failed cannot pass without running anything.
const REQUIRE_CLIENTS_ENV: &str = "BURROW_REQUIRE_TEST_CLIENTS";

/// True when every runtime in `needs` is present; otherwise prints which is not, so the
/// calling test can return early — or panics, when [`REQUIRE_CLIENTS_ENV`] is set.
fn runtimes_present(test: &str, needs: &[Runtime]) -> bool {
    let required = std::env::var(REQUIRE_CLIENTS_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    for runtime in needs {
        if let Some(reason) = runtime.missing() {
            assert!(
                !required,
                "{test}: {reason}, and {REQUIRE_CLIENTS_ENV} is set"
            );
            eprintln!("skipping {test}: {reason}");
            return false;
        }
    }
    true
}

/// How to run a script: `node x.js` or `.venv/bin/python x.py`.
fn script_command(script: &str) -> Command {
    let mut command = if script.ends_with(".py") {
        Command::new(python())
    } else {
        Command::new("node")
    };
    command
        .arg(script)
        .current_dir(clients_dir())
        .env("CHROMIUM", chromium())
        .kill_on_drop(true);
    command
}

/// A running server script, killed when dropped. Its stdin pipe is held open: the scripts
/// also exit by themselves when it closes, so not even a killed test run leaves them behind.
struct Server {
    port: u16,
    _child: Child,
    _stdin: ChildStdin,
}

/// Starts `script` and waits for its `LISTENING <port>` line.
async fn start_server(script: &str) -> Server {
    let mut child = script_command(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(SERVER_START_TIMEOUT, lines.next_line())
        .await
        .unwrap_or_else(|_| {
            panic!("{script} did not print LISTENING within {SERVER_START_TIMEOUT:?}")
        })
        .unwrap_or_else(|e| panic!("reading {script}'s stdout: {e}"))
        .unwrap_or_else(|| panic!("{script} exited before printing LISTENING"));
    let port = line
        .strip_prefix("LISTENING ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{script} printed {line:?}, not LISTENING <port>"));
    // Keep draining stdout so a chatty server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server {
        port,
        _child: child,
        _stdin: stdin,
    }
}

/// Runs a client script to completion and returns its `OK <scenario> …` line; panics with
/// its output on a non-zero exit, a missing `OK` line or a hang.
async fn run_client(script: &str, args: &[&str]) -> String {
    let timeout_ms = CLIENT_SCRIPT_TIMEOUT.as_millis().to_string();
    let child = script_command(script)
        .args(args)
        .args(["--timeout-ms", &timeout_ms])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));
    let output = tokio::time::timeout(CLIENT_RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} still running after {CLIENT_RUN_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("waiting for {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} {args:?} failed ({}):\n{stderr}{stdout}",
        output.status
    );
    let ok = stdout
        .lines()
        .find(|l| l.starts_with("OK "))
        .unwrap_or_else(|| panic!("{script} exited 0 without an OK line:\n{stdout}{stderr}"));
    eprintln!("{ok}");
    ok.to_owned()
}

// === the tunnel ===

/// A tunnel to a local port through the real stack: an in-process control plane over the
/// test's fresh database, an in-process edge registered with it on 127.0.0.1:0 (serving
/// `*.localhost`), and the `burrow` binary as the agent, bound to one subdomain.
struct Tunnel {
    control: ControlPlane,
    edge: Edge,
    agent: Agent,
    subdomain: String,
}

impl Tunnel {
    /// Puts `local_port` behind `subdomain` and waits until the agent says it is forwarding.
    /// The edge serves visitors over plain HTTP and HTTPS; its self-signed certificate names
    /// `localhost` and `SUBDOMAIN.localhost` (clients verify it with `--ca`).
    async fn open(pool: PgPool, local_port: u16, subdomain: &str) -> Tunnel {
        Self::open_with(pool, local_port, subdomain, |_| {}).await
    }

    /// Like [`Tunnel::open`], with the edge's limits adjusted by `tweak`.
    async fn open_with(
        pool: PgPool,
        local_port: u16,
        subdomain: &str,
        tweak: impl FnOnce(&mut burrow_edge::Limits),
    ) -> Tunnel {
        let control = start_control(pool).await;
        let owner = control.owner("dev@example.com", "web").await;
        let (_, secret) = control.agent_token(&owner).await;
        // The names `burrow-edge --domain localhost --self-signed` uses: OpenSSL-based clients
        // (Python, Node) refuse the `*.localhost` wildcard, so this checks that each gets a
        // certificate for its exact name.
        let names = burrow_edge::tls::self_signed_names("localhost");
        let identity = burrow_edge::TlsIdentity::self_signed(&names).unwrap();
        let edge_control = control.edge_control().await;
        let edge = start_edge_with(edge_control, identity, None, true, tweak).await;
        let port = local_port.to_string();
        // The inspector stays on, as people run the agent, but on a port the OS picks.
        let args = [
            "http",
            &port,
            "--subdomain",
            subdomain,
            "--inspect",
            "127.0.0.1:0",
        ];
        let agent = start_agent(&edge, &secret, &args).await;
        assert_eq!(
            agent.subdomain(),
            subdomain,
            "the agent bound another name: {:?}",
            agent.urls
        );
        Tunnel {
            control,
            edge,
            agent,
            subdomain: subdomain.to_owned(),
        }
    }

    /// The public URL with `scheme` (`ws`, `http`, `wss`, `https`):
    /// `SCHEME://SUB.localhost:EDGE_PORT/`. Clients dial 127.0.0.1 at that port and send the
    /// URL's host as `Host` (and as the TLS server name).
    fn url(&self, scheme: &str) -> String {
        let edge = match scheme {
            "wss" | "https" => self.edge.https.expect("the edge serves HTTPS"),
            _ => self.edge.http,
        };
        format!("{scheme}://{}.localhost:{}/", self.subdomain, edge.port())
    }

    /// The PEM file of the edge's certificate, for the clients' `--ca`.
    fn ca(&self) -> String {
        self.edge.ca_file.display().to_string()
    }

    /// Stops the agent, the edge and the control plane.
    async fn close(self) {
        let Tunnel {
            mut control,
            edge,
            mut agent,
            ..
        } = self;
        let _ = agent.child.kill().await;
        edge.stop().await;
        control.stop().await;
    }
}

// === the scenarios ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_node_ws_echo_server_answers_a_node_ws_client_through_a_tunnel(pool: PgPool) {
    if !runtimes_present("node ws ↔ node ws", &[Runtime::Node]) {
        return;
    }
    let server = start_server("ws-echo-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "echo").await;
    let ok = run_client(
        "ws-echo-client.js",
        &[&tunnel.url("ws"), "--prefix", "Echo: "],
    )
    .await;
    assert!(ok.starts_with("OK ws-echo 4 text"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_node_ws_echo_server_answers_a_python_websockets_client_through_a_tunnel(pool: PgPool) {
    if !runtimes_present(
        "node ws ↔ python websockets",
        &[Runtime::Node, Runtime::Python],
    ) {
        return;
    }
    let server = start_server("ws-echo-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "echo").await;
    let ok = run_client(
        "websockets_echo_client.py",
        &[&tunnel.url("ws"), "--prefix", "Echo: "],
    )
    .await;
    assert!(ok.starts_with("OK websockets-echo 4 text"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_python_websockets_echo_server_returns_text_and_binary_byte_for_byte_with_compression(
    pool: PgPool,
) {
    if !runtimes_present(
        "python websockets server",
        &[Runtime::Node, Runtime::Python],
    ) {
        return;
    }
    let server = start_server("websockets_echo_server.py").await;
    let tunnel = Tunnel::open(pool, server.port, "pyecho").await;
    let url = tunnel.url("ws");
    let args = [
        url.as_str(),
        "--binary",
        "--expect-extension",
        "permessage-deflate",
    ];
    let ok = run_client("websockets_echo_client.py", &args).await;
    assert!(ok.contains("4 text + 6 binary messages echoed"), "{ok}");
    let ok = run_client("ws-echo-client.js", &args).await;
    assert!(ok.contains("4 text + 6 binary messages echoed"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn socketio_with_default_transports_opens_on_polling_and_upgrades_to_websocket(pool: PgPool) {
    if !runtimes_present("socket.io default transports", &[Runtime::Node]) {
        return;
    }
    let server = start_server("socketio-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "sockets").await;
    let ok = run_client("socketio-client.js", &[&tunnel.url("http")]).await;
    assert!(ok.contains("upgraded to websocket"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn socketio_with_only_the_websocket_transport_round_trips(pool: PgPool) {
    if !runtimes_present("socket.io websocket transport", &[Runtime::Node]) {
        return;
    }
    let server = start_server("socketio-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "sockets").await;
    let url = tunnel.url("http");
    let ok = run_client("socketio-client.js", &[&url, "--transports", "websocket"]).await;
    assert!(ok.contains("connected over websocket"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn chromium_loads_an_express_page_whose_websocket_echo_appears_in_the_dom(pool: PgPool) {
    if !runtimes_present("express + chromium", &[Runtime::Node, Runtime::Chromium]) {
        return;
    }
    let server = start_server("express-ws-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "page").await;
    let ok = run_client("chromium-page.js", &[&tunnel.url("http")]).await;
    let expected = format!(
        "Echo: hello from page.localhost:{}",
        tunnel.edge.http.port()
    );
    assert!(ok.contains(&expected), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn the_visitor_sees_the_subprotocol_the_local_server_chose(pool: PgPool) {
    if !runtimes_present("subprotocols", &[Runtime::Node]) {
        return;
    }
    let server = start_server("subprotocol-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "chat").await;
    let ok = run_client("subprotocol-client.js", &[&tunnel.url("ws")]).await;
    assert!(ok.contains("agreed on superchat"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_broadcast_reaches_the_two_other_clients_and_not_the_sender(pool: PgPool) {
    if !runtimes_present("broadcast", &[Runtime::Node]) {
        return;
    }
    let server = start_server("broadcast-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "room").await;
    let ok = run_client("broadcast-client.js", &[&tunnel.url("ws")]).await;
    assert!(ok.contains("A did not get its own message"), "{ok}");
    tunnel.close().await;
}

/// The edge's keepalive interval in the idle tests: short, so five intervals take a second.
const TEST_PING_INTERVAL: Duration = Duration::from_millis(200);

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn idle_node_and_python_clients_answer_the_edges_pings_and_keep_their_connections(
    pool: PgPool,
) {
    if !runtimes_present("keepalive", &[Runtime::Node, Runtime::Python]) {
        return;
    }
    let server = start_server("ws-echo-server.js").await;
    let tunnel = Tunnel::open_with(pool, server.port, "idle", |limits| {
        limits.ws_ping_interval = Some(TEST_PING_INTERVAL);
    })
    .await;
    let url = tunnel.url("ws");
    // `ws` reports each ping: wait for five of them, then echo again.
    let ok = run_client(
        "ws-echo-client.js",
        &[&url, "--prefix", "Echo: ", "--idle-pings", "5"],
    )
    .await;
    assert!(
        ok.contains("idle through 5 pings and still echoing"),
        "{ok}"
    );
    // `websockets` answers pings silently: stay idle for five intervals, then echo again.
    let idle_ms = (TEST_PING_INTERVAL * 5).as_millis().to_string();
    let ok = run_client(
        "websockets_echo_client.py",
        &[&url, "--prefix", "Echo: ", "--idle-ms", &idle_ms],
    )
    .await;
    assert!(ok.contains("still echoing"), "{ok}");
    tunnel.close().await;
}

// === the same over TLS (wss://, https://) ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn node_and_python_clients_reach_the_node_echo_server_over_wss(pool: PgPool) {
    if !runtimes_present("wss echo", &[Runtime::Node, Runtime::Python]) {
        return;
    }
    let server = start_server("ws-echo-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "secure").await;
    let (url, ca) = (tunnel.url("wss"), tunnel.ca());
    let args = [url.as_str(), "--ca", &ca, "--prefix", "Echo: "];
    let ok = run_client("ws-echo-client.js", &args).await;
    assert!(ok.starts_with("OK ws-echo 4 text"), "{ok}");
    let ok = run_client("websockets_echo_client.py", &args).await;
    assert!(ok.starts_with("OK websockets-echo 4 text"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn socketio_polls_and_upgrades_to_websocket_over_https(pool: PgPool) {
    if !runtimes_present("socket.io over https", &[Runtime::Node]) {
        return;
    }
    let server = start_server("socketio-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "secure").await;
    let (url, ca) = (tunnel.url("https"), tunnel.ca());
    let ok = run_client("socketio-client.js", &[&url, "--ca", &ca]).await;
    assert!(ok.contains("upgraded to websocket"), "{ok}");
    tunnel.close().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn chromium_loads_the_express_page_over_https_and_its_wss_echo_appears_in_the_dom(
    pool: PgPool,
) {
    if !runtimes_present(
        "express + chromium over https",
        &[Runtime::Node, Runtime::Chromium],
    ) {
        return;
    }
    let server = start_server("express-ws-server.js").await;
    let tunnel = Tunnel::open(pool, server.port, "secure").await;
    let (url, ca) = (tunnel.url("https"), tunnel.ca());
    let ok = run_client("chromium-page.js", &[&url, "--ca", &ca]).await;
    let https = tunnel.edge.https.expect("the edge serves HTTPS");
    let expected = format!("Echo: hello from secure.localhost:{}", https.port());
    assert!(ok.contains(&expected), "{ok}");
    tunnel.close().await;
}
