//! Streaming through a real tunnel: 100 MiB uploads and downloads with bounded memory,
//! chunked responses, Server-Sent Events arriving one by one, and a tunnel that comes back
//! after its edge restarts.

#![allow(clippy::unwrap_used)]

mod tunnel_support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};
use tunnel_support::*;

/// Size of the big transfers.
const BIG: u64 = 100 * 1024 * 1024;
/// Chunk size the generators use.
const CHUNK: usize = 64 * 1024;
/// Memory the agent may grow by while moving 100 MiB.
const AGENT_MEMORY_BUDGET_KIB: u64 = 64 * 1024;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A body of `total` bytes produced chunk by chunk (never held whole).
fn generated(total: u64) -> Body {
    let chunks = total.div_ceil(CHUNK as u64);
    let stream = futures::stream::iter(0..chunks).map(move |i| {
        let len = (total - i * CHUNK as u64).min(CHUNK as u64) as usize;
        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![(i % 251) as u8; len])))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Local server: `/count` drains the upload and answers its size; `/big` streams 100 MiB;
/// `/chunked` answers three chunks without a length; `/events` sends an SSE event, waits for
/// the test to confirm it arrived, then sends the next.
async fn streaming_server(confirm: Arc<Mutex<mpsc::Receiver<()>>>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let confirm = Arc::clone(&confirm);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let confirm = Arc::clone(&confirm);
                        async move {
                            let path = req.uri().path().to_owned();
                            let resp: hyper::Response<Body> = match path.as_str() {
                                "/count" => {
                                    let mut body = req.into_body();
                                    let mut n = 0u64;
                                    while let Some(f) = body.frame().await {
                                        if let Ok(d) = f.unwrap().into_data() {
                                            n += d.len() as u64;
                                        }
                                    }
                                    hyper::Response::new(
                                        http_body_util::Full::new(Bytes::from(n.to_string()))
                                            .boxed(),
                                    )
                                }
                                "/big" => hyper::Response::new(generated(BIG)),
                                "/chunked" => {
                                    let s = futures::stream::iter(["one,", "two,", "three"])
                                        .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
                                    hyper::Response::new(BodyExt::boxed(StreamBody::new(s)))
                                }
                                "/events" => {
                                    let (tx, rx) = mpsc::channel::<Bytes>(1);
                                    tokio::spawn(async move {
                                        for i in 0..3 {
                                            let ev = Bytes::from(format!("data: event {i}\n\n"));
                                            if tx.send(ev).await.is_err() {
                                                return;
                                            }
                                            // The next event only after the visitor saw this one.
                                            if confirm.lock().await.recv().await.is_none() {
                                                return;
                                            }
                                        }
                                    });
                                    let s = tokio_stream::wrappers::ReceiverStream::new(rx)
                                        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
                                    let mut r =
                                        hyper::Response::new(BodyExt::boxed(StreamBody::new(s)));
                                    r.headers_mut().insert(
                                        "content-type",
                                        http::HeaderValue::from_static("text/event-stream"),
                                    );
                                    r
                                }
                                _ => hyper::Response::new(http_body_util::Empty::new().boxed()),
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A visitor connection to `sub` on the edge.
async fn visitor(edge: &Edge) -> hyper::client::conn::http1::SendRequest<Body> {
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn request(edge: &Edge, sub: &str, method: &str, path: &str, body: Body) -> hyper::Request<Body> {
    hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{sub}.localhost:{}", edge.http.port()))
        .body(body)
        .unwrap()
}

async fn setup(sub: &str) -> (Edge, Agent, mpsc::Sender<()>) {
    let (tx, rx) = mpsc::channel(8);
    let local = streaming_server(Arc::new(Mutex::new(rx))).await;
    let (edge, agent) = standalone_tunnel(local, sub).await;
    (edge, agent, tx)
}

#[tokio::test]
async fn a_100_mib_upload_streams_through_with_bounded_agent_memory() {
    let (edge, agent, _tx) = setup("up").await;
    let pid = agent.child.id().unwrap();
    let before = peak_rss_kib(pid);
    let mut v = visitor(&edge).await;
    let resp = v
        .send_request(request(&edge, "up", "POST", "/count", generated(BIG)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, BIG.to_string().as_bytes());
    let grown = peak_rss_kib(pid).saturating_sub(before);
    assert!(grown < AGENT_MEMORY_BUDGET_KIB, "agent grew by {grown} KiB");
}

#[tokio::test]
async fn a_100_mib_download_streams_through_with_bounded_agent_memory() {
    let (edge, agent, _tx) = setup("down").await;
    let pid = agent.child.id().unwrap();
    let before = peak_rss_kib(pid);
    let mut v = visitor(&edge).await;
    let resp = v
        .send_request(request(
            &edge,
            "down",
            "GET",
            "/big",
            http_body_util::Empty::new().boxed(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += d.len() as u64;
        }
    }
    assert_eq!(n, BIG);
    let grown = peak_rss_kib(pid).saturating_sub(before);
    assert!(grown < AGENT_MEMORY_BUDGET_KIB, "agent grew by {grown} KiB");
}

#[tokio::test]
async fn a_chunked_response_arrives_chunked_and_whole() {
    let (edge, _agent, _tx) = setup("chunks").await;
    let mut v = visitor(&edge).await;
    let resp = v
        .send_request(request(
            &edge,
            "chunks",
            "GET",
            "/chunked",
            http_body_util::Empty::new().boxed(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.headers().get("transfer-encoding").unwrap(), "chunked");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"one,two,three");
}

#[tokio::test]
async fn server_sent_events_arrive_one_at_a_time() {
    let (edge, _agent, confirm) = setup("sse").await;
    let mut v = visitor(&edge).await;
    let resp = v
        .send_request(request(
            &edge,
            "sse",
            "GET",
            "/events",
            http_body_util::Empty::new().boxed(),
        ))
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut body = resp.into_body();
    let mut text = String::new();
    for i in 0..3 {
        // Each event must arrive while the server is still waiting for our confirmation.
        while !text.contains(&format!("data: event {i}\n\n")) {
            let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .unwrap_or_else(|_| panic!("event {i} was held back"))
                .unwrap()
                .unwrap();
            if let Ok(d) = f.into_data() {
                text.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
        confirm.send(()).await.unwrap();
    }
}

#[tokio::test]
async fn the_tunnel_comes_back_within_two_seconds_of_the_edge_restarting() {
    let local = local_http_server().await;
    let id = identity();
    let control = || standalone_control();
    let edge = start_edge(control(), id.clone(), None, |_| {}).await;
    let agent_addr = edge.agent;
    let port = local.port().to_string();
    let mut agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "phoenix"],
    )
    .await;
    let (status, _, _) = visit(&edge, "phoenix", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
    edge.stop().await;
    // Down long enough for several attempts (at most a second apart): the agent says once
    // that it cannot reach the edge, not once per attempt.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let edge = start_edge(control(), id, Some(agent_addr), |_| {}).await;
    let started = Instant::now();
    let url = agent
        .next_ready(Duration::from_secs(10))
        .await
        .expect("the agent bound its tunnel again");
    let took = started.elapsed();
    assert!(url.starts_with("http://phoenix.localhost:"), "{url}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let (status, _, _) = visit(&edge, "phoenix", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
    let stderr = agent.stderr_text().await;
    let said = stderr.matches("cannot reach the edge at").count();
    assert_eq!(said, 1, "{stderr}");
}

#[tokio::test]
async fn a_frozen_agent_is_detected_by_keepalive_and_reconnects_when_it_thaws() {
    let local = local_http_server().await;
    let edge =
        standalone_edge_with(|l| l.agent_keepalive_interval = Duration::from_millis(300)).await;
    let port = local.port().to_string();
    let mut agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "frozen"],
    )
    .await;
    let pid = agent.child.id().unwrap().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    // Within two keepalive intervals (plus scheduling slack) the edge drops the silent agent.
    let started = Instant::now();
    loop {
        let (status, _, _) = visit(&edge, "frozen", "GET", "/hello", &[], "").await;
        if status == 503 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the edge still routes to a frozen agent ({status})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal("-CONT");
    agent
        .next_ready(Duration::from_secs(15))
        .await
        .expect("the thawed agent bound its tunnel again");
    let (status, _, _) = visit(&edge, "frozen", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
}

/// A TCP relay in front of the edge's agent port whose connections can be frozen: they then
/// stay open but pass nothing, as a connection through a dead NAT or to a hung host does.
/// Connections accepted after the freeze pass bytes as usual.
struct FreezingRelay {
    addr: std::net::SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    freeze: tokio_util::sync::CancellationToken,
}

async fn freezing_relay(to: std::net::SocketAddr) -> FreezingRelay {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let freeze = tokio_util::sync::CancellationToken::new();
    let (count, frozen) = (Arc::clone(&accepted), freeze.clone());
    tokio::spawn(async move {
        loop {
            let Ok((a, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let Ok(b) = TcpStream::connect(to).await else {
                continue;
            };
            // Only the connections open now freeze; a later freeze is a new token.
            let frozen = if n == 0 {
                frozen.clone()
            } else {
                Default::default()
            };
            tokio::spawn(async move {
                let (mut a, mut b) = (a, b);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    () = frozen.cancelled() => {
                        // Hold both ends open and silent.
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    FreezingRelay {
        addr,
        accepted,
        freeze,
    }
}

#[tokio::test]
async fn an_edge_whose_keepalives_stop_is_left_by_the_agent_which_reconnects() {
    use std::sync::atomic::Ordering;
    let local = local_http_server().await;
    let edge =
        standalone_edge_with(|l| l.agent_keepalive_interval = Duration::from_millis(300)).await;
    let relay = freezing_relay(edge.agent).await;
    // The agent dials the relay; everything else is the real edge.
    let via = Edge {
        http: edge.http,
        https: edge.https,
        agent: relay.addr,
        admin: edge.admin,
        ca_file: edge.ca_file.clone(),
        agent_plaintext: edge.agent_plaintext,
        shutdown: tokio_util::sync::CancellationToken::new(),
        task: tokio::spawn(async { Ok(()) }),
        dir: Arc::clone(&edge.dir),
    };
    let port = local.port().to_string();
    // One connection, so the first one is the only one the freeze catches.
    let mut agent = start_agent(
        &via,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "silent", "--lanes", "1"],
    )
    .await;
    let (status, _, _) = visit(&edge, "silent", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    // Let a few keepalives arrive, so the agent knows the interval, then go silent.
    tokio::time::sleep(Duration::from_millis(800)).await;
    relay.freeze.cancel();
    let frozen_at = Instant::now();
    // The edge's side notices too and closes, but the close never crosses the frozen relay:
    // only the agent's own watch gets it out. Twice 300 ms plus a second of slack, then a
    // short backoff.
    let url = agent
        .next_ready(Duration::from_secs(10))
        .await
        .expect("the agent left the silent connection and bound its tunnel again");
    assert!(url.starts_with("http://silent.localhost:"), "{url}");
    let took = frozen_at.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(relay.accepted.load(Ordering::SeqCst) >= 2);
    let stderr = agent.stderr_text().await;
    assert!(
        stderr.contains("no keepalive from the edge"),
        "the agent says why it left:\n{stderr}"
    );
    let (status, _, _) = visit(&edge, "silent", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_request_in_flight_when_the_edge_shuts_down_still_completes() {
    // A local server that answers only after the test says so.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let go_rx = Arc::new(Mutex::new(Some(go_rx)));
    let (arrived_tx, mut arrived_rx) = mpsc::channel::<()>(1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |_req| {
            let go_rx = Arc::clone(&go_rx);
            let arrived_tx = arrived_tx.clone();
            async move {
                arrived_tx.send(()).await.unwrap();
                let rx = go_rx.lock().await.take().unwrap();
                let _ = rx.await;
                Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                    Bytes::from("late but whole"),
                )))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
            .await;
    });
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "drain"],
    )
    .await;
    let mut v = visitor(&edge).await;
    let pending = tokio::spawn(v.send_request(request(
        &edge,
        "drain",
        "GET",
        "/slow",
        http_body_util::Empty::new().boxed(),
    )));
    arrived_rx.recv().await.unwrap();
    edge.shutdown.cancel();
    go_tx.send(()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"late but whole");
    let _ = edge.task.await;
}
