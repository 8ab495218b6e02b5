//! `burrow-control`: runs the Burrow control plane and its one-off admin commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use burrow_control::{Config, TlsFiles, TunnelLimits};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Exit code for invalid configuration or usage.
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "burrow-control",
    version,
    about = "The Burrow control plane: accounts, teams, tokens, reservations and edges over gRPC.",
    after_help = "Examples:\n  \
        DATABASE_URL=postgres://postgres@127.0.0.1/burrow burrow-control serve\n  \
        burrow-control bootstrap --email admin@example.com\n  \
        burrow-control edge-token create --name edge-1"
)]
struct Cli {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,

    /// Longest wait for a database connection, in milliseconds, before a call fails with
    /// UNAVAILABLE.
    #[arg(
        long,
        env = "BURROW_DB_ACQUIRE_TIMEOUT_MS",
        default_value_t = millis(Config::default().db_acquire_timeout),
        global = true
    )]
    db_acquire_timeout_ms: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the gRPC API (migrations are applied first).
    #[command(after_help = "Examples:\n  \
        burrow-control serve --listen 0.0.0.0:7070\n  \
        burrow-control serve --tls-cert cert.pem --tls-key key.pem")]
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    #[command(after_help = "Example:\n  DATABASE_URL=postgres://… burrow-control migrate")]
    Migrate,
    /// Create the first platform admin and print its API token (once).
    #[command(after_help = "Example:\n  burrow-control bootstrap --email admin@example.com")]
    Bootstrap {
        /// Email of the admin account.
        #[arg(long, env = "BURROW_ADMIN_EMAIL")]
        email: String,
    },
    /// Manage edge tokens.
    #[command(subcommand, name = "edge-token")]
    EdgeToken(EdgeTokenCommand),
}

