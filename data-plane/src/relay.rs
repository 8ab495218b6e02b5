//! Relaying an upgraded (WebSocket) connection between a visitor and an agent stream.
//!
//! Bytes pass unchanged in both directions. A [`FrameObserver`] follows each direction so the
//! edge knows frame boundaries: when one side vanishes without a close frame, the other side
//! gets one (1001 for a clean end of stream, 1011 for an error) — but only at a frame boundary,
//! never inside a frame. The same boundary lets the edge ping an idle visitor.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::frame::{
    client_close_frame, close_frame_with_reason, server_close_frame, FrameObserver, FrameStats,
    SERVER_PING_FRAME,
};

/// Close code for "going away" (RFC 6455 §7.4.1).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for "internal error" (RFC 6455 §7.4.1).
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// Close code for "policy violation" (RFC 6455 §7.4.1): a connection stayed over its limit.
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;

/// First size of each relay buffer, in bytes.
const INITIAL_BUFFER: usize = 4096;
/// A relay buffer grown for bulk transfer goes back to [`INITIAL_BUFFER`] after its source has
/// sent nothing for this long, so a connection that once carried a large message does not
/// hold the large buffer for the rest of its life.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The source reached end of stream.
    Eof,
    /// The relay was told to stop (the edge or agent is going away, or the other direction
    /// ended it); handled like [`End::Eof`] except that the source did not vanish.
    Stopped,
    /// Reading the source failed.
    ReadError,
    /// Writing the destination failed.
    WriteError,
    /// The source sent nothing for the idle timeout.
    Idle,
    /// The source stayed over its byte rate for longer than the grace period.
    OverLimit,
}

/// Why the edge itself ended a relay; both sides get a close frame with this code and reason.
#[derive(Debug, Clone)]
struct Verdict {
    code: u16,
    reason: String,
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
    /// How long a direction may stay over `max_bytes_per_second` (the sender kept waiting
    /// the whole time) before the edge closes the connection with 1008 and a reason toward
    /// both sides. Short bursts are only slowed; a sender that never lets up is cut.
    pub rate_limit_grace: Duration,
    pub close_timeout: Duration,
    /// The handshake agreed an extension (`Sec-WebSocket-Extensions` in the 101, such as
    /// permessage-deflate): frames with RSV bits set are then not protocol violations.
    pub extensions_agreed: bool,
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
    relay_observed(visitor, agent, opts, stop, Arc::new(NoSink)).await
}

/// Receives what a relay sees while it runs (the edge's metrics), not only at the end as
/// [`RelayReport`] does. Called from the relay's task: keep it quick.
pub trait RelaySink: Send + Sync {
    /// The counters of direction `dir` grew from `before` to `after`.
    fn frames(&self, dir: Direction, before: &FrameStats, after: &FrameStats);
    /// The edge wrote a close frame of its own with `code` toward the destination of `dir`
    /// (its source vanished, went idle or broke a limit).
    fn injected_close(&self, _dir: Direction, _code: u16) {}
    /// The edge sent a keepalive ping toward the visitor.
    fn ping_sent(&self) {}
    /// The visitor answered the latest keepalive ping with an empty pong after `rtt`.
    fn ping_answered(&self, _rtt: Duration) {}
}

/// A [`RelaySink`] that ignores everything.
struct NoSink;

impl RelaySink for NoSink {
    fn frames(&self, _: Direction, _: &FrameStats, _: &FrameStats) {}
}

