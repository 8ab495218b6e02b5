//! The edge's admin listener: `/metrics` is scraped before and after known traffic through a
//! real tunnel (in-process edge, the real `burrow` agent, local servers), and the counters
//! must have moved by exactly that traffic; `/healthz` and `/readyz` answer as documented.

#![allow(clippy::unwrap_used)]

mod tunnel_support;

use std::net::SocketAddr;
use std::time::Duration;

use burrow_admin::Scrape;

use futures::{SinkExt as _, StreamExt as _};
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tunnel_support::control::*;
use tunnel_support::*;

/// Longest wait for one step (a scrape, a message, a metric to settle).
const STEP: Duration = Duration::from_secs(20);

/// GETs `path` on the admin listener: (status, content type, body).
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    burrow_admin::get(addr, path, STEP).await.unwrap()
}

/// One scrape of `/metrics`.
async fn scrape(edge: &Edge) -> Scrape {
    Scrape::take(edge.admin, STEP).await
}

/// Scrapes until `ok` holds (metrics settle when a task ends), or panics.
async fn scrape_until(edge: &Edge, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    Scrape::until(edge.admin, STEP, what, ok).await
}

/// Standard base64 (RFC 4648), for a basic-auth header.
fn b64(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn tunnel(sub: &str) -> [(&str, &str); 2] {
    [("team", "standalone"), ("tunnel", sub)]
}

#[tokio::test]
async fn healthz_and_readyz_answer_and_metrics_is_prometheus_text() {
    let edge = standalone_edge().await;
    let (status, _, body) = admin_get(edge.admin, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Standalone: ready as soon as the listeners accept.
    let (status, _, _) = admin_get(edge.admin, "/readyz").await;
    assert_eq!(status, 200);
    let (status, _, _) = admin_get(edge.admin, "/nope").await;
    assert_eq!(status, 404);
    let s = scrape(&edge).await;
    assert!(s
        .0
        .contains("# TYPE burrow_edge_visitor_connections_total counter\n"));
    assert!(s
        .0
        .contains("# TYPE burrow_edge_websocket_ping_rtt_seconds histogram\n"));
    assert!(!s.0.contains("# EOF"));
    assert_eq!(s.get("burrow_edge_agent_sessions", &[]), 0.0);
    edge.stop().await;
}

#[tokio::test]
async fn http_requests_move_the_counters_by_exactly_the_traffic_sent() {
    let edge = standalone_edge().await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let mut agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "metered"],
    )
    .await;
    let t = tunnel("metered");
    let before = scrape(&edge).await;
    assert_eq!(before.get("burrow_edge_agent_sessions", &[]), 1.0);
    assert_eq!(before.get("burrow_edge_tunnels", &[]), 1.0);

    let mut response_bytes = 0;
    for (code, times) in [(200, 3), (302, 1), (404, 2), (503, 1)] {
        for _ in 0..times {
            let (status, _, body) =
                visit(&edge, "metered", "GET", &format!("/status/{code}"), &[], "").await;
            assert_eq!(status.as_u16(), code);
            response_bytes += body.len();
        }
    }
    let upload = vec![b'x'; 100_000];
    let (status, _, body) = visit(&edge, "metered", "POST", "/echo", &[], upload.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), upload.len());
    response_bytes += body.len();
    // A name with no tunnel: counted without the name.
    let (status, _, _) = visit(&edge, "nobody-here", "GET", "/", &[], "").await;
    assert_eq!(status, 404);

    let after = scrape(&edge).await;
    let req = |class| {
        after.delta(
            &before,
            "burrow_edge_http_requests_total",
            &[t[0], t[1], ("status_class", class)],
        )
    };
    assert_eq!(
        [req("1xx"), req("2xx"), req("3xx"), req("4xx"), req("5xx")],
        [0.0, 4.0, 1.0, 2.0, 1.0]
    );
    assert_eq!(
        after.delta(
            &before,
            "burrow_edge_http_request_duration_seconds_count",
            &t
        ),
        8.0
    );
    assert_eq!(
        after.delta(
            &before,
            "burrow_edge_unrouted_requests_total",
            &[("status_class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        after.delta(&before, "burrow_edge_visitor_connections_total", &[]),
        9.0
    );
    let bytes = |dir| {
        after.delta(
            &before,
            "burrow_edge_tunnel_bytes_total",
            &[t[0], t[1], ("direction", dir)],
        )
    };
    assert_eq!(bytes("in"), upload.len() as f64);
    assert_eq!(bytes("out"), response_bytes as f64);

    // The tunnel's series go with the tunnel.
    agent.child.kill().await.unwrap();
    scrape_until(&edge, "the tunnel's series to go", |s| {
        !s.0.contains("tunnel=\"metered\"") && s.get("burrow_edge_tunnels", &[]) == 0.0
    })
    .await;
    edge.stop().await;
}

/// Bytes of a frame header for a payload of `len` bytes, `masked` or not (RFC 6455 §5.2).
fn header_len(len: usize, masked: bool) -> usize {
    let ext = match len {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    };
    2 + ext + if masked { 4 } else { 0 }
}

#[tokio::test]
async fn a_websocket_session_moves_the_counters_by_exactly_its_messages_and_close() {
    let edge = standalone_edge_with(|l| l.ws_ping_interval = None).await;
    let local = local_ws_echo().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "wsm"],
    )
    .await;
    let t = tunnel("wsm");
    let before = scrape(&edge).await;

    let url = format!("ws://wsm.localhost:{}/", edge.http.port());
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(url.into_client_request().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let during = scrape_until(&edge, "the WebSocket to count as open", |s| {
        s.get("burrow_edge_websockets_open", &t) == 1.0
    })
    .await;
    assert_eq!(
        during.delta(&before, "burrow_edge_websockets_total", &t),
        1.0
    );

    let sizes = [0usize, 10, 125, 126, 65_535, 70_000];
    let mut data_wire = (0, 0); // (to_local, to_visitor)
    for (i, n) in sizes.iter().enumerate() {
        let msg = if i % 2 == 0 {
            Message::Binary(vec![7u8; *n].into())
        } else {
            Message::Text("t".repeat(*n).into())
        };
        ws.send(msg.clone()).await.unwrap();
        let back = tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
        data_wire.0 += header_len(*n, true) + n;
        data_wire.1 += header_len(*n, false) + n;
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    // Read the server's close answer and the end of the stream.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(STEP, ws.next()).await {}
    drop(ws);
    let after = scrape_until(&edge, "the WebSocket to end", |s| {
        s.get("burrow_edge_websockets_open", &t) == 0.0
    })
    .await;

    let ws_counter = |name, dir, class| {
        after.delta(
            &before,
            name,
            &[t[0], t[1], ("direction", dir), ("class", class)],
        )
    };
    let k = sizes.len() as f64;
    let m = "burrow_edge_websocket_messages_total";
    let b = "burrow_edge_websocket_bytes_total";
    assert_eq!(ws_counter(m, "to_local", "data"), k);
    assert_eq!(ws_counter(m, "to_visitor", "data"), k);
    assert_eq!(ws_counter(m, "to_local", "control"), 1.0);
    assert_eq!(ws_counter(m, "to_visitor", "control"), 1.0);
    assert_eq!(ws_counter(b, "to_local", "data"), data_wire.0 as f64);
    assert_eq!(ws_counter(b, "to_visitor", "data"), data_wire.1 as f64);
    // The visitor's close: masked, code + "done"; the local server's answer: code only.
    let close_out = header_len(6, true) + 6;
    assert_eq!(ws_counter(b, "to_local", "control"), close_out as f64);
    // The local server's answer echoes the code and the reason, unmasked.
    let close_back = (header_len(6, false) + 6) as f64;
    assert_eq!(ws_counter(b, "to_visitor", "control"), close_back);
    let closes = |dir, code| {
        after.delta(
            &before,
            "burrow_edge_websocket_close_frames_total",
            &[t[0], t[1], ("direction", dir), ("code", code)],
        )
    };
    assert_eq!(closes("to_local", "1000"), 1.0);
    assert_eq!(closes("to_visitor", "1000"), 1.0);
    assert_eq!(
        after.delta(&before, "burrow_edge_websockets_total", &t),
        1.0
    );
    let upgrades = after.delta(
        &before,
        "burrow_edge_http_requests_total",
        &[t[0], t[1], ("status_class", "1xx")],
    );
    assert_eq!(upgrades, 1.0);
    let bytes = |dir| {
        after.delta(
            &before,
            "burrow_edge_tunnel_bytes_total",
            &[t[0], t[1], ("direction", dir)],
        )
    };
    assert_eq!(bytes("in"), (data_wire.0 + close_out) as f64);
    assert_eq!(bytes("out"), data_wire.1 as f64 + close_back);
    edge.stop().await;
}

#[tokio::test]
async fn keepalive_pings_to_an_idle_visitor_are_counted_with_their_round_trip() {
    let edge =
        standalone_edge_with(|l| l.ws_ping_interval = Some(Duration::from_millis(100))).await;
    let local = local_ws_echo().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "idle"],
    )
    .await;
    let t = tunnel("idle");
    let url = format!("ws://idle.localhost:{}/", edge.http.port());
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(url.into_client_request().unwrap(), tcp)
        .await
        .unwrap();
    // Reading makes the client answer pings with pongs.
    let mut pings = 0;
    while pings < 3 {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Ping(p))) => {
                assert!(p.is_empty());
                pings += 1;
            }
            other => panic!("expected a keepalive ping, got {other:?}"),
        }
    }
    // The edge counts a ping once it has written it, so the client may read the third
    // before the counter moves: wait for both.
    let s = scrape_until(&edge, "the pings counted and the pongs timed", |s| {
        s.get("burrow_edge_websocket_pings_total", &[]) >= 3.0
            && s.get("burrow_edge_websocket_ping_rtt_seconds_count", &[]) >= 2.0
    })
    .await;
    let sent = s.get("burrow_edge_websocket_pings_total", &[]);
    let timed = s.get("burrow_edge_websocket_ping_rtt_seconds_count", &[]);
    assert!(sent >= 3.0 && timed <= sent, "sent {sent}, timed {timed}");
    // Round trips on loopback are well under a second.
    assert!(s.get("burrow_edge_websocket_ping_rtt_seconds_sum", &[]) < timed);
    // The pongs went on to the local server as control frames.
    assert!(
        s.get(
            "burrow_edge_websocket_messages_total",
            &[t[0], t[1], ("direction", "to_local"), ("class", "control")]
        ) >= timed
    );
    edge.stop().await;
}

