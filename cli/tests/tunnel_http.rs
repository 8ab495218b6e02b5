//! HTTP through a real tunnel: an in-process standalone edge, the real `burrow` binary, a
//! local hyper server.

#![allow(clippy::unwrap_used)]

mod tunnel_support;

use tunnel_support::*;

/// A standalone edge and an agent serving `sub` from a new [`local_http_server`].
async fn local_tunnel(sub: &str) -> (Edge, Agent) {
    standalone_tunnel(local_http_server().await, sub).await
}

#[tokio::test]
async fn a_get_reaches_the_local_server_through_the_tunnel() {
    let (edge, agent) = local_tunnel("hello").await;
    assert_eq!(
        agent.urls[0],
        format!("http://hello.localhost:{}", edge.http.port())
    );
    let (status, _, body) = visit(&edge, "hello", "GET", "/hello?x=1", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"hello from GET /hello?x=1");
    // One log line per request: method, path, status, duration, bytes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = agent.stderr_text().await;
        if log.contains("GET /hello?x=1 200 ") && log.contains(" 25 B") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no request line in:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_port_alone_reaches_a_local_server_listening_only_on_ipv6_loopback() {
    // Node and others may bind "localhost" to ::1 only; `burrow http PORT` must still find it.
    let Some(local) = local_http_server_on("[::1]:0").await else {
        eprintln!("no IPv6 loopback on this machine; nothing to check");
        return;
    };
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "six"],
    )
    .await;
    for _ in 0..3 {
        let (status, _, body) = visit(&edge, "six", "GET", "/hello", &[], "").await;
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"hello from GET /hello");
    }
}

#[tokio::test]
async fn post_put_and_delete_bodies_travel_both_ways() {
    let (edge, _agent) = local_tunnel("echo").await;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let payload = format!("{method} body ").repeat(1000);
        let (status, headers, body) =
            visit(&edge, "echo", method, "/echo", &[], payload.clone()).await;
        assert_eq!(status, 200, "{method}");
        assert_eq!(headers.get("x-echo").unwrap(), "1");
        assert_eq!(body, payload.as_bytes(), "{method}");
    }
}

#[tokio::test]
async fn the_host_is_matched_case_insensitively_and_forwarded_headers_are_replaced() {
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "hdr"],
    )
    .await;
    let (status, _, body) = visit(
        &edge,
        "HDR",
        "GET",
        "/headers",
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil"),
            ("burrow-tunnel", "spoofed"),
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("cookie", "a=b"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
    assert!(!text.contains("6.6.6.6"), "{text}");
    assert!(text.contains("x-forwarded-proto: http\n"), "{text}");
    assert!(
        text.contains(&format!(
            "x-forwarded-host: HDR.localhost:{}\n",
            edge.http.port()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("host: localhost:{port}\n")),
        "rewrite mode: {text}"
    );
    assert!(
        !text.contains("x-private"),
        "hop-by-hop header leaked: {text}"
    );
    assert!(!text.contains("burrow-"), "internal header leaked: {text}");
    assert!(text.contains("cookie: a=b\n"), "{text}");
}

#[tokio::test]
async fn preserve_mode_shows_the_visitor_host_to_the_local_server() {
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &[
            "http",
            &port,
            "--subdomain",
            "keep",
            "--host-header",
            "preserve",
        ],
    )
    .await;
    let (_, _, body) = visit(&edge, "keep", "GET", "/headers", &[], "").await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains(&format!("host: keep.localhost:{}\n", edge.http.port())),
        "{text}"
    );
}

#[tokio::test]
async fn an_unknown_subdomain_gets_a_404_page_naming_it() {
    let edge = standalone_edge().await;
    let (status, _, body) = visit(&edge, "nobody", "GET", "/", &[], "").await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("nobody"));
}

#[tokio::test]
async fn a_refused_local_server_gets_a_502_page_saying_so() {
    // Bind and drop to find a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let edge = standalone_edge().await;
    let target = format!("127.0.0.1:{port}");
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &target, "--subdomain", "down"],
    )
    .await;
    let (status, _, body) = visit(&edge, "down", "GET", "/", &[], "").await;
    assert_eq!(status, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("refused"), "{text}");
    assert!(text.contains(&target), "{text}");
}

