//! `burrow-bench`: the WebSocket echo server and load generator behind `bench/tunnel.sh`.
//!
//! Every figure is measured against whatever URL it is given, so the script can measure a
//! direct connection, a Burrow tunnel and a bore tunnel in the same run and print ratios.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use futures::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Largest message the echo server and the client accept: the 1 MiB throughput messages plus
/// room to spare.
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "burrow-bench",
    about = "WebSocket echo server and load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a WebSocket echo on ADDR (every data message is sent back as it came).
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Measure one target and print one JSON object.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// ws:// URL to connect to (the TCP address to dial).
    #[arg(long)]
    url: String,
    /// Host header to send instead of the URL's (for `NAME.localhost` routing).
    #[arg(long)]
    host: Option<String>,
    /// Round trips of 64-byte messages for the latency figure.
    #[arg(long, default_value_t = 5000)]
    rtt_count: usize,
    /// 1 MiB messages for the throughput figure.
    #[arg(long, default_value_t = 256)]
    mib_messages: usize,
    /// New connections for the connect-to-first-message figure.
    #[arg(long, default_value_t = 200)]
    connects: usize,
    /// Idle connections to hold for the memory figure (0 skips it).
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Size of one message each idle connection echoes before it goes idle (0: only the
    /// 64-byte round trip), to see what a connection keeps after a burst.
    #[arg(long, default_value_t = 0)]
    idle_burst_bytes: usize,
    /// Process ids of the tunnel: their RSS is sampled before and after opening the idle
    /// connections, and their CPU time around the throughput run.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Label printed in the JSON.
    #[arg(long, default_value = "target")]
    label: String,
    /// Pause before the round-trip figure, in ms, so it is not measured in the wake of an
    /// earlier bulk transfer (a previous repetition's): for about a second after one, the
    /// kernel may keep the threads that wake each other packed on one core. What a round trip
    /// costs right after bulk is measured on its own (`rtt_after_bulk_*`).
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Measure the round trips only, then stop (for profiling a tunnel's processes over
    /// round trips alone, e.g. with `callgrind_control -i on|off` around it).
    #[arg(long)]
    only_rtt: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    label: String,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    throughput_mib_s: f64,
    /// CPU time the given processes spent per 1 MiB message echoed (both directions), in
    /// µs: steadier than the throughput itself on a busy machine.
    cpu_us_per_mib: f64,
    /// CPU time and thread context switches of the given processes per 64-byte round trip
    /// and per new connection (opened, one echo, closed): they follow the number of thread
    /// wake-ups, which the latency figures on a shared machine hide.
    cpu_us_per_rtt: f64,
    switches_per_rtt: f64,
    cpu_us_per_connect: f64,
    switches_per_connect: f64,
    connect_p50_us: f64,
    connect_p99_us: f64,
    hol_rtt_p50_us: f64,
    hol_rtt_p99_us: f64,
    /// 64-byte round trips on the throughput connection right after its bulk transfer (a
    /// fifth of `rtt_count`).
    rtt_after_bulk_p50_us: f64,
    rtt_after_bulk_p99_us: f64,
    idle_connections: usize,
    /// Per process id given: RSS growth per idle connection, in KiB.
    rss_kib_per_idle_conn: Vec<(u32, f64)>,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::EchoServer { listen } => echo_server(listen).await,
        Command::Run(args) => {
            let report = run(&args).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

async fn echo_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.context("bind")?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_binary() || msg.is_text()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn connect(args: &RunArgs) -> anyhow::Result<Ws> {
    let mut request = args.url.as_str().into_client_request()?;
    if let Some(host) = &args.host {
        request
            .headers_mut()
            .insert(http::header::HOST, host.parse().context("--host")?);
    }
    let uri = request.uri().clone();
    let addr = format!(
        "{}:{}",
        uri.host().context("URL without host")?,
        uri.port_u16().unwrap_or(80)
    );
    let tcp = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        MaybeTlsStream::Plain(tcp),
        Some(ws_config()),
    )
    .await
    .context("WebSocket handshake")?;
    Ok(ws)
}

async fn round_trip(ws: &mut Ws, payload: &[u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    ws.send(Message::binary(payload.to_vec())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == payload.len() => return Ok(start.elapsed()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => bail!("unexpected message {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection closed"),
        }
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let idx = ((samples.len() - 1) as f64 * p).round() as usize;
    samples[idx].as_secs_f64() * 1e6
}

/// The sum, over every thread of `pids`, of what `count` reads from the thread's file `name`
/// under `/proc/PID/task/TID/`.
fn per_thread(pids: &[u32], name: &str, count: impl Fn(&str) -> u64) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join(name)) {
                total += count(&text);
            }
        }
    }
    total
}

