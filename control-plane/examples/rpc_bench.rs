//! Benchmark of an authenticated read RPC: `ListReservations` over one HTTP/2 connection with
//! N concurrent callers for a fixed time, against an in-process control plane on a fresh
//! database. Prints requests per second, p50/p99 latency and how many argon2 verifications
//! the run performed (the target is one per token). Run it through `bench/rpc.sh`.

#![allow(clippy::unwrap_used)]

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use burrow_control::Config;
use burrow_proto::v1::{
    self, account_service_client::AccountServiceClient,
    reservation_service_client::ReservationServiceClient, team_service_client::TeamServiceClient,
    token_service_client::TokenServiceClient,
};
use clap::Parser;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Request;

#[derive(Parser, Debug)]
#[command(about = "Authenticated ListReservations throughput and latency")]
struct Args {
    /// PostgreSQL server to create the scratch database on.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Name of the scratch database (dropped and re-created).
    #[arg(long, default_value = "burrow_bench_rpc")]
    database: String,
    /// Concurrent callers sharing one connection.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Database connections in the server's pool.
    #[arg(long, default_value_t = Config::default().db_max_connections)]
    db_connections: u32,
    /// What to measure: `list-reservations` (the authenticated RPC), or for comparison
    /// `health` (gRPC only: no authentication, no database) and `sql` (the same query run
    /// straight on the pool: no gRPC).
    #[arg(long, default_value = "list-reservations")]
    rpc: String,
    /// Reservations the listed team holds (the size of each answer).
    #[arg(long, default_value_t = 10)]
    reservations: usize,
}

fn req<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server_opts = PgConnectOptions::from_str(&args.database_url)?;
    let mut admin_conn = server_opts.clone().connect().await.context("connecting")?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        args.database
    ))
    .execute(&mut admin_conn)
    .await?;
    sqlx::query(&format!("CREATE DATABASE \"{}\"", args.database))
        .execute(&mut admin_conn)
        .await?;

    let config = Config {
        db_max_connections: args.db_connections,
        ..Config::default()
    };
    let metrics = config.metrics.clone();
    let pool = burrow_control::pool_options(&config)
        .connect_with(server_opts.database(&args.database))
        .await?;
    burrow_control::MIGRATOR.run(&pool).await?;
    let admin = burrow_control::bootstrap_admin(&pool, "admin@example.com").await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(burrow_control::run(
        config,
        pool.clone(),
        listener,
        shutdown.clone(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    // A member with a team holding some reservations, and a fresh API token for the run.
    AccountServiceClient::new(channel.clone())
        .create_account(req(
            &admin,
            v1::CreateAccountRequest {
                email: "bench@example.com".into(),
                display_name: "bench".into(),
                password: "bench password".into(),
                platform_admin: false,
            },
        ))
        .await?;
    let login = AccountServiceClient::new(channel.clone())
        .login(Request::new(v1::LoginRequest {
            email: "bench@example.com".into(),
            password: "bench password".into(),
            token_name: "setup".into(),
        }))
        .await?
        .into_inner();
    TeamServiceClient::new(channel.clone())
        .create_team(req(
            &login.token,
            v1::CreateTeamRequest {
                name: "bench".into(),
                display_name: String::new(),
            },
        ))
        .await?;
    for i in 0..args.reservations {
        ReservationServiceClient::new(channel.clone())
            .reserve(req(
                &login.token,
                v1::ReserveRequest {
                    team: "bench".into(),
                    subdomain: format!("bench-{i}"),
                },
            ))
            .await?;
    }
    let token = TokenServiceClient::new(channel.clone())
        .create_token(req(
            &login.token,
            v1::CreateTokenRequest {
                kind: v1::TokenKind::Api as i32,
                name: "bench".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .secret;

    let verifications_before = metrics.argon2_verifications();
    let hits_before = metrics.token_cache_hits();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut callers = Vec::new();
    for _ in 0..args.concurrency {
        let mut client = ReservationServiceClient::new(channel.clone());
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let health_only = args.rpc == "health";
        let sql_only = args.rpc == "sql";
        let pool = pool.clone();
        let token = token.clone();
        let expected = args.reservations;
        callers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0_u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = if sql_only {
                    sqlx::query(
                        "SELECT r.id, r.subdomain, r.team_id, t.name AS team,
                                a.email AS created_by, r.created_at
                         FROM reservations r JOIN teams t ON t.id = r.team_id
                         LEFT JOIN accounts a ON a.id = r.created_by
                         WHERE r.team_id IN (SELECT team_id FROM memberships m
                             JOIN accounts x ON x.id = m.account_id
                             WHERE x.email = 'bench@example.com')
                         ORDER BY r.subdomain",
                    )
                    .fetch_all(&pool)
                    .await
                    .is_ok_and(|rows| rows.len() == expected)
                } else if health_only {
                    health
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .is_ok()
                } else {
                    client
                        .list_reservations(req(&token, v1::ListReservationsRequest::default()))
                        .await
                        .is_ok_and(|r| r.get_ref().reservations.len() == expected)
                };
                if ok {
                    latencies.push(t0.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for caller in callers {
        let (l, e) = caller.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or_default()
    };
    let ok = latencies.len();
    println!(
        "ListReservations, 1 connection, {} concurrent callers, {} reservations per answer",
        args.concurrency, args.reservations
    );
    println!(
        "  requests:          {ok} ok, {errors} failed in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "  throughput:        {:.0} req/s",
        ok as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency p50:       {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3
    );
    println!(
        "  latency p99:       {:.2} ms",
        pct(0.99).as_secs_f64() * 1e3
    );
    println!(
        "  argon2 verifications during the run: {} (tokens used: 1)",
        metrics.argon2_verifications() - verifications_before
    );
    println!(
        "  token cache hits during the run:     {}",
        metrics.token_cache_hits() - hits_before
    );

    shutdown.cancel();
    server.await??;
    pool.close().await;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        args.database
    ))
    .execute(&mut admin_conn)
    .await?;
    Ok(())
}