/// A local server that reads each connection's request head and then answers with `reply`
/// (empty: closes at once), once per connection.
async fn misbehaving_local_server(reply: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(reply).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_local_server_that_hangs_up_or_answers_garbage_gets_a_502_page_saying_which() {
    let edge = standalone_edge().await;
    let cases: [(&str, &'static [u8], &str); 3] = [
        (
            "hangup",
            b"",
            "closed the connection without a complete response",
        ),
        (
            "cutoff",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            "",
        ),
        (
            "garbage",
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            "did not answer with valid HTTP/1.1",
        ),
    ];
    let mut agents = Vec::new();
    for (name, reply, _) in cases {
        let port = misbehaving_local_server(reply).await.to_string();
        agents.push(
            start_agent(
                &edge,
                STANDALONE_TOKEN,
                &["http", &port, "--subdomain", name],
            )
            .await,
        );
    }
    for (name, _, words) in cases {
        if words.is_empty() {
            // The visitor gets the 200 and then a cut connection, within the test's time and
            // with less than the promised body: never a hang, never a body that looks
            // complete. When the local server breaks off so soon that the head has not left
            // the agent, the visitor gets a 502 page saying so instead.
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
            let req = format!(
                "GET / HTTP/1.1\r\nHost: {name}.localhost:{}\r\n\r\n",
                edge.http.port()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let read = async {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    // A 502 page keeps the connection open for the next request.
                    if got.starts_with(b"HTTP/1.1 502") && got.ends_with(b"</html>\n") {
                        break;
                    }
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), read)
                .await
                .expect("the edge ends the visitor's connection or sends a whole page");
            let text = String::from_utf8_lossy(&got);
            if text.starts_with("HTTP/1.1 502") {
                assert!(text.contains("broke off"), "{name}: {text}");
                continue;
            }
            assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}");
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            assert!(
                body.len() < 10 && !body.ends_with("0\r\n\r\n"),
                "{name}: {text}"
            );
            continue;
        }
        let (status, _, body) = visit(&edge, name, "GET", "/", &[], "").await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 502, "{name}: {text}");
        assert!(text.contains(words), "{name}: {text}");
        assert!(!text.contains("SendRequest"), "{name}: {text}");
    }
    // A WebSocket upgrade to a local server that hangs up gets the same page, not a hang.
    use tokio::io::AsyncWriteExt as _;
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let req = format!(
        "GET /socket HTTP/1.1\r\nHost: hangup.localhost:{}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        edge.http.port()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(std::time::Duration::from_secs(10), read_head(&mut s))
        .await
        .expect("the edge answers the upgrade")
        .expect("an answer head");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let mut page = Vec::new();
    let mut buf = [0u8; 4096];
    while !page.windows(7).any(|w| w == b"</html>") {
        let read = tokio::io::AsyncReadExt::read(&mut s, &mut buf);
        match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => page.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the 502 page did not arrive in time"),
        }
    }
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("closed the connection without a complete response"),
        "{page}"
    );
}

