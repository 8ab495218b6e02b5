//! Burrow control plane: accounts, teams, tokens, subdomain reservations, edges and tunnel
//! sessions, served over gRPC and stored in PostgreSQL.
//!
//! The control plane is the only process that touches the database. It is stateless apart
//! from caches, so replicas can run side by side; they learn of each other's changes through
//! the `change_log` table (see [`feed`]).
//!
//! # Layout
//! - [`config`]: the typed [`Config`], validated before anything binds.
//! - [`error`]: [`ApiError`], the single place gRPC status codes are chosen.
//! - [`domain`]: newtypes with `parse` (subdomains, team names, emails, roles, scopes).
//! - [`token`]: token text `brw_<kind>_<id>_<secret><checksum>`.
//! - [`hashing`]: argon2id off the async threads, bounded, with [`Metrics`].
//! - [`auth`]: bearer-token verification, the verified-token cache, failed-attempt limits.
//! - [`store`]: audit and change-log rows, team and account lookups.
//! - [`policy`]: validation and storage of reservation-pinned tunnel policies.
//! - [`limits`]: per-team tunnel limits over the platform defaults.
//! - [`feed`]: tailing the change log (LISTEN/NOTIFY nudge plus a short poll).
//! - [`service`]: one module per gRPC service.
//! - `metrics`: Prometheus metrics, the RPC-counting layer and the admin listener
//!   (`/metrics`, `/healthz`, `/readyz`).
//!
//! # Reading the counters
//! [`Config::metrics`] is a shared handle: clone it before calling [`run`] and read e.g.
//! [`Metrics::argon2_verifications`] while the server runs.

pub mod auth;
pub mod config;
pub mod domain;
pub mod error;
pub mod feed;
pub mod hashing;
pub mod limits;
mod metrics;
pub mod policy;
pub mod service;
pub mod store;
pub mod token;

use std::sync::Arc;

use anyhow::Context as _;
use burrow_proto::v1;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub use config::{Config, ConfigError, TlsFiles, TunnelLimits};
pub use error::ApiError;
pub use hashing::Metrics;

use crate::auth::Authenticator;
use crate::hashing::Hasher;
use crate::token::{TokenKind, TokenText};

/// Every migration in `migrations/`, embedded; tests use it with `#[sqlx::test(migrator)]`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Pool settings matching `config`: in particular the acquire timeout, so a dead database
/// turns into UNAVAILABLE within it instead of a hang.
///
/// Connections are not pinged before each use: that ping is a full round trip on every
/// query, and a connection that died meanwhile fails its query with an I/O error (answered
/// as UNAVAILABLE) and is dropped from the pool anyway.
pub fn pool_options(config: &Config) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.db_max_connections)
        .acquire_timeout(config.db_acquire_timeout)
        .test_before_acquire(false)
}

/// What every service shares.
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) config: Config,
    pub(crate) auth: Authenticator,
    pub(crate) hasher: Hasher,
    /// Newest change-log revision seen by the tailer; server streams wait on it.
    pub(crate) latest_revision: watch::Receiver<i64>,
    /// Cancelled when the server shuts down; server streams end on it.
    pub(crate) shutdown: CancellationToken,
    /// Failed logins per email.
    pub(crate) email_failures: auth::FailureLimiter,
}

/// Shared handle to [`AppState`].
pub(crate) type State = Arc<AppState>;

/// Serves every gRPC service (Account, Team, Token, Reservation, Tunnel, Edge, Usage), gRPC health
/// and reflection on `listener` until `shutdown` is cancelled, then drains in-flight calls for
/// up to [`Config::shutdown_grace`]. The pool should be built with [`pool_options`].
pub async fn run(
    config: Config,
    pool: PgPool,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listeners = Listeners {
        grpc: listener,
        admin: None,
    };
    serve(config, pool, listeners, shutdown).await
}

/// The sockets a control plane serves, bound by the caller (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC API.
    pub grpc: tokio::net::TcpListener,
    /// Admin listener: `/metrics` (Prometheus), `/healthz` and `/readyz` over plain HTTP.
    /// Keep it off the public network.
    pub admin: Option<tokio::net::TcpListener>,
}

