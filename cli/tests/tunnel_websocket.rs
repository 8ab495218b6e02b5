//! WebSocket through a real tunnel: an in-process standalone edge, the real `burrow` binary,
//! and a local tokio-tungstenite echo server (or a raw TCP server where a WebSocket library
//! would get in the way).

#![allow(
    clippy::unwrap_used,
    clippy::result_large_err,
    clippy::collapsible_match
)]

mod tunnel_support;

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tunnel_support::*;

/// How long any single WebSocket step may take.
const STEP: Duration = Duration::from_secs(30);

/// What the local echo server saw.
#[derive(Default)]
struct Seen {
    /// Request line target and headers of each upgrade request.
    requests: Vec<(String, Vec<(String, String)>)>,
    /// Close frames received from visitors.
    closes: Vec<Option<(u16, String)>>,
}

fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(64 << 20);
    c.max_frame_size = Some(32 << 20);
    c
}

/// A local echo server: echoes text and binary messages; `close-me` makes it close with
/// 4001 "bye server"; `die` makes it drop the TCP connection without a close frame. Picks
/// `superchat` when offered.
async fn local_echo_server() -> (std::net::SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let (tx, mut rx) = mpsc::channel(1);
                let cb = move |req: &Request, mut resp: Response| {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                        .collect::<Vec<_>>();
                    let offered = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if offered.split(',').any(|p| p.trim() == "superchat") {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", "superchat".parse().unwrap());
                    }
                    let _ = tx.try_send((req.uri().to_string(), headers));
                    Ok(resp)
                };
                let Ok(mut ws) =
                    tokio_tungstenite::accept_hdr_async_with_config(s, cb, Some(ws_config())).await
                else {
                    return;
                };
                if let Some(r) = rx.recv().await {
                    seen.lock().await.requests.push(r);
                }
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(t) if t.as_str() == "close-me" => {
                            let _ = ws
                                .send(Message::Close(Some(CloseFrame {
                                    code: CloseCode::from(4001),
                                    reason: "bye server".into(),
                                })))
                                .await;
                        }
                        Message::Text(t) if t.as_str() == "die" => return,
                        Message::Text(_) | Message::Binary(_) => {
                            if ws.send(msg).await.is_err() {
                                return;
                            }
                        }
                        Message::Close(c) => {
                            seen.lock()
                                .await
                                .closes
                                .push(c.map(|c| (u16::from(c.code), c.reason.to_string())));
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, seen)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `sub` through the edge with extra request headers.
async fn connect(
    edge: &Edge,
    sub: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> (Ws, http::Response<Option<Vec<u8>>>) {
    let url = format!("ws://{sub}.localhost:{}{path}", edge.http.port());
    let mut req = url.into_client_request().unwrap();
    for (k, v) in extra {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let (ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async_with_config(
            req,
            MaybeTlsStream::Plain(tcp),
            Some(ws_config()),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    (ws, resp)
}

async fn next(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a message in time")
            .expect("the stream is open")
            .expect("a valid message");
        // The edge's keepalive pings are not the local server's doing.
        if matches!(m, Message::Ping(_)) {
            continue;
        }
        return m;
    }
}

async fn tunnel_to_echo() -> (Edge, Agent, Arc<Mutex<Seen>>, String) {
    let (local, seen) = local_echo_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "ws"],
    )
    .await;
    (edge, agent, seen, "ws".to_owned())
}

#[tokio::test]
async fn text_binary_and_empty_messages_of_every_boundary_size_echo_through_the_tunnel() {
    let (edge, _agent, _seen, sub) = tunnel_to_echo().await;
    let (mut ws, resp) = connect(&edge, &sub, "/socket", &[]).await;
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("hello"));
    ws.send(Message::text("")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text(""));
    ws.send(Message::binary(Vec::new())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(Vec::new()));
    for size in [1usize, 125, 126, 127, 65_535, 65_536, 1 << 20, 16 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        ws.send(Message::binary(payload.clone())).await.unwrap();
        match next(&mut ws).await {
            Message::Binary(b) => assert!(
                b[..] == payload[..],
                "binary message of {size} bytes differs"
            ),
            other => panic!("expected binary for {size}, got {other:?}"),
        }
        let text = "x".repeat(size.min(1 << 20));
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text(text), "text of {size}");
    }
}

