//! The control plane's admin listener: RPC counters move by exactly the calls made, with the
//! status each call ended with; server streams are counted while open; `/readyz` follows the
//! database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use burrow_admin::Scrape;
use burrow_control::{Config, Listeners};
use burrow_proto::v1::{
    self, account_service_client::AccountServiceClient, tunnel_service_client::TunnelServiceClient,
};
use sqlx::{Connection as _, PgPool};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Longest wait for one step.
const STEP: Duration = Duration::from_secs(20);

struct App {
    channel: Channel,
    admin_addr: SocketAddr,
    token: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl App {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
    }
}

async fn spawn_app(pool: &PgPool) -> App {
    let config = Config {
        readiness_timeout: Duration::from_millis(500),
        db_acquire_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let token = burrow_control::bootstrap_admin(pool, "admin@example.com")
        .await
        .unwrap();
    let server_pool = burrow_control::pool_options(&config)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(burrow_control::serve(
        config,
        server_pool,
        Listeners {
            grpc,
            admin: Some(admin),
        },
        shutdown.clone(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    App {
        channel,
        admin_addr,
        token,
        shutdown,
        server,
    }
}

fn req<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// GETs `path` on the admin listener: (status, content type, body).
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    burrow_admin::get(addr, path, STEP).await.unwrap()
}

/// One scrape of `/metrics`.
async fn scrape(app: &App) -> Scrape {
    Scrape::take(app.admin_addr, STEP).await
}

/// Scrapes until `ok` holds (metrics settle when a task ends), or panics.
async fn scrape_until(app: &App, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    Scrape::until(app.admin_addr, STEP, what, ok).await
}

const GET_ACCOUNT: [(&str, &str); 2] = [
    ("service", "burrow.v1.AccountService"),
    ("method", "GetAccount"),
];

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn each_call_is_counted_once_with_the_status_it_ended_with(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mut accounts = AccountServiceClient::new(app.channel.clone());
    // Warm the verified-token cache so the calls below are all cache hits.
    accounts
        .get_account(req(&app.token, v1::GetAccountRequest::default()))
        .await
        .unwrap();
    let before = scrape(&app).await;
    for _ in 0..3 {
        accounts
            .get_account(req(&app.token, v1::GetAccountRequest::default()))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let err = accounts
            .get_account(Request::new(v1::GetAccountRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let after = scrape(&app).await;
    let rpcs = |code| {
        after.delta(
            &before,
            "burrow_control_rpcs_total",
            &[GET_ACCOUNT[0], GET_ACCOUNT[1], ("code", code)],
        )
    };
    assert_eq!(rpcs("OK"), 3.0);
    assert_eq!(rpcs("UNAUTHENTICATED"), 2.0);
    assert_eq!(rpcs("INTERNAL"), 0.0);
    assert_eq!(
        after.delta(
            &before,
            "burrow_control_rpc_duration_seconds_count",
            &GET_ACCOUNT
        ),
        5.0
    );
    assert_eq!(
        after.delta(&before, "burrow_control_token_cache_hits_total", &[]),
        3.0
    );
    assert!(after.get("burrow_control_argon2_verifications_total", &[]) >= 1.0);
    assert!(after.get("burrow_control_db_pool_max_connections", &[]) >= 1.0);
    assert!(
        after.get("burrow_control_db_pool_connections", &[("state", "idle")])
            + after.get("burrow_control_db_pool_connections", &[("state", "in_use")])
            >= 1.0
    );
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn an_open_server_stream_is_a_subscriber_until_its_client_leaves(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let before = scrape(&app).await;
    assert_eq!(
        before.get(
            "burrow_control_watch_subscribers",
            &[("stream", "WatchTunnels")]
        ),
        0.0
    );
    let mut tunnels = TunnelServiceClient::new(app.channel.clone());
    let stream = tunnels
        .watch_tunnels(req(&app.token, v1::WatchTunnelsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    scrape_until(&app, "the stream to be counted", |s| {
        s.get(
            "burrow_control_watch_subscribers",
            &[("stream", "WatchTunnels")],
        ) == 1.0
    })
    .await;
    // A stream refused before it opens is a finished call with its status.
    let err = tunnels
        .watch_tunnels(Request::new(v1::WatchTunnelsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let s = scrape(&app).await;
    let watch = [
        ("service", "burrow.v1.TunnelService"),
        ("method", "WatchTunnels"),
    ];
    assert_eq!(
        s.get(
            "burrow_control_rpcs_total",
            &[watch[0], watch[1], ("code", "UNAUTHENTICATED")]
        ),
        1.0
    );
    assert_eq!(
        s.get("burrow_control_rpc_duration_seconds_count", &watch),
        2.0
    );
    // The client goes away: the subscriber goes and the call ends as CANCELLED.
    drop(stream);
    let s = scrape_until(&app, "the subscriber to go", |s| {
        s.get(
            "burrow_control_watch_subscribers",
            &[("stream", "WatchTunnels")],
        ) == 0.0
            && s.get(
                "burrow_control_rpcs_total",
                &[watch[0], watch[1], ("code", "CANCELLED")],
            ) == 1.0
    })
    .await;
    assert_eq!(
        s.get(
            "burrow_control_rpcs_total",
            &[watch[0], watch[1], ("code", "OK")]
        ),
        0.0
    );
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn readyz_follows_the_database_and_healthz_only_the_process(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let (status, _, body) = admin_get(app.admin_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = admin_get(app.admin_addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // Take the database away: refuse new connections and end the open ones.
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let url = std::env::var("DATABASE_URL").unwrap();
    let mut master = sqlx::PgConnection::connect(&url).await.unwrap();
    let set_allowed =
        |allowed: bool| format!("ALTER DATABASE \"{db}\" WITH ALLOW_CONNECTIONS {allowed}");
    sqlx::query(&set_allowed(false))
        .execute(&mut master)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&mut master)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, _, body) = admin_get(app.admin_addr, "/readyz").await;
        if status == 503 {
            assert!(body.starts_with("not ready: the database"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, _) = admin_get(app.admin_addr, "/healthz").await;
    assert_eq!(status, 200);

    // And back.
    sqlx::query(&set_allowed(true))
        .execute(&mut master)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, _, body) = admin_get(app.admin_addr, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}
