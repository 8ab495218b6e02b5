//! The inspector's JSON API and event stream, driven through a real tunnel: an in-process
//! standalone edge, the real `burrow` agent with `--inspect 127.0.0.1:0`, and local servers.

#![allow(clippy::unwrap_used, clippy::result_large_err)]

mod tunnel_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tunnel_support::*;

/// How long any single step may take.
const STEP: Duration = Duration::from_secs(30);

/// Requests a counting local server received: `(method, path, body)`.
type Received = Arc<Mutex<Vec<(String, String, Bytes)>>>;

/// A local server that records every request and answers `{"ok":true,"n":N}` as JSON.
async fn counting_server() -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Received = Arc::default();
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let n = {
                                let mut s = seen.lock().await;
                                s.push((method, path, body));
                                s.len()
                            };
                            let mut r = hyper::Response::new(Full::new(Bytes::from(format!(
                                "{{\"ok\":true,\"n\":{n}}}"
                            ))));
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A local WebSocket server echoing every message, picking subprotocol `chat.v1`.
async fn echo_ws_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                          mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    if req.headers().contains_key("sec-websocket-protocol") {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", "chat.v1".parse().unwrap());
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    addr
}

/// The inspector URL the agent printed.
async fn inspector_url(agent: &Agent) -> String {
    let lines = agent.stdout.lock().await;
    lines
        .iter()
        .find_map(|l| l.strip_prefix("Inspector ").map(str::to_owned))
        .unwrap_or_else(|| panic!("no Inspector line in {lines:?}"))
}

/// One request to the inspector; returns status and body.
async fn api(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    api_host(base, method, path, body, "localhost").await
}

async fn api_host(
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    host: &str,
) -> (u16, Value) {
    inspector_api(base, method, path, body, host).await
}