#[tokio::test]
async fn big_and_small_messages_stay_exact_across_quiet_spells_after_bursts() {
    // After a burst the relays grow their buffers; after a quiet second they shrink them
    // again, while a read is pending. Nothing may be lost or reordered across that.
    let (edge, _agent, _seen, sub) = tunnel_to_echo().await;
    let (mut ws, _) = connect(&edge, &sub, "/socket", &[]).await;
    for round in 0..3u8 {
        let big: Vec<u8> = (0..(2usize << 20))
            .map(|i| (i * 7 + usize::from(round)) as u8)
            .collect();
        ws.send(Message::binary(big.clone())).await.unwrap();
        match next(&mut ws).await {
            Message::Binary(b) => assert!(b[..] == big[..], "big message of round {round}"),
            other => panic!("expected the big message back, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(1300)).await;
        for i in 0..20 {
            let small = format!("round {round} message {i}");
            ws.send(Message::text(small.clone())).await.unwrap();
            assert_eq!(next(&mut ws).await, Message::text(small));
        }
    }
}

#[tokio::test]
async fn a_fragmented_message_arrives_whole_and_a_ping_gets_its_pong() {
    let (edge, _agent, _seen, sub) = tunnel_to_echo().await;
    let (mut ws, _) = connect(&edge, &sub, "/", &[]).await;
    ws.send(Message::Frame(Frame::message(
        "frag",
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        "men",
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    // A control frame may sit between fragments (RFC 6455 §5.4).
    ws.send(Message::Ping(b"mid".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message(
        "ted",
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    let mut got_pong = false;
    let mut got_text = false;
    while !(got_pong && got_text) {
        match next(&mut ws).await {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"mid");
                got_pong = true;
            }
            Message::Text(t) => {
                assert_eq!(t.as_str(), "fragmented");
                got_text = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_close_from_the_visitor_reaches_the_local_server_with_code_and_reason() {
    let (edge, _agent, seen, sub) = tunnel_to_echo().await;
    let (mut ws, _) = connect(&edge, &sub, "/", &[]).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye client".into(),
    })))
    .await
    .unwrap();
    // The server echoes the close; the stream then ends.
    match next(&mut ws).await {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 4000),
        other => panic!("expected the close echo, got {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(c) = seen.lock().await.closes.first().cloned() {
            assert_eq!(c, Some((4000, "bye client".to_owned())));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the local server never saw the close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_close_from_the_local_server_reaches_the_visitor_with_code_and_reason() {
    let (edge, _agent, _seen, sub) = tunnel_to_echo().await;
    let (mut ws, _) = connect(&edge, &sub, "/", &[]).await;
    ws.send(Message::text("close-me")).await.unwrap();
    match next(&mut ws).await {
        Message::Close(Some(c)) => {
            assert_eq!(u16::from(c.code), 4001);
            assert_eq!(c.reason.as_str(), "bye server");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn the_upgrade_request_reaches_the_local_server_with_every_header_and_the_subprotocol_comes_back(
) {
    let (edge, _agent, seen, sub) = tunnel_to_echo().await;
    let (mut ws, resp) = connect(
        &edge,
        &sub,
        "/socket?room=1&x=%20y",
        &[
            ("sec-websocket-protocol", "chat, superchat"),
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            ("origin", "http://example.com"),
            ("cookie", "session=abc"),
        ],
    )
    .await;
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "superchat"
    );
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("x"));
    let seen = seen.lock().await;
    let (target, headers) = &seen.requests[0];
    assert_eq!(target, "/socket?room=1&x=%20y");
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} missing in {headers:?}"))
    };
    assert_eq!(get("sec-websocket-protocol"), "chat, superchat");
    assert_eq!(
        get("sec-websocket-extensions"),
        "permessage-deflate; client_max_window_bits"
    );
    assert_eq!(get("origin"), "http://example.com");
    assert_eq!(get("cookie"), "session=abc");
    assert_eq!(get("sec-websocket-version"), "13");
    assert!(!get("sec-websocket-key").is_empty());
}

/// A raw local server: answers the upgrade with `extra` response headers, then records every
/// byte it receives and sends `to_send`.
async fn raw_local_server(
    extra: &'static str,
    to_send: Vec<u8>,
) -> (std::net::SocketAddr, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await.unwrap();
        assert!(header_value(&head, "sec-websocket-key").is_some(), "{head}");
        let resp = switching_protocols(&head, extra);
        s.write_all(resp.as_bytes()).await.unwrap();
        s.write_all(&to_send).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let _ = tx.send((head, got)).await;
    });
    (addr, rx)
}

/// Unusual frames: RSV1 set (what permessage-deflate sends), a reserved opcode, invalid UTF-8
/// in a text frame, a close without a code.
fn odd_frames(masked: bool) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = Vec::new();
    let mut push = |first: u8, payload: &[u8]| {
        out.push(first);
        let m = if masked { 0x80 } else { 0 };
        out.push(m | payload.len() as u8);
        if masked {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
    };
    push(0xC1, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]); // RSV1 text ("Hello" deflated)
    push(0x83, b"reserved opcode");
    push(0x81, &[0xff, 0xfe, 0xfd]); // invalid UTF-8
    push(0x88, b""); // close, no code
    out
}

#[tokio::test]
async fn after_the_101_bytes_pass_unchanged_both_ways_so_permessage_deflate_just_works() {
    let from_server = odd_frames(false);
    let (local, mut rx) = raw_local_server(
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        from_server.clone(),
    )
    .await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "raw"],
    )
    .await;

    let mut v = TcpStream::connect(edge.http).await.unwrap();
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: raw.localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        edge.http.port()
    );
    v.write_all(req.as_bytes()).await.unwrap();
    let from_client = odd_frames(true);

    let head = tokio::time::timeout(STEP, read_head(&mut v))
        .await
        .unwrap()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate"),
        "{head}"
    );
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    // Frames only after the 101 (bytes sent before it are refused; see below).
    v.write_all(&from_client).await.unwrap();
    let mut got = vec![0u8; from_server.len()];
    tokio::time::timeout(STEP, v.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, from_server, "server → visitor bytes changed");
    drop(v);
    let (req_head, at_server) = tokio::time::timeout(STEP, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        req_head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate; client_max_window_bits"),
        "{req_head}"
    );
    assert_eq!(
        &at_server[..from_client.len()],
        &from_client[..],
        "visitor → server bytes changed"
    );
}

#[tokio::test]
async fn when_the_local_server_drops_the_connection_the_visitor_gets_a_close_frame() {
    let (edge, _agent, _seen, sub) = tunnel_to_echo().await;
    let (mut ws, _) = connect(&edge, &sub, "/", &[]).await;
    ws.send(Message::text("die")).await.unwrap();
    match next(&mut ws).await {
        Message::Close(Some(c)) => assert!(
            [1001u16, 1011].contains(&u16::from(c.code)),
            "close code {}",
            c.code
        ),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn when_the_agent_goes_away_the_visitor_gets_a_close_frame() {
    let (edge, mut agent, _seen, sub) = tunnel_to_echo().await;
    let (mut ws, _) = connect(&edge, &sub, "/", &[]).await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("before"));
    agent.child.kill().await.unwrap();
    match next(&mut ws).await {
        Message::Close(Some(c)) => assert!(
            [1001u16, 1011].contains(&u16::from(c.code)),
            "close code {}",
            c.code
        ),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn an_error_answer_to_an_upgrade_reaches_the_visitor_with_its_body() {
    let local = local_http_server().await; // answers 404 "not found" to /nope
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "noup"],
    )
    .await;
    let (status, _, body) = visit(
        &edge,
        "noup",
        "GET",
        "/nope",
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(&body[..], b"not found");
}

#[tokio::test]
async fn a_plain_200_answer_to_an_upgrade_reaches_the_visitor_with_its_body() {
    let local = local_http_server().await; // answers 200 "hello from GET /hello"
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "plain"],
    )
    .await;
    let (status, _, body) = visit(
        &edge,
        "plain",
        "GET",
        "/hello",
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], b"hello from GET /hello");
}

