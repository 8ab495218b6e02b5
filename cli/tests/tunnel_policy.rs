//! Tunnel policies through real tunnels: an in-process edge (standalone, or registered with an
//! in-process control plane for reservation-pinned policies), the real `burrow` binary, and a
//! local server that counts every request it receives, so refusals are seen never to reach it.

#![allow(clippy::unwrap_used)]

mod tunnel_support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::v1 as pb;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt as _, Full};
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tunnel_support::control::*;
use tunnel_support::*;

/// How long any single step may take.
const STEP: Duration = Duration::from_secs(30);

/// A local server that counts requests (upgrades included), remembers their headers, answers
/// HTTP requests with `x-powered-by: local` and a list of the request headers, and accepts
/// WebSocket upgrades (also with `x-powered-by: local` on the 101), echoing messages.
struct Local {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Local {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    async fn last_request(&self) -> HeaderMap {
        self.requests.lock().await.last().cloned().unwrap()
    }
}

type LocalBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn local_server() -> Local {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (h, r) = (Arc::clone(&hits), Arc::clone(&requests));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let (hits, requests) = (Arc::clone(&h), Arc::clone(&r));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (hits, requests) = (Arc::clone(&hits), Arc::clone(&requests));
                    async move { Ok::<_, std::convert::Infallible>(local(req, hits, requests).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Local {
        addr,
        hits,
        requests,
    }
}

async fn local(
    mut req: hyper::Request<hyper::body::Incoming>,
    hits: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<HeaderMap>>>,
) -> hyper::Response<LocalBody> {
    hits.fetch_add(1, Ordering::SeqCst);
    requests.lock().await.push(req.headers().clone());
    let full = |s: String| Full::new(Bytes::from(s)).map_err(|n| match n {}).boxed();
    if let Some(accept) = spawn_ws_echo(&mut req) {
        return hyper::Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", accept)
            .header("x-powered-by", "local")
            .body(full(String::new()))
            .unwrap();
    }
    let mut s = String::new();
    for (k, v) in req.headers() {
        s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
    }
    hyper::Response::builder()
        .header("x-powered-by", "local")
        .body(full(s))
        .unwrap()
}

/// Base64 (RFC 4648, padded), for `Authorization: Basic` values.
fn b64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn basic(user_pass: &str) -> String {
    format!("Basic {}", b64(user_pass.as_bytes()))
}

/// One visitor connection to `edge`'s HTTP listener from `from` (any loopback address of the
/// listener's family when `None`).
struct Visitor {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    edge: SocketAddr,
}

impl Visitor {
    async fn open(edge: &Edge, from: Option<IpAddr>) -> Self {
        let tcp = dial(edge.http, from).await;
        let (sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        Self {
            sender,
            edge: edge.http,
        }
    }

    async fn get(
        &mut self,
        sub: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = hyper::Request::builder()
            .uri(path)
            .header("host", format!("{sub}.localhost:{}", self.edge.port()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = tokio::time::timeout(STEP, self.sender.send_request(req))
            .await
            .expect("the edge answered in time")
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }
}

async fn dial(to: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4().unwrap()
    } else {
        TcpSocket::new_v6().unwrap()
    };
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    socket.connect(to).await.unwrap()
}

/// One request on a fresh connection.
async fn get(
    edge: &Edge,
    from: Option<IpAddr>,
    sub: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    Visitor::open(edge, from)
        .await
        .get(sub, path, headers)
        .await
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a WebSocket to `sub`; `Err` carries the refusal's status, headers and body.
async fn ws(
    edge: &Edge,
    from: Option<IpAddr>,
    sub: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, HeaderMap), (StatusCode, HeaderMap, String)> {
    let host = format!("{sub}.localhost:{}", edge.http.port());
    let mut req = format!("ws://{host}/socket").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let tcp = dial(edge.http, from).await;
    let r = tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("the edge answered the upgrade in time");
    match r {
        Ok((ws, resp)) => Ok((ws, resp.headers().clone())),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((resp.status(), resp.headers().clone(), body))
        }
        Err(e) => panic!("WebSocket handshake failed: {e}"),
    }
}

/// Sends one message and expects it echoed.
async fn echoes(ws: &mut Ws) {
    ws.send(Message::text("ping through policy")).await.unwrap();
    loop {
        let m = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("an echo in time")
            .unwrap()
            .unwrap();
        if m.is_ping() {
            continue;
        }
        assert_eq!(m, Message::text("ping through policy"));
        return;
    }
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

async fn tunnel(edge: &Edge, local: &Local, sub: &str, policy: &[&str]) -> Agent {
    let port = local.port();
    let mut args = vec!["http", port.as_str(), "--subdomain", sub];
    args.extend_from_slice(policy);
    start_agent(edge, STANDALONE_TOKEN, &args).await
}

#[tokio::test]
async fn basic_auth_lets_the_right_user_in_and_answers_401_with_a_challenge_otherwise() {
    let edge = standalone_edge().await;
    let local = local_server().await;
    let _agent = tunnel(&edge, &local, "vault", &["--basic-auth", "ann:s3cret:x"]).await;
    let challenge = "Basic realm=\"vault\", charset=\"UTF-8\"";

    let (status, headers, _) = get(&edge, None, "vault", "/", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], challenge);
    for wrong in ["ann:s3cret", "bob:s3cret:x", "ann:", "ann"] {
        let (status, headers, _) = get(
            &edge,
            None,
            "vault",
            "/",
            &[("authorization", &basic(wrong))],
        )
        .await;
        assert_eq!(status, 401, "{wrong}");
        assert_eq!(headers["www-authenticate"], challenge);
    }
    let (status, _, _) = get(
        &edge,
        None,
        "vault",
        "/",
        &[("authorization", "Bearer abc")],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        local.hits(),
        0,
        "refused requests never reach the local server"
    );

    // The password is split at the first ':'; the scheme name is case-insensitive.
    let good = basic("ann:s3cret:x");
    let (status, _, body) = get(&edge, None, "vault", "/", &[("authorization", &good)]).await;
    assert_eq!(status, 200, "{body}");
    let lower = good.replacen("Basic", "bAsIc", 1);
    let (status, _, _) = get(&edge, None, "vault", "/", &[("authorization", &lower)]).await;
    assert_eq!(status, 200);
    assert_eq!(local.hits(), 2);

    // Keep-alive requests on one connection; a wrong value on the same connection is still
    // refused after a right one.
    let mut v = Visitor::open(&edge, None).await;
    for _ in 0..3 {
        let (status, _, _) = v.get("vault", "/", &[("authorization", &good)]).await;
        assert_eq!(status, 200);
    }
    let (status, _, _) = v
        .get("vault", "/", &[("authorization", &basic("ann:nope"))])
        .await;
    assert_eq!(status, 401);
    assert_eq!(local.hits(), 5);
}

#[tokio::test]
async fn basic_auth_guards_websocket_upgrades_too() {
    let edge = standalone_edge().await;
    let local = local_server().await;
    let _agent = tunnel(&edge, &local, "wsvault", &["--basic-auth", "ann:pw"]).await;
    let (status, headers, _) = ws(&edge, None, "wsvault", &[]).await.err().unwrap();
    assert_eq!(status, 401);
    assert!(headers.contains_key("www-authenticate"));
    let wrong = basic("ann:wrong");
    let (status, _, _) = ws(&edge, None, "wsvault", &[("authorization", &wrong)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(local.hits(), 0);
    let good = basic("ann:pw");
    let (mut socket, _) = ws(&edge, None, "wsvault", &[("authorization", &good)])
        .await
        .unwrap();
    echoes(&mut socket).await;
    assert_eq!(local.hits(), 1);
}

#[tokio::test]
async fn an_upgrade_retried_with_credentials_on_the_same_connection_after_a_401_is_switched() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let edge = standalone_edge().await;
    let local = local_server().await;
    let _agent = tunnel(&edge, &local, "retry", &["--basic-auth", "ann:pw"]).await;
    let upgrade = |auth: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: retry.localhost:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n",
            edge.http.port()
        )
    };
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    s.write_all(upgrade("").as_bytes()).await.unwrap();
    // Read the whole 401 (head and its Content-Length body), leaving the connection open.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the edge closed the connection after the 401");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                assert!(text.starts_with("HTTP/1.1 401"), "{text}");
                break;
            }
        }
    }
    let auth = format!("Authorization: {}\r\n", basic("ann:pw"));
    s.write_all(upgrade(&auth).as_bytes()).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(local.hits(), 1);
}

#[tokio::test]
async fn an_ip_allow_list_checks_the_real_peer_address_never_x_forwarded_for() {
    let edge = standalone_edge().await;
    let local = local_server().await;
    let _agent = tunnel(&edge, &local, "office", &["--allow-ip", "10.0.0.0/8"]).await;
    let (status, _, body) = get(&edge, None, "office", "/", &[]).await;
    assert_eq!(status, 403);
    assert!(body.contains("127.0.0.1"), "{body}");
    assert!(body.contains("not allowed"), "{body}");
    let spoofed = [("x-forwarded-for", "10.1.2.3"), ("x-real-ip", "10.1.2.3")];
    let (status, _, _) = get(&edge, None, "office", "/", &spoofed).await;
    assert_eq!(
        status, 403,
        "a spoofed X-Forwarded-For does not get past the list"
    );
    let (status, _, _) = ws(&edge, None, "office", &spoofed).await.err().unwrap();
    assert_eq!(status, 403);
    assert_eq!(local.hits(), 0);
}

#[tokio::test]
async fn an_ip_deny_rule_wins_over_an_allow_rule_for_http_and_websocket() {
    let edge = standalone_edge().await;
    let local = local_server().await;
    let _agent = tunnel(
        &edge,
        &local,
        "lab",
        &["--allow-ip", "127.0.0.0/8", "--deny-ip", "127.0.0.2"],
    )
    .await;
    let (status, _, body) = get(&edge, ip("127.0.0.1"), "lab", "/", &[]).await;
    assert_eq!(status, 200, "{body}");
    let (mut socket, _) = ws(&edge, ip("127.0.0.1"), "lab", &[]).await.unwrap();
    echoes(&mut socket).await;
    let (status, _, body) = get(&edge, ip("127.0.0.2"), "lab", "/", &[]).await;
    assert_eq!(status, 403);
    assert!(body.contains("127.0.0.2"), "{body}");
    let (status, _, _) = ws(&edge, ip("127.0.0.2"), "lab", &[]).await.err().unwrap();
    assert_eq!(status, 403);
    assert_eq!(local.hits(), 2);
}

/// An edge whose visitor listener is on `[::1]`.
async fn ipv6_edge() -> Edge {
    start_edge_on(
        standalone_control(),
        identity(),
        None,
        false,
        false,
        "[::1]:0".parse().unwrap(),
        |_| {},
    )
    .await
}

#[tokio::test]
async fn ipv6_visitors_are_matched_against_ipv6_blocks() {
    let edge = ipv6_edge().await;
    let local = local_server().await;
    let _allowed = tunnel(&edge, &local, "six", &["--allow-ip", "::1/128"]).await;
    let _v4_only = tunnel(&edge, &local, "four", &["--allow-ip", "127.0.0.0/8"]).await;
    let _denied = tunnel(&edge, &local, "nosix", &["--deny-ip", "::/0"]).await;

    let (status, _, body) = get(&edge, None, "six", "/", &[]).await;
    assert_eq!(status, 200, "{body}");
    let (mut socket, _) = ws(&edge, None, "six", &[]).await.unwrap();
    echoes(&mut socket).await;
    assert_eq!(local.hits(), 2);

    for sub in ["four", "nosix"] {
        let (status, _, body) = get(&edge, None, sub, "/", &[]).await;
        assert_eq!(status, 403, "{sub}");
        assert!(body.contains("::1"), "{body}");
        let (status, _, _) = ws(&edge, None, sub, &[]).await.err().unwrap();
        assert_eq!(status, 403, "{sub}");
    }
    assert_eq!(local.hits(), 2);
}

#[tokio::test]
async fn an_origin_allow_list_refuses_other_origins_before_the_upgrade_reaches_the_local_server() {
    let edge = standalone_edge().await;
    let local = local_server().await;
    let _agent = tunnel(
        &edge,
        &local,
        "chat",
        &["--allow-origin", "https://app.example.com"],
    )
    .await;
    let (mut socket, _) = ws(
        &edge,
        None,
        "chat",
        &[("origin", "https://APP.example.com")],
    )
    .await
    .unwrap();
    echoes(&mut socket).await;
    assert_eq!(local.hits(), 1);
    for origin in ["https://evil.example.com", "http://app.example.com", "null"] {
        let (status, _, body) = ws(&edge, None, "chat", &[("origin", origin)])
            .await
            .err()
            .unwrap();
        assert_eq!(status, 403, "{origin}");
        assert!(body.contains("origin"), "{body}");
    }
    let (status, _, _) = ws(&edge, None, "chat", &[]).await.err().unwrap();
    assert_eq!(status, 403, "an upgrade without Origin is refused");
    assert_eq!(local.hits(), 1);
    // Plain requests are not upgrades: the list does not apply.
    let (status, _, _) = get(&edge, None, "chat", "/", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(local.hits(), 2);
}

#[tokio::test]
async fn header_rules_rewrite_requests_for_the_local_server_and_responses_for_the_visitor() {
    let edge = standalone_edge().await;
    let local = local_server().await;
    let _agent = tunnel(
        &edge,
        &local,
        "hdr",
        &[
            "--request-header-add",
            "X-From:burrow",
            "--request-header-remove",
            "Cookie",
            "--response-header-add",
            "X-Frame-Options:DENY",
            "--response-header-remove",
            "X-Powered-By",
        ],
    )
    .await;
    let (status, headers, body) = get(
        &edge,
        None,
        "hdr",
        "/",
        &[("cookie", "session=1"), ("x-from", "visitor")],
    )
    .await;
    assert_eq!(status, 200);
    let seen = local.last_request().await;
    assert_eq!(seen["x-from"], "burrow", "{body}");
    assert_eq!(seen.get_all("x-from").iter().count(), 1);
    assert!(!seen.contains_key("cookie"), "{body}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(!headers.contains_key("x-powered-by"));

    // The upgrade request and the 101 get the same rules; the handshake still completes.
    let (mut socket, headers) = ws(&edge, None, "hdr", &[("cookie", "session=1")])
        .await
        .unwrap();
    echoes(&mut socket).await;
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(!headers.contains_key("x-powered-by"));
    let seen = local.last_request().await;
    assert_eq!(seen["x-from"], "burrow");
    assert!(!seen.contains_key("cookie"));
}

#[tokio::test]
async fn a_policy_the_edge_cannot_apply_stops_the_agent_with_a_sentence() {
    // This edge accepts cheaper password hashes than the agent makes, and short lists.
    let edge = standalone_edge_with(|l| {
        l.basic_auth_max_hash_memory_kib = 1024;
        l.policy_max_rules = 1;
    })
    .await;
    let err = try_start_agent(
        &edge,
        STANDALONE_TOKEN,
        &[
            "http",
            "3000",
            "--subdomain",
            "bad",
            "--basic-auth",
            "ann:pw",
        ],
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("the tunnel policy for bad is invalid"),
        "{err}"
    );
    assert!(err.contains("this edge allows at most 1024 KiB"), "{err}");
    assert!(!err.contains("ann:pw"), "{err}");
    let err = try_start_agent(
        &edge,
        STANDALONE_TOKEN,
        &[
            "http",
            "3000",
            "--subdomain",
            "bad",
            "--allow-ip",
            "10.0.0.0/8",
            "--allow-ip",
            "192.168.0.0/16",
        ],
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("at most 1 allowed addresses, not 2"), "{err}");
}

#[tokio::test]
async fn the_tunnels_file_takes_the_same_policy_keys() {
    let edge = standalone_edge().await;
    let local = local_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.txt"), "cat:meow\n").unwrap();
    let file = dir.path().join("burrow.toml");
    std::fs::write(
        &file,
        format!(
            "[[tunnel]]\ntarget = \"{}\"\nsubdomain = \"filed\"\nbasic_auth = [\"ann:pw\"]\nbasic_auth_file = [\"users.txt\"]\nallow_ip = [\"127.0.0.1\"]\nresponse_header_add = [\"X-Filed:yes\"]\n",
            local.port()
        ),
    )
    .unwrap();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["start", "--config", file.to_str().unwrap()],
    )
    .await;
    let (status, _, _) = get(&edge, None, "filed", "/", &[]).await;
    assert_eq!(status, 401);
    for user in ["ann:pw", "cat:meow"] {
        let (status, headers, _) = get(
            &edge,
            None,
            "filed",
            "/",
            &[("authorization", &basic(user))],
        )
        .await;
        assert_eq!(status, 200, "{user}");
        assert_eq!(headers["x-filed"], "yes");
    }
    let (status, _, _) = get(
        &edge,
        ip("127.0.0.3"),
        "filed",
        "/",
        &[("authorization", &basic("ann:pw"))],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(local.hits(), 2);
}

// === Policies pinned on reservations (control plane) ===

/// An argon2id PHC hash of `password`, as `burrow` sends it.
fn hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

async fn pin(cp: &ControlPlane, owner: &Owner, subdomain: &str, policy: Option<pb::TunnelPolicy>) {
    let mut req = tonic::Request::new(pb::SetReservationPolicyRequest {
        subdomain: subdomain.into(),
        policy,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", owner.token).parse().unwrap(),
    );
    pb::reservation_service_client::ReservationServiceClient::new(cp.channel.clone())
        .set_reservation_policy(req)
        .await
        .unwrap();
}

/// Polls until a plain visit to `sub` answers `want`.
async fn until_status(edge: &Edge, sub: &str, want: u16) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, _, _) = get(edge, None, sub, "/", &[]).await;
        if status == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sub} still answers {status}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn an_agent_cannot_loosen_a_policy_pinned_on_the_reservation(pool: PgPool) {
    let cp = start_control(pool).await;
    let owner = cp.owner("ann@example.com", "web").await;
    cp.reserve(&owner, "shop").await;
    pin(
        &cp,
        &owner,
        "shop",
        Some(pb::TunnelPolicy {
            allow_ips: vec!["10.0.0.0/8".into()],
            basic_auth: vec![pb::BasicAuthUser {
                username: "admin".into(),
                password_hash: hash("pinned-pw"),
            }],
            ..Default::default()
        }),
    )
    .await;
    let (_, secret) = cp.agent_token(&owner).await;
    let edge = start_edge(cp.edge_control().await, identity(), None, |_| {}).await;
    let local = local_server().await;
    let port = local.port();
    // The agent allows its own address and brings its own user: neither loosens the pin.
    let agent = start_agent(
        &edge,
        &secret,
        &[
            "http",
            &port,
            "--subdomain",
            "shop",
            "--allow-ip",
            "127.0.0.0/8",
            "--basic-auth",
            "me:mine",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = agent.stdout.lock().await.join("\n");
    assert!(out.contains("pinned on the reservation of shop"), "{out}");
    let (status, _, body) = get(
        &edge,
        None,
        "shop",
        "/",
        &[("authorization", &basic("me:mine"))],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, _) = ws(
        &edge,
        None,
        "shop",
        &[("authorization", &basic("admin:pinned-pw"))],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status, 403);
    assert_eq!(local.hits(), 0);
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_pinned_policy_changed_through_the_api_applies_to_the_running_tunnel(pool: PgPool) {
    let cp = start_control(pool).await;
    let owner = cp.owner("ann@example.com", "web").await;
    cp.reserve(&owner, "live").await;
    let (_, secret) = cp.agent_token(&owner).await;
    let edge = start_edge(cp.edge_control().await, identity(), None, |_| {}).await;
    let local = local_server().await;
    let port = local.port();
    let _agent = start_agent(&edge, &secret, &["http", &port, "--subdomain", "live"]).await;
    let (status, _, _) = get(&edge, None, "live", "/", &[]).await;
    assert_eq!(status, 200);

    pin(
        &cp,
        &owner,
        "live",
        Some(pb::TunnelPolicy {
            basic_auth: vec![pb::BasicAuthUser {
                username: "admin".into(),
                password_hash: hash("pinned-pw"),
            }],
            ..Default::default()
        }),
    )
    .await;
    until_status(&edge, "live", 401).await;
    let hits = local.hits();
    let good = basic("admin:pinned-pw");
    let (status, _, _) = get(&edge, None, "live", "/", &[("authorization", &good)]).await;
    assert_eq!(status, 200);
    let (mut socket, _) = ws(&edge, None, "live", &[("authorization", &good)])
        .await
        .unwrap();
    echoes(&mut socket).await;
    let (status, _, _) = ws(&edge, None, "live", &[]).await.err().unwrap();
    assert_eq!(status, 401);
    assert_eq!(local.hits(), hits + 2);

    // Cleared: open again.
    pin(&cp, &owner, "live", None).await;
    until_status(&edge, "live", 200).await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn new_team_limits_apply_to_the_running_tunnel(pool: PgPool) {
    let cp = start_control(pool).await;
    let owner = cp.owner("ann@example.com", "web").await;
    let (_, secret) = cp.agent_token(&owner).await;
    let edge = start_edge(cp.edge_control().await, identity(), None, |_| {}).await;
    let local = local_server().await;
    let port = local.port();
    let _agent = start_agent(&edge, &secret, &["http", &port, "--subdomain", "capped"]).await;
    let set_limits = |max_websockets: u32| {
        let mut req = tonic::Request::new(pb::SetTunnelLimitsRequest {
            team: "web".into(),
            limits: Some(pb::TunnelLimits {
                max_websocket_connections: max_websockets,
                ..Default::default()
            }),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", cp.admin).parse().unwrap(),
        );
        let channel = cp.channel.clone();
        async move {
            pb::team_service_client::TeamServiceClient::new(channel)
                .set_tunnel_limits(req)
                .await
                .unwrap();
        }
    };
    let (mut first, _) = ws(&edge, None, "capped", &[]).await.unwrap();
    let (mut second, _) = ws(&edge, None, "capped", &[]).await.unwrap();

    set_limits(2).await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match ws(&edge, None, "capped", &[]).await {
            Err((status, _, _)) => {
                assert_eq!(status, 429);
                break;
            }
            Ok(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "the new WebSocket limit never applied"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The open ones keep working.
    echoes(&mut first).await;
    echoes(&mut second).await;

    set_limits(0).await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Ok((mut third, _)) = ws(&edge, None, "capped", &[]).await {
            echoes(&mut third).await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lifted limit never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