/// Waits until `check` holds for the exchange list (changes arrive as the agent sees them).
async fn wait_list(base: &str, query: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (_, v) = api(base, "GET", &format!("/api/exchanges{query}"), None).await;
        let list = v["exchanges"].as_array().cloned().unwrap_or_default();
        if check(&list) {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "list never matched: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tunnel(local: SocketAddr, sub: &str, extra: &[&str]) -> (Edge, Agent, String) {
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let mut args = vec![
        "http",
        &port,
        "--subdomain",
        sub,
        "--inspect",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    let base = inspector_url(&agent).await;
    (edge, agent, base)
}

#[tokio::test]
async fn a_request_through_the_tunnel_is_listed_with_headers_and_bodies_then_replayed_and_cleared()
{
    let (local, received) = counting_server().await;
    let (edge, _agent, base) = tunnel(local, "hooks", &[]).await;
    let (status, _, _) = visit(
        &edge,
        "hooks",
        "POST",
        "/webhook?source=test",
        &[
            ("content-type", "application/json"),
            ("x-signature", "abc123"),
        ],
        r#"{"event":"push","n":1}"#,
    )
    .await;
    assert_eq!(status, 200);

    let list = wait_list(&base, "", |l| l.iter().any(|e| e["state"] == "done")).await;
    let e = &list[0];
    assert_eq!(e["kind"], "http");
    assert_eq!(e["method"], "POST");
    assert_eq!(e["path"], "/webhook?source=test");
    assert_eq!(e["status"], 200);
    assert_eq!(e["request_bytes"], 22);
    assert!(e["duration_ms"].as_f64().unwrap() >= 0.0);
    let id = e["id"].as_u64().unwrap();

    let (code, d) = api(&base, "GET", &format!("/api/exchanges/{id}"), None).await;
    assert_eq!(code, 200);
    let req_headers = d["request"]["headers"].as_array().unwrap();
    assert!(
        req_headers
            .iter()
            .any(|h| h[0] == "x-signature" && h[1] == "abc123"),
        "{d}"
    );
    assert_eq!(d["request"]["body"]["encoding"], "json");
    assert_eq!(
        d["request"]["body"]["content"],
        "{\n  \"event\": \"push\",\n  \"n\": 1\n}"
    );
    assert_eq!(d["response"]["body"]["encoding"], "json");
    assert!(d["response"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "content-type"));

    // Replay as captured: the local server receives the same request a second time.
    let (code, out) = api(&base, "POST", &format!("/api/exchanges/{id}/replay"), None).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["status"], 200);
    {
        let got = received.lock().await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], got[1]);
    }
    let replay_id = out["id"].as_u64().unwrap();
    let (_, r) = api(&base, "GET", &format!("/api/exchanges/{replay_id}"), None).await;
    assert_eq!(r["replay_of"], id);
    assert_eq!(
        r["response"]["body"]["content"],
        "{\n  \"n\": 2,\n  \"ok\": true\n}"
    );

    // Replay with edits.
    let edits = json!({"method": "PUT", "path": "/other", "body": "edited"});
    let (code, out) = api(
        &base,
        "POST",
        &format!("/api/exchanges/{id}/replay"),
        Some(edits),
    )
    .await;
    assert_eq!(code, 200, "{out}");
    {
        let got = received.lock().await;
        assert_eq!(got[2].0, "PUT");
        assert_eq!(got[2].1, "/other");
        assert_eq!(got[2].2, Bytes::from_static(b"edited"));
    }

    // Filters.
    let puts = wait_list(&base, "?path=%2Fother", |l| l.len() == 1).await;
    assert_eq!(puts[0]["method"], "PUT");
    // The search looks into headers: the original and both replays carry x-signature.
    let found = wait_list(&base, "?q=ABC123", |l| l.len() == 3).await;
    assert!(found.iter().any(|e| e["id"] == id));
    let (_, none) = api(&base, "GET", "/api/exchanges?q=no-such-text", None).await;
    assert_eq!(none["exchanges"].as_array().unwrap().len(), 0);
    let (code, _) = api(&base, "GET", "/api/exchanges?kind=ws", None).await;
    assert_eq!(code, 200);
    let (code, err) = api(&base, "GET", "/api/exchanges?status=7xx", None).await;
    assert_eq!(code, 400);
    assert!(err["error"].as_str().unwrap().contains("status"));

    // Clear.
    let (code, _) = api(&base, "DELETE", "/api/exchanges", None).await;
    assert_eq!(code, 204);
    let (_, v) = api(&base, "GET", "/api/exchanges", None).await;
    assert_eq!(v["exchanges"].as_array().unwrap().len(), 0);
    let (code, v) = api(&base, "GET", &format!("/api/exchanges/{id}"), None).await;
    assert_eq!(code, 404);
    assert!(v["error"].as_str().unwrap().contains("no such exchange"));
    edge.stop().await;
}

#[tokio::test]
async fn the_event_stream_announces_an_exchange_as_it_happens() {
    let (local, _) = counting_server().await;
    let (edge, _agent, base) = tunnel(local, "live", &[]).await;
    let tcp = TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/api/events")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The stream is open before the request is made.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("connected"));
    visit(&edge, "live", "GET", "/pushed", &[], "").await;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + STEP;
    while !(text.contains("event: exchange") && text.contains("\"state\":\"done\"")) {
        let f = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
    }
    assert!(text.contains("\"path\":\"/pushed\""), "{text}");
    edge.stop().await;
}