#[tokio::test]
async fn a_tunnel_whose_agent_left_shows_a_503_offline_page() {
    let (edge, mut agent) = local_tunnel("gone").await;
    agent.child.kill().await.unwrap();
    // The edge notices the dropped connection; wait for it rather than sleeping blindly.
    let mut last = 0;
    for _ in 0..100 {
        let (status, _, body) = visit(&edge, "gone", "GET", "/hello", &[], "").await;
        last = status.as_u16();
        if status == 503 {
            assert!(String::from_utf8_lossy(&body).contains("offline"));
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never saw the offline page; last status {last}");
}

#[tokio::test]
async fn a_wrong_token_is_refused_at_the_agent_with_a_reason() {
    let edge = standalone_edge().await;
    let err = try_start_agent(&edge, "brw_agent_wrong", &["http", "3000"])
        .await
        .err()
        .unwrap();
    assert!(err.contains("not valid"), "{err}");
}

#[tokio::test]
async fn without_a_subdomain_the_agent_gets_a_random_name() {
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let agent = start_agent(&edge, STANDALONE_TOKEN, &["http", &port]).await;
    let sub = agent.subdomain();
    assert!(sub.len() >= 8, "{sub}");
    let (status, _, _) = visit(&edge, &sub, "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
}

/// The first `Forwarding …` line the agent prints (other lines may come first).
async fn first_forwarding_line<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut R) -> String {
    let read = async {
        loop {
            let mut line = String::new();
            let n = tokio::io::AsyncBufReadExt::read_line(lines, &mut line)
                .await
                .unwrap();
            if n == 0 || line.starts_with("Forwarding ") {
                return line;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .unwrap()
}

async fn raw_exchange(edge: &Edge, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    s.write_all(request).await.unwrap();
    // Read the response head (or until the edge closes the connection).
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` to the edge's HTTP listener and reads the whole answer, until the edge
/// closes the connection (or 10 s pass without a byte).
async fn raw_exchange_to_end(edge: &Edge, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_or_too_many_request_headers_get_431() {
    let edge = standalone_edge_with(|l| {
        l.max_header_bytes = 8192;
        l.max_headers = 10;
    })
    .await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x.localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = raw_exchange(&edge, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x.localhost\r\n");
    for i in 0..20 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange_to_end(&edge, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        answer.contains("at most 10 headers (its --max-headers setting)"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_large_response_head_crosses_the_tunnel_and_one_over_the_limit_gets_a_502_page() {
    let local = local_http_server().await;
    let edge = standalone_edge_with(|l| l.agent_max_header_list_bytes = 64 * 1024).await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "head"],
    )
    .await;
    // 40 KB of response headers (a big Content-Security-Policy or a pile of cookies).
    let (status, headers, body) = visit(&edge, "head", "GET", "/big-head/40000", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-big"].len(), 40_000);
    assert_eq!(&body[..], b"big head");
    // Over the edge's limit: a page saying the local server's answer was refused, not a hang
    // and not an "offline" page; the tunnel stays up for the next request.
    let (status, _, body) = visit(&edge, "head", "GET", "/big-head/100000", &[], "").await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("could not be relayed"), "{body}");
    let (status, _, _) = visit(&edge, "head", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_visitor_that_sends_headers_too_slowly_is_disconnected() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let edge =
        standalone_edge_with(|l| l.header_read_timeout = std::time::Duration::from_millis(500))
            .await;
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x.local")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the edge kept a slow visitor open");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn an_upgrade_request_with_a_body_is_refused_before_reaching_the_agent() {
    let (edge, _agent) = local_tunnel("smuggle").await;
    let req = format!(
        "GET /hello HTTP/1.1\r\nHost: smuggle.localhost:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
        edge.http.port()
    );
    let answer = raw_exchange(&edge, req.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[tokio::test]
async fn burrow_start_runs_every_tunnel_of_its_file() {
    let a = local_http_server().await;
    let b = local_http_server().await;
    let edge = standalone_edge().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("burrow.toml");
    std::fs::write(
        &file,
        format!(
            "[[tunnel]]\ntarget = \"{}\"\nsubdomain = \"one\"\n\n[[tunnel]]\ntarget = \"127.0.0.1:{}\"\nsubdomain = \"two\"\nhost_header = \"preserve\"\n",
            a.port(),
            b.port()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap().to_owned();
    let mut agent = start_agent(&edge, STANDALONE_TOKEN, &["start", "--config", &file]).await;
    // Both URLs are printed.
    while agent.urls.len() < 2 {
        let u = agent
            .next_ready(std::time::Duration::from_secs(10))
            .await
            .unwrap();
        agent.urls.push(u);
    }
    agent.urls.sort();
    assert!(
        agent.urls[0].starts_with("http://one.localhost:"),
        "{:?}",
        agent.urls
    );
    assert!(
        agent.urls[1].starts_with("http://two.localhost:"),
        "{:?}",
        agent.urls
    );
    for sub in ["one", "two"] {
        let (status, _, _) = visit(&edge, sub, "GET", "/hello", &[], "").await;
        assert_eq!(status, 200, "{sub}");
    }
}

#[tokio::test]
async fn authtoken_add_reads_the_token_from_stdin_and_the_agent_uses_it() {
    use tokio::io::AsyncWriteExt as _;
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.toml");
    let mut add = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["authtoken", "add"])
        .env("BURROW_CONFIG", &config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(format!("{STANDALONE_TOKEN}\n").as_bytes())
        .await
        .unwrap();
    let out = add.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains(STANDALONE_TOKEN));
    // The agent finds the token in the config file (no BURROW_TOKEN).
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["http", &local.port().to_string(), "--subdomain", "saved"])
        .arg("--edge")
        .arg(format!("localhost:{}", edge.agent.port()))
        .arg("--edge-ca")
        .arg(&edge.ca_file)
        .env("BURROW_CONFIG", &config)
        .env_remove("BURROW_TOKEN")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let first = first_forwarding_line(&mut lines).await;
    assert!(
        first.starts_with("Forwarding http://saved.localhost:"),
        "{first}"
    );
}

#[tokio::test]
async fn https_visitors_reach_the_tunnel_and_the_local_server_sees_proto_https() {
    let local = local_http_server().await;
    let id = identity();
    let edge = start_edge_with(standalone_control(), id.clone(), None, true, |_| {}).await;
    let port = local.port().to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "sec"],
    )
    .await;
    let https = edge.https.unwrap();
    assert!(
        agent
            .urls
            .contains(&format!("https://sec.localhost:{}", https.port())),
        "{:?}",
        agent.urls
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut id.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tls))
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("/headers")
        .header("host", format!("sec.localhost:{}", https.port()))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt as _;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
}

#[tokio::test]
async fn insecure_mode_works_for_a_local_edge_and_is_refused_for_a_remote_one() {
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let home = tempfile::tempdir().unwrap();
    let run = |edge_addr: String, sub: &'static str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
            .args([
                "http",
                &local.port().to_string(),
                "--subdomain",
                sub,
                "--insecure",
            ])
            .arg("--edge")
            .arg(edge_addr)
            .env("BURROW_TOKEN", STANDALONE_TOKEN)
            .env("BURROW_CONFIG", home.path().join("config.toml"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let remote = run("edge.example.com:4443".to_owned(), "far")
        .wait_with_output()
        .await
        .unwrap();
    assert!(!remote.status.success());
    let err = String::from_utf8_lossy(&remote.stderr);
    assert!(err.contains("--insecure is only allowed"), "{err}");

    let mut child = run(format!("127.0.0.1:{}", edge.agent.port()), "near");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let first = first_forwarding_line(&mut lines).await;
    assert!(
        first.starts_with("Forwarding http://near.localhost:"),
        "{first}"
    );
}

#[tokio::test]
async fn a_plaintext_agent_connection_works_for_benchmarks_on_one_machine() {
    let local = local_http_server().await;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let agent_addr = agent_listener.local_addr().unwrap();
    let config = burrow_edge::Config {
        name: "plain".into(),
        domain: "localhost".into(),
        public_url_template: None,
        agent_addr: None,
        control: standalone_control(),
        agent_tls: identity(),
        agent_plaintext: true,
        visitor_tls: None,
        limits: burrow_edge::Limits::default(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _edge = tokio::spawn(burrow_edge::run(
        config,
        burrow_edge::Listeners {
            http: Some(http),
            https: None,
            agent: agent_listener,
            admin: None,
        },
        shutdown.clone(),
    ));
    let home = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args([
            "http",
            &local.port().to_string(),
            "--subdomain",
            "plain",
            "--edge-plaintext",
        ])
        .arg("--edge")
        .arg(agent_addr.to_string())
        .env("BURROW_TOKEN", STANDALONE_TOKEN)
        .env("BURROW_CONFIG", home.path().join("config.toml"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let first = first_forwarding_line(&mut lines).await;
    assert!(
        first.starts_with("Forwarding http://plain.localhost:"),
        "{first}"
    );
    let tcp = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tcp))
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            hyper::Request::builder()
                .uri("/hello")
                .header("host", format!("plain.localhost:{}", http_addr.port()))
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    shutdown.cancel();
}

#[tokio::test]
async fn sigint_and_sigterm_stop_the_agent_at_once_with_a_line_saying_so() {
    let edge = standalone_edge().await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    for (signal, sub) in [("-INT", "stopint"), ("-TERM", "stopterm")] {
        let mut agent = start_agent(
            &edge,
            STANDALONE_TOKEN,
            &["http", &port, "--subdomain", sub],
        )
        .await;
        let pid = agent.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let exit = tokio::time::timeout(std::time::Duration::from_secs(5), agent.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "{signal}: {exit:?}");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !agent
            .stderr_text()
            .await
            .contains("Stopped: the tunnels are closed")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{signal}: {}",
                agent.stderr_text().await
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn a_request_with_two_hosts_gets_400_and_is_not_forwarded() {
    let (edge, _agent) = local_tunnel("ambiguous").await;
    let host = format!("ambiguous.localhost:{}", edge.http.port());
    // RFC 9112 §3.2: more than one Host is a 400, whichever would have been routed.
    let two = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nHost: other.localhost\r\n\r\n");
    let answer = raw_exchange(&edge, two.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let (status, _, body) = visit(&edge, "ambiguous", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn a_second_agent_asking_for_a_name_live_on_the_edge_is_refused_and_the_first_keeps_it() {
    let edge = standalone_edge().await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let first = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "taken"],
    )
    .await;
    // Same token, the name in other letter case, a local port nothing listens on.
    let err = try_start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", "127.0.0.1:9", "--subdomain", "Taken"],
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("taken is in use by a live tunnel of your team")
            && err.contains("stop that agent first"),
        "{err}"
    );
    let (status, _, body) = visit(&edge, "taken", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"hello from GET /hello");
    assert!(
        !first.stderr_text().await.contains("ended by the edge"),
        "{}",
        first.stderr_text().await
    );
}

#[tokio::test]
async fn an_agent_that_stops_answering_loses_its_name_to_a_new_one_and_is_told_why() {
    let edge = standalone_edge_with(|l| {
        l.takeover_probe_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let mut first = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "frozen"],
    )
    .await;
    let pid = first.child.id().unwrap().to_string();
    let signal = |s: &str| {
        let sent = std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    // A stopped process keeps its connection open but answers nothing: to the edge it looks
    // like an agent whose network vanished without a goodbye.
    signal("-STOP");
    let started = std::time::Instant::now();
    // The newcomer forwards to a port nothing listens on, so its answers are told apart.
    let _second = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", "127.0.0.1:9", "--subdomain", "frozen"],
    )
    .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    signal("-CONT");
    let (status, _, body) = visit(&edge, "frozen", "GET", "/hello", &[], "").await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    // The old agent hears why once it runs again, and stops rather than fight for the name.
    let exit = tokio::time::timeout(std::time::Duration::from_secs(20), first.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!exit.success());
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let err = first.stderr_text().await;
    assert!(
        err.contains("frozen was taken over by a new agent of your team"),
        "{err}"
    );
}

#[tokio::test]
async fn an_empty_or_malformed_subdomain_is_refused_at_once_with_what_to_give_instead() {
    let edge = standalone_edge().await;
    for (name, expected) in [
        ("", "--subdomain is empty"),
        ("  ", "--subdomain is empty"),
        ("chat.example.com", "not a valid subdomain"),
        ("chat-", "not a valid subdomain"),
        ("ch@t", "not a valid subdomain"),
    ] {
        let started = std::time::Instant::now();
        let err = try_start_agent(
            &edge,
            STANDALONE_TOKEN,
            &["http", "3000", "--subdomain", name],
        )
        .await
        .err()
        .unwrap();
        assert!(err.contains(expected), "{name:?}: {err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{name:?}"
        );
    }
    // Upper case is the same name, as in a browser's address bar.
    let local = local_http_server().await;
    let port = local.port().to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "MiXed"],
    )
    .await;
    assert_eq!(agent.subdomain(), "mixed");
}

/// An edge (its limits changed by `tweak`) and an agent that forwards `sub` to a
/// [`recording_local_server`]; also the requests it saw and the tunnel's `Host` value.
async fn recorded_tunnel(
    sub: &str,
    tweak: impl FnOnce(&mut burrow_edge::Limits),
) -> (
    Edge,
    Agent,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    String,
) {
    let (port, seen) = recording_local_server().await;
    let edge = standalone_edge_with(tweak).await;
    let port = port.to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", sub],
    )
    .await;
    let host = format!("{sub}.localhost:{}", edge.http.port());
    (edge, agent, seen, host)
}

/// A local server that answers every request `200 ok` and notes each as `METHOD TARGET`, the
/// target as hyper read it from the request line.
async fn recording_local_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    log.lock()
                        .unwrap()
                        .push(format!("{} {}", req.method(), req.uri()));
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn a_connect_request_gets_501_and_never_reaches_the_local_server() {
    let (edge, _agent, seen, host) = recorded_tunnel("connect", |_| {}).await;
    // RFC 9110 §9.3.6: a forward-proxy tunnel, whether to the tunnel's own name or elsewhere.
    for target in [host.as_str(), "example.com:443"] {
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let answer = raw_exchange_to_end(&edge, req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("does not proxy CONNECT"), "{answer}");
    }
    let (status, _, body) = visit(&edge, "connect", "GET", "/after", &[], "").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(*seen.lock().unwrap(), ["GET /after"]);
}

#[tokio::test]
async fn a_request_body_in_a_transfer_coding_other_than_chunked_is_refused_not_forwarded() {
    let (edge, _agent, seen, host) = recorded_tunnel("codings", |_| {}).await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    // RFC 9112 §6.1: a coding the edge does not decode is a 501; `chunked` must be last and
    // only once, else the request is malformed (400).
    let cases = [
        ("gzip, chunked", "501", "gzip"),
        ("gzip\r\nTransfer-Encoding: chunked", "501", "gzip"),
        ("chunked, chunked", "400", "more than once"),
        (
            "chunked\r\nTransfer-Encoding: chunked",
            "400",
            "more than once",
        ),
        // hyper refuses these before the edge is asked; the edge's page replaces its bare 400.
        (
            "gzip",
            "501",
            "chunked must be its last and only transfer coding",
        ),
        (
            "chunked, gzip",
            "501",
            "chunked must be its last and only transfer coding",
        ),
    ];
    for (coding, status, words) in cases {
        let req = format!(
            "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: {coding}\r\n\r\n{body}"
        );
        let answer = raw_exchange_to_end(&edge, req.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{coding}: {answer}"
        );
        assert!(answer.contains("connection: close"), "{coding}: {answer}");
        assert!(answer.contains(words), "{coding}: {answer}");
    }
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
    );
    let answer = raw_exchange_to_end(&edge, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(*seen.lock().unwrap(), ["POST /upload"]);
}

#[tokio::test]
async fn a_url_or_head_over_the_limit_gets_a_414_or_431_page_naming_the_setting() {
    let (edge, _agent, seen, host) = recorded_tunnel("limits", |l| l.max_header_bytes = 8192).await;
    let url = |n: usize| format!("GET /{} HTTP/1.1\r\nHost: {host}\r\n\r\n", "u".repeat(n));
    let head = |n: usize| {
        format!(
            "GET /x HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
            "h".repeat(n)
        )
    };
    // Just over the limit the edge answers itself; far beyond it hyper stops reading at its
    // own cap, and the page still names the setting and tells a long URL from a big head.
    for (req, status) in [
        (url(9000), "414"),
        (head(9000), "431"),
        (url(100_000), "414"),
        (head(40_000), "431"),
    ] {
        let answer = raw_exchange_to_end(&edge, req.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("--max-header-bytes"), "{answer}");
        assert!(answer.contains("8192 bytes"), "{answer}");
    }
    // A head just under the limit is forwarded.
    let fits = "f".repeat(7000);
    let (status, _, _) = visit(&edge, "limits", "GET", "/fits", &[("x-fits", &fits)], "").await;
    assert_eq!(status, 200);
    assert_eq!(*seen.lock().unwrap(), ["GET /fits"]);
}

#[tokio::test]
async fn an_asterisk_form_options_request_reaches_the_local_server_as_sent() {
    let (edge, _agent, seen, host) = recorded_tunnel("star", |_| {}).await;
    // RFC 9112 §3.2.4: the server as a whole is asked, not one of its resources.
    let star = format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange_to_end(&edge, star.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    // The asterisk-form is for OPTIONS only.
    let get = format!("GET * HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let answer = raw_exchange_to_end(&edge, get.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("only for OPTIONS"), "{answer}");
    assert_eq!(*seen.lock().unwrap(), ["OPTIONS *"]);
}

#[tokio::test]
async fn a_response_with_both_content_length_and_chunked_reaches_the_visitor_framed_by_chunked() {
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, which is to be removed.
    let port = misbehaving_local_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .to_string();
    let edge = standalone_edge().await;
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "both"],
    )
    .await;
    let host = format!("both.localhost:{}", edge.http.port());
    let req = format!("GET /both HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange_to_end(&edge, req.as_bytes()).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        header_value(head, "transfer-encoding").as_deref(),
        Some("chunked"),
        "{answer}"
    );
    assert_eq!(header_value(head, "content-length"), None, "{answer}");
    assert_eq!(body, "5\r\nhello\r\n0\r\n\r\n", "{answer}");
}

#[tokio::test]
async fn a_host_header_that_is_not_ascii_gets_a_400_page_saying_so_not_that_it_is_missing() {
    let edge = standalone_edge().await;
    let hosts: [&[u8]; 4] = [
        "ch\u{e4}t.localhost".as_bytes(),
        b"chat\xff.localhost",
        b"chat localhost",
        b"someone@chat.localhost",
    ];
    for host in hosts {
        let mut req = b"GET / HTTP/1.1\r\nHost: ".to_vec();
        req.extend_from_slice(host);
        req.extend_from_slice(b"\r\n\r\n");
        let answer = raw_exchange_to_end(&edge, &req).await;
        let shown = String::from_utf8_lossy(host);
        assert!(answer.starts_with("HTTP/1.1 400"), "{shown}: {answer}");
        assert!(
            answer.contains("not a valid host name"),
            "{shown}: {answer}"
        );
        assert!(!answer.contains("no Host"), "{shown}: {answer}");
    }
    let none = raw_exchange_to_end(&edge, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 400"), "{none}");
    assert!(none.contains("no Host header"), "{none}");
}

/// A local server that answers a `Content-Length: 1000000` response with only `abc`, then
/// holds the connection open until the agent closes it, or closes it itself when `cut` is
/// notified.
async fn stalling_local_server() -> (u16, std::sync::Arc<tokio::sync::Notify>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let cut = std::sync::Arc::new(tokio::sync::Notify::new());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let notify = std::sync::Arc::clone(&cut);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let cut = std::sync::Arc::clone(&notify);
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nabc")
                    .await;
                let mut buf = [0u8; 1024];
                loop {
                    tokio::select! {
                        () = cut.notified() => return,
                        r = s.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
                    }
                }
            });
        }
    });
    (port, cut)
}

/// Waits until the agent's log has a line holding every one of `words`; that line.
async fn agent_log_line(agent: &Agent, words: &[&str]) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = agent.stderr_text().await;
        if let Some(line) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line with {words:?} in:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Sends `GET path` for `sub` on a raw connection and reads until the response head is in
/// (checked to be a 200); returns the connection, with the body still to come.
async fn get_until_head(edge: &Edge, sub: &str, path: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {sub}.localhost:{}\r\n\r\n",
        edge.http.port()
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

#[tokio::test]
async fn a_response_body_the_local_server_cuts_off_is_logged_by_the_agent_as_broken_off() {
    let edge = standalone_edge().await;
    let (port, cut) = stalling_local_server().await;
    let port = port.to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "cut"],
    )
    .await;
    let _s = get_until_head(&edge, "cut", "/cut").await;
    // The head is out; now the local server hangs up with 999997 bytes still owed.
    cut.notify_one();
    let line = agent_log_line(&agent, &["GET /cut 200"]).await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("3 B"), "{line}");
    assert!(line.contains("broke off"), "{line}");

    // A visitor that leaves mid-body.
    let slow = stalling_local_server().await.0.to_string();
    let slow_agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &slow, "--subdomain", "slow"],
    )
    .await;
    drop(get_until_head(&edge, "slow", "/slow").await);
    let line = agent_log_line(&slow_agent, &["GET /slow 200"]).await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("the visitor"), "{line}");

    // A body that ends as announced is still a normal line.
    let (port, _) = recording_local_server().await;
    let port = port.to_string();
    let ok_agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "fine"],
    )
    .await;
    let (status, _, _) = visit(&edge, "fine", "GET", "/fine", &[], "").await;
    assert_eq!(status, 200);
    let line = agent_log_line(&ok_agent, &["GET /fine 200"]).await;
    assert!(line.contains("INFO") && line.ends_with(" 2 B"), "{line}");
}

/// A local server that answers the first request of each connection `200 ok` and keeps the
/// connection alive, then reads the next request and closes the connection without an
/// answer, as a server whose keep-alive timeout ran out just as that request came. Notes each
/// request as `CONNECTION-NUMBER REQUEST-LINE`.
async fn closing_kept_alive_local_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                for served in 0.. {
                    let Some(head) = read_head(&mut s).await else {
                        return;
                    };
                    let line = head.lines().next().unwrap_or("").to_owned();
                    log.lock().unwrap().push(format!("{n} {line}"));
                    if served == 1 {
                        return;
                    }
                    let len =
                        header_value(&head, "content-length").map_or(0, |v| v.parse().unwrap());
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
            n += 1;
        }
    });
    (port, seen)
}

#[tokio::test]
async fn a_get_on_a_kept_alive_connection_the_local_server_just_closed_is_sent_again_on_a_new_one()
{
    let (port, seen) = closing_kept_alive_local_server().await;
    let edge = standalone_edge().await;
    let port = port.to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "again"],
    )
    .await;
    // Every second request lands on a kept-alive connection that the local server closes.
    for i in 0..4 {
        let (status, _, body) = visit(&edge, "again", "GET", &format!("/get/{i}"), &[], "").await;
        assert_eq!(status, 200, "{i}: {}", String::from_utf8_lossy(&body));
        assert_eq!(&body[..], b"ok");
    }
    let log = seen.lock().unwrap().clone();
    let sent_twice = (0..4).filter(|i| {
        let line = format!(" GET /get/{i} HTTP/1.1");
        log.iter().filter(|l| l.ends_with(&line)).count() == 2
    });
    assert!(sent_twice.count() >= 1, "{log:?}");

    // A request with a body is never sent twice: it gets the 502 page.
    let mut refused = false;
    for i in 0..4 {
        let path = format!("/post/{i}");
        let (status, _, _) = visit(&edge, "again", "POST", &path, &[], "data").await;
        let line = format!(" POST {path} HTTP/1.1");
        let times = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.ends_with(&line))
            .count();
        assert_eq!(times, 1, "{:?}", seen.lock().unwrap());
        if status == 502 {
            refused = true;
            break;
        }
        assert_eq!(status, 200);
    }
    assert!(refused, "{:?}", seen.lock().unwrap());
}

#[tokio::test]
async fn a_request_hyper_cannot_parse_gets_a_page_and_an_empty_local_answer_still_reaches_the_visitor(
) {
    let edge = standalone_edge().await;
    let answer = raw_exchange_to_end(
        &edge,
        b"GET / HTTP/1.1\r\nHost: x.localhost\r\nBad Header: v\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("could not read the request as HTTP/1.1"),
        "{answer}"
    );
    // A local server's own empty 4xx on a closing connection looks like hyper's bare answer,
    // and is sent as it is.
    let port = misbehaving_local_server(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        .await
        .to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "empty"],
    )
    .await;
    let req = format!(
        "GET /gone HTTP/1.1\r\nHost: empty.localhost:{}\r\nConnection: close\r\n\r\n",
        edge.http.port()
    );
    let answer = raw_exchange_to_end(&edge, req.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    assert!(answer.contains("content-length: 0\r\n"), "{answer}");
}

#[tokio::test]
async fn a_get_that_a_new_local_connection_closes_unanswered_is_not_sent_twice() {
    // A local server that reads each request head, notes it and hangs up without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let heads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            if read_head(&mut s).await.is_some() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let edge = standalone_edge().await;
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "hangup"],
    )
    .await;
    let (status, _, body) = visit(&edge, "hangup", "GET", "/once", &[], "").await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(heads.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Reads one response (head and a `Content-Length` body) from `s`; `None` when the
/// connection ends first.
async fn read_response(s: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let len: usize = header_value(&head, "content-length")?.parse().ok()?;
    while out.len() < end + len {
        match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    Some((head, out[end..end + len].to_vec()))
}

#[tokio::test]
async fn an_http_1_0_client_that_asks_for_keep_alive_is_told_so_and_keeps_its_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (edge, _agent) = local_tunnel("old").await;
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    for _ in 0..3 {
        s.write_all(
            b"GET /hello HTTP/1.0\r\nHost: old.localhost\r\nConnection: Keep-Alive\r\n\r\n",
        )
        .await
        .unwrap();
        let (head, body) = read_response(&mut s)
            .await
            .expect("an answer on the same connection");
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert_eq!(
            header_value(&head, "connection").map(|v| v.to_ascii_lowercase()),
            Some("keep-alive".to_owned()),
            "{head}"
        );
        assert_eq!(&body[..], b"hello from GET /hello");
    }
    // Without keep-alive, HTTP/1.0 means one request per connection: the edge closes it.
    s.write_all(b"GET /hello HTTP/1.0\r\nHost: old.localhost\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await.expect("an answer");
    assert!(header_value(&head, "connection").is_none(), "{head}");
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "the connection stayed open");
}
