//! The control plane end to end: a real tonic server on 127.0.0.1:0, a fresh PostgreSQL
//! database per test, driven through the generated clients.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_control::{Config, Metrics};
use burrow_proto::v1::{
    self, account_service_client::AccountServiceClient, edge_service_client::EdgeServiceClient,
    reservation_service_client::ReservationServiceClient, team_service_client::TeamServiceClient,
    token_service_client::TokenServiceClient, tunnel_service_client::TunnelServiceClient,
    usage_service_client::UsageServiceClient,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

// === spawn_app ===

struct TestApp {
    addr: SocketAddr,
    channel: Channel,
    pool: PgPool,
    metrics: Metrics,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    admin: String,
}

fn test_config() -> Config {
    Config {
        change_poll_interval: Duration::from_millis(200),
        reconnect_grace: Duration::from_secs(60),
        ..Config::default()
    }
}

async fn spawn_app(pool: PgPool) -> TestApp {
    spawn_app_with(pool, test_config()).await
}

async fn spawn_app_with(pool: PgPool, config: Config) -> TestApp {
    capture_logs();
    let admin = burrow_control::bootstrap_admin(&pool, "admin@example.com")
        .await
        .unwrap();
    let server_pool = burrow_control::pool_options(&config)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    serve(server_pool, pool, config, admin).await
}

async fn serve(server_pool: PgPool, pool: PgPool, config: Config, admin: String) -> TestApp {
    let metrics = config.metrics.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(burrow_control::run(
        config,
        server_pool,
        listener,
        shutdown.clone(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    TestApp {
        addr,
        channel,
        pool,
        metrics,
        shutdown,
        server,
        admin,
    }
}

/// A request carrying `token` as its bearer credential.
fn req<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A request without credentials.
fn none<T: Default>() -> Request<T> {
    Request::new(T::default())
}

fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(status) => status.code(),
    }
}

/// A person with an account, an API token and (optionally) their own team.
struct User {
    id: String,
    email: String,
    token: String,
}

impl TestApp {
    fn accounts(&self) -> AccountServiceClient<Channel> {
        AccountServiceClient::new(self.channel.clone())
    }
    fn teams(&self) -> TeamServiceClient<Channel> {
        TeamServiceClient::new(self.channel.clone())
    }
    fn tokens(&self) -> TokenServiceClient<Channel> {
        TokenServiceClient::new(self.channel.clone())
    }
    fn reservations(&self) -> ReservationServiceClient<Channel> {
        ReservationServiceClient::new(self.channel.clone())
    }
    fn edges(&self) -> EdgeServiceClient<Channel> {
        EdgeServiceClient::new(self.channel.clone())
    }
    fn tunnels(&self) -> TunnelServiceClient<Channel> {
        TunnelServiceClient::new(self.channel.clone())
    }
    fn usage(&self) -> UsageServiceClient<Channel> {
        UsageServiceClient::new(self.channel.clone())
    }

    /// Creates an account (by the admin) and logs it in.
    async fn user(&self, email: &str) -> User {
        let account = self
            .accounts()
            .create_account(req(
                &self.admin,
                v1::CreateAccountRequest {
                    email: email.into(),
                    display_name: email.into(),
                    password: "correct horse battery".into(),
                    platform_admin: false,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let login = self
            .accounts()
            .login(Request::new(v1::LoginRequest {
                email: email.into(),
                password: "correct horse battery".into(),
                token_name: "test".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        User {
            id: account.id,
            email: email.into(),
            token: login.token,
        }
    }

    /// Creates an account that owns team `team`.
    async fn owner(&self, email: &str, team: &str) -> User {
        let user = self.user(email).await;
        self.teams()
            .create_team(req(
                &user.token,
                v1::CreateTeamRequest {
                    name: team.into(),
                    display_name: String::new(),
                },
            ))
            .await
            .unwrap();
        user
    }

    async fn agent_token(
        &self,
        user: &User,
        team: &str,
        scopes: &[&str],
    ) -> v1::CreateTokenResponse {
        self.tokens()
            .create_token(req(
                &user.token,
                v1::CreateTokenRequest {
                    kind: v1::TokenKind::Agent as i32,
                    name: "laptop".into(),
                    team: team.into(),
                    expires_in_seconds: 0,
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn reserve(
        &self,
        user: &User,
        team: &str,
        subdomain: &str,
    ) -> Result<v1::Reservation, Status> {
        self.reservations()
            .reserve(req(
                &user.token,
                v1::ReserveRequest {
                    team: team.into(),
                    subdomain: subdomain.into(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// An edge token and a registered edge.
    async fn edge(&self) -> (String, String) {
        let token = burrow_control::create_edge_token(&self.pool, "edge-1")
            .await
            .unwrap();
        let registered = self
            .edges()
            .register_edge(req(
                &token,
                v1::RegisterEdgeRequest {
                    name: "edge-1".into(),
                    domain: "localhost".into(),
                    public_url_template: "http://{sub}.localhost:8080".into(),
                    agent_addr: "127.0.0.1:7443".into(),
                    internal_addr: String::new(),
                    version: "test".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        (token, registered.edge_id)
    }

    /// Registers edge `name` (domain `localhost`) with `token`.
    async fn register(&self, token: &str, name: &str) -> Result<v1::RegisterEdgeResponse, Status> {
        self.edges()
            .register_edge(req(
                token,
                v1::RegisterEdgeRequest {
                    name: name.into(),
                    domain: "localhost".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Alice owning team acme, a registered edge (token, id) and the edge's authorization of an
    /// agent token of acme for `names`.
    async fn acme_agent_on_edge(
        &self,
        names: &[&str],
    ) -> (User, String, String, v1::AuthorizeAgentResponse) {
        let alice = self.owner("alice@example.com", "acme").await;
        let (edge, edge_id) = self.edge().await;
        let agent = self.agent_token(&alice, "acme", &[]).await;
        let auth = self.authorize(&edge, &agent.secret, names).await.unwrap();
        (alice, edge, edge_id, auth)
    }

    async fn authorize(
        &self,
        edge_token: &str,
        agent_token: &str,
        names: &[&str],
    ) -> Result<v1::AuthorizeAgentResponse, Status> {
        self.edges()
            .authorize_agent(req(
                edge_token,
                v1::AuthorizeAgentRequest {
                    agent_token: agent_token.into(),
                    requested_subdomains: names.iter().map(|s| (*s).to_owned()).collect(),
                    edge_id: String::new(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn open(
        &self,
        edge_token: &str,
        edge_id: &str,
        agent: &v1::AuthorizeAgentResponse,
        subdomain: &str,
    ) -> Result<v1::TunnelSession, Status> {
        self.edges()
            .open_tunnel_session(req(
                edge_token,
                v1::OpenTunnelSessionRequest {
                    edge_id: edge_id.into(),
                    token_id: agent.token_id.clone(),
                    team_id: agent.team_id.clone(),
                    subdomain: subdomain.into(),
                    agent_instance: "instance-1".into(),
                    agent_version: "test".into(),
                    agent_addr: "127.0.0.1:50000".into(),
                    local_addr: "localhost:3000".into(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn close(&self, edge_token: &str, session: &str, clean: bool) {
        self.edges()
            .close_tunnel_session(req(
                edge_token,
                v1::CloseTunnelSessionRequest {
                    session_id: session.into(),
                    clean,
                },
            ))
            .await
            .unwrap();
    }

    async fn list_reservations(&self, token: &str) -> Result<Vec<String>, Status> {
        self.reservations()
            .list_reservations(req(token, v1::ListReservationsRequest::default()))
            .await
            .map(|r| {
                r.into_inner()
                    .reservations
                    .into_iter()
                    .map(|r| r.subdomain)
                    .collect()
            })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server drains within 10 s")
            .unwrap()
            .unwrap();
    }
}

// === authentication ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn every_method_refuses_calls_without_a_token(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut codes = vec![
        code(app.accounts().create_account(none()).await),
        code(app.accounts().get_account(none()).await),
        code(app.accounts().list_accounts(none()).await),
        code(app.accounts().disable_account(none()).await),
        code(app.accounts().set_password(none()).await),
        code(app.teams().create_team(none()).await),
        code(app.teams().get_team(none()).await),
        code(app.teams().list_teams(none()).await),
        code(app.teams().add_member(none()).await),
        code(app.teams().remove_member(none()).await),
        code(app.teams().set_role(none()).await),
        code(app.tokens().create_token(none()).await),
        code(app.tokens().list_tokens(none()).await),
        code(app.tokens().revoke_token(none()).await),
        code(app.tokens().rotate_token(none()).await),
        code(app.reservations().reserve(none()).await),
        code(app.reservations().list_reservations(none()).await),
        code(app.reservations().release(none()).await),
        code(app.reservations().transfer(none()).await),
        code(app.reservations().set_reservation_policy(none()).await),
        code(app.teams().set_tunnel_limits(none()).await),
        code(app.usage().get_usage(none()).await),
        code(app.tunnels().list_tunnels(none()).await),
        code(app.tunnels().kill_tunnel(none()).await),
        code(app.edges().register_edge(none()).await),
        code(app.edges().heartbeat(none()).await),
        code(app.edges().authorize_agent(none()).await),
        code(app.edges().open_tunnel_session(none()).await),
        code(app.edges().close_tunnel_session(none()).await),
        code(app.edges().report_tunnel_stats(none()).await),
    ];
    codes.push(code(app.tunnels().watch_tunnels(none()).await.map(|_| ())));
    codes.push(code(app.edges().watch(none()).await.map(|_| ())));
    assert_eq!(codes.len(), 32);
    assert!(
        codes.iter().all(|c| *c == Code::Unauthenticated),
        "{codes:?}"
    );
    // Login is the one method that needs no token; with a wrong password it is refused.
    let login = app
        .accounts()
        .login(Request::new(v1::LoginRequest {
            email: "admin@example.com".into(),
            password: "not the password".into(),
            token_name: String::new(),
        }))
        .await;
    assert_eq!(code(login), Code::Unauthenticated);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn malformed_and_mistyped_tokens_are_refused_before_any_argon2_work(pool: PgPool) {
    let app = spawn_app(pool).await;
    let before = app.metrics.argon2_verifications();
    let mut mistyped = app.admin.clone().into_bytes();
    let i = mistyped.len() - 12;
    mistyped[i] = if mistyped[i] == b'A' { b'B' } else { b'A' };
    let mistyped = String::from_utf8(mistyped).unwrap();
    for bad in [
        "garbage",
        "brw_api_",
        "brw_api_aaaaaaaaaaaa_short",
        mistyped.as_str(),
    ] {
        let status = app
            .list_reservations(bad)
            .await
            .expect_err("a bad token must be refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{bad}");
    }
    let checksum = app.list_reservations(&mistyped).await.unwrap_err();
    assert!(
        checksum.message().contains("checksum"),
        "{}",
        checksum.message()
    );
    assert_eq!(app.metrics.argon2_verifications(), before);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_well_formed_unknown_token_is_refused_after_a_dummy_verification(pool: PgPool) {
    let app = spawn_app(pool).await;
    let before = app.metrics.argon2_verifications();
    let unknown =
        burrow_control::token::TokenText::generate(burrow_control::token::TokenKind::Api).expose();
    let status = app.list_reservations(&unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(app.metrics.argon2_verifications(), before + 1);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn argon2_runs_once_per_token_however_many_concurrent_calls_use_it(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let before = app.metrics.argon2_verifications();
    let calls = (0..50).map(|_| app.list_reservations(&alice.token));
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    // The login token was verified once by create_team already; nothing more was needed.
    assert_eq!(app.metrics.argon2_verifications(), before);
    let fresh = app.user("bob@example.com").await;
    let before = app.metrics.argon2_verifications();
    let calls = (0..50).map(|_| app.list_reservations(&fresh.token));
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    assert_eq!(app.metrics.argon2_verifications(), before + 1);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_revoked_token_is_refused_on_the_next_call(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let extra = app
        .tokens()
        .create_token(req(
            &alice.token,
            v1::CreateTokenRequest {
                kind: v1::TokenKind::Api as i32,
                name: "ci".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    app.list_reservations(&extra.secret).await.unwrap();
    let token_id = extra.token.unwrap().id;
    let revoked = app
        .tokens()
        .revoke_token(req(&alice.token, v1::RevokeTokenRequest { id: token_id }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at.is_some());
    let status = app.list_reservations(&extra.secret).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{}", status.message());
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_rotated_tokens_old_secret_works_only_during_the_overlap(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let first = app
        .tokens()
        .create_token(req(
            &alice.token,
            v1::CreateTokenRequest {
                kind: v1::TokenKind::Api as i32,
                name: "ci".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let id = first.token.unwrap().id;
    let rotate = |overlap| {
        let mut client = app.tokens();
        let request = req(
            &alice.token,
            v1::RotateTokenRequest {
                id: id.clone(),
                overlap_seconds: overlap,
            },
        );
        async move { client.rotate_token(request).await }
    };
    let second = rotate(3600).await.unwrap().into_inner();
    assert_ne!(second.secret, first.secret);
    assert!(second.secret.contains(&id));
    app.list_reservations(&first.secret).await.unwrap();
    app.list_reservations(&second.secret).await.unwrap();
    let third = rotate(0).await.unwrap().into_inner();
    assert_eq!(
        app.list_reservations(&first.secret)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        app.list_reservations(&second.secret)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    app.list_reservations(&third.secret).await.unwrap();
    let too_long = rotate(8 * 24 * 3600).await.unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(too_long.message().contains("overlap_seconds"));
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn repeated_failures_from_one_address_are_rate_limited(pool: PgPool) {
    let config = Config {
        max_failed_auth_per_peer: 3,
        ..test_config()
    };
    let app = spawn_app_with(pool, config).await;
    for _ in 0..3 {
        let status = app.list_reservations("brw_api_nope").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = app.list_reservations(&app.admin).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_disabled_accounts_tokens_stop_working_at_once(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    app.list_reservations(&alice.token).await.unwrap();
    app.accounts()
        .disable_account(req(
            &app.admin,
            v1::DisableAccountRequest {
                account: alice.email.clone(),
            },
        ))
        .await
        .unwrap();
    let status = app.list_reservations(&alice.token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let login = app
        .accounts()
        .login(Request::new(v1::LoginRequest {
            email: alice.email.clone(),
            password: "correct horse battery".into(),
            token_name: String::new(),
        }))
        .await;
    assert_eq!(code(login), Code::Unauthenticated);
    app.stop().await;
}

// === secrets at rest and in logs ===

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, at DEBUG and above. One global subscriber (installed
/// before any server starts) rather than a per-test one: tracing caches per-callsite interest
/// globally, so thread-local subscribers in parallel tests miss events.
fn capture_logs() -> LogBuffer {
    static LOGS: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogBuffer::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
    .clone()
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn stored_hashes_are_argon2id_and_no_secret_is_in_the_database_or_the_logs(pool: PgPool) {
    let logs = capture_logs();

    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let agent = app.agent_token(&alice, "acme", &[]).await;
    let rotated = app
        .tokens()
        .rotate_token(req(
            &alice.token,
            v1::RotateTokenRequest {
                id: agent.token.clone().unwrap().id,
                overlap_seconds: 60,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let (edge_token, _) = app.edge().await;
    app.authorize(&edge_token, &rotated.secret, &["chat"])
        .await
        .unwrap();
    // A failing call too, so error paths are in the logs.
    let _ = app.list_reservations(&agent.secret).await;

    let hashes: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT secret_hash, previous_hash FROM api_tokens")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(hashes.len() >= 4);
    for (hash, previous) in &hashes {
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        if let Some(previous) = previous {
            assert!(previous.starts_with("$argon2id$"), "{previous}");
        }
    }
    let password: String =
        sqlx::query_scalar("SELECT password_hash FROM accounts WHERE email = 'alice@example.com'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(password.starts_with("$argon2id$"));

    // Every secret part of every token handed out, and the password.
    let secrets: Vec<String> = [
        &app.admin,
        &alice.token,
        &agent.secret,
        &rotated.secret,
        &edge_token,
    ]
    .iter()
    .map(|t| {
        burrow_control::token::TokenText::parse(t)
            .unwrap()
            .secret()
            .to_owned()
    })
    .chain(["correct horse battery".to_owned()])
    .collect();
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND data_type IN ('text', 'jsonb', 'ARRAY', 'character varying')",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(columns.len() > 20, "{columns:?}");
    for (table, column) in &columns {
        for secret in &secrets {
            let found: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM \"{table}\" WHERE \"{column}\"::text LIKE '%' || $1 || '%'"
            ))
            .bind(secret)
            .fetch_one(&app.pool)
            .await
            .unwrap();
            assert_eq!(found, 0, "a secret is stored in {table}.{column}");
        }
    }
    app.stop().await;
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // The capture works: the statements that stored the hashes were logged.
    assert!(
        logs.contains("api_tokens"),
        "no database statements were logged"
    );
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret appears in the logs"
        );
    }
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn bootstrap_refuses_a_second_run(pool: PgPool) {
    let first = burrow_control::bootstrap_admin(&pool, "root@example.com").await;
    assert!(first.unwrap().starts_with("brw_api_"));
    let second = burrow_control::bootstrap_admin(&pool, "other@example.com").await;
    assert!(matches!(
        second,
        Err(burrow_control::BootstrapError::AdminExists)
    ));
    let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts WHERE platform_admin")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(admins, 1);
}

// === isolation between teams ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn nobody_sees_or_changes_another_teams_things(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.owner("bob@example.com", "globex").await;
    app.reserve(&alice, "acme", "chat").await.unwrap();
    let alice_agent = app.agent_token(&alice, "acme", &[]).await;
    let alice_agent_id = alice_agent.token.clone().unwrap().id;
    let (edge_token, edge_id) = app.edge().await;
    let auth = app
        .authorize(&edge_token, &alice_agent.secret, &["chat"])
        .await
        .unwrap();
    app.open(&edge_token, &edge_id, &auth, "chat")
        .await
        .unwrap();

    // Team service.
    assert_eq!(
        code(
            app.teams()
                .get_team(req(
                    &bob.token,
                    v1::GetTeamRequest {
                        team: "acme".into()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.teams()
                .add_member(req(
                    &bob.token,
                    v1::AddMemberRequest {
                        team: "acme".into(),
                        account: bob.email.clone(),
                        role: 0
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.teams()
                .remove_member(req(
                    &bob.token,
                    v1::RemoveMemberRequest {
                        team: "acme".into(),
                        account: alice.email.clone()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.teams()
                .set_role(req(
                    &bob.token,
                    v1::SetRoleRequest {
                        team: "acme".into(),
                        account: alice.email.clone(),
                        role: v1::Role::Member as i32
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    let teams = app
        .teams()
        .list_teams(req(&bob.token, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        teams
            .teams
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["globex"]
    );
    assert_eq!(
        code(
            app.teams()
                .list_teams(req(&bob.token, v1::ListTeamsRequest { all: true }))
                .await
        ),
        Code::PermissionDenied
    );

    // Account service.
    assert_eq!(
        code(
            app.accounts()
                .get_account(req(
                    &bob.token,
                    v1::GetAccountRequest {
                        account: alice.id.clone()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    let accounts = app
        .accounts()
        .list_accounts(req(&bob.token, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        accounts
            .accounts
            .iter()
            .map(|a| a.email.as_str())
            .collect::<Vec<_>>(),
        ["bob@example.com"]
    );
    assert_eq!(
        code(
            app.accounts()
                .create_account(req(
                    &bob.token,
                    v1::CreateAccountRequest {
                        email: "mallory@example.com".into(),
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.accounts()
                .disable_account(req(
                    &bob.token,
                    v1::DisableAccountRequest {
                        account: alice.email.clone()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.accounts()
                .set_password(req(
                    &bob.token,
                    v1::SetPasswordRequest {
                        account: alice.email.clone(),
                        password: "new password 1".into()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );

    // Token service.
    assert_eq!(
        code(
            app.tokens()
                .create_token(req(
                    &bob.token,
                    v1::CreateTokenRequest {
                        kind: v1::TokenKind::Agent as i32,
                        name: "sneaky".into(),
                        team: "acme".into(),
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.tokens()
                .create_token(req(
                    &bob.token,
                    v1::CreateTokenRequest {
                        kind: v1::TokenKind::Edge as i32,
                        name: "sneaky".into(),
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.tokens()
                .list_tokens(req(
                    &bob.token,
                    v1::ListTokensRequest {
                        team: "acme".into(),
                        include_inactive: true
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    let listed = app
        .tokens()
        .list_tokens(req(&bob.token, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tokens.iter().all(|t| t.id != alice_agent_id));
    assert!(listed.tokens.iter().all(|t| t.created_by == bob.email));
    assert_eq!(
        code(
            app.tokens()
                .revoke_token(req(
                    &bob.token,
                    v1::RevokeTokenRequest {
                        id: alice_agent_id.clone()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            app.tokens()
                .rotate_token(req(
                    &bob.token,
                    v1::RotateTokenRequest {
                        id: alice_agent_id.clone(),
                        overlap_seconds: 0
                    }
                ))
                .await
        ),
        Code::NotFound
    );

    // Reservation service.
    assert_eq!(
        code(app.reserve(&bob, "acme", "other").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.reservations()
                .list_reservations(req(
                    &bob.token,
                    v1::ListReservationsRequest {
                        team: "acme".into()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert!(app.list_reservations(&bob.token).await.unwrap().is_empty());
    assert_eq!(
        code(
            app.reservations()
                .release(req(
                    &bob.token,
                    v1::ReleaseRequest {
                        subdomain: "chat".into()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            app.reservations()
                .transfer(req(
                    &bob.token,
                    v1::TransferRequest {
                        subdomain: "chat".into(),
                        to_team: "globex".into()
                    }
                ))
                .await
        ),
        Code::NotFound
    );

    // Tunnel service.
    let tunnels = app
        .tunnels()
        .list_tunnels(req(&bob.token, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(tunnels.tunnels.is_empty());
    assert_eq!(
        code(
            app.tunnels()
                .list_tunnels(req(
                    &bob.token,
                    v1::ListTunnelsRequest {
                        team: "acme".into()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.tunnels()
                .watch_tunnels(req(
                    &bob.token,
                    v1::WatchTunnelsRequest {
                        team: "acme".into()
                    }
                ))
                .await
                .map(|_| ())
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            app.tunnels()
                .kill_tunnel(req(
                    &bob.token,
                    v1::KillTunnelRequest {
                        subdomain: "chat".into()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    // Alice still has everything.
    assert_eq!(app.list_reservations(&alice.token).await.unwrap(), ["chat"]);
    let tunnels = app
        .tunnels()
        .list_tunnels(req(&alice.token, Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tunnels.tunnels.len(), 1);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn agent_and_edge_tokens_are_refused_where_they_do_not_belong(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let agent = app.agent_token(&alice, "acme", &[]).await;
    let (edge_token, _) = app.edge().await;
    for token in [&agent.secret, &edge_token] {
        let status = app.list_reservations(token).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{}",
            status.message()
        );
        let status = app
            .tokens()
            .create_token(req(
                token,
                v1::CreateTokenRequest {
                    kind: v1::TokenKind::Api as i32,
                    name: "escalate".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    for token in [&agent.secret, &alice.token, &app.admin] {
        let status = app
            .edges()
            .heartbeat(req(token, v1::HeartbeatRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let status = app
            .edges()
            .watch(req(token, v1::WatchRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn team_roles_limit_who_manages_members(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let carol = app.user("carol@example.com").await;
    let dave = app.user("dave@example.com").await;
    let add = |by: &User, who: &User, role: v1::Role| {
        let mut client = app.teams();
        let request = req(
            &by.token,
            v1::AddMemberRequest {
                team: "acme".into(),
                account: who.email.clone(),
                role: role as i32,
            },
        );
        async move { client.add_member(request).await }
    };
    add(&alice, &carol, v1::Role::Admin).await.unwrap();
    // An admin may add members but not owners.
    assert_eq!(
        code(add(&carol, &dave, v1::Role::Owner).await),
        Code::PermissionDenied
    );
    add(&carol, &dave, v1::Role::Member).await.unwrap();
    assert_eq!(
        code(add(&carol, &dave, v1::Role::Member).await),
        Code::AlreadyExists
    );
    // A member may not reserve, an admin may.
    assert_eq!(
        code(app.reserve(&dave, "acme", "docs-site").await),
        Code::PermissionDenied
    );
    app.reserve(&carol, "acme", "docs-site").await.unwrap();
    // The last owner cannot leave or be demoted.
    let leave = app
        .teams()
        .remove_member(req(
            &alice.token,
            v1::RemoveMemberRequest {
                team: "acme".into(),
                account: alice.email.clone(),
            },
        ))
        .await;
    assert_eq!(code(leave), Code::FailedPrecondition);
    // Anyone may leave.
    app.teams()
        .remove_member(req(
            &dave.token,
            v1::RemoveMemberRequest {
                team: "acme".into(),
                account: dave.email.clone(),
            },
        ))
        .await
        .unwrap();
    let team = app
        .teams()
        .get_team(req(
            &alice.token,
            v1::GetTeamRequest {
                team: "acme".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(team.members.len(), 2);
    assert_eq!(team.my_role, v1::Role::Owner as i32);
    app.stop().await;
}

// === reservations ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn fifty_concurrent_reservations_of_one_name_have_exactly_one_winner(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut owners = Vec::new();
    for i in 0..5 {
        owners.push(
            app.owner(&format!("owner{i}@example.com"), &format!("team-{i}"))
                .await,
        );
    }
    for round in 0..20 {
        let name = format!("race-{round}");
        let teams: Vec<String> = (0..50)
            .map(|i| format!("team-{}", i % owners.len()))
            .collect();
        let attempts = (0..50).map(|i| app.reserve(&owners[i % owners.len()], &teams[i], &name));
        let results = futures::future::join_all(attempts).await;
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "round {round}");
        for result in results.into_iter().filter_map(Result::err) {
            assert_eq!(
                result.code(),
                Code::AlreadyExists,
                "round {round}: {result:?}"
            );
            assert!(result.message().contains(&name), "{}", result.message());
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 20);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn bad_subdomains_get_invalid_argument_naming_the_field(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    for bad in [
        "",
        "-chat",
        "chat-",
        "a.b",
        "under_score",
        "www",
        "ADMIN",
        &"x".repeat(64),
    ] {
        let status = app.reserve(&alice, "acme", bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
        assert!(
            status.message().starts_with("subdomain:"),
            "{}",
            status.message()
        );
    }
    let reserved = app.reserve(&alice, "acme", "Chat").await.unwrap();
    assert_eq!(reserved.subdomain, "chat");
    assert_eq!(reserved.team, "acme");
    let status = app.reserve(&alice, "nope", "chat2").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn every_mutation_writes_one_audit_row(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.owner("bob@example.com", "globex").await;
    app.teams()
        .add_member(req(
            &bob.token,
            v1::AddMemberRequest {
                team: "globex".into(),
                account: alice.email.clone(),
                role: v1::Role::Admin as i32,
            },
        ))
        .await
        .unwrap();
    let count = |action: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log WHERE action = $1")
                .bind(action)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    app.reserve(&alice, "acme", "chat").await.unwrap();
    assert_eq!(count("reservation.reserve").await, 1);
    app.reservations()
        .transfer(req(
            &alice.token,
            v1::TransferRequest {
                subdomain: "chat".into(),
                to_team: "globex".into(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(count("reservation.transfer").await, 1);
    app.reservations()
        .release(req(
            &bob.token,
            v1::ReleaseRequest {
                subdomain: "chat".into(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(count("reservation.release").await, 1);
    assert_eq!(count("team.create").await, 2);
    assert_eq!(count("team.add_member").await, 1);
    assert_eq!(count("account.create").await, 2);
    // A refused mutation leaves no audit row.
    let _ = app.reserve(&alice, "acme", "www").await;
    assert_eq!(count("reservation.reserve").await, 1);
    app.stop().await;
}

// === edges: authorization, sessions, watch ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn authorize_agent_applies_reservations_scopes_and_the_reserved_list(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.owner("bob@example.com", "globex").await;
    app.reserve(&alice, "acme", "chat").await.unwrap();
    app.reserve(&bob, "globex", "shop").await.unwrap();
    let (edge_token, _) = app.edge().await;
    let agent = app.agent_token(&alice, "acme", &[]).await;

    let ok = app
        .authorize(&edge_token, &agent.secret, &["Chat", "free-name"])
        .await
        .unwrap();
    assert_eq!(ok.team_name, "acme");
    assert_eq!(ok.allowed.len(), 2);
    assert_eq!(
        (ok.allowed[0].subdomain.as_str(), ok.allowed[0].reserved),
        ("chat", true)
    );
    assert_eq!(
        (ok.allowed[1].subdomain.as_str(), ok.allowed[1].reserved),
        ("free-name", false)
    );
    assert!(ok.limits.is_some());
    let expires = ok.expires_at.unwrap().seconds;
    let now = chrono::Utc::now().timestamp();
    assert!(expires > now && expires <= now + 601);

    let other = app
        .authorize(&edge_token, &agent.secret, &["shop"])
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(other.message().contains("shop"), "{}", other.message());
    let reserved = app
        .authorize(&edge_token, &agent.secret, &["www"])
        .await
        .unwrap_err();
    assert_eq!(reserved.code(), Code::InvalidArgument);

    let scoped = app.agent_token(&alice, "acme", &["pr-*"]).await;
    let ok = app
        .authorize(&edge_token, &scoped.secret, &["pr-12"])
        .await
        .unwrap();
    assert_eq!(ok.scopes, ["pr-*"]);
    let denied = app
        .authorize(&edge_token, &scoped.secret, &["chat"])
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("chat"));

    let not_agent = app
        .authorize(&edge_token, &alice.token, &["x"])
        .await
        .unwrap_err();
    assert_eq!(not_agent.code(), Code::Unauthenticated);
    let garbage = app
        .authorize(&edge_token, "brw_agent_x", &["x"])
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::Unauthenticated);
    app.tokens()
        .revoke_token(req(
            &alice.token,
            v1::RevokeTokenRequest {
                id: agent.token.unwrap().id,
            },
        ))
        .await
        .unwrap();
    let revoked = app
        .authorize(&edge_token, &agent.secret, &["chat"])
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_live_subdomain_is_refused_to_another_team_and_taken_over_by_the_same_team(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.owner("bob@example.com", "globex").await;
    let (edge, edge_id) = app.edge().await;
    let a1 = app.agent_token(&alice, "acme", &[]).await;
    let a2 = app.agent_token(&alice, "acme", &[]).await;
    let b1 = app.agent_token(&bob, "globex", &[]).await;
    let auth_a1 = app.authorize(&edge, &a1.secret, &["demo"]).await.unwrap();
    let auth_a2 = app.authorize(&edge, &a2.secret, &["demo"]).await.unwrap();
    let auth_b1 = app.authorize(&edge, &b1.secret, &["demo"]).await.unwrap();

    let first = app.open(&edge, &edge_id, &auth_a1, "demo").await.unwrap();
    assert_eq!(first.public_url, "http://demo.localhost:8080");
    assert_eq!(first.team, "acme");
    let refused = app
        .open(&edge, &edge_id, &auth_b1, "demo")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert!(refused.message().contains("demo"));
    // Another agent of the same team takes over at once.
    let second = app.open(&edge, &edge_id, &auth_a2, "demo").await.unwrap();
    assert_ne!(second.id, first.id);
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tunnel_sessions WHERE subdomain = 'demo' AND ended_at IS NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(live, 1);
    // A clean close frees the name for anyone at once.
    app.close(&edge, &second.id, true).await;
    app.open(&edge, &edge_id, &auth_b1, "demo").await.unwrap();
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn an_unclean_close_holds_the_name_for_its_team_during_the_grace_period(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.owner("bob@example.com", "globex").await;
    let (edge, edge_id) = app.edge().await;
    let a = app.agent_token(&alice, "acme", &[]).await;
    let b = app.agent_token(&bob, "globex", &[]).await;
    let auth_a = app.authorize(&edge, &a.secret, &["demo"]).await.unwrap();
    let auth_b = app.authorize(&edge, &b.secret, &["demo"]).await.unwrap();

    let session = app.open(&edge, &edge_id, &auth_a, "demo").await.unwrap();
    app.close(&edge, &session.id, false).await;
    let held = app
        .open(&edge, &edge_id, &auth_b, "demo")
        .await
        .unwrap_err();
    assert_eq!(held.code(), Code::AlreadyExists);
    assert!(held.message().contains("frees up"), "{}", held.message());
    // The same team reclaims at once.
    let again = app.open(&edge, &edge_id, &auth_a, "demo").await.unwrap();
    app.close(&edge, &again.id, true).await;
    // After a clean close nothing holds it any more.
    app.open(&edge, &edge_id, &auth_b, "demo").await.unwrap();

    // When the grace period is over, the name is free: pretend it passed.
    let s2 = app.open(&edge, &edge_id, &auth_b, "other").await.unwrap();
    app.close(&edge, &s2.id, false).await;
    assert_eq!(
        app.open(&edge, &edge_id, &auth_a, "other")
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    sqlx::query("UPDATE tunnel_sessions SET grace_until = now() - interval '1 second' WHERE subdomain = 'other'")
        .execute(&app.pool)
        .await
        .unwrap();
    app.open(&edge, &edge_id, &auth_a, "other").await.unwrap();
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_reservation_of_another_team_cannot_be_opened(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.owner("bob@example.com", "globex").await;
    app.reserve(&alice, "acme", "chat").await.unwrap();
    let (edge, edge_id) = app.edge().await;
    let b = app.agent_token(&bob, "globex", &[]).await;
    let auth_b = app.authorize(&edge, &b.secret, &["free"]).await.unwrap();
    let status = app
        .open(&edge, &edge_id, &auth_b, "chat")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.stop().await;
}

async fn next_event(stream: &mut tonic::Streaming<v1::WatchEvent>) -> v1::watch_event::Event {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .expect("the stream stays open")
        .event
        .unwrap()
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn watch_starts_with_hello_then_pushes_revocations_reservations_and_kills(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (alice, edge, edge_id, auth) = app.acme_agent_on_edge(&["demo"]).await;
    let session = app.open(&edge, &edge_id, &auth, "demo").await.unwrap();

    let mut stream = app
        .edges()
        .watch(req(
            &edge,
            v1::WatchRequest {
                edge_id: edge_id.clone(),
                after_revision: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let v1::watch_event::Event::Hello(hello) = next_event(&mut stream).await else {
        panic!("the first event must be Hello");
    };
    assert!(hello.current_revision > 0);

    app.reserve(&alice, "acme", "chat").await.unwrap();
    match next_event(&mut stream).await {
        v1::watch_event::Event::ReservationChanged(c) => {
            assert_eq!(c.subdomain, "chat");
            assert_eq!(c.team_id, auth.team_id);
        }
        other => panic!("unexpected {other:?}"),
    }
    app.tunnels()
        .kill_tunnel(req(
            &alice.token,
            v1::KillTunnelRequest {
                subdomain: "demo".into(),
            },
        ))
        .await
        .unwrap();
    match next_event(&mut stream).await {
        v1::watch_event::Event::TunnelKilled(k) => {
            assert_eq!(k.session_id, session.id);
            assert_eq!(k.subdomain, "demo");
        }
        other => panic!("unexpected {other:?}"),
    }
    app.tokens()
        .revoke_token(req(
            &alice.token,
            v1::RevokeTokenRequest {
                id: auth.token_id.clone(),
            },
        ))
        .await
        .unwrap();
    match next_event(&mut stream).await {
        v1::watch_event::Event::TokenRevoked(r) => assert_eq!(r.token_id, auth.token_id),
        other => panic!("unexpected {other:?}"),
    }

    // Resuming from the Hello revision replays the same three events.
    let mut resumed = app
        .edges()
        .watch(req(
            &edge,
            v1::WatchRequest {
                edge_id,
                after_revision: hello.current_revision,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut resumed).await,
        v1::watch_event::Event::Hello(_)
    ));
    assert!(matches!(
        next_event(&mut resumed).await,
        v1::watch_event::Event::ReservationChanged(_)
    ));
    assert!(matches!(
        next_event(&mut resumed).await,
        v1::watch_event::Event::TunnelKilled(_)
    ));
    assert!(matches!(
        next_event(&mut resumed).await,
        v1::watch_event::Event::TokenRevoked(_)
    ));
    // Shutdown ends open streams instead of waiting for them.
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn tunnels_are_listed_watched_and_killed_for_their_team(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (alice, edge, edge_id, auth) = app.acme_agent_on_edge(&["demo"]).await;
    let mut events = app
        .tunnels()
        .watch_tunnels(req(&alice.token, v1::WatchTunnelsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let session = app.open(&edge, &edge_id, &auth, "demo").await.unwrap();
    let started = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(started.kind, v1::tunnel_event::Kind::Started as i32);
    assert_eq!(started.tunnel.unwrap().subdomain, "demo");

    app.edges()
        .report_tunnel_stats(req(
            &edge,
            v1::ReportTunnelStatsRequest {
                edge_id: edge_id.clone(),
                stats: vec![v1::TunnelStats {
                    session_id: session.id.clone(),
                    connections_total: 7,
                    connections_open: 2,
                    bytes_in: 100,
                    bytes_out: 200,
                    websocket_messages: 3,
                    lanes: 4,
                }],
            },
        ))
        .await
        .unwrap();
    let listed = app
        .tunnels()
        .list_tunnels(req(&alice.token, Default::default()))
        .await
        .unwrap()
        .into_inner()
        .tunnels;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].connections_total, 7);
    assert_eq!(listed[0].bytes_out, 200);
    assert_eq!(listed[0].lanes, 4);
    assert_eq!(listed[0].edge_name, "edge-1");

    app.tunnels()
        .kill_tunnel(req(
            &alice.token,
            v1::KillTunnelRequest {
                subdomain: "demo".into(),
            },
        ))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ended.kind, v1::tunnel_event::Kind::Ended as i32);
    let listed = app
        .tunnels()
        .list_tunnels(req(&alice.token, Default::default()))
        .await
        .unwrap()
        .into_inner()
        .tunnels;
    assert!(listed.is_empty());
    let again = app
        .tunnels()
        .kill_tunnel(req(
            &alice.token,
            v1::KillTunnelRequest {
                subdomain: "demo".into(),
            },
        ))
        .await;
    assert_eq!(code(again), Code::NotFound);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn heartbeats_need_a_registered_edge(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (edge, edge_id) = app.edge().await;
    app.edges()
        .heartbeat(req(
            &edge,
            v1::HeartbeatRequest {
                edge_id,
                agent_sessions: 1,
                tunnels: 2,
                visitor_connections: 3,
            },
        ))
        .await
        .unwrap();
    let unknown = app
        .edges()
        .heartbeat(req(
            &edge,
            v1::HeartbeatRequest {
                edge_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code(unknown), Code::NotFound);
    let malformed = app
        .edges()
        .heartbeat(req(
            &edge,
            v1::HeartbeatRequest {
                edge_id: "nope".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(malformed.message().starts_with("edge_id:"));
    app.stop().await;
}

// === failure modes ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_dead_database_gives_unavailable_within_a_second(pool: PgPool) {
    let admin = burrow_control::bootstrap_admin(&pool, "admin@example.com")
        .await
        .unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = Config {
        db_acquire_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let dead = burrow_control::pool_options(&config)
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/none"))
        .unwrap();
    let app = serve(dead, pool, config, admin).await;
    let started = Instant::now();
    let status = app.list_reservations(&app.admin).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(status.message().contains("unavailable"));
    let _ = app.addr;
    app.stop().await;
}

// === the binary ===

/// DATABASE_URL pointing at the test's own database.
async fn database_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{name}")
}

async fn control(args: &[&str], url: &str) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow-control"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn the_binary_bootstraps_once_then_refuses_with_a_sentence(pool: PgPool) {
    let url = database_url(&pool).await;
    let first = control(&["bootstrap", "--email", "root@example.com"], &url).await;
    assert!(first.status.success(), "{first:?}");
    let token = String::from_utf8(first.stdout).unwrap();
    assert!(token.trim().starts_with("brw_api_"), "{token}");
    let second = control(&["bootstrap", "--email", "root2@example.com"], &url).await;
    assert!(!second.status.success());
    let stderr = String::from_utf8(second.stderr).unwrap();
    assert!(stderr.contains("already exists"), "{stderr}");
    let edge = control(&["edge-token", "create", "--name", "edge-a"], &url).await;
    assert!(edge.status.success(), "{edge:?}");
    assert!(String::from_utf8(edge.stdout)
        .unwrap()
        .starts_with("brw_edge_"));
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn the_binary_exits_with_code_2_on_invalid_configuration(pool: PgPool) {
    let url = database_url(&pool).await;
    let out = control(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token-cache-ttl-secs",
            "0",
        ],
        &url,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("token cache TTL"), "{stderr}");
    let missing = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow-control"))
        .args(["migrate"])
        .env_remove("DATABASE_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn repeated_wrong_passwords_for_one_email_are_rate_limited(pool: PgPool) {
    let config = Config {
        max_failed_login_per_email: 2,
        ..test_config()
    };
    let app = spawn_app_with(pool, config).await;
    app.user("alice@example.com").await;
    let login = |password: &str| {
        let mut client = app.accounts();
        let request = Request::new(v1::LoginRequest {
            email: "alice@example.com".into(),
            password: password.into(),
            token_name: String::new(),
        });
        async move { client.login(request).await }
    };
    assert_eq!(code(login("wrong one").await), Code::Unauthenticated);
    assert_eq!(code(login("wrong two").await), Code::Unauthenticated);
    // Even the right password is refused until the window passes.
    assert_eq!(
        code(login("correct horse battery").await),
        Code::ResourceExhausted
    );
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn another_replica_drops_a_revoked_token_from_its_cache_through_the_change_log(pool: PgPool) {
    let a = spawn_app(pool.clone()).await;
    let config = test_config();
    let b_pool = burrow_control::pool_options(&config)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let b = serve(b_pool, pool, config, a.admin.clone()).await;
    let alice = a.owner("alice@example.com", "acme").await;
    // Replica B verifies and caches the token (TTL 60 s).
    b.list_reservations(&alice.token).await.unwrap();
    let listed = a
        .tokens()
        .list_tokens(req(&alice.token, v1::ListTokensRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let id = listed
        .tokens
        .iter()
        .find(|t| t.name == "test")
        .unwrap()
        .id
        .clone();
    // Replica A revokes it.
    a.tokens()
        .revoke_token(req(&alice.token, v1::RevokeTokenRequest { id }))
        .await
        .unwrap();
    // B learns through the change log well before its cache entry would expire.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match b.list_reservations(&alice.token).await {
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated);
                break;
            }
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "replica B still accepts the revoked token"
                );
                // Polling for another process's effect; nothing local to await.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    b.stop().await;
    a.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn the_api_is_served_over_tls_when_configured(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let config = Config {
        tls: Some(burrow_control::TlsFiles {
            cert: cert_path,
            key: key_path,
        }),
        ..test_config()
    };
    let admin = burrow_control::bootstrap_admin(&pool, "admin@example.com")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(burrow_control::run(
        config,
        pool,
        listener,
        shutdown.clone(),
    ));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let me = AccountServiceClient::new(channel)
        .get_account(req(&admin, v1::GetAccountRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.email, "admin@example.com");
    assert!(me.platform_admin);
    // Plaintext gRPC against the TLS port fails instead of hanging.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    assert!(AccountServiceClient::new(plain)
        .get_account(req(&admin, v1::GetAccountRequest::default()))
        .await
        .is_err());
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_silent_edges_tunnels_stop_blocking_other_teams_after_the_grace_period(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.owner("bob@example.com", "globex").await;
    let (edge, edge_id) = app.edge().await;
    let a = app.agent_token(&alice, "acme", &[]).await;
    let b = app.agent_token(&bob, "globex", &[]).await;
    let auth_a = app.authorize(&edge, &a.secret, &["demo"]).await.unwrap();
    let auth_b = app.authorize(&edge, &b.secret, &["demo"]).await.unwrap();
    app.open(&edge, &edge_id, &auth_a, "demo").await.unwrap();
    // The edge went quiet a little while ago: the session counts as an unclean end, within
    // the grace period, so another team is still refused.
    sqlx::query("UPDATE edges SET last_heartbeat_at = now() - interval '40 seconds'")
        .execute(&app.pool)
        .await
        .unwrap();
    let held = app
        .open(&edge, &edge_id, &auth_b, "demo")
        .await
        .unwrap_err();
    assert_eq!(held.code(), Code::AlreadyExists);
    // Long enough ago that the grace period is over too: the name is free.
    sqlx::query("UPDATE tunnel_sessions SET ended_at = now() - interval '10 minutes', grace_until = now() - interval '5 minutes'")
        .execute(&app.pool)
        .await
        .unwrap();
    app.open(&edge, &edge_id, &auth_b, "demo").await.unwrap();
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn disabling_an_account_tells_edges_which_tokens_stopped_working(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let agent = app.agent_token(&alice, "acme", &[]).await;
    let (edge, edge_id) = app.edge().await;
    let mut stream = app
        .edges()
        .watch(req(
            &edge,
            v1::WatchRequest {
                edge_id,
                after_revision: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream).await,
        v1::watch_event::Event::Hello(_)
    ));
    app.accounts()
        .disable_account(req(
            &app.admin,
            v1::DisableAccountRequest {
                account: alice.id.clone(),
            },
        ))
        .await
        .unwrap();
    let mut revoked = Vec::new();
    match next_event(&mut stream).await {
        v1::watch_event::Event::AccountDisabled(d) => assert_eq!(d.account_id, alice.id),
        other => panic!("unexpected {other:?}"),
    }
    for _ in 0..2 {
        match next_event(&mut stream).await {
            v1::watch_event::Event::TokenRevoked(r) => revoked.push(r.token_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(revoked.contains(&agent.token.unwrap().id));
    let status = app
        .authorize(&edge, &agent.secret, &["x"])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn health_and_reflection_are_served(pool: PgPool) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let app = spawn_app(pool).await;
    let health = HealthClient::new(app.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "burrow.v1.AccountService",
        "burrow.v1.TeamService",
        "burrow.v1.TokenService",
        "burrow.v1.ReservationService",
        "burrow.v1.TunnelService",
        "burrow.v1.EdgeService",
        "burrow.v1.UsageService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn the_binary_serves_after_migrating_and_drains_on_sigterm(pool: PgPool) {
    let url = database_url(&pool).await;
    let token = String::from_utf8(
        control(&["bootstrap", "--email", "root@example.com"], &url)
            .await
            .stdout,
    )
    .unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow-control"))
        // No admin listener: its default port may be taken (by the platform the README
        // runs, say), and this test is about the gRPC listener.
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-addr",
            "off",
        ])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until it accepts connections (it migrates first).
    let deadline = Instant::now() + Duration::from_secs(20);
    let channel = loop {
        match Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => break channel,
            Err(_) if Instant::now() < deadline => {
                // Polling another process; there is no event to await.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("the server never came up: {err}"),
        }
    };
    let me = AccountServiceClient::new(channel)
        .get_account(req(token.trim(), v1::GetAccountRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.email, "root@example.com");
    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the server exits within 15 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

// === reservation policies ===

/// An argon2id PHC hash of `password`, as `burrow reservation policy set` sends it.
async fn password_hash(password: &str) -> String {
    burrow_control::hashing::Hasher::new(1, Metrics::default())
        .unwrap()
        .hash(password.to_owned())
        .await
        .unwrap()
}

fn sample_policy(hash: &str) -> v1::TunnelPolicy {
    v1::TunnelPolicy {
        basic_auth: vec![v1::BasicAuthUser {
            username: "reviewer".into(),
            password_hash: hash.into(),
        }],
        allow_ips: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
        deny_ips: vec!["10.9.0.0/16".into()],
        allow_origins: vec!["https://app.example.com".into()],
        request_headers_add: vec![v1::Header {
            name: "X-From".into(),
            value: "burrow".into(),
        }],
        request_headers_remove: vec!["Cookie".into()],
        response_headers_add: vec![v1::Header {
            name: "X-Frame-Options".into(),
            value: "DENY".into(),
        }],
        response_headers_remove: vec!["Server".into()],
    }
}

impl TestApp {
    async fn set_policy(
        &self,
        token: &str,
        subdomain: &str,
        policy: Option<v1::TunnelPolicy>,
    ) -> Result<v1::Reservation, Status> {
        self.reservations()
            .set_reservation_policy(req(
                token,
                v1::SetReservationPolicyRequest {
                    subdomain: subdomain.into(),
                    policy,
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn add_member(&self, by: &User, team: &str, who: &User, role: v1::Role) {
        self.teams()
            .add_member(req(
                &by.token,
                v1::AddMemberRequest {
                    team: team.into(),
                    account: who.email.clone(),
                    role: role as i32,
                },
            ))
            .await
            .unwrap();
    }

    async fn watch_from_now(&self, edge: &str, edge_id: &str) -> tonic::Streaming<v1::WatchEvent> {
        let mut stream = self
            .edges()
            .watch(req(
                edge,
                v1::WatchRequest {
                    edge_id: edge_id.into(),
                    after_revision: 0,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            next_event(&mut stream).await,
            v1::watch_event::Event::Hello(_)
        ));
        stream
    }
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn reservation_policies_are_pinned_by_team_admins_and_shown_without_hashes(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bob = app.user("bob@example.com").await;
    let dana = app.user("dana@example.com").await;
    let carol = app.owner("carol@example.com", "other").await;
    app.add_member(&alice, "acme", &bob, v1::Role::Member).await;
    app.add_member(&alice, "acme", &dana, v1::Role::Admin).await;
    app.reserve(&alice, "acme", "chat").await.unwrap();
    let hash = password_hash("open sesame").await;
    let policy = sample_policy(&hash);

    // A member may not pin; another team cannot even see the reservation.
    let refused = app
        .set_policy(&bob.token, "chat", Some(policy.clone()))
        .await;
    assert_eq!(code(refused), Code::PermissionDenied);
    let hidden = app
        .set_policy(&carol.token, "chat", Some(policy.clone()))
        .await;
    assert_eq!(code(hidden), Code::NotFound);
    let missing = app
        .set_policy(&alice.token, "nosuch", Some(policy.clone()))
        .await;
    assert_eq!(code(missing), Code::NotFound);

    // An admin may; the answer shows every rule but no hash.
    let shown = app
        .set_policy(&dana.token, "chat", Some(policy.clone()))
        .await
        .unwrap()
        .policy
        .expect("the pinned policy is shown");
    assert_eq!(shown.basic_auth.len(), 1);
    assert_eq!(shown.basic_auth[0].username, "reviewer");
    assert_eq!(shown.basic_auth[0].password_hash, "");
    assert_eq!(shown.allow_ips, policy.allow_ips);
    assert_eq!(
        shown.response_headers_remove,
        policy.response_headers_remove
    );
    let listed = app
        .reservations()
        .list_reservations(req(&bob.token, v1::ListReservationsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .reservations;
    let listed = listed[0].policy.clone().unwrap();
    assert_eq!(listed.basic_auth[0].password_hash, "");
    assert_eq!(listed.allow_origins, policy.allow_origins);

    // One audit row per change, naming the user but not carrying the hash.
    let details: Vec<String> = sqlx::query_scalar(
        "SELECT details::text FROM audit_log WHERE action = 'reservation.policy.set'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(details.len(), 1);
    assert!(details[0].contains("reviewer"), "{}", details[0]);
    assert!(!details[0].contains("$argon2id$"), "{}", details[0]);

    // An empty policy clears it.
    let cleared = app
        .set_policy(&alice.token, "chat", Some(v1::TunnelPolicy::default()))
        .await
        .unwrap();
    assert_eq!(cleared.policy, None);
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT policy FROM reservations WHERE subdomain = 'chat'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, None);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn malformed_policies_are_refused_with_a_sentence_naming_the_problem(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    app.reserve(&alice, "acme", "chat").await.unwrap();
    let hash = password_hash("open sesame").await;
    let good = sample_policy(&hash);
    type Edit = Box<dyn Fn(&mut v1::TunnelPolicy)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|p| p.allow_ips.push("10.0.0.0/33".into())),
            "prefix length",
        ),
        (
            Box::new(|p| p.deny_ips.push("intranet".into())),
            "not an IP network",
        ),
        (
            Box::new(|p| {
                p.allow_ips = (0..257)
                    .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
                    .collect()
            }),
            "at most 256",
        ),
        (
            Box::new(|p| p.allow_origins.push("ftp://files.example.com".into())),
            "http:// or https://",
        ),
        (
            Box::new(|p| p.allow_origins.push("https://app.example.com/path".into())),
            "no path",
        ),
        (
            Box::new(|p| p.request_headers_remove.push("Host".into())),
            "cannot add or remove",
        ),
        (
            Box::new(|p| p.response_headers_remove.push("Transfer-Encoding".into())),
            "cannot add or remove",
        ),
        (
            Box::new(|p| {
                p.request_headers_add.push(v1::Header {
                    name: "X Bad".into(),
                    value: "1".into(),
                })
            }),
            "header name",
        ),
        (
            Box::new(|p| {
                p.response_headers_add.push(v1::Header {
                    name: "X-A".into(),
                    value: "a\r\nSet-Cookie: x".into(),
                })
            }),
            "header value",
        ),
        (
            Box::new(|p| p.basic_auth[0].password_hash = "hunter2".into()),
            "argon2id PHC",
        ),
        (
            Box::new(|p| {
                p.basic_auth[0].password_hash =
                    "$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".into()
            }),
            "argon2id PHC",
        ),
        (
            Box::new(|p| {
                p.basic_auth[0].password_hash =
                    "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into()
            }),
            "lower argon2 parameters",
        ),
        (
            Box::new(|p| p.basic_auth[0].username = "a:b".into()),
            "contains ':'",
        ),
        (
            Box::new(|p| p.basic_auth[0].username = String::new()),
            "cannot be empty",
        ),
        (
            Box::new(|p| p.basic_auth.push(p.basic_auth[0].clone())),
            "listed twice",
        ),
    ];
    for (edit, want) in cases {
        let mut policy = good.clone();
        edit(&mut policy);
        let status = app
            .set_policy(&alice.token, "chat", Some(policy))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(want),
            "{want:?} not in {:?}",
            status.message()
        );
        assert!(!status.message().contains("hunter2"));
    }
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT policy FROM reservations WHERE subdomain = 'chat'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, None, "nothing refused was stored");
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_pinned_policy_reaches_edges_with_its_hashes_and_goes_with_the_reservation(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let (edge, edge_id) = app.edge().await;
    let agent = app.agent_token(&alice, "acme", &[]).await;
    app.reserve(&alice, "acme", "chat").await.unwrap();
    let mut stream = app.watch_from_now(&edge, &edge_id).await;

    let hash = password_hash("open sesame").await;
    app.set_policy(&alice.token, "chat", Some(sample_policy(&hash)))
        .await
        .unwrap();
    match next_event(&mut stream).await {
        v1::watch_event::Event::ReservationPolicyChanged(c) => {
            assert_eq!(c.subdomain, "chat");
            let policy = c.policy.expect("the event carries the policy");
            assert_eq!(policy, sample_policy(&hash), "with the hash, unchanged");
        }
        other => panic!("unexpected {other:?}"),
    }
    let auth = app
        .authorize(&edge, &agent.secret, &["chat", "free"])
        .await
        .unwrap();
    assert_eq!(auth.allowed[0].subdomain, "chat");
    assert_eq!(auth.allowed[0].pinned_policy, Some(sample_policy(&hash)));
    assert_eq!(auth.allowed[1].pinned_policy, None);

    // Clearing is streamed as a policy-less event.
    app.set_policy(&alice.token, "chat", None).await.unwrap();
    match next_event(&mut stream).await {
        v1::watch_event::Event::ReservationPolicyChanged(c) => assert_eq!(c.policy, None),
        other => panic!("unexpected {other:?}"),
    }

    // Releasing drops the policy: after ReservationChanged, edges hear it is gone.
    app.set_policy(&alice.token, "chat", Some(sample_policy(&hash)))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        v1::watch_event::Event::ReservationPolicyChanged(_)
    ));
    app.reservations()
        .release(req(
            &alice.token,
            v1::ReleaseRequest {
                subdomain: "chat".into(),
            },
        ))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        v1::watch_event::Event::ReservationChanged(_)
    ));
    match next_event(&mut stream).await {
        v1::watch_event::Event::ReservationPolicyChanged(c) => {
            assert_eq!(c.subdomain, "chat");
            assert_eq!(c.policy, None);
        }
        other => panic!("unexpected {other:?}"),
    }

    // Transferring drops it too.
    app.reserve(&alice, "acme", "chat").await.unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        v1::watch_event::Event::ReservationChanged(_)
    ));
    app.set_policy(&alice.token, "chat", Some(sample_policy(&hash)))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        v1::watch_event::Event::ReservationPolicyChanged(_)
    ));
    let beta = app.owner("beta-owner@example.com", "beta").await;
    app.add_member(
        &beta,
        "beta",
        &User {
            id: String::new(),
            email: "alice@example.com".into(),
            token: String::new(),
        },
        v1::Role::Admin,
    )
    .await;
    let moved = app
        .reservations()
        .transfer(req(
            &alice.token,
            v1::TransferRequest {
                subdomain: "chat".into(),
                to_team: "beta".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.team, "beta");
    assert_eq!(moved.policy, None);
    assert!(matches!(
        next_event(&mut stream).await,
        v1::watch_event::Event::ReservationChanged(_)
    ));
    match next_event(&mut stream).await {
        v1::watch_event::Event::ReservationPolicyChanged(c) => assert_eq!(c.policy, None),
        other => panic!("unexpected {other:?}"),
    }
    app.stop().await;
}

// === team tunnel limits ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn team_tunnel_limits_are_set_by_platform_admins_and_reach_edges(pool: PgPool) {
    let app = spawn_app(pool).await;
    let defaults = Config::default().tunnel_limits;
    let alice = app.owner("alice@example.com", "acme").await;
    let (edge, edge_id) = app.edge().await;
    let agent = app.agent_token(&alice, "acme", &[]).await;
    let mut stream = app.watch_from_now(&edge, &edge_id).await;
    let set = |token: &str, limits: v1::TunnelLimits| {
        let mut client = app.teams();
        let request = req(
            token,
            v1::SetTunnelLimitsRequest {
                team: "acme".into(),
                limits: Some(limits),
            },
        );
        async move {
            client
                .set_tunnel_limits(request)
                .await
                .map(|r| r.into_inner())
        }
    };
    let ours = v1::TunnelLimits {
        max_websocket_connections: 5,
        max_new_connections_per_second: 0,
        max_bytes_per_second_per_connection: 1_000_000,
        max_tunnels_per_session: 0,
    };
    // Even the team's owner may not raise its own limits.
    assert_eq!(code(set(&alice.token, ours).await), Code::PermissionDenied);

    let effective = v1::TunnelLimits {
        max_websocket_connections: 5,
        max_new_connections_per_second: defaults.max_new_connections_per_second,
        max_bytes_per_second_per_connection: 1_000_000,
        max_tunnels_per_session: defaults.max_tunnels_per_session,
    };
    let team = set(&app.admin, ours).await.unwrap();
    assert_eq!(team.tunnel_limits, Some(effective));
    let shown = app
        .teams()
        .get_team(req(
            &alice.token,
            v1::GetTeamRequest {
                team: "acme".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.tunnel_limits, Some(effective));
    let listed = app
        .teams()
        .list_teams(req(&alice.token, v1::ListTeamsRequest { all: false }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.teams[0].tunnel_limits, Some(effective));
    let auth = app
        .authorize(&edge, &agent.secret, &["demo"])
        .await
        .unwrap();
    assert_eq!(auth.limits, Some(effective));
    match next_event(&mut stream).await {
        v1::watch_event::Event::TeamLimitsChanged(c) => {
            assert_eq!(c.team_id, team.id);
            assert_eq!(c.limits, Some(effective));
        }
        other => panic!("unexpected {other:?}"),
    }
    let audits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'team.limits.set'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(audits, 1);

    // Zeros go back to the platform defaults.
    let reset = set(&app.admin, v1::TunnelLimits::default()).await.unwrap();
    let platform = v1::TunnelLimits {
        max_websocket_connections: defaults.max_websocket_connections,
        max_new_connections_per_second: defaults.max_new_connections_per_second,
        max_bytes_per_second_per_connection: defaults.max_bytes_per_second_per_connection,
        max_tunnels_per_session: defaults.max_tunnels_per_session,
    };
    assert_eq!(reset.tunnel_limits, Some(platform));
    match next_event(&mut stream).await {
        v1::watch_event::Event::TeamLimitsChanged(c) => assert_eq!(c.limits, Some(platform)),
        other => panic!("unexpected {other:?}"),
    }
    let auth = app
        .authorize(&edge, &agent.secret, &["demo"])
        .await
        .unwrap();
    assert_eq!(auth.limits, Some(platform));

    let too_big = v1::TunnelLimits {
        max_websocket_connections: u32::MAX,
        ..Default::default()
    };
    assert_eq!(code(set(&app.admin, too_big).await), Code::InvalidArgument);
    app.stop().await;
}

// === usage metering ===

fn stats(session: &str, conns: u64, bytes_in: u64, bytes_out: u64, ws: u64) -> v1::TunnelStats {
    v1::TunnelStats {
        session_id: session.into(),
        connections_total: conns,
        connections_open: 1,
        bytes_in,
        bytes_out,
        websocket_messages: ws,
        lanes: 1,
    }
}

impl TestApp {
    async fn report(&self, edge: &str, edge_id: &str, stats: Vec<v1::TunnelStats>) {
        self.edges()
            .report_tunnel_stats(req(
                edge,
                v1::ReportTunnelStatsRequest {
                    edge_id: edge_id.into(),
                    stats,
                },
            ))
            .await
            .unwrap();
    }

    async fn usage_rows(&self) -> Vec<(String, i64, i64, i64, i64)> {
        sqlx::query_as(
            "SELECT t.name, u.bytes_in, u.bytes_out, u.connections, u.websocket_messages
             FROM usage_daily u JOIN teams t ON t.id = u.team_id
             WHERE u.day = (now() AT TIME ZONE 'UTC')::date ORDER BY t.name",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn usage_grows_by_what_each_report_added_and_never_shrinks(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let bert = app.owner("bert@example.com", "beta").await;
    let (edge, edge_id) = app.edge().await;
    let a_agent = app.agent_token(&alice, "acme", &[]).await;
    let b_agent = app.agent_token(&bert, "beta", &[]).await;
    let a_auth = app
        .authorize(&edge, &a_agent.secret, &["one", "two"])
        .await
        .unwrap();
    let b_auth = app
        .authorize(&edge, &b_agent.secret, &["three"])
        .await
        .unwrap();
    let one = app.open(&edge, &edge_id, &a_auth, "one").await.unwrap().id;
    let two = app.open(&edge, &edge_id, &a_auth, "two").await.unwrap().id;
    let three = app
        .open(&edge, &edge_id, &b_auth, "three")
        .await
        .unwrap()
        .id;

    app.report(
        &edge,
        &edge_id,
        vec![
            stats(&one, 2, 100, 200, 3),
            stats(&two, 1, 10, 20, 0),
            stats(&three, 4, 1000, 2000, 40),
        ],
    )
    .await;
    assert_eq!(
        app.usage_rows().await,
        vec![
            ("acme".into(), 110, 220, 3, 3),
            ("beta".into(), 1000, 2000, 4, 40)
        ]
    );
    // Second report: one grew; two went backwards in some counters (its edge restarted the
    // count), which adds nothing for those and only the growth of the others; three is quiet.
    app.report(
        &edge,
        &edge_id,
        vec![
            stats(&one, 5, 150, 260, 10),
            stats(&two, 0, 5, 30, 0),
            stats(&three, 4, 1000, 2000, 40),
        ],
    )
    .await;
    assert_eq!(
        app.usage_rows().await,
        vec![
            ("acme".into(), 160, 290, 6, 10),
            ("beta".into(), 1000, 2000, 4, 40)
        ]
    );
    // After going backwards, the lower value is the base for the next report.
    app.report(&edge, &edge_id, vec![stats(&two, 2, 8, 30, 1)])
        .await;
    assert_eq!(app.usage_rows().await[0], ("acme".into(), 163, 290, 8, 11));
    let stored: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT connections_total, connections_open, bytes_in, bytes_out, websocket_messages
         FROM tunnel_sessions WHERE id = $1::uuid",
    )
    .bind(&two)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, (2, 1, 8, 30, 1));

    // Another edge cannot report on (or bill) sessions it does not hold.
    let other_token = burrow_control::create_edge_token(&app.pool, "edge-2")
        .await
        .unwrap();
    let other_id = app.register(&other_token, "edge-2").await.unwrap().edge_id;
    app.report(
        &other_token,
        &other_id,
        vec![stats(&one, 99, 99_999, 99_999, 99)],
    )
    .await;
    assert_eq!(app.usage_rows().await[0], ("acme".into(), 163, 290, 8, 11));
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn concurrent_reports_add_up_exactly(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let (edge, edge_id) = app.edge().await;
    let agent = app.agent_token(&alice, "acme", &[]).await;
    let names: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let auth = app.authorize(&edge, &agent.secret, &refs).await.unwrap();
    let mut sessions = Vec::new();
    for name in &names {
        sessions.push(app.open(&edge, &edge_id, &auth, name).await.unwrap().id);
    }
    let reports = sessions.iter().map(|id| {
        let mut client = app.edges();
        let request = req(
            &edge,
            v1::ReportTunnelStatsRequest {
                edge_id: edge_id.clone(),
                stats: vec![stats(id, 3, 1000, 500, 7)],
            },
        );
        async move { client.report_tunnel_stats(request).await.unwrap() }
    });
    futures::future::join_all(reports).await;
    assert_eq!(
        app.usage_rows().await,
        vec![("acme".into(), 20_000, 10_000, 60, 140)]
    );
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn usage_is_shown_to_team_members_for_a_checked_range_of_days(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = app.owner("alice@example.com", "acme").await;
    let carol = app.owner("carol@example.com", "other").await;
    let agent = app.agent_token(&alice, "acme", &[]).await;
    sqlx::query(
        "INSERT INTO usage_daily (team_id, day, bytes_in, bytes_out, connections,
                                  websocket_messages)
         SELECT t.id, d.day::date, 1, 2, 3, 4
         FROM teams t, (VALUES ('2026-01-01'), ('2026-01-15'), ('2026-02-01')) AS d(day)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let get = |token: &str, team: &str, from: &str, to: &str| {
        let mut client = app.usage();
        let request = req(
            token,
            v1::GetUsageRequest {
                team: team.into(),
                from: from.into(),
                to: to.into(),
            },
        );
        async move { client.get_usage(request).await.map(|r| r.into_inner().days) }
    };
    let days = get(&alice.token, "acme", "2026-01-01", "2026-01-31")
        .await
        .unwrap();
    let shown: Vec<(&str, &str)> = days
        .iter()
        .map(|d| (d.team.as_str(), d.day.as_str()))
        .collect();
    assert_eq!(shown, [("acme", "2026-01-01"), ("acme", "2026-01-15")]);
    assert_eq!(
        (
            days[0].bytes_in,
            days[0].bytes_out,
            days[0].connections,
            days[0].websocket_messages
        ),
        (1, 2, 3, 4)
    );
    // Without a team: the caller's teams only; a platform admin sees every team.
    let mine = get(&alice.token, "", "2026-01-01", "2026-02-28")
        .await
        .unwrap();
    assert_eq!(mine.len(), 3);
    assert!(mine.iter().all(|d| d.team == "acme"));
    let all = get(&app.admin, "", "2026-01-01", "2026-02-28")
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(
        get(&app.admin, "acme", "2026-02-01", "2026-02-01")
            .await
            .unwrap()
            .len(),
        1
    );

    // Someone else's team, or an agent token: refused.
    assert_eq!(
        code(get(&carol.token, "acme", "", "").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(get(&agent.secret, "acme", "", "").await),
        Code::PermissionDenied
    );
    // Dates are checked.
    for (from, to, want) in [
        ("2026-13-01", "", "YYYY-MM-DD"),
        ("", "yesterday", "YYYY-MM-DD"),
        ("2026-02-01", "2026-01-01", "after it ends"),
        ("2024-01-01", "2026-01-01", "more than 366 days"),
    ] {
        let status = get(&alice.token, "acme", from, to).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(want), "{}", status.message());
    }
    // Defaults: the 30 days up to today.
    assert!(get(&alice.token, "acme", "", "").await.unwrap().is_empty());
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn an_edge_token_acts_only_for_the_edge_it_was_made_for(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (_, edge1, edge1_id, auth) = app.acme_agent_on_edge(&["chat"]).await;
    let session = app.open(&edge1, &edge1_id, &auth, "chat").await.unwrap();

    // Edge 1's token cannot register under another name (and so take it over).
    let other_name = app.register(&edge1, "edge-9").await.unwrap_err();
    assert_eq!(other_name.code(), Code::PermissionDenied);
    assert!(
        other_name.message().contains("made for edge \"edge-1\""),
        "{}",
        other_name.message()
    );

    // A second edge, registered with its own token, cannot act as edge 1.
    let edge2 = burrow_control::create_edge_token(&app.pool, "edge-2")
        .await
        .unwrap();
    let denied = |e: Status| {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    };
    denied(
        app.edges()
            .heartbeat(req(
                &edge2,
                v1::HeartbeatRequest {
                    edge_id: edge1_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err(),
    );
    denied(
        app.open(&edge2, &edge1_id, &auth, "other")
            .await
            .unwrap_err(),
    );
    denied(
        app.edges()
            .report_tunnel_stats(req(
                &edge2,
                v1::ReportTunnelStatsRequest {
                    edge_id: edge1_id.clone(),
                    stats: Vec::new(),
                },
            ))
            .await
            .unwrap_err(),
    );
    denied(
        app.edges()
            .close_tunnel_session(req(
                &edge2,
                v1::CloseTunnelSessionRequest {
                    session_id: session.id.clone(),
                    clean: true,
                },
            ))
            .await
            .unwrap_err(),
    );
    let live: bool =
        sqlx::query_scalar("SELECT ended_at IS NULL FROM tunnel_sessions WHERE id = $1::uuid")
            .bind(&session.id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(live, "another edge's token closed the session");

    // Edge 1 itself still can.
    app.close(&edge1, &session.id, true).await;
    app.stop().await;
}