#[tokio::test]
async fn a_websocket_session_shows_messages_each_way_subprotocol_previews_and_close_code() {
    let local = echo_ws_server().await;
    let (edge, _agent, base) = tunnel(local, "sock", &["--inspect-payloads"]).await;
    let url = format!("ws://sock.localhost:{}/chat", edge.http.port());
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "chat.v1".parse().unwrap());
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    for i in 0..3 {
        ws.send(Message::Text(format!("hello {i}").into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(STEP, ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if m.is_text() {
                break;
            }
        }
    }
    let open = wait_list(&base, "?kind=ws", |l| {
        l.first().is_some_and(|e| e["ws"]["messages_out"] == 3)
    })
    .await;
    assert_eq!(open[0]["state"], "open");
    assert_eq!(open[0]["ws"]["messages_in"], 3);
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "done here".into(),
    }))
    .await
    .unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let closed = wait_list(&base, "?kind=ws", |l| {
        l.first().is_some_and(|e| e["state"] == "closed")
    })
    .await;
    let e = &closed[0];
    assert_eq!(e["ws"]["messages_in"], 3);
    assert_eq!(e["ws"]["messages_out"], 3);
    assert_eq!(e["ws"]["bytes_in"], 21);
    assert_eq!(e["ws"]["close_code"], 4000);
    assert_eq!(e["ws"]["close_reason"], "done here");
    assert_eq!(e["ws"]["closed_by"], "visitor");
    let id = e["id"].as_u64().unwrap();
    let (_, d) = api(&base, "GET", &format!("/api/exchanges/{id}"), None).await;
    assert_eq!(d["websocket"]["subprotocol"], "chat.v1");
    let frames = d["websocket"]["frames"].as_array().unwrap();
    let texts: Vec<_> = frames.iter().filter(|f| f["opcode"] == "text").collect();
    assert_eq!(texts.len(), 6);
    assert_eq!(texts[0]["dir"], "in");
    assert_eq!(texts[0]["preview"], "hello 0");
    assert_eq!(texts[1]["dir"], "out");
    assert!(frames.iter().any(|f| f["opcode"] == "close"));
    assert!(d["request"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "sec-websocket-key"));
    // A WebSocket session cannot be replayed.
    let (code, _) = api(&base, "POST", &format!("/api/exchanges/{id}/replay"), None).await;
    assert_eq!(code, 409);
    edge.stop().await;
}

#[tokio::test]
async fn without_inspect_payloads_no_message_content_is_kept() {
    let local = echo_ws_server().await;
    let (edge, _agent, base) = tunnel(local, "quiet", &[]).await;
    let url = format!("ws://quiet.localhost:{}/", edge.http.port());
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
        .unwrap();
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws.send(Message::Text("a secret message".into()))
        .await
        .unwrap();
    let _ = tokio::time::timeout(STEP, ws.next()).await.unwrap();
    let list = wait_list(&base, "?kind=ws", |l| {
        l.first().is_some_and(|e| e["ws"]["messages_out"] == 1)
    })
    .await;
    let id = list[0]["id"].as_u64().unwrap();
    let (_, d) = api(&base, "GET", &format!("/api/exchanges/{id}"), None).await;
    assert!(!d.to_string().contains("secret"), "{d}");
    assert_eq!(d["websocket"]["frames"][0]["size"], 16);
    edge.stop().await;
}

#[tokio::test]
async fn the_inspector_refuses_foreign_hosts_and_non_loopback_addresses() {
    let (local, _) = counting_server().await;
    let (edge, _agent, base) = tunnel(local, "guard", &[]).await;
    let (code, v) = api_host(&base, "GET", "/api/exchanges", None, "evil.example.com").await;
    assert_eq!(code, 403);
    assert!(v["error"].as_str().unwrap().contains("localhost"));
    let (code, _) = api(&base, "GET", "/api/nothing", None).await;
    assert_eq!(code, 404);
    let (code, _) = api(&base, "PUT", "/api/exchanges", None).await;
    assert_eq!(code, 405);
    let (code, v) = api(
        &base,
        "POST",
        "/api/exchanges/1/replay",
        Some(json!({"colour": 1})),
    )
    .await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = api(&base, "GET", "/api/exchanges/abc", None).await;
    assert_eq!(code, 400, "{v}");

    let port = local.port().to_string();
    let err = try_start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--inspect", "0.0.0.0:0"],
    )
    .await
    .err()
    .expect("a non-loopback inspector address is refused");
    assert!(err.contains("loopback"), "{err}");
    edge.stop().await;
}

