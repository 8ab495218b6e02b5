//! Relaying an upgraded (WebSocket) connection between a visitor and an agent stream.
//!
//! Bytes pass unchanged in both directions. A [`FrameObserver`] follows each direction so the
//! edge knows frame boundaries: when one side vanishes without a close frame, the other side
//! gets one (1001 for a clean end of stream, 1011 for an error) — but only at a frame boundary,
//! never inside a frame. The same boundary lets the edge ping an idle visitor.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::frame::{
    client_close_frame, server_close_frame, FrameObserver, FrameStats, SERVER_PING_FRAME,
};

/// Close code for "going away" (RFC 6455 §7.4.1).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for "internal error" (RFC 6455 §7.4.1).
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;

/// First size of each relay buffer, in bytes.
const INITIAL_BUFFER: usize = 4096;

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The source reached end of stream.
    Eof,
    /// Reading the source failed.
    ReadError,
    /// Writing the destination failed.
    WriteError,
    /// The source sent nothing for the idle timeout.
    Idle,
}

/// What went through one relayed connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayReport {
    /// Visitor → local server.
    pub to_local: FrameStats,
    /// Local server → visitor.
    pub to_visitor: FrameStats,
}

/// Options of one relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    pub buffer: usize,
    /// Keepalive ping toward an idle visitor (at frame boundaries only).
    pub ping_interval: Option<Duration>,
    /// Close the connection when the visitor sends nothing for this long.
    pub idle_timeout: Option<Duration>,
    /// Most bytes per second in each direction; `None` is unlimited. Excess is delayed
    /// (backpressure reaches the sender through TCP), never dropped.
    pub max_bytes_per_second: Option<u64>,
    pub close_timeout: Duration,
}

/// Relays `visitor` ↔ `agent` until both directions end (or one ended and the other
/// outlived `close_timeout`).
///
/// Cancelling `stop` ends both directions at once; each destination then gets a 1001 close
/// frame (going away) if it is at a frame boundary.
pub async fn relay<V, A>(
    visitor: V,
    agent: A,
    opts: RelayOptions,
    stop: CancellationToken,
) -> RelayReport
where
    V: AsyncRead + AsyncWrite + Send + 'static,
    A: AsyncRead + AsyncWrite + Send + 'static,
{
    let (vr, vw) = tokio::io::split(visitor);
    let (ar, aw) = tokio::io::split(agent);
    let mut up_observer = FrameObserver::new();
    let mut down_observer = FrameObserver::new();
    // An idle visitor ends both directions.
    let stop = stop.child_token();
    {
        let up = pump(
            vr,
            aw,
            Direction::ToLocal,
            opts,
            stop.clone(),
            &mut up_observer,
        );
        let down = pump(ar, vw, Direction::ToVisitor, opts, stop, &mut down_observer);
        tokio::pin!(up, down);
        // After one direction ends, the other gets `close_timeout` to end by itself — even
        // when close frames already went both ways: cutting it short would drop a stream
        // mid-write, or an HTTP/2 stream whose peer is still open (a CANCEL reset), and
        // either discards bytes already accepted, the close frame among them.
        tokio::select! {
            () = &mut up => {
                let _ = tokio::time::timeout(opts.close_timeout, &mut down).await;
            }
            () = &mut down => {
                let _ = tokio::time::timeout(opts.close_timeout, &mut up).await;
            }
        }
    }
    RelayReport {
        to_local: up_observer.stats(),
        to_visitor: down_observer.stats(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Visitor → local server: frames are masked (client to server).
    ToLocal,
    /// Local server → visitor: frames are unmasked.
    ToVisitor,
}

async fn pump<R, W>(
    mut src: R,
    mut dst: W,
    dir: Direction,
    opts: RelayOptions,
    stop: CancellationToken,
    observer: &mut FrameObserver,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Start small so an idle connection costs little; grow to the full size once a read
    // fills the buffer (bulk transfer).
    let mut buf = vec![0u8; INITIAL_BUFFER.min(opts.buffer)];
    let started = tokio::time::Instant::now();
    let mut total: u64 = 0;
    let ping = if dir == Direction::ToVisitor {
        opts.ping_interval
    } else {
        None
    };
    let idle = tokio::time::sleep(ping.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(idle);
    // Silence from the visitor (the source of the `ToLocal` direction).
    let silence_limit = if dir == Direction::ToLocal {
        opts.idle_timeout
    } else {
        None
    };
    let silence = tokio::time::sleep(silence_limit.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(silence);
    let end = loop {
        let read = tokio::select! {
            r = src.read(&mut buf) => r,
            () = stop.cancelled() => break End::Eof,
            () = &mut silence, if silence_limit.is_some() => break End::Idle,
            () = &mut idle, if ping.is_some() => {
                // Keepalive toward the visitor, only between frames.
                if observer.at_boundary()
                    && !observer.stats().closed
                    && (dst.write_all(&SERVER_PING_FRAME).await.is_err()
                        || dst.flush().await.is_err())
                {
                    break End::WriteError;
                }
                if let Some(p) = ping {
                    idle.as_mut().reset(tokio::time::Instant::now() + p);
                }
                continue;
            }
        };
        match read {
            Ok(0) => break End::Eof,
            Ok(n) => {
                let grow = n == buf.len() && buf.len() < opts.buffer;
                observer.observe(&buf[..n]);
                if dst.write_all(&buf[..n]).await.is_err() || dst.flush().await.is_err() {
                    break End::WriteError;
                }
                total += n as u64;
                if grow {
                    buf.resize(opts.buffer, 0);
                }
                if let Some(rate) = opts.max_bytes_per_second.filter(|r| *r > 0) {
                    // Hold the average at `rate`: wait until `total` bytes are due.
                    let due = started + Duration::from_secs_f64(total as f64 / rate as f64);
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        () = stop.cancelled() => break End::Eof,
                    }
                }
                if let Some(p) = ping {
                    idle.as_mut().reset(tokio::time::Instant::now() + p);
                }
                if let Some(limit) = silence_limit {
                    silence.as_mut().reset(tokio::time::Instant::now() + limit);
                }
            }
            Err(_) => break End::ReadError,
        }
    };
    // The source vanished without a close frame: tell the destination, if we can do so
    // without cutting a frame in half.
    if end != End::WriteError && observer.at_boundary() && !observer.stats().closed {
        let code = if matches!(end, End::Eof | End::Idle) {
            CLOSE_GOING_AWAY
        } else {
            CLOSE_INTERNAL_ERROR
        };
        let _ = match dir {
            Direction::ToVisitor => dst.write_all(&server_close_frame(code)).await,
            Direction::ToLocal => {
                dst.write_all(&client_close_frame(code, rand::random()))
                    .await
            }
        };
    }
    let _ = dst.shutdown().await;
    if end == End::Idle {
        stop.cancel();
    }
}
