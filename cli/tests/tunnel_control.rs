//! Tunnels governed by the real control plane: in-process control plane over a fresh
//! PostgreSQL database, an in-process edge registered with it, and the real `burrow` binary.

#![allow(clippy::unwrap_used)]

mod tunnel_support;

use std::time::Duration;

use sqlx::PgPool;
use tunnel_support::control::*;
use tunnel_support::*;

async fn edge_for(cp: &ControlPlane) -> Edge {
    start_edge(cp.edge_control().await, identity(), None, |_| {}).await
}

/// Waits for the agent process to exit; returns its stderr.
async fn exits(agent: &mut Agent, within: Duration) -> String {
    let status = tokio::time::timeout(within, agent.child.wait())
        .await
        .expect("the agent exits")
        .unwrap();
    assert!(!status.success(), "the agent should fail");
    // Let the stderr reader drain.
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.stderr_text().await
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_teams_agent_binds_its_reserved_name_and_serves_http(pool: PgPool) {
    let cp = start_control(pool).await;
    let owner = cp.owner("ann@example.com", "web").await;
    cp.reserve(&owner, "shop").await;
    let (_, secret) = cp.agent_token(&owner).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let _agent = start_agent(&edge, &secret, &["http", &port, "--subdomain", "shop"]).await;
    let (status, _, body) = visit(&edge, "shop", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"hello from GET /hello");
    let live = cp.list(&owner).await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].subdomain, "shop");
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn binding_another_teams_reservation_is_refused_at_the_agent_with_a_reason(pool: PgPool) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    cp.reserve(&ann, "shop").await;
    let bob = cp.owner("bob@example.com", "other").await;
    let (_, secret) = cp.agent_token(&bob).await;
    let edge = edge_for(&cp).await;
    let err = try_start_agent(&edge, &secret, &["http", "3000", "--subdomain", "shop"])
        .await
        .err()
        .unwrap();
    assert!(err.contains("reserved by another team"), "{err}");
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn binding_a_name_live_in_another_teams_session_is_refused_at_the_agent_with_a_reason(
    pool: PgPool,
) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let bob = cp.owner("bob@example.com", "other").await;
    let (_, ann_secret) = cp.agent_token(&ann).await;
    let (_, bob_secret) = cp.agent_token(&bob).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let _ann_agent = start_agent(&edge, &ann_secret, &["http", &port, "--subdomain", "demo"]).await;
    let err = try_start_agent(&edge, &bob_secret, &["http", &port, "--subdomain", "demo"])
        .await
        .err()
        .unwrap();
    assert!(err.contains("demo"), "{err}");
    assert!(
        err.to_lowercase().contains("in use") || err.contains("live"),
        "{err}"
    );
    // Ann's tunnel is untouched.
    let (status, _, _) = visit(&edge, "demo", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_second_agent_of_the_same_team_is_refused_a_reserved_name_its_first_agent_serves(
    pool: PgPool,
) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    cp.reserve(&ann, "busy").await;
    let (_, first_secret) = cp.agent_token(&ann).await;
    let (_, second_secret) = cp.agent_token(&ann).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let _first = start_agent(
        &edge,
        &first_secret,
        &["http", &port, "--subdomain", "busy"],
    )
    .await;
    let err = try_start_agent(
        &edge,
        &second_secret,
        &["http", "127.0.0.1:9", "--subdomain", "busy"],
    )
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("busy is in use by a live tunnel of your team"),
        "{err}"
    );
    let (status, _, _) = visit(&edge, "busy", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
    // The control plane still records the first agent's session, and only it.
    let live = cp.list(&ann).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].subdomain, "busy");
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn after_an_unclean_disconnect_the_team_reclaims_its_name_at_once_and_nobody_else_can(
    pool: PgPool,
) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let bob = cp.owner("bob@example.com", "other").await;
    let (_, ann_secret) = cp.agent_token(&ann).await;
    let (_, bob_secret) = cp.agent_token(&bob).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let mut first = start_agent(&edge, &ann_secret, &["http", &port, "--subdomain", "keep"]).await;
    first.child.kill().await.unwrap();
    first.child.wait().await.unwrap();
    // Within the grace period another team is refused…
    let err = try_start_agent(&edge, &bob_secret, &["http", &port, "--subdomain", "keep"])
        .await
        .err()
        .unwrap();
    assert!(err.contains("keep"), "{err}");
    // …while the same team takes it back at once.
    let _second = start_agent(&edge, &ann_secret, &["http", &port, "--subdomain", "keep"]).await;
    let (status, _, _) = visit(&edge, "keep", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_random_name_is_bound_when_no_subdomain_is_asked_for(pool: PgPool) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let (_, secret) = cp.agent_token(&ann).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let agent = start_agent(&edge, &secret, &["http", &port]).await;
    let sub = agent.subdomain();
    let (status, _, _) = visit(&edge, &sub, "GET", "/hello", &[], "").await;
    assert_eq!(status, 200);
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn revoking_the_agent_token_ends_its_live_tunnel(pool: PgPool) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let (token_id, secret) = cp.agent_token(&ann).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let mut agent = start_agent(&edge, &secret, &["http", &port, "--subdomain", "gone"]).await;
    cp.revoke(&ann, &token_id).await;
    let err = exits(&mut agent, Duration::from_secs(20)).await;
    assert!(
        err.contains("revoked")
            || err.contains("not valid")
            || err.contains("UNAUTH")
            || err.contains("token"),
        "{err}"
    );
    let (status, _, _) = visit(&edge, "gone", "GET", "/hello", &[], "").await;
    assert_ne!(status, 200);
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn killing_a_tunnel_through_the_api_tells_its_agent_why(pool: PgPool) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let (_, secret) = cp.agent_token(&ann).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let mut agent = start_agent(&edge, &secret, &["http", &port, "--subdomain", "bye"]).await;
    cp.kill(&ann, "bye").await;
    let err = exits(&mut agent, Duration::from_secs(20)).await;
    assert!(err.contains("ended"), "{err}");
    let (status, _, _) = visit(&edge, "bye", "GET", "/hello", &[], "").await;
    assert_eq!(status, 404);
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn live_tunnels_and_known_agents_keep_working_while_the_control_plane_is_down(pool: PgPool) {
    let mut cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let (_, secret) = cp.agent_token(&ann).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let mut agent = start_agent(&edge, &secret, &["http", &port, "--subdomain", "steady"]).await;
    cp.stop().await;
    let (status, _, _) = visit(&edge, "steady", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200, "a live tunnel survives the outage");
    // The same agent reconnects on its cached authorization.
    agent.child.kill().await.unwrap();
    let _again = start_agent(&edge, &secret, &["http", &port, "--subdomain", "steady"]).await;
    let (status, _, _) = visit(&edge, "steady", "GET", "/hello", &[], "").await;
    assert_eq!(status, 200, "a cached agent reconnects during the outage");
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn the_api_shows_each_live_tunnels_connections_and_bytes(pool: PgPool) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let (_, secret) = cp.agent_token(&ann).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let _agent = start_agent(&edge, &secret, &["http", &port, "--subdomain", "counted"]).await;
    let payload = "x".repeat(10_000);
    let (status, _, _) = visit(&edge, "counted", "POST", "/echo", &[], payload).await;
    assert_eq!(status, 200);
    // Counters travel with the edge's heartbeat (1 s in these tests).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let live = cp.list(&ann).await;
        let t = &live[0];
        // The agent's four lanes (its default) are counted as its connections to the edge.
        if t.connections_total >= 1 && t.bytes_in >= 10_000 && t.bytes_out >= 10_000 && t.lanes == 4
        {
            assert!(!t.agent_version.is_empty());
            assert_eq!(t.local_addr, format!("localhost:{port}"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counters never arrived: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn after_the_agent_stops_cleanly_its_name_is_free_for_anyone_at_once(pool: PgPool) {
    let cp = start_control(pool).await;
    let ann = cp.owner("ann@example.com", "web").await;
    let bob = cp.owner("bob@example.com", "other").await;
    let (_, ann_secret) = cp.agent_token(&ann).await;
    let (_, bob_secret) = cp.agent_token(&bob).await;
    let edge = edge_for(&cp).await;
    let local = local_http_server().await;
    let port = local.port().to_string();
    let mut first = start_agent(&edge, &ann_secret, &["http", &port, "--subdomain", "free"]).await;
    // SIGTERM: the agent says goodbye (HTTP/2 GOAWAY), so no grace period holds the name.
    let pid = first.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), first.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "a stopped agent exits 0");
    // The edge closes the session when it sees the goodbye; give that a moment to land.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match try_start_agent(&edge, &bob_secret, &["http", &port, "--subdomain", "free"]).await {
            Ok(_bob_agent) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "bob never got the name: {e}"
            ),
        }
    }
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn usage_rows_count_exactly_the_traffic_sent_even_right_before_the_agent_leaves(
    pool: PgPool,
) {
    use burrow_proto::v1 as pb;
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;

    let cp = start_control(pool).await;
    let owner = cp.owner("ann@example.com", "web").await;
    let (_, secret) = cp.agent_token(&owner).await;
    let edge = edge_for(&cp).await;
    let http = local_http_server().await.port().to_string();
    let ws_port = local_ws_echo().await.port().to_string();
    let mut web = start_agent(&edge, &secret, &["http", &http, "--subdomain", "metered"]).await;
    let mut sock = start_agent(
        &edge,
        &secret,
        &["http", &ws_port, "--subdomain", "metered-ws"],
    )
    .await;

    // Four HTTP requests: 6,000 body bytes each way through /echo, plus one /hello.
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    for n in [1000usize, 2000, 3000] {
        let body = vec![b'x'; n];
        let (status, _, got) = visit(&edge, "metered", "POST", "/echo", &[], body).await;
        assert_eq!(status, 200);
        assert_eq!(got.len(), n);
        bytes_in += n as u64;
        bytes_out += n as u64;
    }
    let (_, _, hello) = visit(&edge, "metered", "GET", "/hello", &[], "").await;
    bytes_out += hello.len() as u64;

    // One WebSocket: three 10-byte text messages echoed, then a close handshake without a code.
    let url = format!("ws://metered-ws.localhost:{}/", edge.http.port());
    let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(url.into_client_request().unwrap(), tcp)
        .await
        .unwrap();
    for i in 0..3 {
        ws.send(Message::text(format!("message-{i:02}")))
            .await
            .unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.len(), 10);
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    // Client frames are masked (2 + 4 header bytes), server frames are not (2); the close
    // frames are empty.
    bytes_in += 3 * (2 + 4 + 10) + (2 + 4);
    bytes_out += 3 * (2 + 10) + 2;

    // Leave at once, before the next heartbeat could report the last traffic.
    web.child.kill().await.unwrap();
    sock.child.kill().await.unwrap();

    let mut client = pb::usage_service_client::UsageServiceClient::new(cp.channel.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let day = loop {
        let mut req = tonic::Request::new(pb::GetUsageRequest {
            team: "web".into(),
            ..Default::default()
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", owner.token).parse().unwrap(),
        );
        let days = client.get_usage(req).await.unwrap().into_inner().days;
        if let Some(d) = days
            .first()
            .filter(|d| d.connections >= 5 && d.bytes_out >= bytes_out)
        {
            assert_eq!(days.len(), 1);
            break d.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage never caught up: {days:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(day.team, "web");
    assert_eq!(day.connections, 5, "{day:?}");
    assert_eq!(day.bytes_in, bytes_in, "{day:?}");
    assert_eq!(day.bytes_out, bytes_out, "{day:?}");
    assert_eq!(day.websocket_messages, 6, "{day:?}");
}
