//! Tunnels to a local server that speaks HTTPS (`burrow http https://localhost:PORT`): an
//! in-process standalone edge, the real `burrow` binary, and a local rustls server with a
//! certificate from a private authority (as mkcert makes), serving HTTP and a WebSocket echo.

#![allow(clippy::unwrap_used)]

mod tunnel_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tunnel_support::*;

/// How long any single step may take.
const STEP: Duration = Duration::from_secs(30);

/// A private authority's certificate (PEM, for `--local-ca`) and a TLS acceptor whose
/// certificate for `localhost` and 127.0.0.1 it issued.
fn local_tls() -> (String, tokio_rustls::TlsAcceptor) {
    // Offers HTTP/2 first, as many dev servers do: the agent must agree on HTTP/1.1.
    local_tls_offering(&[b"h2", b"http/1.1"])
}

/// [`local_tls`] with these ALPN protocols.
fn local_tls_offering(alpn: &[&[u8]]) -> (String, tokio_rustls::TlsAcceptor) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test local authority");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    let mut config =
        rustls::ServerConfig::builder_with_provider(burrow_edge::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (ca.pem(), tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A local HTTPS server: `/hello` says hello and names the ALPN protocol the agent agreed
/// (`-` for none); an upgrade to `websocket` on any path echoes text and binary messages.
async fn local_https_server(acceptor: tokio_rustls::TlsAcceptor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map_or("-".to_owned(), |p| String::from_utf8_lossy(p).into_owned());
                let svc = hyper::service::service_fn(move |req| {
                    let alpn = alpn.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &alpn)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn handle(
    mut req: hyper::Request<hyper::body::Incoming>,
    alpn: &str,
) -> hyper::Response<Full<Bytes>> {
    let Some(accept) = spawn_ws_echo(&mut req) else {
        return hyper::Response::new(Full::new(Bytes::from(format!(
            "hello over https from {} (alpn {alpn})",
            req.uri().path()
        ))));
    };
    hyper::Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A tunnel from `sub` to `https://localhost:PORT` of `local`, with `extra` agent flags.
async fn tunnel(local: SocketAddr, sub: &str, extra: &[&str]) -> (Edge, Agent) {
    let edge = standalone_edge().await;
    let target = format!("https://localhost:{}", local.port());
    let mut args = vec!["http", &target, "--subdomain", sub, "--no-inspect"];
    args.extend_from_slice(extra);
    let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    (edge, agent)
}

/// What a visitor of `sub` sees for `/hello` when the agent cannot talk to `local`: a 502 page.
async fn failing_page(local: SocketAddr, sub: &str, extra: &[&str]) -> String {
    let (edge, agent) = tunnel(local, sub, extra).await;
    let (status, _, body) = visit(&edge, sub, "GET", "/hello", &[], "").await;
    assert_eq!(status, 502, "{body:?}");
    drop(agent);
    String::from_utf8_lossy(&body).into_owned()
}

/// The standard error of `burrow ARGS`, which must fail before connecting anywhere.
async fn refused(args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(args)
        .env("BURROW_TOKEN", STANDALONE_TOKEN)
        .env("BURROW_CONFIG", "/nonexistent/config.toml")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn an_https_local_server_with_a_private_authority_answers_http_and_websocket() {
    let (ca_pem, acceptor) = local_tls();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("local-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let local = local_https_server(acceptor).await;
    let ca_arg = ca_file.to_str().unwrap();
    let (edge, agent) = tunnel(local, "secure", &["--local-ca", ca_arg]).await;
    assert!(
        agent
            .stdout
            .lock()
            .await
            .iter()
            .any(|l| l.contains(&format!("-> https://localhost:{}", local.port()))),
        "the Forwarding line names the https target"
    );

    let (status, _, body) = visit(&edge, "secure", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(
        body,
        Bytes::from("hello over https from /hello (alpn http/1.1)")
    );

    // A WebSocket through the tunnel to the HTTPS server: text and a 100 KiB binary message.
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let url = format!("ws://secure.localhost:{}/socket", edge.http.port());
    let (mut ws, resp) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(url, tcp))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    let m = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m, Message::text("over tls"));
    let big: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    let m = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.into_data().as_ref(), big.as_slice());
    ws.close(None).await.unwrap();
    drop(agent);
}

#[tokio::test]
async fn an_untrusted_local_certificate_gets_a_502_that_says_what_to_do_and_insecure_skips_the_check(
) {
    let (_ca, acceptor) = local_tls();
    let local = local_https_server(acceptor).await;

    let page = failing_page(local, "untrusted", &[]).await;
    assert!(page.contains("--local-ca"), "{page}");
    assert!(page.contains("certificate"), "{page}");

    let (edge, agent) = tunnel(local, "skipcheck", &["--local-insecure"]).await;
    let (status, _, body) = visit(&edge, "skipcheck", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200, "{body:?}");
    assert!(body.starts_with(b"hello over https"));
    drop(agent);
}

#[tokio::test]
async fn an_https_target_on_a_plain_http_server_gets_a_502_that_says_so() {
    let local = local_http_server().await;
    let page = failing_page(local, "mixedup", &["--local-insecure"]).await;
    assert!(page.contains("HTTPS"), "{page}");
}

#[tokio::test]
async fn a_local_server_that_speaks_only_http2_over_tls_gets_a_502_that_says_so() {
    let (_ca, acceptor) = local_tls_offering(&[b"h2"]);
    let local = local_https_server(acceptor).await;
    let page = failing_page(local, "h2only", &["--local-insecure"]).await;
    assert!(page.contains("only HTTP/2"), "{page}");
}

#[tokio::test]
async fn local_tls_flags_are_checked_before_connecting() {
    let err = refused(&[
        "http",
        "https://localhost:8443",
        "--local-ca",
        "/nonexistent/ca.pem",
    ])
    .await;
    assert!(err.contains("cannot read --local-ca file"), "{err}");

    // A file without a certificate, for either kind of CA flag.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let empty = empty.to_str().unwrap();
    for flag in ["--local-ca", "--edge-ca"] {
        let err = refused(&["http", "https://localhost:8443", flag, empty]).await;
        assert!(err.contains("holds no certificate"), "{flag}: {err}");
    }

    let err = refused(&["http", "3000", "--local-ca", "x.pem", "--local-insecure"]).await;
    assert!(err.contains("cannot be used with"), "{err}");
}

#[tokio::test]
async fn a_tunnels_file_mixes_http_and_https_targets_with_its_local_ca() {
    let (ca_pem, acceptor) = local_tls();
    let secure = local_https_server(acceptor).await;
    let plain = local_http_server().await;
    let edge = standalone_edge().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("local-ca.pem"), ca_pem).unwrap();
    let file = dir.path().join("burrow.toml");
    // `local_ca` is relative to the file.
    std::fs::write(
        &file,
        format!(
            "local_ca = \"local-ca.pem\"\n\n[[tunnel]]\ntarget = \"https://localhost:{}\"\nsubdomain = \"tls-one\"\n\n[[tunnel]]\ntarget = \"{}\"\nsubdomain = \"plain-two\"\n",
            secure.port(),
            plain.port()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap().to_owned();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["start", "--config", &file, "--no-inspect"],
    )
    .await;
    let (status, _, body) = visit(&edge, "tls-one", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200, "{body:?}");
    assert!(body.starts_with(b"hello over https"), "{body:?}");
    let (status, _, body) = visit(&edge, "plain-two", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200, "{body:?}");
    assert!(body.starts_with(b"hello from GET"), "{body:?}");
    drop(agent);
}

async fn inspector(base: &str, method: &str, path: &str) -> (u16, serde_json::Value) {
    inspector_api(base, method, path, None, "localhost").await
}

#[tokio::test]
async fn the_inspector_records_an_https_exchange_and_replays_it_over_tls() {
    let (_ca, acceptor) = local_tls();
    let local = local_https_server(acceptor).await;
    let edge = standalone_edge().await;
    let target = format!("https://localhost:{}", local.port());
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &[
            "http",
            &target,
            "--subdomain",
            "inspected",
            "--local-insecure",
            "--inspect",
            "127.0.0.1:0",
        ],
    )
    .await;
    let base = {
        let lines = agent.stdout.lock().await;
        lines
            .iter()
            .find_map(|l| l.strip_prefix("Inspector ").map(str::to_owned))
            .unwrap()
    };
    let (status, _, _) = visit(&edge, "inspected", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
    let deadline = tokio::time::Instant::now() + STEP;
    let id = loop {
        let (_, v) = inspector(&base, "GET", "/api/exchanges").await;
        if let Some(id) = v["exchanges"][0]["id"].as_u64() {
            break id;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (code, out) = inspector(&base, "GET", &format!("/api/exchanges/{id}")).await;
    assert_eq!(code, 200, "{out}");
    assert!(out.to_string().contains("https://localhost:"), "{out}");
    let (code, out) = inspector(&base, "POST", &format!("/api/exchanges/{id}/replay")).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["status"], 200, "{out}");
    let replayed = out["id"].as_u64().unwrap();
    let (_, d) = inspector(&base, "GET", &format!("/api/exchanges/{replayed}")).await;
    assert!(
        d["response"]["body"]["content"]
            .as_str()
            .is_some_and(|b| b.starts_with("hello over https from /hello")),
        "{d}"
    );
    drop(agent);
}