/// CPU time (user and system) of every thread of `pids`, in ns (`schedstat`).
fn cpu_ns(pids: &[u32]) -> u64 {
    per_thread(pids, "schedstat", |s| {
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// Context switches (voluntary and not) of every thread of `pids` (`status`).
fn switches(pids: &[u32]) -> u64 {
    per_thread(pids, "status", |s| {
        s.lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    })
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

async fn run(args: &RunArgs) -> anyhow::Result<Report> {
    let small = [7u8; 64];
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    // Latency: 64-byte round trips on one connection (after a short warm-up).
    let mut ws = connect(args).await?;
    for _ in 0..100 {
        round_trip(&mut ws, &small).await?;
    }
    let mut rtts = Vec::with_capacity(args.rtt_count);
    let (cpu_before, switches_before) = (cpu_ns(&args.pids), switches(&args.pids));
    for _ in 0..args.rtt_count {
        rtts.push(round_trip(&mut ws, &small).await?);
    }
    let per_rtt = args.rtt_count.max(1) as f64;
    let cpu_us_per_rtt = cpu_ns(&args.pids).saturating_sub(cpu_before) as f64 / 1e3 / per_rtt;
    let switches_per_rtt = switches(&args.pids).saturating_sub(switches_before) as f64 / per_rtt;
    if args.only_rtt {
        let _ = ws.close(None).await;
        return Ok(Report {
            label: args.label.clone(),
            rtt_p50_us: percentile(&mut rtts, 0.50),
            rtt_p99_us: percentile(&mut rtts, 0.99),
            cpu_us_per_rtt,
            switches_per_rtt,
            ..Report::default()
        });
    }

    // Throughput: 1 MiB messages pipelined, echoed back; counts bytes received.
    let big = vec![42u8; 1 << 20];
    let (mut tx, mut rx) = ws.split();
    let n = args.mib_messages;
    let cpu_before = cpu_ns(&args.pids);
    let start = Instant::now();
    let writer = async {
        for _ in 0..n {
            tx.send(Message::binary(big.clone())).await?;
        }
        anyhow::Ok(tx)
    };
    let reader = async {
        let mut got = 0usize;
        while got < n {
            match rx.next().await {
                Some(Ok(Message::Binary(b))) if b.len() == big.len() => got += 1,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(other)) => bail!("unexpected message {other:?}"),
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed during throughput run"),
            }
        }
        anyhow::Ok(rx)
    };
    let (tx, rx) = tokio::try_join!(writer, reader)?;
    let throughput = n as f64 / start.elapsed().as_secs_f64();
    let cpu_us_per_mib = cpu_ns(&args.pids).saturating_sub(cpu_before) as f64 / 1e3 / n as f64;
    let mut ws = tx.reunite(rx).context("reunite")?;
    let mut after_bulk = Vec::with_capacity(args.rtt_count / 5);
    for _ in 0..(args.rtt_count / 5).max(1) {
        after_bulk.push(round_trip(&mut ws, &small).await?);
    }
    let _ = ws.close(None).await;

    // Connect to first message: a new WebSocket each time, one 64-byte echo.
    let mut connects = Vec::with_capacity(args.connects);
    let (cpu_before, switches_before) = (cpu_ns(&args.pids), switches(&args.pids));
    for _ in 0..args.connects {
        let start = Instant::now();
        let mut ws = connect(args).await?;
        round_trip(&mut ws, &small).await?;
        connects.push(start.elapsed());
        let _ = ws.close(None).await;
    }
    // Includes each connection's close, as a visitor's life does.
    let per_connect = args.connects.max(1) as f64;
    let cpu_us_per_connect =
        cpu_ns(&args.pids).saturating_sub(cpu_before) as f64 / 1e3 / per_connect;
    let switches_per_connect =
        switches(&args.pids).saturating_sub(switches_before) as f64 / per_connect;

    // Head-of-line: 64-byte round trips while another connection streams 1 MiB messages.
    let bulk = connect(args).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let big2 = big.clone();
    let bulk_task = tokio::spawn(async move {
        let (mut tx, mut rx) = bulk.split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if tx.send(Message::binary(big2.clone())).await.is_err() {
                break;
            }
        }
        let _ = tx.close().await;
        drain.abort();
    });
    let mut probe = connect(args).await?;
    let mut hol = Vec::with_capacity(args.rtt_count / 5);
    for _ in 0..(args.rtt_count / 5).max(1) {
        hol.push(round_trip(&mut probe, &small).await?);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = bulk_task.await;
    let _ = probe.close(None).await;

    // Memory: hold idle connections and sample the given processes' RSS.
    let mut rss = Vec::new();
    if args.idle > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before: Vec<u64> = args.pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
        let mut held = Vec::with_capacity(args.idle);
        let burst = vec![9u8; args.idle_burst_bytes];
        for _ in 0..args.idle {
            let mut ws = connect(args).await?;
            round_trip(&mut ws, &small).await?;
            if !burst.is_empty() {
                round_trip(&mut ws, &burst).await?;
            }
            held.push(ws);
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        for (pid, before) in args.pids.iter().zip(before) {
            let after = rss_kib(*pid).unwrap_or(0);
            rss.push((*pid, after.saturating_sub(before) as f64 / args.idle as f64));
        }
        drop(held);
    }

    Ok(Report {
        label: args.label.clone(),
        rtt_p50_us: percentile(&mut rtts, 0.50),
        rtt_p99_us: percentile(&mut rtts, 0.99),
        throughput_mib_s: throughput,
        cpu_us_per_mib,
        cpu_us_per_rtt,
        switches_per_rtt,
        cpu_us_per_connect,
        switches_per_connect,
        connect_p50_us: percentile(&mut connects, 0.50),
        connect_p99_us: percentile(&mut connects, 0.99),
        hol_rtt_p50_us: percentile(&mut hol, 0.50),
        hol_rtt_p99_us: percentile(&mut hol, 0.99),
        rtt_after_bulk_p50_us: percentile(&mut after_bulk, 0.50),
        rtt_after_bulk_p99_us: percentile(&mut after_bulk, 0.99),
        idle_connections: args.idle,
        rss_kib_per_idle_conn: rss,
    })
}