/// [`relay`], telling `sink` what passes as it passes.
pub async fn relay_observed<V, A>(
    visitor: V,
    agent: A,
    opts: RelayOptions,
    stop: CancellationToken,
    sink: Arc<dyn RelaySink>,
) -> RelayReport
where
    V: AsyncRead + AsyncWrite + Send + 'static,
    A: AsyncRead + AsyncWrite + Send + 'static,
{
    let (vr, vw) = tokio::io::split(visitor);
    let (ar, aw) = tokio::io::split(agent);
    let mut up_observer = FrameObserver::with_extensions(opts.extensions_agreed);
    let mut down_observer = FrameObserver::with_extensions(opts.extensions_agreed);
    // An idle visitor ends both directions.
    let stop = stop.child_token();
    // Shared by the two directions, which run in this one future: no allocation of its own.
    let shared = Shared::default();
    {
        let up = pump(
            vr,
            aw,
            Direction::ToLocal,
            opts,
            Ends {
                stop: stop.clone(),
                shared: &shared,
                sink: Arc::clone(&sink),
            },
            &mut up_observer,
        );
        let down = pump(
            ar,
            vw,
            Direction::ToVisitor,
            opts,
            Ends {
                stop,
                shared: &shared,
                sink,
            },
            &mut down_observer,
        );
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

/// Size of a relay buffer of `len` bytes after a read of `n` bytes: a read that filled it
/// means bulk transfer, so it grows to `max`; a grown buffer that got less than `initial`
/// means the burst is over (the source had little pending), so it shrinks back. A source that
/// goes quiet after a burst is handled by [`SHRINK_AFTER`] instead (no read, no decision).
fn buffer_len_after_read(len: usize, n: usize, initial: usize, max: usize) -> usize {
    if n == len && len < max {
        max
    } else if len > initial && n < initial {
        initial
    } else {
        len
    }
}

/// One direction of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Visitor → local server: frames are masked (client to server).
    ToLocal,
    /// Local server → visitor: frames are unmasked.
    ToVisitor,
}

impl Direction {
    /// The other direction of the same connection.
    fn reverse(self) -> Self {
        match self {
            Direction::ToLocal => Direction::ToVisitor,
            Direction::ToVisitor => Direction::ToLocal,
        }
    }
}

/// What ends both directions of one relay: a cancel, and why the edge cancelled.
struct Ends<'a> {
    stop: CancellationToken,
    shared: &'a Shared,
    /// Told what passes.
    sink: Arc<dyn RelaySink>,
}

/// What the two directions of one relay know of each other.
#[derive(Default)]
struct Shared {
    /// Why the edge ended the relay, once it has.
    verdict: OnceLock<Verdict>,
    /// When the latest keepalive ping toward the visitor went out, until its pong comes back.
    pinged: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Which directions carried a frame that broke the protocol.
    violated: Violations,
}

/// Per direction: how its source first broke RFC 6455 ([`FrameStats::violation`]'s close
/// code) and when.
#[derive(Default)]
struct Violations {
    to_local: std::sync::Mutex<Option<(u16, tokio::time::Instant)>>,
    to_visitor: std::sync::Mutex<Option<(u16, tokio::time::Instant)>>,
}

impl Violations {
    fn slot(&self, dir: Direction) -> &std::sync::Mutex<Option<(u16, tokio::time::Instant)>> {
        match dir {
            Direction::ToLocal => &self.to_local,
            Direction::ToVisitor => &self.to_visitor,
        }
    }

    fn record(&self, dir: Direction, code: u16) {
        if let Ok(mut v) = self.slot(dir).lock() {
            v.get_or_insert((code, tokio::time::Instant::now()));
        }
    }

    /// The close code of `dir`'s violation if it happened within `recent`: an endpoint fails
    /// the connection at once, so a hang-up long after a violation it tolerated is not one.
    fn recent(&self, dir: Direction, recent: Duration) -> Option<u16> {
        let v = *self.slot(dir).lock().ok()?;
        v.filter(|(_, at)| at.elapsed() <= recent)
            .map(|(code, _)| code)
    }
}