#[derive(Subcommand, Debug)]
enum EdgeTokenCommand {
    /// Create an edge token and print it (once).
    #[command(
        after_help = "Example:\n  burrow-control edge-token create --name edge-1\n  burrow-edge --name edge-1 --edge-token-file edge-1.token …"
    )]
    Create {
        /// The edge the token is for: it registers only an edge of this name (`burrow-edge
        /// --name`), and acts only for that edge's sessions.
        #[arg(long)]
        name: String,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "BURROW_CONTROL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Admin listener serving /metrics (Prometheus), /healthz and /readyz over plain HTTP;
    /// "off" disables it. Keep it off the public network.
    #[arg(
        long,
        env = "BURROW_CONTROL_ADMIN_ADDR",
        default_value = "127.0.0.1:9091"
    )]
    admin_addr: String,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "BURROW_CONTROL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, env = "BURROW_CONTROL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Subdomains nobody may reserve or bind, comma-separated (replaces the built-in list).
    #[arg(long, env = "BURROW_RESERVED_SUBDOMAINS", value_delimiter = ',')]
    reserved_subdomains: Option<Vec<String>>,
    /// Seconds a verified token stays cached.
    #[arg(long, env = "BURROW_TOKEN_CACHE_TTL_SECS", default_value_t = 60)]
    token_cache_ttl_secs: u64,
    /// Seconds a vanished agent's names stay held for its team.
    #[arg(long, env = "BURROW_RECONNECT_GRACE_SECS", default_value_t = 60)]
    reconnect_grace_secs: u64,
    /// Seconds an edge may trust an agent authorization.
    #[arg(long, env = "BURROW_AUTHORIZATION_TTL_SECS", default_value_t = 600)]
    authorization_ttl_secs: u64,
    /// Most database connections.
    #[arg(long, env = "BURROW_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: u32,
    /// Most entries in the verified-token cache; bounds its memory under a flood of valid
    /// tokens (when full, the cache is emptied and refilled).
    #[arg(long, env = "BURROW_TOKEN_CACHE_CAPACITY", default_value_t = Config::default().token_cache_capacity)]
    token_cache_capacity: usize,
    /// Seconds between the heartbeats edges are asked to send.
    #[arg(long, env = "BURROW_HEARTBEAT_INTERVAL_SECS", default_value_t = Config::default().heartbeat_interval.as_secs())]
    heartbeat_interval_secs: u64,
    /// Most argon2 computations (token and password checks) running at once; each takes
    /// ~19 MiB and a core for ~20 ms, others wait their turn.
    #[arg(long, env = "BURROW_MAX_CONCURRENT_HASHES", default_value_t = Config::default().max_concurrent_hashes)]
    max_concurrent_hashes: usize,
    /// Failed authentication or login attempts allowed per peer address per
    /// --failed-auth-window-secs; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BURROW_MAX_FAILED_AUTH_PER_PEER", default_value_t = Config::default().max_failed_auth_per_peer)]
    max_failed_auth_per_peer: u32,
    /// Failed login attempts allowed per email per --failed-auth-window-secs.
    #[arg(long, env = "BURROW_MAX_FAILED_LOGIN_PER_EMAIL", default_value_t = Config::default().max_failed_login_per_email)]
    max_failed_login_per_email: u32,
    /// Seconds over which failed authentication and login attempts are counted.
    #[arg(long, env = "BURROW_FAILED_AUTH_WINDOW_SECS", default_value_t = Config::default().failed_auth_window.as_secs())]
    failed_auth_window_secs: u64,
    /// Milliseconds between change-log polls when no NOTIFY arrives (NOTIFY is only a nudge,
    /// so this bounds how late an edge may learn of a change).
    #[arg(long, env = "BURROW_CHANGE_POLL_INTERVAL_MS", default_value_t = millis(Config::default().change_poll_interval))]
    change_poll_interval_ms: u64,
    /// Events each server stream (`Watch`, `WatchTunnels`) may queue for a slow reader before
    /// it applies backpressure instead of growing memory.
    #[arg(long, env = "BURROW_STREAM_BUFFER", default_value_t = Config::default().stream_buffer)]
    stream_buffer: usize,
    /// Longest overlap, in seconds, a rotated token's old secret may keep working.
    #[arg(long, env = "BURROW_MAX_ROTATION_OVERLAP_SECS", default_value_t = Config::default().max_rotation_overlap.as_secs())]
    max_rotation_overlap_secs: u64,
    /// Seconds in-flight calls get to finish after SIGINT or SIGTERM.
    #[arg(long, env = "BURROW_SHUTDOWN_GRACE_SECS", default_value_t = Config::default().shutdown_grace.as_secs())]
    shutdown_grace_secs: u64,
    /// Longest a unary call may take, in seconds, before it fails, so a stuck dependency never
    /// holds a caller forever (server streams are not cut by it).
    #[arg(long, env = "BURROW_REQUEST_TIMEOUT_SECS", default_value_t = Config::default().request_timeout.as_secs())]
    request_timeout_secs: u64,
    /// Seconds between HTTP/2 PINGs on idle connections, so a vanished edge's `Watch` stream
    /// is noticed and freed.
    #[arg(long, env = "BURROW_HTTP2_KEEPALIVE_INTERVAL_SECS", default_value_t = Config::default().http2_keepalive_interval.as_secs())]
    http2_keepalive_interval_secs: u64,
    /// Most concurrent calls (HTTP/2 streams) on one connection.
    #[arg(long, env = "BURROW_MAX_CONCURRENT_STREAMS", default_value_t = Config::default().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// Platform default: most WebSocket connections open at once through one tunnel (a
    /// team's own limit wins; 0: the edge's default).
    #[arg(long, env = "BURROW_MAX_WEBSOCKET_CONNECTIONS", default_value_t = Config::default().tunnel_limits.max_websocket_connections)]
    max_websocket_connections: u32,
    /// Platform default: most new visitor connections per second to one tunnel (a team's own
    /// limit wins; 0: the edge's default).
    #[arg(long, env = "BURROW_MAX_NEW_CONNECTIONS_PER_SECOND", default_value_t = Config::default().tunnel_limits.max_new_connections_per_second)]
    max_new_connections_per_second: u32,
    /// Platform default: most bytes per second in each direction of one visitor connection (a
    /// team's own limit wins; 0: the edge's default).
    #[arg(long, env = "BURROW_MAX_BYTES_PER_SECOND_PER_CONNECTION", default_value_t = Config::default().tunnel_limits.max_bytes_per_second_per_connection)]
    max_bytes_per_second_per_connection: u64,
    /// Platform default: most tunnels one agent session may bind (a team's own limit wins; 0:
    /// the edge's default).
    #[arg(long, env = "BURROW_MAX_TUNNELS_PER_SESSION", default_value_t = Config::default().tunnel_limits.max_tunnels_per_session)]
    max_tunnels_per_session: u32,
    /// Most days one usage query (`burrow usage`, `UsageService.GetUsage`) may span, so one
    /// call reads a bounded number of rows per team.
    #[arg(long, env = "BURROW_MAX_USAGE_RANGE_DAYS", default_value_t = Config::default().max_usage_range_days)]
    max_usage_range_days: u32,
    /// Milliseconds /readyz waits for `SELECT 1` on the database pool before answering 503.
    #[arg(long, env = "BURROW_CONTROL_READINESS_TIMEOUT_MS", default_value_t = millis(Config::default().readiness_timeout))]
    readiness_timeout_ms: u64,
    /// Most connections served at once on the admin listener; more wait for a free slot.
    #[arg(long, env = "BURROW_CONTROL_ADMIN_MAX_CONNECTIONS", default_value_t = Config::default().admin_max_connections)]
    admin_max_connections: usize,
    /// Seconds an admin client may take to send its request head.
    #[arg(long, env = "BURROW_CONTROL_ADMIN_HEADER_TIMEOUT_SECS", default_value_t = Config::default().admin_header_timeout.as_secs())]
    admin_header_timeout_secs: u64,
}