#[tokio::test]
async fn two_hundred_concurrent_websockets_share_the_tunnel_without_cross_talk() {
    let (edge, _agent, _seen, sub) = tunnel_to_echo().await;
    let edge = Arc::new(edge);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let edge = Arc::clone(&edge);
        let sub = sub.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = connect(&edge, &sub, &format!("/c{i}"), &[]).await;
            for j in 0..5 {
                let msg = format!("conn {i} msg {j}");
                ws.send(Message::text(msg.clone())).await.unwrap();
                assert_eq!(next(&mut ws).await, Message::text(msg));
            }
            ws.close(None).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn every_worker_thread_setting_carries_concurrent_websockets_on_every_lane() {
    // (edge threads, agent --worker-threads): the shared pool on both ends, one thread, and
    // more threads than this machine has CPUs or the agent has lanes.
    let (local, _seen) = local_echo_server().await;
    let port = local.port().to_string();
    for (edge_threads, agent_threads) in [(0, "0"), (1, "1"), (3, "3"), (5, "64")] {
        let edge = Arc::new(standalone_edge_with(|l| l.worker_threads = edge_threads).await);
        let _agent = start_agent(
            &edge,
            STANDALONE_TOKEN,
            &[
                "http",
                &port,
                "--subdomain",
                "threads",
                "--lanes",
                "4",
                "--worker-threads",
                agent_threads,
            ],
        )
        .await;
        let mut tasks = Vec::new();
        for i in 0..24 {
            let edge = Arc::clone(&edge);
            tasks.push(tokio::spawn(async move {
                let (mut ws, _) = connect(&edge, "threads", &format!("/t{i}"), &[]).await;
                for j in 0..3 {
                    let msg = format!("conn {i} msg {j}");
                    ws.send(Message::text(msg.clone())).await.unwrap();
                    assert_eq!(next(&mut ws).await, Message::text(msg));
                }
                let big: Vec<u8> = (0..300_000).map(|k| (k * 13 + i) as u8).collect();
                ws.send(Message::binary(big.clone())).await.unwrap();
                match next(&mut ws).await {
                    Message::Binary(b) => assert!(b[..] == big[..], "connection {i}"),
                    other => panic!("expected the binary message back, got {other:?}"),
                }
                ws.close(None).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(_agent);
        Arc::into_inner(edge)
            .expect("no task holds the edge any more")
            .stop()
            .await;
    }
}

#[test]
fn a_worker_thread_count_out_of_range_is_refused_with_the_range() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["http", "3000", "--worker-threads", "257"])
        .env("BURROW_TOKEN", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--worker-threads") && err.contains("0..=256"),
        "{err}"
    );
}

#[tokio::test]
async fn an_idle_visitor_websocket_gets_keepalive_pings_and_stays_usable() {
    let (local, _seen) = local_echo_server().await;
    let edge =
        standalone_edge_with(|l| l.ws_ping_interval = Some(Duration::from_millis(200))).await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "idle"],
    )
    .await;
    let (mut ws, _) = connect(&edge, "idle", "/", &[]).await;
    // Five ping intervals of silence from both ends: the edge pings, the client answers.
    let mut pings = 0;
    while pings < 5 {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Ping(p) => {
                assert!(p.is_empty());
                pings += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("still here"));
}

#[tokio::test]
async fn the_agent_logs_one_line_per_websocket_with_messages_and_close_code() {
    let (edge, agent, _seen, sub) = tunnel_to_echo().await;
    let (mut ws, _) = connect(&edge, &sub, "/logged", &[]).await;
    for _ in 0..3 {
        ws.send(Message::text("m")).await.unwrap();
        next(&mut ws).await;
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let log = agent.stderr_text().await;
        if let Some(line) = log.lines().find(|l| l.contains("WS  /logged")) {
            assert!(line.contains("in 3 msgs"), "{line}");
            assert!(line.contains("out 3 msgs"), "{line}");
            assert!(line.contains("close 1000"), "{line}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no WebSocket line in:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_silent_visitor_is_closed_after_the_idle_timeout_with_1001_toward_the_local_server() {
    let (local, seen) = local_echo_server().await;
    let edge = standalone_edge_with(|l| {
        l.ws_ping_interval = Some(Duration::from_millis(200));
        l.ws_idle_timeout = Some(Duration::from_millis(1000));
    })
    .await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "silent"],
    )
    .await;
    // A visitor that upgrades and then neither reads nor writes.
    let mut v = TcpStream::connect(edge.http).await.unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: silent.localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        edge.http.port()
    );
    v.write_all(req.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    loop {
        if let Some(c) = seen.lock().await.closes.first().cloned() {
            assert_eq!(c.map(|c| c.0), Some(1001));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the silent visitor was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    drop(v);
}

#[tokio::test]
async fn over_the_tunnels_websocket_limit_a_visitor_gets_429_before_the_upgrade() {
    let (local, _seen) = local_echo_server().await;
    let edge = standalone_edge_with(|l| l.default_max_websockets_per_tunnel = 2).await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "full"],
    )
    .await;
    let (mut a, _) = connect(&edge, "full", "/", &[]).await;
    let (_b, _) = connect(&edge, "full", "/", &[]).await;
    let url = format!("ws://full.localhost:{}/", edge.http.port());
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let refused = tokio_tungstenite::client_async(url.clone(), tcp).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("expected 429, got {other:?}"),
    }
    // Closing one frees its slot.
    a.close(None).await.unwrap();
    while let Some(Ok(_)) = a.next().await {}
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let tcp = TcpStream::connect(edge.http).await.unwrap();
        if tokio_tungstenite::client_async(url.clone(), tcp)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn over_the_tunnels_request_rate_a_visitor_gets_429() {
    let local = local_http_server().await;
    let edge = standalone_edge_with(|l| l.default_max_requests_per_second_per_tunnel = 3).await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "busy"],
    )
    .await;
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..10 {
        let (status, headers, _) = visit(&edge, "busy", "GET", "/hello", &[], "").await;
        match status.as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(headers.get("retry-after").unwrap(), "1");
                limited += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(ok >= 3 && limited >= 4, "ok {ok}, limited {limited}");
}

#[tokio::test]
async fn a_websocket_over_its_byte_rate_is_slowed_not_cut() {
    let (local, _seen) = local_echo_server().await;
    let edge =
        standalone_edge_with(|l| l.default_max_websocket_bytes_per_second = 256 * 1024).await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "slow"],
    )
    .await;
    let (mut ws, _) = connect(&edge, "slow", "/", &[]).await;
    let started = tokio::time::Instant::now();
    // 768 KiB each way at 256 KiB/s: about 3 s, never much less.
    let payload = vec![7u8; 768 * 1024];
    ws.send(Message::binary(payload.clone())).await.unwrap();
    match next(&mut ws).await {
        Message::Binary(b) => assert_eq!(b.len(), payload.len()),
        other => panic!("unexpected {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "not throttled: {took:?}"
    );
}

/// A raw local server that answers every upgrade by what it finds: 400 without a
/// `Sec-WebSocket-Key`, 426 for a version other than 13, else 101 after `delay`. Reports each
/// request head, then every byte received after it.
async fn judging_local_server(
    delay: Duration,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let get = |name: &str| header_value(&head, name);
                let answer = match (get("sec-websocket-key"), get("sec-websocket-version")) {
                    (None, _) => "HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nmissing key".to_owned(),
                    (Some(_), v) if v.as_deref() != Some("13") => {
                        "HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 11\r\n\r\nwant v13 :)".to_owned()
                    }
                    (Some(_), _) => {
                        tokio::time::sleep(delay).await;
                        switching_protocols(&head, "")
                    }
                };
                let _ = s.write_all(answer.as_bytes()).await;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send((head, got));
            });
        }
    });
    (addr, rx)
}