async fn pump<R, W>(
    mut src: R,
    mut dst: W,
    dir: Direction,
    opts: RelayOptions,
    ends: Ends<'_>,
    observer: &mut FrameObserver,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stop = ends.stop;
    // Since when every read has been over the byte rate.
    let mut over_since: Option<tokio::time::Instant> = None;
    // Start small so an idle connection costs little; grow to the full size once a read
    // fills the buffer (bulk transfer), and shrink back when a burst is over.
    let initial = INITIAL_BUFFER.min(opts.buffer);
    let mut buf = vec![0u8; initial];
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
    // When the source last delivered bytes; checked (not reset per read) when `shrink` fires.
    let mut last_read = tokio::time::Instant::now();
    let shrink = tokio::time::sleep(SHRINK_AFTER);
    tokio::pin!(shrink);
    let mut end = loop {
        let read = tokio::select! {
            r = src.read(&mut buf) => r,
            () = stop.cancelled() => break End::Stopped,
            () = &mut silence, if silence_limit.is_some() => break End::Idle,
            () = &mut shrink, if buf.len() > initial => {
                let quiet_since = last_read + SHRINK_AFTER;
                if tokio::time::Instant::now() >= quiet_since {
                    buf = vec![0u8; initial];
                } else {
                    shrink.as_mut().reset(quiet_since);
                }
                continue;
            }
            () = &mut idle, if ping.is_some() => {
                // Keepalive toward the visitor, only between frames.
                if observer.at_boundary()
                    && !observer.stats().closed
                    && (dst.write_all(&SERVER_PING_FRAME).await.is_err()
                        || dst.flush().await.is_err())
                {
                    break End::WriteError;
                }
                if observer.at_boundary() && !observer.stats().closed {
                    ends.sink.ping_sent();
                    if let Ok(mut p) = ends.shared.pinged.lock() {
                        *p = Some(tokio::time::Instant::now());
                    }
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
                let next_len = buffer_len_after_read(buf.len(), n, initial, opts.buffer);
                let before = observer.stats();
                observer.observe(&buf[..n]);
                let after = observer.stats();
                ends.sink.frames(dir, &before, &after);
                if let (Some(code), None) = (after.violation, before.violation) {
                    ends.shared.violated.record(dir, code);
                }
                if after.empty_pongs > before.empty_pongs {
                    let sent = ends.shared.pinged.lock().ok().and_then(|mut p| p.take());
                    if let Some(sent) = sent {
                        ends.sink.ping_answered(sent.elapsed());
                    }
                }
                if dst.write_all(&buf[..n]).await.is_err() || dst.flush().await.is_err() {
                    break End::WriteError;
                }
                total += n as u64;
                if next_len > buf.len() {
                    buf.resize(next_len, 0);
                    shrink
                        .as_mut()
                        .reset(tokio::time::Instant::now() + SHRINK_AFTER);
                } else if next_len < buf.len() {
                    buf = vec![0u8; next_len];
                }
                if buf.len() > initial {
                    last_read = tokio::time::Instant::now();
                }
                if let Some(rate) = opts.max_bytes_per_second.filter(|r| *r > 0) {
                    // Hold the average at `rate`: wait until `total` bytes are due.
                    let due = started + Duration::from_secs_f64(total as f64 / rate as f64);
                    let now = tokio::time::Instant::now();
                    if due > now {
                        let since = *over_since.get_or_insert(now);
                        if now.duration_since(since) >= opts.rate_limit_grace {
                            let _ = ends.shared.verdict.set(Verdict {
                                code: CLOSE_POLICY_VIOLATION,
                                reason: format!("over the tunnel's limit of {rate} bytes/s"),
                            });
                            break End::OverLimit;
                        }
                    } else {
                        over_since = None;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        () = stop.cancelled() => break End::Stopped,
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
    if matches!(end, End::Eof | End::Stopped | End::OverLimit)
        && ends.shared.verdict.get().is_some()
        && !observer.at_boundary()
    {
        // The edge is closing this connection: finish the frame under way (at full speed, at
        // most `close_timeout`) so the close frame lands on a boundary.
        let finished = tokio::time::timeout(opts.close_timeout, async {
            loop {
                let want = observer.bytes_to_boundary().min(buf.len());
                if want == 0 {
                    return true;
                }
                match src.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => {
                        observer.observe(&buf[..n]);
                        if dst.write_all(&buf[..n]).await.is_err() {
                            return false;
                        }
                    }
                }
            }
        })
        .await;
        if !matches!(finished, Ok(true)) {
            end = End::ReadError;
        }
    }
    // The source vanished without a close frame: tell the destination, if we can do so
    // without cutting a frame in half.
    if end != End::WriteError && observer.at_boundary() && !observer.stats().closed {
        // The destination broke the protocol shortly before the source vanished: most likely
        // why it vanished, and its close code (1002 or 1007) is what an endpoint would have
        // sent.
        let destination_broke_protocol = ends
            .shared
            .violated
            .recent(dir.reverse(), opts.close_timeout)
            .filter(|_| matches!(end, End::Eof | End::ReadError));
        let code = match (ends.shared.verdict.get(), destination_broke_protocol) {
            (Some(v), _) => v.code,
            (None, Some(code)) => code,
            (None, None) if matches!(end, End::Eof | End::Stopped | End::Idle) => CLOSE_GOING_AWAY,
            (None, None) => CLOSE_INTERNAL_ERROR,
        };
        ends.sink.injected_close(dir, code);
        let _ = match (ends.shared.verdict.get(), dir) {
            (Some(v), Direction::ToVisitor) => {
                dst.write_all(&close_frame_with_reason(v.code, &v.reason, None))
                    .await
            }
            (Some(v), Direction::ToLocal) => {
                let mask = Some(rand::random());
                dst.write_all(&close_frame_with_reason(v.code, &v.reason, mask))
                    .await
            }
            (None, Direction::ToVisitor) => dst.write_all(&server_close_frame(code)).await,
            (None, Direction::ToLocal) => {
                dst.write_all(&client_close_frame(code, rand::random()))
                    .await
            }
        };
    }
    let _ = dst.shutdown().await;
    if matches!(end, End::Idle | End::OverLimit) {
        stop.cancel();
    }
    if ends.shared.verdict.get().is_some()
        && matches!(end, End::Eof | End::Stopped | End::OverLimit)
    {
        // The edge closed the connection: keep reading (and dropping) what the source still
        // sends, so a peer blocked writing gets to read the close frame and answer it.
        let _ = tokio::time::timeout(opts.close_timeout, async {
            while let Ok(n) = src.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::buffer_len_after_read as next;
    use super::{Direction, Violations};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_violation_explains_a_hang_up_only_shortly_after_it() {
        let v = Violations::default();
        let close_timeout = Duration::from_secs(5);
        assert_eq!(v.recent(Direction::ToLocal, close_timeout), None);
        v.record(Direction::ToLocal, 1007);
        // The first violation stays; the other direction is untouched.
        v.record(Direction::ToLocal, 1002);
        assert_eq!(v.recent(Direction::ToLocal, close_timeout), Some(1007));
        assert_eq!(v.recent(Direction::ToVisitor, close_timeout), None);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(v.recent(Direction::ToLocal, close_timeout), Some(1007));
        // A peer still there long after the violation tolerated it: a later hang-up is not
        // explained by it.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(v.recent(Direction::ToLocal, close_timeout), None);
    }

    #[test]
    fn a_relay_buffer_grows_under_bulk_and_shrinks_when_the_burst_is_over() {
        let (initial, max) = (4096, 65536);
        // Small messages keep the small buffer.
        assert_eq!(next(initial, 100, initial, max), initial);
        // A read that fills it means more is pending: grow.
        assert_eq!(next(initial, initial, initial, max), max);
        // Bulk reads, full or partial but large, keep it grown.
        assert_eq!(next(max, max, initial, max), max);
        assert_eq!(next(max, 20_000, initial, max), max);
        // A short read after a burst: back to the small buffer.
        assert_eq!(next(max, 64, initial, max), initial);
        // A buffer configured smaller than the initial size never changes.
        assert_eq!(next(1024, 1024, 4096, 1024), 1024);
        assert_eq!(next(1024, 10, 4096, 1024), 1024);
    }
}