/// Like [`run`], with every listener: also serves the admin endpoints when
/// [`Listeners::admin`] is given.
pub async fn serve(
    config: Config,
    pool: PgPool,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = listeners.grpc;
    config.validate()?;
    let tracker = TaskTracker::new();
    let hasher = Hasher::new(config.max_concurrent_hashes, config.metrics.clone())?;
    let auth = Authenticator::new(pool.clone(), hasher.clone(), &config);
    let (latest_tx, latest_rx) = watch::channel(0_i64);
    let streams_stop = shutdown.child_token();
    tracker.spawn(feed::tail(
        pool.clone(),
        auth.clone(),
        latest_tx,
        config.change_poll_interval,
        streams_stop.clone(),
    ));

    let tls = match &config.tls {
        Some(files) => {
            let cert = tokio::fs::read(&files.cert)
                .await
                .with_context(|| format!("reading {}", files.cert.display()))?;
            let key = tokio::fs::read(&files.key)
                .await
                .with_context(|| format!("reading {}", files.key.display()))?;
            Some(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        }
        None => None,
    };
    let state: State = Arc::new(AppState {
        email_failures: auth::FailureLimiter::new(
            config.max_failed_login_per_email,
            config.failed_auth_window,
        ),
        pool,
        auth,
        hasher,
        latest_revision: latest_rx,
        shutdown: streams_stop.clone(),
        config,
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<v1::account_service_server::AccountServiceServer<service::account::AccountApi>>()
        .await;
    health_reporter
        .set_serving::<v1::edge_service_server::EdgeServiceServer<service::edge::EdgeApi>>()
        .await;
    // Both reflection versions, so older and newer `grpcurl`s can list the services.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(burrow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(burrow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;

    let rpc_metrics = metrics::ControlMetrics::new(
        state.pool.clone(),
        state.config.metrics.clone(),
        state.config.db_max_connections,
    );
    let rpc_layer = rpc_metrics.layer();
    // The admin listener outlives the drain, so `/readyz` says "shutting down" meanwhile.
    let admin_stop = CancellationToken::new();
    if let Some(l) = listeners.admin {
        tracing::info!(addr = ?l.local_addr().ok(), "admin endpoints listening");
        let admin = Arc::new(metrics::Admin {
            metrics: rpc_metrics,
            pool: state.pool.clone(),
            readiness_timeout: state.config.readiness_timeout,
            shutdown: shutdown.clone(),
        });
        let limits = burrow_admin::AdminLimits {
            max_connections: state.config.admin_max_connections,
            header_timeout: state.config.admin_header_timeout,
        };
        tokio::spawn(burrow_admin::serve(l, admin, limits, admin_stop.clone()));
    }
    let mut builder = Server::builder()
        .timeout(state.config.request_timeout)
        .http2_keepalive_interval(Some(state.config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(state.config.http2_keepalive_interval))
        .max_concurrent_streams(Some(state.config.max_concurrent_streams))
        .trace_fn(|request| tracing::info_span!("rpc", method = %request.uri().path()));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, "control plane listening");
    // Nagle's algorithm would hold small responses back until the peer's delayed ACK
    // (tens of milliseconds at the tail); gRPC frames are already batched by HTTP/2.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(state.config.http2_keepalive_interval));
    let stop = shutdown.clone();
    let grace = state.config.shutdown_grace;
    let server = builder
        .layer(rpc_layer)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(service::account::server(state.clone()))
        .add_service(service::team::server(state.clone()))
        .add_service(service::token::server(state.clone()))
        .add_service(service::reservation::server(state.clone()))
        .add_service(service::edge::server(state.clone()))
        .add_service(service::tunnel::server(state.clone()))
        .add_service(service::usage::server(state.clone()))
        .serve_with_incoming_shutdown(incoming, async move {
            stop.cancelled().await;
            // End server streams (Watch, WatchTunnels) so the drain can finish.
            streams_stop.cancel();
        });
    let served = tokio::select! {
        r = server => r.context("serving gRPC"),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown grace period over; dropping remaining calls");
            Ok(())
        }
    };
    tracker.close();
    let _ = tokio::time::timeout(grace, tracker.wait()).await;
    admin_stop.cancel();
    served
}

/// Why [`bootstrap_admin`] refused.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Bootstrap runs once; later admins are made through the API.
    #[error("a platform admin already exists; create more accounts through the API instead")]
    AdminExists,
    /// The email is not an address.
    #[error("{0}")]
    InvalidEmail(String),
    /// The database refused or is unreachable.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Hashing failed.
    #[error("{0}")]
    Other(String),
}

/// Creates the first platform admin with an API token and returns the token text (shown once).
/// Refuses when any platform admin exists; concurrent runs are serialized by a lock.
pub async fn bootstrap_admin(pool: &PgPool, email: &str) -> Result<String, BootstrapError> {
    let email = domain::Email::parse(email, "email")
        .map_err(|e| BootstrapError::InvalidEmail(e.to_string()))?;
    let hasher =
        Hasher::new(1, Metrics::default()).map_err(|e| BootstrapError::Other(e.to_string()))?;
    let token = TokenText::generate(TokenKind::Api);
    let hash = hasher
        .hash(token.secret().to_owned())
        .await
        .map_err(|e| BootstrapError::Other(e.to_string()))?;
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE platform_admin)")
            .fetch_one(&mut *tx)
            .await?;
    if exists {
        return Err(BootstrapError::AdminExists);
    }
    let account: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO accounts (email, display_name, platform_admin) VALUES ($1, 'admin', true)
         ON CONFLICT (lower(email)) DO UPDATE SET platform_admin = true
         RETURNING id",
    )
    .bind(email.as_str())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO api_tokens (id, kind, created_by, name, secret_hash)
         VALUES ($1, 'api', $2, 'bootstrap', $3)",
    )
    .bind(token.id())
    .bind(account)
    .bind(&hash)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO audit_log (actor_account, action, target, details)
         VALUES (NULL, 'bootstrap', $1, '{}'::jsonb)",
    )
    .bind(format!("account:{account}"))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(token.expose())
}

/// Creates an edge token named `name` and returns its text (shown once).
pub async fn create_edge_token(pool: &PgPool, name: &str) -> anyhow::Result<String> {
    let name = domain::parse_name(name, "name", true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hasher = Hasher::new(1, Metrics::default())?;
    let token = TokenText::generate(TokenKind::Edge);
    let hash = hasher
        .hash(token.secret().to_owned())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO api_tokens (id, kind, name, secret_hash) VALUES ($1, 'edge', $2, $3)")
        .bind(token.id())
        .bind(&name)
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .context("storing the edge token")?;
    sqlx::query(
        "INSERT INTO audit_log (action, target, details) VALUES ('edge_token.create', $1, '{}'::jsonb)",
    )
    .bind(format!("token:{}", token.id()))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(token.expose())
}