#[tokio::test]
async fn while_the_edge_is_unreachable_the_status_says_why_and_online_clears_it() {
    let (local, _) = counting_server().await;
    let id = identity();
    let edge = start_edge(standalone_control(), id.clone(), None, |_| {}).await;
    let agent_addr = edge.agent;
    let port = local.port().to_string();
    let args = [
        "http",
        &port,
        "--subdomain",
        "later",
        "--inspect",
        "127.0.0.1:0",
    ];
    let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    let base = inspector_url(&agent).await;
    let status = || async { api(&base, "GET", "/api/status", None).await.1 };
    assert!(status().await.get("edge_error").is_none());
    // The edge goes away: the agent keeps trying, and its status says why it fails.
    edge.stop().await;
    let deadline = tokio::time::Instant::now() + STEP;
    let st = loop {
        let st = status().await;
        if st["edge_error"].is_string() {
            break st;
        }
        assert!(tokio::time::Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st["status"], "reconnecting");
    let error = st["edge_error"].as_str().unwrap();
    assert!(
        error.contains(&format!(":{}", agent_addr.port())),
        "{error}"
    );
    assert!(error.contains("refused"), "{error}");
    // The edge comes back on the same port: online, and the error is gone.
    let edge = start_edge(standalone_control(), id, Some(agent_addr), |_| {}).await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let st = status().await;
        if st["status"] == "online" {
            assert!(st.get("edge_error").is_none(), "{st}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    edge.stop().await;
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let (local, _) = counting_server().await;
    let (edge, _agent, base) = tunnel(local, "page", &[]).await;
    for (path, ctype, needle) in [
        ("/", "text/html", "Burrow"),
        ("/assets/app.js", "text/javascript", "EventSource"),
        ("/assets/app.css", "text/css", "--accent"),
    ] {
        let tcp = TcpStream::connect(base.trim_start_matches("http://"))
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "localhost:4040")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(ctype));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(needle), "{path}");
    }
    let (code, st) = api(&base, "GET", "/api/status", None).await;
    assert_eq!(code, 200);
    assert_eq!(st["status"], "online");
    assert!(st["forwards"][0][0]
        .as_str()
        .unwrap()
        .contains("page.localhost"));
    edge.stop().await;
}

#[tokio::test]
async fn burrow_replay_resends_a_captured_request_with_edits() {
    let (local, received) = counting_server().await;
    let (edge, _agent, base) = tunnel(local, "cli", &[]).await;
    visit(&edge, "cli", "POST", "/orig", &[("x-a", "1")], "body").await;
    let list = wait_list(&base, "", |l| l.iter().any(|e| e["state"] == "done")).await;
    let id = list[0]["id"].as_u64().unwrap().to_string();
    let addr = base.trim_start_matches("http://");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args([
            "replay",
            &id,
            "--inspect",
            addr,
            "--path",
            "/edited",
            "-H",
            "X-A: 2",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("replayed #{id} as #")), "{stdout}");
    assert!(stdout.contains(": 200 in"), "{stdout}");
    let got = received.lock().await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].1, "/edited");
    assert_eq!(got[1].2, Bytes::from_static(b"body"));
    drop(got);
    let (_, d) = api(&base, "GET", "/api/exchanges?path=%2Fedited", None).await;
    let rid = d["exchanges"][0]["id"].as_u64().unwrap();
    let (_, d) = api(&base, "GET", &format!("/api/exchanges/{rid}"), None).await;
    assert!(
        d["request"]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "x-a" && h[1] == "2"),
        "{d}"
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["replay", "999999", "--inspect", addr])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such exchange"));
    edge.stop().await;
}

