//! `burrow-control`: runs the Burrow control plane and its one-off admin commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use burrow_control::{Config, TlsFiles};
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
        default_value_t = 1000,
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
    Serve(ServeArgs),
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
    #[command(after_help = "Example:\n  burrow-control edge-token create --name edge-1")]
    Create {
        /// A name to recognise the token by.
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
            config.tls = match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            };
            if let Some(list) = &args.reserved_subdomains {
                config.reserved_subdomains =
                    list.iter().map(|s| s.trim().to_ascii_lowercase()).collect();
            }
            config.token_cache_ttl = Duration::from_secs(args.token_cache_ttl_secs);
            config.reconnect_grace = Duration::from_secs(args.reconnect_grace_secs);
            config.authorization_ttl = Duration::from_secs(args.authorization_ttl_secs);
            config.db_max_connections = args.db_max_connections;
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