impl ServeArgs {
    /// Writes every setting given by a flag into `config` (TLS files, the reserved list,
    /// limits and timeouts); the database settings of [`Cli`] are applied by the caller.
    fn apply(&self, config: &mut Config) {
        config.tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        if let Some(list) = &self.reserved_subdomains {
            config.reserved_subdomains =
                list.iter().map(|s| s.trim().to_ascii_lowercase()).collect();
        }
        config.token_cache_ttl = Duration::from_secs(self.token_cache_ttl_secs);
        config.reconnect_grace = Duration::from_secs(self.reconnect_grace_secs);
        config.authorization_ttl = Duration::from_secs(self.authorization_ttl_secs);
        config.db_max_connections = self.db_max_connections;
        config.token_cache_capacity = self.token_cache_capacity;
        config.heartbeat_interval = Duration::from_secs(self.heartbeat_interval_secs);
        config.max_concurrent_hashes = self.max_concurrent_hashes;
        config.max_failed_auth_per_peer = self.max_failed_auth_per_peer;
        config.max_failed_login_per_email = self.max_failed_login_per_email;
        config.failed_auth_window = Duration::from_secs(self.failed_auth_window_secs);
        config.change_poll_interval = Duration::from_millis(self.change_poll_interval_ms);
        config.stream_buffer = self.stream_buffer;
        config.max_rotation_overlap = Duration::from_secs(self.max_rotation_overlap_secs);
        config.shutdown_grace = Duration::from_secs(self.shutdown_grace_secs);
        config.request_timeout = Duration::from_secs(self.request_timeout_secs);
        config.http2_keepalive_interval = Duration::from_secs(self.http2_keepalive_interval_secs);
        config.max_concurrent_streams = self.max_concurrent_streams;
        config.tunnel_limits = TunnelLimits {
            max_websocket_connections: self.max_websocket_connections,
            max_new_connections_per_second: self.max_new_connections_per_second,
            max_bytes_per_second_per_connection: self.max_bytes_per_second_per_connection,
            max_tunnels_per_session: self.max_tunnels_per_session,
        };
        config.max_usage_range_days = self.max_usage_range_days;
        config.readiness_timeout = Duration::from_millis(self.readiness_timeout_ms);
        config.admin_max_connections = self.admin_max_connections;
        config.admin_header_timeout = Duration::from_secs(self.admin_header_timeout_secs);
    }
}

/// `d` in whole milliseconds, for the default of a millisecond flag.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // PostgreSQL's notices ("relation _sqlx_migrations already exists, skipping"
                // on every start) are its chatter, not ours.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn")
                }),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal, and not with NO_COLOR set (https://no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match real_main(cli).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Usage(msg)) => {
                eprintln!("error: {msg}");
                ExitCode::from(EXIT_USAGE)
            }
            Err(Failure::Other(err)) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    })
}

enum Failure {
    Usage(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Other(err)
    }
}

async fn connect(cli: &Cli, config: &Config) -> Result<sqlx::PgPool, Failure> {
    let url = cli.database_url.as_deref().ok_or_else(|| {
        Failure::Usage("set DATABASE_URL (or --database-url) to the PostgreSQL database".into())
    })?;
    let pool = burrow_control::pool_options(config)
        .connect(url)
        .await
        .context("connecting to PostgreSQL (is DATABASE_URL right and the server up?)")?;
    Ok(pool)
}