#[tokio::test]
async fn policy_refusals_are_counted_by_reason() {
    let edge = standalone_edge().await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &[
            "http",
            &port,
            "--subdomain",
            "guarded",
            "--allow-ip",
            "10.0.0.0/8",
        ],
    )
    .await;
    let t = tunnel("guarded");
    let before = scrape(&edge).await;
    for _ in 0..2 {
        let (status, _, _) = visit(&edge, "guarded", "GET", "/hello", &[], "").await;
        assert_eq!(status, 403);
    }
    let after = scrape(&edge).await;
    assert_eq!(
        after.delta(
            &before,
            "burrow_edge_policy_refusals_total",
            &[t[0], t[1], ("reason", "ip")]
        ),
        2.0
    );
    assert_eq!(
        after.delta(
            &before,
            "burrow_edge_http_requests_total",
            &[t[0], t[1], ("status_class", "4xx")]
        ),
        2.0
    );

    let _locked = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &[
            "http",
            &port,
            "--subdomain",
            "locked",
            "--basic-auth",
            "ann:correct-horse",
        ],
    )
    .await;
    let t = tunnel("locked");
    let before = scrape(&edge).await;
    let (status, _, _) = visit(&edge, "locked", "GET", "/hello", &[], "").await;
    assert_eq!(status, 401);
    let wrong = format!("Basic {}", b64("ann:wrong-horse"));
    let (status, _, _) = visit(
        &edge,
        "locked",
        "GET",
        "/hello",
        &[("authorization", &wrong)],
        "",
    )
    .await;
    assert_eq!(status, 401);
    let right = format!("Basic {}", b64("ann:correct-horse"));
    let (status, _, _) = visit(
        &edge,
        "locked",
        "GET",
        "/hello",
        &[("authorization", &right)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let after = scrape(&edge).await;
    assert_eq!(
        after.delta(
            &before,
            "burrow_edge_policy_refusals_total",
            &[t[0], t[1], ("reason", "basic_auth")]
        ),
        2.0
    );
    // A missing password costs nothing; a wrong and a right one one argon2 run each.
    assert_eq!(
        after.delta(&before, "burrow_edge_basic_auth_verifications_total", &[]),
        2.0
    );
    edge.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn readyz_is_503_until_the_edge_registers_and_again_when_the_control_plane_is_gone(
    pool: PgPool,
) {
    // No control plane answers here yet.
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = unused.local_addr().unwrap();
    drop(unused);
    let edge = start_edge(
        burrow_edge::ControlConfig::Remote {
            url: format!("http://{dead}"),
            edge_token: "brw_edge_unused".to_owned().into(),
            ca_pem: None,
        },
        identity(),
        None,
        |_| {},
    )
    .await;
    let (status, _, body) = admin_get(edge.admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("not registered"), "{body}");
    let (status, _, _) = admin_get(edge.admin, "/healthz").await;
    assert_eq!(status, 200);
    edge.stop().await;

    let cp = start_control(pool).await;
    let edge = start_edge(cp.edge_control().await, identity(), None, |_| {}).await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, _, body) = admin_get(edge.admin, "/readyz").await;
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert_eq!(status, 503);
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The control plane goes away: the next heartbeat (every second here) gets no answer.
    cp.shutdown.cancel();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, _, body) = admin_get(edge.admin, "/readyz").await;
        if status == 503 {
            assert!(
                body.contains("did not answer the latest heartbeat"),
                "{body}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, _) = admin_get(edge.admin, "/healthz").await;
    assert_eq!(status, 200);
    edge.stop().await;
}