/// Writes `parts` to the edge as a visitor (pausing `gap` between them) and returns the
/// response head and whatever body bytes came with it.
async fn raw_visit(edge: &Edge, parts: &[&[u8]], gap: Duration) -> String {
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        s.write_all(p).await.unwrap();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn upgrade_head(edge: &Edge, sub: &str, extra: &str) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: {sub}.localhost:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{extra}\r\n",
        edge.http.port()
    )
}

#[tokio::test]
async fn an_upgrade_with_a_missing_key_or_a_wrong_version_gets_the_local_servers_own_answer() {
    let (local, mut heads) = judging_local_server(Duration::ZERO).await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "judge"],
    )
    .await;

    let no_key = upgrade_head(&edge, "judge", "Sec-WebSocket-Version: 13\r\n");
    let answer = raw_visit(&edge, &[no_key.as_bytes()], Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with("missing key"), "{answer}");
    let (head, _) = heads.recv().await.unwrap();
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-key"),
        "{head}"
    );

    let old = upgrade_head(
        &edge,
        "judge",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n",
    );
    let answer = raw_visit(&edge, &[old.as_bytes()], Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{answer}"
    );
    assert!(answer.ends_with("want v13 :)"), "{answer}");
    let (head, _) = heads.recv().await.unwrap();
    assert!(
        head.contains("Sec-WebSocket-Version: 8") || head.contains("sec-websocket-version: 8"),
        "{head}"
    );

    // A malformed key is the local server's business too: it reaches it unchanged.
    let odd = upgrade_head(
        &edge,
        "judge",
        "Sec-WebSocket-Key: not base64!\r\nSec-WebSocket-Version: 13\r\n",
    );
    let answer = raw_visit(&edge, &[odd.as_bytes()], Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let (head, _) = heads.recv().await.unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-key: not base64!"),
        "{head}"
    );
}