async fn real_main(cli: Cli) -> Result<(), Failure> {
    let mut config = Config {
        db_acquire_timeout: Duration::from_millis(cli.db_acquire_timeout_ms),
        ..Config::default()
    };
    match &cli.command {
        Command::Serve(args) => {
            args.apply(&mut config);
            config
                .validate()
                .map_err(|e| Failure::Usage(e.to_string()))?;
            let pool = connect(&cli, &config).await?;
            burrow_control::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            let admin = if args.admin_addr == "off" {
                None
            } else {
                Some(
                    tokio::net::TcpListener::bind(&args.admin_addr)
                        .await
                        .with_context(|| {
                            format!("binding the admin listener {}", args.admin_addr)
                        })?,
                )
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(wait_for_signal(shutdown.clone()));
            let listeners = burrow_control::Listeners {
                grpc: listener,
                admin,
            };
            burrow_control::serve(config, pool, listeners, shutdown).await?;
            Ok(())
        }
        Command::Migrate => {
            config
                .validate()
                .map_err(|e| Failure::Usage(e.to_string()))?;
            let pool = connect(&cli, &config).await?;
            burrow_control::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Bootstrap { email } => {
            let pool = connect(&cli, &config).await?;
            burrow_control::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            match burrow_control::bootstrap_admin(&pool, email).await {
                Ok(token) => {
                    eprintln!("Platform admin {email} created. Its API token (shown only now):");
                    println!("{token}");
                    Ok(())
                }
                Err(burrow_control::BootstrapError::InvalidEmail(msg)) => Err(Failure::Usage(msg)),
                Err(err) => Err(Failure::Other(err.into())),
            }
        }
        Command::EdgeToken(EdgeTokenCommand::Create { name }) => {
            let pool = connect(&cli, &config).await?;
            burrow_control::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            let token = burrow_control::create_edge_token(&pool, name).await?;
            eprintln!("Edge token {name:?} created (shown only now):");
            println!("{token}");
            Ok(())
        }
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn wait_for_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested; draining");
    shutdown.cancel();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn serve_config(flags: &[&str]) -> Config {
        let cli = Cli::try_parse_from(["burrow-control", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = &cli.command else {
            panic!("not serve");
        };
        let mut config = Config::default();
        args.apply(&mut config);
        config
    }

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn without_flags_every_setting_keeps_its_default() {
        let config = serve_config(&[]);
        let default = Config::default();
        assert_eq!(format!("{config:?}"), format!("{default:?}"));
        config.validate().unwrap();
    }

    #[test]
    fn each_limit_flag_reaches_the_config() {
        let config = serve_config(&[
            "--token-cache-capacity=7",
            "--heartbeat-interval-secs=3",
            "--max-concurrent-hashes=5",
            "--max-failed-auth-per-peer=11",
            "--max-failed-login-per-email=12",
            "--failed-auth-window-secs=13",
            "--change-poll-interval-ms=250",
            "--stream-buffer=9",
            "--max-rotation-overlap-secs=14",
            "--shutdown-grace-secs=15",
            "--request-timeout-secs=16",
            "--http2-keepalive-interval-secs=17",
            "--max-concurrent-streams=18",
            "--max-websocket-connections=19",
            "--max-new-connections-per-second=20",
            "--max-bytes-per-second-per-connection=21",
            "--max-tunnels-per-session=22",
            "--max-usage-range-days=23",
            "--readiness-timeout-ms=500",
            "--admin-max-connections=24",
            "--admin-header-timeout-secs=25",
        ]);
        let secs = Duration::from_secs;
        assert_eq!(config.token_cache_capacity, 7);
        assert_eq!(config.heartbeat_interval, secs(3));
        assert_eq!(config.max_concurrent_hashes, 5);
        assert_eq!(config.max_failed_auth_per_peer, 11);
        assert_eq!(config.max_failed_login_per_email, 12);
        assert_eq!(config.failed_auth_window, secs(13));
        assert_eq!(config.change_poll_interval, Duration::from_millis(250));
        assert_eq!(config.stream_buffer, 9);
        assert_eq!(config.max_rotation_overlap, secs(14));
        assert_eq!(config.shutdown_grace, secs(15));
        assert_eq!(config.request_timeout, secs(16));
        assert_eq!(config.http2_keepalive_interval, secs(17));
        assert_eq!(config.max_concurrent_streams, 18);
        assert_eq!(config.tunnel_limits.max_websocket_connections, 19);
        assert_eq!(config.tunnel_limits.max_new_connections_per_second, 20);
        assert_eq!(config.tunnel_limits.max_bytes_per_second_per_connection, 21);
        assert_eq!(config.tunnel_limits.max_tunnels_per_session, 22);
        assert_eq!(config.max_usage_range_days, 23);
        assert_eq!(config.readiness_timeout, Duration::from_millis(500));
        assert_eq!(config.admin_max_connections, 24);
        assert_eq!(config.admin_header_timeout, secs(25));
        config.validate().unwrap();
    }

    #[test]
    fn a_zero_or_endless_limit_from_a_flag_is_refused_by_validation() {
        for flag in [
            "--admin-header-timeout-secs=0",
            "--admin-max-connections=0",
            "--max-usage-range-days=0",
            "--readiness-timeout-ms=0",
            "--stream-buffer=0",
            "--request-timeout-secs=18446744073709551615",
        ] {
            assert!(serve_config(&[flag]).validate().is_err(), "{flag}");
        }
    }
}
