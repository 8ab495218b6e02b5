//! HTTP through a real tunnel: an in-process standalone edge, the real `burrow` binary, a
//! local hyper server.

#![allow(clippy::unwrap_used)]

mod tunnel_support;

use tunnel_support::*;

#[tokio::test]
async fn a_get_reaches_the_local_server_through_the_tunnel() {
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "hello"],
    )
    .await;
    assert_eq!(
        agent.urls[0],
        format!("http://hello.localhost:{}", edge.http.port())
    );
    let (status, _, body) = visit(&edge, "hello", "GET", "/hello?x=1", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"hello from GET /hello?x=1");
}

#[tokio::test]
async fn post_put_and_delete_bodies_travel_both_ways() {
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let _agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "echo"],
    )
    .await;
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

#[tokio::test]
async fn a_tunnel_whose_agent_left_shows_a_503_offline_page() {
    let local = local_http_server().await;
    let edge = standalone_edge().await;
    let port = local.port().to_string();
    let mut agent = start_agent(
        &edge,
        STANDALONE_TOKEN,
        &["http", &port, "--subdomain", "gone"],
    )
    .await;
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