#[tokio::test]
async fn bytes_sent_with_the_upgrade_request_are_refused_with_400_and_never_reach_the_local_server()
{
    let (local, mut heads) = judging_local_server(Duration::ZERO).await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "early"],
    )
    .await;
    let head = upgrade_head(
        &edge,
        "early",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    // A masked text frame, then a smuggled request, in the same write as the upgrade.
    let mut smuggled = head.clone().into_bytes();
    smuggled.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
    smuggled.extend_from_slice(b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let answer = raw_visit(&edge, &[&smuggled], Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("101 Switching Protocols"),
        "the page says why: {answer}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), heads.recv())
            .await
            .is_err(),
        "the upgrade reached the local server"
    );

    // The same request without the early bytes is fine.
    let answer = raw_visit(&edge, &[head.as_bytes()], Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    heads.recv().await.unwrap();
}

#[tokio::test]
async fn bytes_sent_while_the_local_server_is_still_answering_the_upgrade_are_refused_with_400() {
    // The local server takes 600 ms to accept; the visitor sends a frame after 100 ms.
    let (local, mut heads) = judging_local_server(Duration::from_millis(600)).await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "eager"],
    )
    .await;
    let head = upgrade_head(
        &edge,
        "eager",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    let frame: &[u8] = &[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    let answer = raw_visit(&edge, &[head.as_bytes(), frame], Duration::from_millis(100)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The local server saw the upgrade (it had already been forwarded) but never the
    // visitor's frame: at most the agent's own close frame (1001, going away).
    let (_, after) = heads.recv().await.unwrap();
    assert!(
        after.is_empty() || (after.len() == 8 && after[0] == 0x88),
        "bytes reached the local server: {after:?}"
    );
}

#[tokio::test]
async fn a_websocket_that_stays_over_its_byte_rate_is_closed_with_1008_and_a_reason_both_ways() {
    let (local, seen) = local_echo_server().await;
    let edge = standalone_edge_with(|l| {
        l.default_max_websocket_bytes_per_second = 64 * 1024;
        l.ws_rate_limit_grace = Duration::from_millis(800);
    })
    .await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "hog"],
    )
    .await;
    let (ws, _) = connect(&edge, "hog", "/", &[]).await;
    let (mut tx, mut rx) = ws.split();
    // Send 32 KiB messages as fast as the edge takes them, far over 64 KiB/s, for as long
    // as the connection lasts.
    let sender = tokio::spawn(async move {
        let chunk = vec![1u8; 32 * 1024];
        while tx.send(Message::binary(chunk.clone())).await.is_ok() {}
    });
    let started = tokio::time::Instant::now();
    let close = loop {
        let m = tokio::time::timeout(STEP, rx.next())
            .await
            .expect("the edge closed the connection in time");
        match m {
            Some(Ok(Message::Close(c))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("65536 bytes/s"), "{}", close.reason);
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed before the grace ran out"
    );
    sender.abort();
    // The local server was told the same.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let closes = seen.lock().await.closes.clone();
        if let Some(Some((code, reason))) = closes.first() {
            assert_eq!(*code, 1008);
            assert!(reason.contains("bytes/s"), "{reason}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the local server never got a close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Upgrades a raw connection to the tunnel's local echo server, sends `frame`, and returns
/// every byte that comes back until the connection closes.
async fn answer_to_a_raw_frame(edge: &Edge, sub: &str, frame: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    let head = upgrade_head(
        edge,
        sub,
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        got.push(b[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(frame).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    rest
}

#[tokio::test]
async fn a_visitor_frame_that_breaks_the_protocol_gets_1002_or_1007_when_the_local_server_hangs_up()
{
    // tokio-tungstenite drops the TCP connection on a protocol error without a close frame; a
    // direct client would see the connection end, a tunnelled one gets the close frame the
    // edge writes in its place, with the code an endpoint would use (not 1001).
    let (edge, _agent, _seen, sub) = tunnel_to_echo().await;
    // A masked frame with reserved opcode 3: an unmasked close with 1002 comes back.
    let rest = answer_to_a_raw_frame(&edge, &sub, &[0x83, 0x80, 1, 2, 3, 4]).await;
    assert_eq!(rest, [0x88, 0x02, 0x03, 0xEA], "{rest:02x?}");
    // A masked text frame that is not UTF-8 (mask 0: the payload as is): 1007.
    let rest = answer_to_a_raw_frame(&edge, &sub, &[0x81, 0x82, 0, 0, 0, 0, 0xce, 0xff]).await;
    assert_eq!(rest, [0x88, 0x02, 0x03, 0xEF], "{rest:02x?}");
}

/// A local server whose `/flood` WebSockets get a 60-byte text message every few
/// microseconds, each from its own `write` (so each becomes one small DATA frame on the agent
/// link), whose `/events` answer is an endless chunked response of such pieces, and whose
/// other WebSockets answer every read with `ok`. Counts the flood and events connections that
/// ended (their writes failed).
fn flooding_local_server() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ended2 = Arc::clone(&ended);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let ended = Arc::clone(&ended2);
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                if head.starts_with("GET /big ") {
                    // An endless download in 16 KiB chunks: large frames to HTTP/2.
                    let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
                    let mut chunk = b"4000\r\n".to_vec();
                    chunk.extend_from_slice(&[b'b'; 0x4000]);
                    chunk.extend_from_slice(b"\r\n");
                    if s.write_all(answer.as_bytes()).is_ok() {
                        while s.write_all(&chunk).is_ok() {}
                    }
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                if head.starts_with("GET /events ") {
                    // Server-Sent Events: a 60-byte chunk every few microseconds.
                    let answer = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
                    let mut chunk = b"3c\r\n".to_vec();
                    chunk.extend_from_slice(&[b'a'; 60]);
                    chunk.extend_from_slice(b"\r\n");
                    let _ = s.set_nodelay(true);
                    if s.write_all(answer.as_bytes()).is_ok() {
                        while s.write_all(&chunk).is_ok() {
                            std::thread::sleep(Duration::from_micros(20));
                        }
                    }
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                let answer = switching_protocols(&head, "");
                if s.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                let _ = s.set_nodelay(true);
                if head.starts_with("GET /flood ") {
                    // 60 bytes of text: a small frame to HTTP/2, yet enough bytes to fill
                    // the socket buffers between the edge and the stalled visitor quickly.
                    let mut message = vec![0x81, 60];
                    message.extend_from_slice(&[b'a'; 60]);
                    while s.write_all(&message).is_ok() {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                } else {
                    while matches!(s.read(&mut buf), Ok(n) if n > 0) {
                        if s.write_all(b"\x81\x02ok").is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, ended)
}

/// A standalone edge with `tweak`, an agent for [`flooding_local_server`] on `sub`, and a
/// canary WebSocket to its `/echo` (see [`canary_echoes`]). Also returns the count of flood,
/// download and events answers that ended.
async fn flooded_tunnel(
    tweak: impl FnOnce(&mut burrow_edge::config::Limits),
    sub: &str,
) -> (Edge, Agent, Arc<std::sync::atomic::AtomicUsize>, Ws) {
    let edge = standalone_edge_with(tweak).await;
    let (local, ended) = flooding_local_server();
    let port = local.port().to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        // One connection, so the canary shares it with the flood.
        &["http", &port, "--subdomain", sub, "--lanes", "1"],
    )
    .await;
    let (canary, _) = connect(&edge, sub, "/echo", &[]).await;
    (edge, agent, ended, canary)
}

/// One round of a canary WebSocket to [`flooding_local_server`] on a shared agent link: it
/// sends `hi`, must get `ok` back, then waits 50 ms. Panics with the agent's log otherwise.
async fn canary_echoes(canary: &mut Ws, agent: &Agent, started: std::time::Instant, round: usize) {
    if let Err(e) = canary.send(Message::text("hi")).await {
        panic!(
            "the canary failed after {:?}: {e}; agent: {}",
            started.elapsed(),
            agent.stderr_text().await
        );
    }
    match tokio::time::timeout(Duration::from_secs(3), canary.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), "ok"),
        other => panic!(
            "the canary got {other:?} after {:?} (round {round}); agent: {}",
            started.elapsed(),
            agent.stderr_text().await
        ),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// An edge link of 1 MiB windows, whose stopped readers are cut after 300 ms. h2 allows
/// buffered small DATA frames a budget of half the connection window (here 512 Ki units, about
/// 2,700 frames of 60 bytes): less than one stream window of them left waiting in h2 by one
/// reader would use, yet enough that the edge's read-ahead, scheduled late on a loaded
/// machine, never reaches it (at the smallest windows it is 167 such frames, 3 ms of
/// [`flooding_local_server`]'s flood). Half the connection window is less than one stream
/// window, so a reader that stops is cut whether its frames came small or, coalesced by a
/// loaded agent, large.
fn tight_link(l: &mut burrow_edge::config::Limits) {
    l.h2_connection_window = 1 << 20;
    l.h2_stream_window = 1 << 20;
    l.stopped_reader_grace = Duration::from_millis(300);
}

/// Against a standalone edge with a [`tight_link`] and an agent for
/// [`flooding_local_server`] on `sub`: a visitor with a small receive
/// buffer sends `request` (`{host}` stands for its Host), checks that the answer starts with
/// `answer`, and then never reads. A canary WebSocket on the same agent must keep echoing
/// meanwhile, and the local server's endless answer must end: the edge cut the stalled visitor
/// off, not the agent's link. Returns the agent, for more checks of its log.
async fn a_stalled_visitor_is_cut_off_alone(sub: &str, request: &str, answer: &[u8]) -> Agent {
    let tweak = |l: &mut burrow_edge::config::Limits| {
        tight_link(l);
        l.ws_close_timeout = Duration::from_secs(1);
    };
    let (edge, agent, local_ended, mut canary) = flooded_tunnel(tweak, sub).await;

    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let mut stalled = sock.connect(edge.http).await.unwrap();
    let host = format!("{sub}.localhost:{}", edge.http.port());
    stalled
        .write_all(request.replace("{host}", &host).as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(STEP, stalled.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(first[..n].starts_with(answer), "{:?}", &first[..n]);

    let ended = || local_ended.load(std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(20) && !(ended() > 0 && rounds > 40) {
        canary_echoes(&mut canary, &agent, started, rounds).await;
        rounds += 1;
    }
    assert_eq!(
        ended(),
        1,
        "the edge should have cut the stalled visitor off"
    );
    let log = agent.stderr_text().await;
    assert!(!log.contains("reconnect"), "{log}");
    drop(stalled);
    agent
}

#[tokio::test]
async fn a_visitor_that_stops_reading_a_stream_of_small_messages_is_cut_off_and_the_other_tunnels_live_on(
) {
    let request = "GET /flood HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let agent = a_stalled_visitor_is_cut_off_alone("flood", request, b"HTTP/1.1 101").await;
    // The local server was told why: the agent logs the close code it relayed.
    let relayed = |log: &str| {
        log.lines()
            .any(|l| l.contains("/flood") && l.contains("close 1008"))
    };
    let mut log = agent.stderr_text().await;
    for _ in 0..50 {
        if relayed(&log) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = agent.stderr_text().await;
    }
    assert!(relayed(&log), "{log}");
}

#[tokio::test]
async fn small_messages_over_a_tunnels_byte_rate_close_that_websocket_and_the_other_tunnels_live_on(
) {
    // Holding the link's small frames back for the rate would use up h2's budget for the
    // whole link. The edge closes the WebSocket as over the limit once its backlog is full of
    // small frames, or after the grace if a loaded agent coalesced them into large ones.
    // (The link of 1 MiB windows of `tight_link`, but with room for one stopped reader: a
    // visitor slowed by a loaded machine is not mistaken for one that stopped.)
    // The stream window is a quarter of the default: h2's own budget (half the connection
    // window, 512 Ki units) then holds one whole stream window of these 62-byte frames
    // (2,114 frames × 194 units), so a moment in which the lane's HTTP/2 task reads the
    // socket ahead of the relay cannot end the link; with 512 KiB windows it could (1 run in
    // 4 on a 2-core machine).
    let tweak = |l: &mut burrow_edge::config::Limits| {
        l.h2_connection_window = 1 << 20;
        l.h2_stream_window = 128 * 1024;
        l.default_max_websocket_bytes_per_second = 4096;
        l.ws_rate_limit_grace = Duration::from_secs(8);
    };
    let (edge, agent, local_ended, mut canary) = flooded_tunnel(tweak, "chatty").await;
    let started = std::time::Instant::now();
    // A visitor that reads everything the flood sends it, at the rate it arrives.
    let (mut flood, _) = connect(&edge, "chatty", "/flood", &[]).await;
    let reader = tokio::spawn(async move {
        let mut messages = 0u64;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), flood.next()).await {
                Ok(Some(Ok(Message::Close(c)))) => return (c, messages),
                Ok(Some(Ok(_))) => messages += 1,
                other => panic!("the flood ended without a close frame: {other:?}"),
            }
        }
    });
    let mut rounds = 0;
    while !reader.is_finished() || rounds < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no close in time"
        );
        canary_echoes(&mut canary, &agent, started, rounds).await;
        rounds += 1;
    }
    let (close, messages) = reader.await.unwrap();
    let close = close.expect("a close code");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("4096 bytes/s"), "{}", close.reason);
    // The backlog read ahead reached the visitor before the close.
    assert!(messages > 64 * 1024 / 62, "{messages}");
    let deadline = std::time::Instant::now() + STEP;
    while local_ended.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = agent.stderr_text().await;
    assert!(!log.contains("reconnect"), "{log}");
}

#[tokio::test]
async fn visitors_that_stop_reading_downloads_cannot_take_the_links_whole_window() {
    // Room for four stream windows in the connection window: without a bound, four stalled
    // downloads would hold all of it and no other stream of the agent could receive a byte.
    let tweak = |l: &mut burrow_edge::config::Limits| {
        l.h2_connection_window = 4 * 65_535;
        l.h2_stream_window = 65_535;
        l.stopped_reader_grace = Duration::from_millis(300);
    };
    let (edge, agent, local_ended, mut canary) = flooded_tunnel(tweak, "files").await;
    let host = format!("files.localhost:{}", edge.http.port());
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(2048).unwrap();
        let mut s = sock.connect(edge.http).await.unwrap();
        s.write_all(format!("GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        stalled.push(s);
    }
    let started = std::time::Instant::now();
    for round in 0..40 {
        canary_echoes(&mut canary, &agent, started, round).await;
    }
    // Half the connection window holds two stopped readers; the others were cut.
    let ended = local_ended.load(std::sync::atomic::Ordering::SeqCst);
    assert!((5..=7).contains(&ended), "{ended} downloads ended");
    let log = agent.stderr_text().await;
    assert!(!log.contains("reconnect"), "{log}");
    drop(stalled);
}

/// A local listener whose accepted sockets have a small receive buffer (they inherit the
/// listener's), so a server that stops reading backs up at once; and its port.
fn small_buffer_listener() -> (tokio::net::TcpListener, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(16).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    (listener, port)
}

/// An agent for the local server on `port` as `sub`, with a 32 KiB stall backlog (the flag
/// reaches the relay and the body read-ahead) and a [`tight_link`] of its own: a local server
/// that stops is cut whether the edge sent it small frames or, loaded, coalesced large ones.
async fn agent_with_small_backlog(edge: &Edge, port: &str, sub: &str) -> Agent {
    let args = [
        "http",
        port,
        "--subdomain",
        sub,
        "--stall-buffer-bytes",
        "32768",
        "--h2-connection-window",
        "1048576",
        "--h2-stream-window",
        "1048576",
        "--stopped-reader-grace-ms",
        "300",
        // One connection, so every stream shares the link under test.
        "--lanes",
        "1",
    ];
    start_agent(edge, STANDALONE_TOKEN, &args).await
}

#[tokio::test]
async fn a_local_server_that_stops_reading_a_stream_of_small_messages_is_cut_off_with_1008_toward_the_visitor(
) {
    let edge = standalone_edge_with(|l| l.ws_close_timeout = Duration::from_secs(1)).await;
    // A local server that answers the upgrade and then never reads.
    let (listener, port) = small_buffer_listener();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let head = read_head(&mut s).await.unwrap_or_default();
            let answer = switching_protocols(&head, "");
            let _ = s.write_all(answer.as_bytes()).await;
            held.push(s);
        }
    });
    let _agent = agent_with_small_backlog(&edge, &port, "deaf").await;
    let mut visitor = std::net::TcpStream::connect(edge.http).unwrap();
    let head = format!(
        "GET /deaf HTTP/1.1\r\nHost: deaf.localhost:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        edge.http.port()
    );
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        visitor.write_all(head.as_bytes()).unwrap();
        visitor
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = visitor.read(&mut buf).unwrap();
            assert!(n > 0, "the edge hung up before the 101");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101"), "{got:?}");
        // Small masked text messages, one per write, paced so each one travels alone.
        let writer = visitor.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut writer = writer;
            let mut message = vec![0x81, 0x80 | 60, 1, 2, 3, 4];
            message.extend_from_slice(&[b'a' ^ 1; 60]);
            while writer.write_all(&message).is_ok() {
                std::thread::sleep(Duration::from_micros(20));
            }
        });
        // Whatever comes back after the 101 ends with the close frame.
        got.clear();
        loop {
            match visitor.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    let got = tokio::time::timeout(Duration::from_secs(40), reader)
        .await
        .expect("the stalled WebSocket was ended in time")
        .unwrap();
    let reason = b"the local server stopped reading";
    assert!(
        got.len() >= 4 + reason.len() && got[0] == 0x88 && got[2..4] == 1008u16.to_be_bytes(),
        "{got:?}"
    );
    assert_eq!(&got[4..4 + reason.len()], reason);
}

#[tokio::test]
async fn local_servers_that_stop_reading_uploads_cannot_take_the_agents_whole_window() {
    let edge = standalone_edge().await;
    // A local server that reads the head of `POST /stall` and then nothing, and echoes `ok`
    // for every read of any WebSocket.
    let (listener, port) = small_buffer_listener();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                if head.starts_with("POST /stall ") {
                    // Hold the connection, read nothing, until the agent drops it.
                    let _ = s.writable().await;
                    std::future::pending::<()>().await;
                }
                if s.write_all(switching_protocols(&head, "").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    if s.write_all(b"\x81\x02ok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // Room for four stream windows in the agent's connection window.
    let args = [
        "http",
        &port,
        "--subdomain",
        "sink",
        "--h2-stream-window",
        "65535",
        "--h2-connection-window",
        "262140",
        "--stopped-reader-grace-ms",
        "300",
        // One connection, so the canary shares it with the uploads.
        "--lanes",
        "1",
    ];
    let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    let (mut canary, _) = connect(&edge, "sink", "/echo", &[]).await;
    let head = format!(
        "POST /stall HTTP/1.1\r\nHost: sink.localhost:{}\r\nContent-Length: 100000000\r\n\r\n",
        edge.http.port()
    );
    let mut uploads = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(edge.http).await.unwrap();
        let head = head.clone();
        uploads.push(tokio::spawn(async move {
            s.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'u'; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    for round in 0..40 {
        canary_echoes(&mut canary, &agent, started, round).await;
    }
    let log = agent.stderr_text().await;
    assert!(log.contains("POST /stall"), "no upload was cut: {log}");
    assert!(!log.contains("reconnect"), "{log}");
    for u in uploads {
        u.abort();
    }
}

#[tokio::test]
async fn a_visitor_that_stops_reading_a_response_of_small_pieces_is_cut_off_and_the_other_tunnels_live_on(
) {
    let request = "GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n";
    a_stalled_visitor_is_cut_off_alone("events", request, b"HTTP/1.1 200").await;
}

#[tokio::test]
async fn a_local_server_that_stops_reading_an_upload_of_small_pieces_has_it_cut_and_the_visitor_gets_an_error(
) {
    let edge = standalone_edge().await;
    // A local server that reads the request head and then neither reads nor answers.
    let (listener, port) = small_buffer_listener();
    let (closed_tx, mut closed_rx) = mpsc::channel::<()>(4);
    let drain_now = Arc::new(tokio::sync::Notify::new());
    let drain_now2 = Arc::clone(&drain_now);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            let drain_now = Arc::clone(&drain_now2);
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                // Read nothing until the visitor has its answer; then check that the agent
                // ended this connection: a reset, not a socket left open behind the unsent body.
                drain_now.notified().await;
                let mut buf = vec![0u8; 65536];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                let _ = closed_tx.send(()).await;
            });
        }
    });
    let agent = agent_with_small_backlog(&edge, &port, "upload").await;
    let mut visitor = std::net::TcpStream::connect(edge.http).unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: upload.localhost:{}\r\nTransfer-Encoding: chunked\r\n\r\n",
        edge.http.port()
    );
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        visitor.write_all(head.as_bytes()).unwrap();
        visitor.set_nodelay(true).unwrap();
        let writer = visitor.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut writer = writer;
            let mut chunk = b"3c\r\n".to_vec();
            chunk.extend_from_slice(&[b'u'; 60]);
            chunk.extend_from_slice(b"\r\n");
            while writer.write_all(&chunk).is_ok() {
                std::thread::sleep(Duration::from_micros(20));
            }
        });
        visitor
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match visitor.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    let answer = tokio::time::timeout(Duration::from_secs(40), answer)
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 502"),
        "{answer:?}; agent log:\n{}",
        agent.stderr_text().await
    );
    drain_now.notify_waiters();
    let closed = tokio::time::timeout(Duration::from_secs(10), closed_rx.recv()).await;
    assert!(
        closed.is_ok(),
        "the agent did not end the local connection; answer {answer:?}; agent log:\n{}",
        agent.stderr_text().await
    );
}