#[tokio::test]
async fn with_log_format_json_every_line_on_standard_output_is_json_with_or_without_the_inspector()
{
    let (local, _) = counting_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    for (sub, inspect) in [("jl", "--inspect=127.0.0.1:0"), ("jn", "--no-inspect")] {
        let args = [
            "http",
            &port,
            "--subdomain",
            sub,
            inspect,
            "--log-format",
            "json",
        ];
        let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
        visit(&edge, sub, "POST", "/one", &[], "hello").await;
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let lines = agent.stdout.lock().await.clone();
            let json_lines: Vec<Value> = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect();
            if let Some(e) = json_lines.iter().find(|v| v["event"] == "http") {
                assert_eq!((&e["method"], &e["path"]), (&json!("POST"), &json!("/one")));
                assert_eq!(
                    (&e["status"], &e["request_bytes"]),
                    (&json!(200), &json!(5))
                );
                assert_eq!(
                    json_lines.iter().any(|v| v["event"] == "inspector"),
                    inspect != "--no-inspect",
                    "{lines:?}"
                );
                let online = json_lines.iter().find(|v| v["event"] == "online");
                assert!(online.is_some_and(|v| v["edge"].is_string()), "{lines:?}");
                assert_eq!(
                    json_lines.len(),
                    lines.len(),
                    "a line that is not JSON: {lines:?}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no JSON line ({inspect}): {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    edge.stop().await;
}

/// Which of the agent's outputs a test leaves unread.
#[derive(Clone, Copy)]
enum Unread {
    Stdout,
    Stderr,
}

/// Runs an agent with `extra` flags (one lane, so every request is served on the runtime
/// that also started the output) whose `unread` output is a pipe nobody reads (the other is
/// drained), then sends 600 requests with 400-byte paths (each event line several hundred
/// bytes: well past a pipe's 64 KiB); every one must be answered within 10 s.
async fn unread_output_never_stalls_the_tunnel(sub: &str, unread: Unread, extra: &[&str]) {
    let (local, _) = counting_server().await;
    let id = identity();
    let edge = start_edge(standalone_control(), id.clone(), None, |_| {}).await;
    let port = local.port().to_string();
    let mut args = vec!["http", &port, "--subdomain", sub, "--lanes", "1"];
    args.extend_from_slice(extra);
    let (mut child, _home) = spawn_agent(&edge, STANDALONE_TOKEN, &args);
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _kept_unread: Box<dyn std::any::Any> = match unread {
        Unread::Stdout => {
            let mut stderr = stderr;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            });
            Box::new(stdout)
        }
        Unread::Stderr => {
            let mut stdout = stdout;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
            });
            Box::new(stderr)
        }
    };
    let deadline = tokio::time::Instant::now() + STEP;
    while visit(&edge, sub, "GET", "/ready", &[], "").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tunnel never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = format!("/{}", "p".repeat(400));
    for i in 0..600 {
        let answered = tokio::time::timeout(
            Duration::from_secs(10),
            visit(&edge, sub, "GET", &path, &[], ""),
        )
        .await;
        assert!(
            matches!(answered, Ok((s, _, _)) if s == 200),
            "request {i} was not answered in time"
        );
    }
    // The output is full by now. The edge restarts: the agent's lines about losing it and
    // about the tunnel being live again must not block the connection that serves it.
    let agent_addr = edge.agent;
    edge.stop().await;
    let edge = start_edge(standalone_control(), id, Some(agent_addr), |_| {}).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answered = tokio::time::timeout(
            Duration::from_secs(2),
            visit(&edge, sub, "GET", "/", &[], ""),
        )
        .await;
        if matches!(answered, Ok((s, _, _)) if s == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tunnel did not come back after the edge restarted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    edge.stop().await;
}

#[tokio::test]
async fn a_reader_of_the_json_lines_that_stops_reading_never_stalls_the_tunnel() {
    unread_output_never_stalls_the_tunnel(
        "stuck",
        Unread::Stdout,
        &["--inspect", "127.0.0.1:0", "--log-format", "json"],
    )
    .await;
}

#[tokio::test]
async fn a_reader_of_the_log_lines_that_stops_reading_never_stalls_the_tunnel() {
    // Plain event lines are log lines on standard error.
    unread_output_never_stalls_the_tunnel("stuckerr", Unread::Stderr, &["--log-format", "plain"])
        .await;
}

/// Resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn memory_stays_flat_over_10000_requests_because_the_ring_is_bounded() {
    let (local, _) = counting_server().await;
    let (edge, agent, base) = tunnel(local, "mem", &["--inspect-keep", "200"]).await;
    let pid = agent.child.id().unwrap();
    let body = Bytes::from(vec![b'x'; 8 * 1024]);
    let sent = Arc::new(AtomicUsize::new(0));
    let run = |n: usize| {
        let body = body.clone();
        let sent = Arc::clone(&sent);
        let edge_http = edge.http;
        async move {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let body = body.clone();
                    let sent = Arc::clone(&sent);
                    tokio::spawn(async move {
                        let tcp = TcpStream::connect(edge_http).await.unwrap();
                        let (mut s, conn) =
                            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
                                hyper_util::rt::TokioIo::new(tcp),
                            )
                            .await
                            .unwrap();
                        tokio::spawn(conn);
                        while sent.fetch_add(1, Ordering::Relaxed) < n {
                            let req = hyper::Request::post("/m")
                                .header("host", format!("mem.localhost:{}", edge_http.port()))
                                .body(Full::new(body.clone()))
                                .unwrap();
                            let r = s.send_request(req).await.unwrap();
                            assert_eq!(r.status(), 200);
                            r.into_body().collect().await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    run(2_000).await;
    let (_, st) = api(&base, "GET", "/api/status", None).await;
    let held_early = st["kept_bytes"].as_u64().unwrap();
    let rss_early = rss_kib(pid);
    sent.store(2_000, Ordering::Relaxed);
    run(10_000).await;
    let rss_late = rss_kib(pid);
    let (_, st) = api(&base, "GET", "/api/status", None).await;
    assert_eq!(st["kept"], 200);
    assert!(st["connections_total"].as_u64().unwrap() >= 10_000);
    // The ring holds about the same bytes after 2,000 and after 10,000 requests (headers
    // vary a little, e.g. the visitor's port), well under 200 × (8 KiB bodies + headers)…
    let held_late = st["kept_bytes"].as_u64().unwrap();
    eprintln!("held {held_early} → {held_late} B; RSS {rss_early} → {rss_late} KiB");
    assert!(
        held_late < held_early + held_early / 20,
        "{held_early} → {held_late}"
    );
    assert!(held_late < 200 * 12 * 1024, "{held_late}");
    // …and the process does not grow with the 8,000 requests in between (80 MB of bodies).
    assert!(
        rss_late < rss_early + 8 * 1024,
        "RSS grew from {rss_early} KiB to {rss_late} KiB"
    );
    edge.stop().await;
}

/// Set to a path to keep the screenshot the browser test takes (e.g. `docs/inspector.png`).
const SCREENSHOT_ENV: &str = "BURROW_INSPECTOR_SCREENSHOT";
/// Set (to anything but `0`) to fail instead of skipping when node or Chromium is missing.
const REQUIRE_CLIENTS_ENV: &str = "BURROW_REQUIRE_TEST_CLIENTS";

/// Why the browser test cannot run here, if it cannot.
fn browser_missing() -> Option<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let chromium = std::env::var_os("CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into());
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok {
        return Some("`node` is not on PATH".into());
    }
    if !root
        .join("tests/clients/node_modules/playwright-core")
        .is_dir()
    {
        return Some("tests/clients/node_modules/playwright-core is missing (run scripts/install-test-clients.sh)".into());
    }
    if !std::path::Path::new(&chromium).is_file() {
        return Some(format!("{} is missing", chromium.to_string_lossy()));
    }
    None
}

#[tokio::test]
async fn chromium_shows_live_traffic_headers_replay_and_websocket_counts() {
    if let Some(reason) = browser_missing() {
        let required = std::env::var(REQUIRE_CLIENTS_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(!required, "{reason}, and {REQUIRE_CLIENTS_ENV} is set");
        eprintln!("skipping the browser test: {reason}");
        return;
    }
    let (web, received) = counting_server().await;
    let sock = echo_ws_server().await;
    let edge = standalone_edge().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("burrow.toml");
    std::fs::write(
        &file,
        format!(
            "[[tunnel]]\ntarget = \"{web}\"\nsubdomain = \"web\"\n\n[[tunnel]]\ntarget = \"{sock}\"\nsubdomain = \"sock\"\n"
        ),
    )
    .unwrap();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &[
            "start",
            "--config",
            file.to_str().unwrap(),
            "--inspect",
            "127.0.0.1:0",
            "--inspect-payloads",
        ],
    )
    .await;
    let base = inspector_url(&agent).await;
    let port = edge.http.port();
    let shot = std::env::var(SCREENSHOT_ENV)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("inspector.png"));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/inspector/inspector.test.js"))
        .args(["--inspector", &base])
        .args(["--web", &format!("http://web.localhost:{port}")])
        .args(["--ws", &format!("ws://sock.localhost:{port}/chat")])
        .arg("--screenshot")
        .arg(&shot)
        .env("NODE_PATH", root.join("tests/clients/node_modules"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser test finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("OK inspector"),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nagent:\n{}",
        agent.stderr_text().await
    );
    // The click on Replay reached the local server: /hello arrived twice.
    let hellos = received
        .lock()
        .await
        .iter()
        .filter(|(m, p, _)| m == "GET" && p == "/hello?from=chromium")
        .count();
    assert_eq!(hellos, 2);
    assert!(shot.is_file());
    edge.stop().await;
}

/// A tmux server on its own socket, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    /// The pane's text; with `escapes`, colours as escape sequences too.
    fn capture(&self, escapes: bool) -> String {
        let mut c = self.cmd();
        c.args(["capture-pane", "-p", "-t", "panel"]);
        if escapes {
            c.arg("-e");
        }
        String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
    }

    /// Waits until the pane's text satisfies `check`.
    async fn wait(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let text = self.capture(false);
            if check(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} never appeared:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// The panel's counters line: `(open, total)`.
fn panel_counters(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("Connections"));
    lines.next()?;
    let mut nums = lines.next()?.split_whitespace();
    Some((nums.next()?.parse().ok()?, nums.next()?.parse().ok()?))
}

#[tokio::test]
async fn on_a_terminal_the_panel_shows_the_forwarding_url_and_counters_that_change() {
    let tmux_ok = std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !tmux_ok {
        let required = std::env::var(REQUIRE_CLIENTS_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "tmux is missing, and {REQUIRE_CLIENTS_ENV} is set"
        );
        eprintln!("skipping the panel test: tmux is missing (run scripts/install-test-clients.sh)");
        return;
    }
    let (local, _) = counting_server().await;
    let edge = standalone_edge().await;
    let home = tempfile::tempdir().unwrap();
    let tmux = Tmux {
        socket: format!("burrow-panel-{}-{}", std::process::id(), local.port()),
    };
    let command = format!(
        "env BURROW_TOKEN={STANDALONE_TOKEN} BURROW_CONFIG={} NO_COLOR=1 {} http {} --subdomain panel \
         --inspect 127.0.0.1:0 --edge localhost:{} --edge-ca {}",
        home.path().join("config.toml").display(),
        env!("CARGO_BIN_EXE_burrow"),
        local.port(),
        edge.agent.port(),
        edge.ca_file.display(),
    );
    let started = tmux
        .cmd()
        .args([
            "new-session",
            "-d",
            "-s",
            "panel",
            "-x",
            "120",
            "-y",
            "40",
            &command,
        ])
        .status()
        .unwrap();
    assert!(started.success());
    let text = tmux
        .wait("the forwarding line", |t| {
            t.contains("Forwarding") && t.contains("panel.localhost") && t.contains("online")
        })
        .await;
    assert!(
        text.contains("Web Interface      http://127.0.0.1:"),
        "{text}"
    );
    assert_eq!(panel_counters(&text), Some((0, 0)), "{text}");

    for i in 0..3 {
        visit(&edge, "panel", "GET", &format!("/panel-test/{i}"), &[], "").await;
    }
    let text = tmux
        .wait("three requests", |t| {
            panel_counters(t) == Some((0, 3)) && t.contains("/panel-test/2")
        })
        .await;
    eprintln!("{text}");
    assert!(text.contains("GET     /panel-test/0"), "{text}");
    assert!(
        !tmux.capture(true).contains("\x1b[32m"),
        "colours with NO_COLOR set"
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_websocket_upgrade_the_local_server_does_not_accept_is_listed_as_refused() {
    let (local, _) = counting_server().await;
    let (edge, _agent, base) = tunnel(local, "nows", &[]).await;
    let url = format!("ws://nows.localhost:{}/socket", edge.http.port());
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
        .unwrap();
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    assert!(tokio_tungstenite::client_async(req, tcp).await.is_err());
    let list = wait_list(&base, "?kind=ws", |l| {
        l.first().is_some_and(|e| e["state"] == "refused")
    })
    .await;
    assert_eq!(list[0]["status"], 200);
    assert_eq!(list[0]["path"], "/socket");
    edge.stop().await;
}