/// Waits until the edge's `burrow_edge_agent_lanes` gauge reads `n`.
async fn lanes_settle(edge: &Edge, n: f64) {
    burrow_admin::Scrape::until(edge.admin, STEP, &format!("{n} agent lanes"), |s| {
        s.get("burrow_edge_agent_lanes", &[]) == n
    })
    .await;
}

/// Waits until the gauge reads `n`, and checks it still does half a second later (no agent
/// keeps trying for more).
async fn lanes_stay(edge: &Edge, n: f64) {
    lanes_settle(edge, n).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    lanes_settle(edge, n).await;
}

/// Sends `text` on a new WebSocket to `sub` and expects it echoed.
async fn echoes(edge: &Edge, sub: &str, text: &str) {
    let (mut ws, _) = connect(edge, sub, "/", &[]).await;
    ws.send(Message::text(text)).await.unwrap();
    let echoed = tokio::time::timeout(STEP, ws.next()).await.unwrap();
    assert!(matches!(echoed, Some(Ok(Message::Text(t))) if t.as_str() == text));
}

#[tokio::test]
async fn an_agent_opens_its_lanes_and_visitors_share_them_beside_a_bulk_stream() {
    let edge = standalone_edge().await;
    let port = local_ws_echo().await.port().to_string();
    let args = ["http", &port, "--subdomain", "lanes", "--lanes", "3"];
    let mut agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    lanes_settle(&edge, 3.0).await;

    // One visitor echoes 1 MiB messages while twelve others echo small ones of their own.
    let bulk = async {
        let (mut ws, _) = connect(&edge, "lanes", "/bulk", &[]).await;
        for i in 0..16u8 {
            let big = vec![i; 1 << 20];
            ws.send(Message::binary(big.clone())).await.unwrap();
            match tokio::time::timeout(STEP, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => assert!(b[..] == big[..], "message {i}"),
                other => panic!("bulk message {i}: {other:?}"),
            }
        }
    };
    let small = |v: usize| {
        let edge = &edge;
        async move {
            let (mut ws, _) = connect(edge, "lanes", "/small", &[]).await;
            for j in 0..20 {
                let text = format!("visitor {v} message {j}");
                ws.send(Message::text(text.clone())).await.unwrap();
                match tokio::time::timeout(STEP, ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), text),
                    other => panic!("visitor {v} message {j}: {other:?}"),
                }
            }
        }
    };
    let others = futures::future::join_all((0..12).map(small));
    tokio::join!(bulk, others);
    let log = agent.stderr_text().await;
    assert!(!log.contains("reconnect"), "{log}");

    // The lanes end with the agent.
    agent.child.kill().await.unwrap();
    lanes_settle(&edge, 0.0).await;
    edge.stop().await;
}

#[tokio::test]
async fn the_edge_caps_an_agents_lanes_and_refuses_a_lane_without_its_sessions_key() {
    use burrow_proto::tunnel::{read_message, write_message, PROTOCOL_VERSION};
    use burrow_proto::v1 as pb;
    let edge = start_edge_full(standalone_control(), identity(), None, false, true, |l| {
        l.max_agent_lanes = 2
    })
    .await;
    let port = local_ws_echo().await.port().to_string();
    let args = ["http", &port, "--subdomain", "capped", "--lanes", "4"];
    let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    // The agent asks for no more than the edge allows.
    lanes_stay(&edge, 2.0).await;

    // A lane with a made-up key for the live session (edge-local id 0) is refused, and says why.
    let mut s = TcpStream::connect(edge.agent).await.unwrap();
    let hello = pb::AgentHello {
        protocol_version: PROTOCOL_VERSION,
        lane_key: "0.00112233445566778899aabbccddeeff".into(),
        ..Default::default()
    };
    write_message(&mut s, &hello).await.unwrap();
    let answer: pb::EdgeHello = read_message(&mut s).await.unwrap();
    assert_eq!(answer.error_code, "NOT_FOUND", "{answer:?}");
    assert!(answer.error.contains("session is gone"), "{}", answer.error);
    lanes_settle(&edge, 2.0).await;

    echoes(&edge, "capped", "still here").await;
    let log = agent.stderr_text().await;
    assert!(!log.contains("reconnect"), "{log}");
    edge.stop().await;
}

#[tokio::test]
async fn lanes_leave_a_quarter_of_the_edges_agent_connections_to_new_agents() {
    let edge = standalone_edge_with(|l| l.max_agent_connections = 8).await;
    let port = local_ws_echo().await.port().to_string();
    let args = ["http", &port, "--subdomain", "first", "--lanes", "3"];
    let mut first = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    lanes_settle(&edge, 3.0).await;
    let args = [
        "http",
        &port,
        "--subdomain",
        "greedy",
        "--lanes",
        "8",
        "--lane-retry-secs",
        "1",
    ];
    let _greedy = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    // Six of eight in use: two stay free for agents' first connections.
    lanes_stay(&edge, 6.0).await;
    let args = ["http", &port, "--subdomain", "later", "--lanes", "1"];
    let _later = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    lanes_settle(&edge, 7.0).await;
    echoes(&edge, "later", "room").await;

    // Once the first agent leaves, the greedy one asks again and gets lanes up to the reserve.
    first.child.kill().await.unwrap();
    burrow_admin::Scrape::until(edge.admin, STEP, "the greedy agent's lanes", |s| {
        s.get("burrow_edge_agent_sessions", &[]) == 2.0
            && s.get("burrow_edge_agent_lanes", &[]) == 6.0
    })
    .await;
    echoes(&edge, "greedy", "more room").await;
    edge.stop().await;
}

/// A TCP relay to `to`; each accepted connection's task is kept so a test can cut it.
async fn cuttable_relay(
    to: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((mut a, _)) = listener.accept().await {
            let task = tokio::spawn(async move {
                if let Ok(mut b) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
            kept.lock().await.push(task);
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn a_lane_that_drops_is_opened_again_and_the_tunnel_never_goes_down() {
    let mut edge = standalone_edge().await;
    let (relay, conns) = cuttable_relay(edge.agent).await;
    let real = std::mem::replace(&mut edge.agent, relay);
    let port = local_ws_echo().await.port().to_string();
    let args = ["http", &port, "--subdomain", "sturdy", "--lanes", "3"];
    let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    edge.agent = real;
    lanes_settle(&edge, 3.0).await;
    assert_eq!(conns.lock().await.len(), 3);

    // Cut the second connection (an extra lane; the first bound the names).
    conns.lock().await[1].abort();
    let started = std::time::Instant::now();
    while conns.lock().await.len() < 4 {
        assert!(
            started.elapsed() < STEP,
            "the agent did not open the lane again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lanes_settle(&edge, 3.0).await;
    for i in 0..6 {
        echoes(&edge, "sturdy", &format!("message {i}")).await;
    }
    let log = agent.stderr_text().await;
    assert!(!log.contains("reconnect"), "{log}");
    edge.stop().await;
}
