//! Relaying an upgraded (WebSocket) connection between a visitor and an agent stream.
//!
//! Bytes pass unchanged in both directions. A [`FrameObserver`] follows each direction so the
//! edge knows frame boundaries: when one side vanishes without a close frame, the other side
//! gets one (1001 for a clean end of stream, 1011 for an error) — but only at a frame boundary,
//! never inside a frame. The same boundary lets the edge ping an idle visitor.

use std::future::{poll_fn, Future as _};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::frame::{
    client_close_frame, close_frame_with_reason, server_close_frame, FrameObserver, FrameStats,
    SERVER_PING_FRAME,
};
use crate::gate::{Cancelled, Gated};

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

/// Default [`RelayOptions::yield_after`]: about one large read (relay buffers grow to 64 KiB).
pub const DEFAULT_YIELD_AFTER: usize = 32 * 1024;

/// Average read size, in bytes, below which a stalled destination's backlog counts as small
/// frames (see [`RelayOptions::stall_buffer`]). Each read of an agent-link stream returns at
/// most one HTTP/2 DATA frame; h2 charges every buffered frame under 256 bytes against one
/// budget for the whole connection. Four times that threshold leaves room for mixed sizes.
pub(crate) const SMALL_FRAMES_BELOW: u64 = 1024;
/// Default [`RelayOptions::stall_buffer`], in bytes.
pub const DEFAULT_STALL_BUFFER: usize = 64 * 1024;

/// What the relays of one agent link may leave waiting in h2 as small DATA frames, in h2's
/// own units (each frame under 256 bytes costs 256 minus its size). A direction whose
/// backlog is full of small frames and whose reader is slow (not stopped) stops reading, and
/// up to one stream window of small frames can then wait in h2: before pausing it reserves
/// that worst case here, and when the budget has no room left it ends its connection instead
/// (1008). h2 ends the whole link when its own budget (half the connection window) runs out;
/// this one is a quarter of the connection window, so paused streams can never get there.
///
/// It also keeps readers that stopped from taking the link's whole connection window: what
/// waits unread in h2 for one stream (up to a stream window) counts against the window of the
/// whole connection, so enough stopped readers would leave no window for any other stream and
/// freeze every tunnel on the link. A reader whose backlog stays full with nothing taken for
/// [`LinkBudget::stopped_after`] holds one stream window of [`LinkBudget::hold_window`]'s
/// half of the connection window until it takes something again; with no room left, its
/// WebSocket or body is ended instead.
#[derive(Debug)]
pub struct LinkBudget {
    left: std::sync::atomic::AtomicI64,
    /// Bytes of the connection window that stopped readers may still hold.
    windows_left: std::sync::atomic::AtomicI64,
    /// The per-stream flow-control window the peer sends into, in bytes.
    stream_window: u32,
    /// How long a full backlog may see nothing taken before its reader counts as stopped.
    pub stopped_after: Duration,
}

/// Default [`LinkBudget::stopped_after`].
pub const DEFAULT_STOPPED_READER_GRACE: Duration = Duration::from_millis(1000);

impl LinkBudget {
    /// The budget of a link with these HTTP/2 windows (what this side advertises).
    pub fn new(connection_window: u32, stream_window: u32, stopped_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            left: std::sync::atomic::AtomicI64::new(i64::from(connection_window / 4)),
            windows_left: std::sync::atomic::AtomicI64::new(i64::from(connection_window / 2)),
            stream_window,
            stopped_after,
        })
    }

    /// Takes one stream window of the connection window for a stopped reader; false when
    /// stopped readers already hold half of it.
    pub(crate) fn hold_window(&self) -> bool {
        use std::sync::atomic::Ordering;
        let w = i64::from(self.stream_window);
        self.windows_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= w).then_some(left - w)
            })
            .is_ok()
    }

    /// Gives back what [`LinkBudget::hold_window`] took.
    pub(crate) fn release_window(&self) {
        self.windows_left.fetch_add(
            i64::from(self.stream_window),
            std::sync::atomic::Ordering::AcqRel,
        );
    }

    /// What one paused stream of reads of `avg` bytes may cost at most: a stream window of
    /// such frames.
    fn worst_case(&self, avg: u64) -> i64 {
        let avg = avg.max(1);
        let per_frame = 256u64.saturating_sub(avg);
        let frames = u64::from(self.stream_window).div_ceil(avg);
        i64::try_from(frames.saturating_mul(per_frame)).unwrap_or(i64::MAX)
    }

    fn try_take(&self, cost: i64) -> bool {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= cost).then_some(left - cost)
            })
            .is_ok()
    }

    fn give(&self, cost: i64) {
        self.left
            .fetch_add(cost, std::sync::atomic::Ordering::AcqRel);
    }
}

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
    /// The destination stopped reading while the source (an agent-link stream) kept sending
    /// small frames; see [`RelayOptions::stall_buffer`].
    Stalled,
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
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub buffer: usize,
    /// Keepalive ping toward an idle visitor (at frame boundaries only).
    pub ping_interval: Option<Duration>,
    /// Close the connection when the visitor sends nothing for this long.
    pub idle_timeout: Option<Duration>,
    /// Most bytes per second in each direction; `None` is unlimited. Excess is delayed
    /// (backpressure reaches the sender through TCP), never dropped. In the
    /// [`RelayOptions::link_source`] direction the relay keeps reading into its backlog and
    /// delays the writes, so the source's frames wait there and not in h2; a backlog full of
    /// small frames that the link's budget has no room to pause is closed with 1008 as over
    /// the limit.
    pub max_bytes_per_second: Option<u64>,
    /// How long a direction may stay over `max_bytes_per_second` (the sender kept waiting
    /// the whole time) before the edge closes the connection with 1008 and a reason toward
    /// both sides. Short bursts are only slowed; a sender that never lets up is cut.
    pub rate_limit_grace: Duration,
    pub close_timeout: Duration,
    /// The handshake agreed an extension (`Sec-WebSocket-Extensions` in the 101, such as
    /// permessage-deflate): frames with RSV bits set are then not protocol violations.
    pub extensions_agreed: bool,
    /// The direction whose source is a stream of the agent link (HTTP/2), if any: on the
    /// edge [`Direction::ToVisitor`], in the agent [`Direction::ToLocal`].
    pub link_source: Option<Direction>,
    /// In the [`RelayOptions::link_source`] direction, how many bytes the relay keeps reading
    /// into a backlog of its own while the destination does not take them. Left in h2 instead,
    /// a backlog of small DATA frames counts against h2's connection-wide budget for framing
    /// overhead, and h2 ends the whole agent connection (every tunnel on it) with
    /// ENHANCE_YOUR_CALM once one stalled reader has enough of them. When the backlog reaches
    /// this size, a direction that has been receiving small frames (under
    /// [`SMALL_FRAMES_BELOW`] bytes a read on average) and whose destination took nothing
    /// while the second half filled is ended with 1008 toward its source's side; otherwise
    /// (large frames, or a reader that is slow but still reading) it stops reading, as any
    /// other direction does, and lets flow control hold the sender. `0` turns the backlog off.
    pub stall_buffer: usize,
    /// The agent link's [`LinkBudget`], shared by its relays; without one a slow reader of
    /// small frames is paused without limit.
    pub link_budget: Option<Arc<LinkBudget>>,
    /// Bytes one direction moves without its source ever making it wait before it yields to
    /// the scheduler (`tokio::task::yield_now`, which lets the worker look for I/O events
    /// first). A bulk transfer whose source always has data ready would otherwise keep its
    /// worker thread for Tokio's whole cooperative budget of 128 reads (up to 8 MiB at 64 KiB
    /// a read) while a small message of another connection waits on the same thread.
    /// `0` never yields.
    pub yield_after: usize,
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
pub struct NoSink;

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
    relay_halves(vr, vw, ar, aw, opts, stop, sink).await
}

/// [`relay_observed`] over streams already split into their read and write halves: a TCP
/// stream's own halves (`TcpStream::into_split`) cost less per message than
/// `tokio::io::split`, which locks the stream on every read and write.
#[allow(clippy::too_many_arguments)]
pub async fn relay_halves<VR, VW, AR, AW>(
    vr: VR,
    vw: VW,
    ar: AR,
    aw: AW,
    opts: RelayOptions,
    stop: CancellationToken,
    sink: Arc<dyn RelaySink>,
) -> RelayReport
where
    VR: AsyncRead + Unpin,
    VW: AsyncWrite + Unpin,
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
{
    let mut up_observer = FrameObserver::with_extensions(opts.extensions_agreed);
    let mut down_observer = FrameObserver::with_extensions(opts.extensions_agreed);
    // An idle visitor ends both directions.
    let stop = stop.child_token();
    // Shared by the two directions, which run in this one future: no allocation of its own.
    let shared = Shared::default();
    {
        // Each direction is polled only when what it waits on woke it: a message in one
        // direction does not make the other read its quiet source and poll its timers again
        // (about 5 % of a round trip's instructions, BENCHMARKS.md).
        let mut up = Gated::new(Box::pin(pump(
            vr,
            aw,
            Direction::ToLocal,
            &opts,
            Ends {
                stop: stop.clone(),
                shared: &shared,
                sink: Arc::clone(&sink),
            },
            &mut up_observer,
        )));
        let mut down = Gated::new(Box::pin(pump(
            ar,
            vw,
            Direction::ToVisitor,
            &opts,
            Ends {
                stop,
                shared: &shared,
                sink,
            },
            &mut down_observer,
        )));
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

/// A TCP stream as the two halves [`relay_halves`] takes, `prefix` (bytes already read from
/// it, such as what hyper read past a request head) coming first.
pub fn tcp_halves(tcp: TcpStream, prefix: Bytes) -> (Prefixed<OwnedReadHalf>, KeepOpen) {
    let (r, w) = tcp.into_split();
    (Prefixed::new(prefix, r), KeepOpen(Some(w)))
}

/// A reader that gives `prefix` before what `inner` reads.
pub struct Prefixed<R> {
    prefix: Bytes,
    inner: R,
}

impl<R> Prefixed<R> {
    pub fn new(prefix: Bytes, inner: R) -> Self {
        let mut p = Self { prefix, inner };
        p.release_if_done();
        p
    }

    /// An empty prefix may still hold the whole buffer it was split from (hyper's read
    /// buffer, 8 KiB or more): let it go, an idle connection keeps none of it.
    fn release_if_done(&mut self) {
        if self.prefix.is_empty() {
            self.prefix = Bytes::new();
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        self.release_if_done();
        Poll::Ready(Ok(()))
    }
}

/// A TCP stream's write half that, dropped, leaves the stream open until its read half is
/// dropped too, as a half of `tokio::io::split` does (an `OwnedWriteHalf` would send a FIN):
/// the relay decides when a destination is shut down.
pub struct KeepOpen(Option<OwnedWriteHalf>);

impl Drop for KeepOpen {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.forget();
        }
    }
}

impl KeepOpen {
    /// The half (only `drop` takes it).
    fn half(&mut self) -> io::Result<Pin<&mut OwnedWriteHalf>> {
        self.0
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "write half dropped"))
    }
}

impl AsyncWrite for KeepOpen {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.half() {
            Ok(w) => w.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.half() {
            Ok(w) => w.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.half() {
            Ok(w) => w.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.half() {
            Ok(w) => w.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
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
    /// Who reads what this direction carries.
    fn destination(self) -> &'static str {
        match self {
            Direction::ToLocal => "local server",
            Direction::ToVisitor => "visitor",
        }
    }

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

/// Bytes read from the source that the destination has not taken yet (only in the
/// [`RelayOptions::link_source`] direction).
#[derive(Default)]
struct Held {
    bytes: BytesMut,
    /// Written to the destination but not flushed yet.
    unflushed: bool,
    /// Reads, and their bytes, since the destination fell behind.
    reads: u64,
    read_bytes: u64,
    /// Bytes the destination took since the backlog was last at most half full: a reader
    /// that is slow but still reading is not one that stopped.
    taken: u64,
    /// Bytes the destination took since the backlog last emptied.
    progress: u64,
    /// The sizes of the last [`RECENT_READS`] reads, oldest overwritten first: a source that
    /// switches from large frames to small ones shows it here long before in the average of
    /// every read since the destination fell behind.
    recent: [u32; RECENT_READS],
    /// Reads pushed into `recent`, up to [`RECENT_READS`].
    recent_len: usize,
}

/// How many of the latest reads [`Held`] averages besides all of them.
const RECENT_READS: usize = 4;

impl Held {
    /// Whether the destination still has to take (or flush) something.
    fn is_pending(&self) -> bool {
        !self.bytes.is_empty() || self.unflushed
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        self.count_read(data.len());
    }

    fn count_read(&mut self, len: usize) {
        self.reads += 1;
        self.read_bytes += len as u64;
        self.recent[(self.reads as usize - 1) % RECENT_READS] =
            u32::try_from(len).unwrap_or(u32::MAX);
        self.recent_len = (self.recent_len + 1).min(RECENT_READS);
    }

    /// Whether the backlog came in small frames (reads) on average.
    fn small_frames(&self) -> bool {
        self.reads > 0 && self.read_bytes / self.reads < SMALL_FRAMES_BELOW
    }

    /// The smaller of the average read since the destination fell behind and that of the
    /// last few reads: what pausing must expect the source to send while it waits in h2.
    fn frame_size_lately(&self) -> u64 {
        let all = self.read_bytes / self.reads.max(1);
        let recent = &self.recent[..self.recent_len];
        if recent.is_empty() {
            return all;
        }
        let lately = recent.iter().map(|&n| u64::from(n)).sum::<u64>() / recent.len() as u64;
        all.min(lately)
    }

    /// Whether the backlog's frames are small on average or have been lately.
    fn small_frames_lately(&self) -> bool {
        self.reads > 0 && self.frame_size_lately() < SMALL_FRAMES_BELOW
    }

    /// Whether the relay should end the connection now that the backlog is full: it came in
    /// small frames and the destination took nothing while its second half filled. A full
    /// backlog of large frames, or one a slow reader is still working through, only stops the
    /// reading, as a full relay buffer always did.
    fn stalled_on_small_frames(&self, stall_buffer: usize) -> bool {
        self.bytes.len() >= stall_buffer && self.small_frames() && self.taken == 0
    }
}

/// Reserves in `budget` what pausing `held`'s direction may leave in h2 (see [`LinkBudget`]),
/// into `reserved`; false when the budget has no room for it. Without a budget, pausing is
/// always allowed.
fn pause_within(budget: Option<&LinkBudget>, held: &Held, reserved: &mut i64) -> bool {
    let Some(budget) = budget else {
        return true;
    };
    let cost = budget.worst_case(held.frame_size_lately());
    if cost == 0 || budget.try_take(cost) {
        *reserved = cost;
        true
    } else {
        false
    }
}

/// Watches a full backlog for a reader that stopped (see [`LinkBudget`]): polled while the
/// backlog is full, it checks every [`LinkBudget::stopped_after`] whether the reader took
/// anything since the last check. A reader that took nothing holds one stream window of the
/// link's budget until it takes something again or the backlog is no longer full.
pub(crate) struct StoppedWatch {
    budget: Arc<LinkBudget>,
    /// Made the first time the backlog is full: most connections never need it.
    check: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    /// What the reader had taken at the last check.
    mark: u64,
    holding: bool,
}

impl StoppedWatch {
    pub(crate) fn new(budget: Arc<LinkBudget>) -> Self {
        Self {
            check: None,
            budget,
            armed: false,
            mark: 0,
            holding: false,
        }
    }

    /// The backlog is full and its reader has taken `taken` bytes so far (a running count).
    /// `Ready(())` means the reader stopped and the link has no room for it: end the stream.
    /// Registers `cx` for the next check.
    pub(crate) fn poll_full(&mut self, taken: u64, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if !self.armed {
                self.arm(taken);
            }
            let Some(check) = self.check.as_mut() else {
                return Poll::Pending;
            };
            if check.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.armed = false;
            if taken != self.mark {
                // Slow, not stopped.
                self.release();
            } else if !self.holding {
                if !self.budget.hold_window() {
                    return Poll::Ready(());
                }
                self.holding = true;
            }
        }
    }

    /// The backlog is not full (any more): nothing to watch, nothing held.
    pub(crate) fn not_full(&mut self) {
        self.armed = false;
        self.release();
    }

    fn arm(&mut self, taken: u64) {
        let at = tokio::time::Instant::now() + self.budget.stopped_after;
        match self.check.as_mut() {
            Some(c) => c.as_mut().reset(at),
            None => self.check = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.mark = taken;
        self.armed = true;
    }

    fn release(&mut self) {
        if self.holding {
            self.budget.release_window();
            self.holding = false;
        }
    }
}

impl Drop for StoppedWatch {
    fn drop(&mut self) {
        self.release();
    }
}

/// The byte rate of a direction that reads ahead into its backlog: its writes wait until the
/// bytes written so far are due, its reads do not. Holding the reads instead would leave the
/// source's frames waiting in h2, where small ones count against the whole link's budget.
struct Pace {
    rate: u64,
    /// Most bytes one write may take: about 20 ms at the rate, so a backlog leaves at the
    /// rate rather than in one burst after each wait.
    quantum: usize,
    started: tokio::time::Instant,
    written: u64,
    /// Until when the next write waits, once armed.
    wait: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl Pace {
    fn new(rate: u64, started: tokio::time::Instant, max_write: usize) -> Self {
        let quantum = usize::try_from(rate / 50).unwrap_or(usize::MAX);
        Self {
            rate,
            quantum: quantum.clamp(1024, max_write.max(1024)),
            started,
            written: 0,
            wait: Box::pin(tokio::time::sleep_until(started)),
            waiting: false,
        }
    }

    /// Counts `k` bytes written; the next write waits until they are due.
    fn wrote(&mut self, k: usize) {
        self.written += k as u64;
        let due = self.started + Duration::from_secs_f64(self.written as f64 / self.rate as f64);
        if due > tokio::time::Instant::now() {
            self.wait.as_mut().reset(due);
            self.waiting = true;
        }
    }

    /// Whether a write must wait now (registering `cx` for when it may go on).
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> bool {
        if self.waiting && self.wait.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.waiting = false;
        false
    }

    /// Whether writes are held back by the rate (not by the destination) at this moment.
    fn holding(&self) -> bool {
        self.waiting && tokio::time::Instant::now() < self.wait.deadline()
    }
}

/// What [`poll_step`] got done.
enum Step {
    /// A read of the source finished.
    Read(io::Result<usize>),
    /// The destination took the whole backlog.
    CaughtUp,
    /// Writing the backlog failed.
    WriteFailed,
    /// The destination stopped reading and the link has no room for one more such stream.
    Stopped,
}

/// What holds back, or watches, the writes of [`poll_step`].
struct Watch<'a> {
    pace: Option<&'a mut Pace>,
    stopped: Option<&'a mut StoppedWatch>,
}

/// Moves the backlog on toward `dst` as far as it goes (and `pace` lets it), then reads `src`
/// unless the backlog is full (without a backlog: just reads `src`).
fn poll_step<R, W>(
    src: &mut R,
    dst: &mut W,
    buf: &mut [u8],
    held: &mut Held,
    stall_buffer: usize,
    watch: Watch<'_>,
    cx: &mut Context<'_>,
) -> Poll<Step>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Watch { mut pace, stopped } = watch;
    let mut gated = false;
    while held.is_pending() {
        gated = match pace.as_deref_mut() {
            Some(p) => p.poll_closed(cx),
            None => false,
        };
        if held.bytes.is_empty() || gated {
            if !held.unflushed {
                break;
            }
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) if held.bytes.is_empty() => {
                    // Give the memory back: a stall is rare and the backlog may have grown.
                    *held = Held::default();
                    return Poll::Ready(Step::CaughtUp);
                }
                Poll::Ready(Ok(())) => {
                    held.unflushed = false;
                    break;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Step::WriteFailed),
                Poll::Pending => break,
            }
        }
        let len = pace
            .as_deref()
            .map_or(held.bytes.len(), |p| held.bytes.len().min(p.quantum));
        match Pin::new(&mut *dst).poll_write(cx, &held.bytes[..len]) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Step::WriteFailed),
            Poll::Ready(Ok(k)) => {
                held.bytes.advance(k);
                held.unflushed = true;
                held.taken = if held.bytes.len() <= stall_buffer / 2 {
                    0
                } else {
                    held.taken + k as u64
                };
                held.progress += k as u64;
                if let Some(p) = pace.as_deref_mut() {
                    p.wrote(k);
                }
            }
            Poll::Pending => break,
        }
    }
    let full = held.is_pending() && held.bytes.len() >= stall_buffer;
    if let Some(w) = stopped {
        if !full || gated {
            // Not waiting on the reader (the byte rate holds the writes back, if anything).
            w.not_full();
        } else if w.poll_full(held.progress, cx).is_ready() {
            return Poll::Ready(Step::Stopped);
        }
    }
    if full {
        return Poll::Pending;
    }
    let mut rb = ReadBuf::new(buf);
    match Pin::new(src).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => Poll::Ready(Step::Read(Ok(rb.filled().len()))),
        Poll::Ready(Err(e)) => Poll::Ready(Step::Read(Err(e))),
        Poll::Pending => Poll::Pending,
    }
}

/// Writes `data` to `dst` as far as `dst` takes it without waiting and flushes; what is left
/// (or the flush) becomes the backlog in `held`.
fn poll_write_now<W>(
    dst: &mut W,
    data: &[u8],
    held: &mut Held,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>>
where
    W: AsyncWrite + Unpin,
{
    let mut off = 0;
    while off < data.len() {
        match Pin::new(&mut *dst).poll_write(cx, &data[off..]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(k)) => off += k,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                held.bytes.extend_from_slice(&data[off..]);
                held.count_read(data.len());
                held.unflushed = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
    match Pin::new(&mut *dst).poll_flush(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => {
            held.unflushed = true;
            Poll::Ready(Ok(()))
        }
    }
}

async fn pump<R, W>(
    mut src: R,
    mut dst: W,
    dir: Direction,
    opts: &RelayOptions,
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
    // What the destination has not taken yet, in the direction that keeps reading its source.
    let mut held = Held::default();
    let stall_buffer = if opts.link_source == Some(dir) {
        opts.stall_buffer
    } else {
        0
    };
    let started = tokio::time::Instant::now();
    let mut total: u64 = 0;
    // Bytes moved since this direction last waited for its source or yielded.
    let mut since_yield = 0usize;
    let rate = opts.max_bytes_per_second.filter(|r| *r > 0);
    // With a backlog, the byte rate holds back the writes and the reads go on.
    let mut pace = rate
        .filter(|_| stall_buffer > 0)
        .map(|r| Box::new(Pace::new(r, started, opts.buffer)));
    // A reader that stops must not hold the link's connection window for ever.
    let mut stopped = opts
        .link_budget
        .as_ref()
        .filter(|_| stall_buffer > 0)
        .map(|b| StoppedWatch::new(Arc::clone(b)));
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
    // When the source last delivered bytes. The timers above are not reset per read (that
    // costs a clock read and a timer update per message): when one fires it compares its
    // deadline with this and waits again if bytes came meanwhile.
    let mut last_read = tokio::time::Instant::now();
    // When the last keepalive ping went to the visitor.
    let mut last_ping = last_read;
    // Registered once; cheap to poll on every message.
    let cancelled = Cancelled::new(&stop);
    tokio::pin!(cancelled);
    let shrink = tokio::time::sleep(SHRINK_AFTER);
    tokio::pin!(shrink);
    // What this direction reserved of the link's budget while paused on small frames.
    let mut reserved: i64 = 0;
    let mut end = loop {
        if reserved > 0 && held.bytes.len() < stall_buffer {
            // Reading again: no small frames of ours wait in h2 any more.
            if let Some(b) = &opts.link_budget {
                b.give(reserved);
            }
            reserved = 0;
        }
        let read = tokio::select! {
            // Bytes first: while they keep coming none of the other branches can fire (the
            // timers measure quiet, and `stop` is also checked at every yield below).
            biased;
            step = poll_fn(|cx| {
                let r = poll_step(&mut src, &mut dst, &mut buf, &mut held, stall_buffer, Watch { pace: pace.as_deref_mut(), stopped: stopped.as_mut() }, cx);
                if r.is_pending() {
                    since_yield = 0;
                }
                r
            }) => {
                match step {
                    Step::Read(r) => r,
                    Step::CaughtUp => continue,
                    Step::WriteFailed => break End::WriteError,
                    Step::Stopped => {
                        let _ = ends.shared.verdict.set(Verdict {
                            code: CLOSE_POLICY_VIOLATION,
                            reason: format!("the {} stopped reading", dir.destination()),
                        });
                        tracing::warn!(
                            held = held.bytes.len(),
                            "the {} of a WebSocket took nothing for {:?} with its backlog \
                             full, and readers that stopped already hold half of the agent \
                             link's HTTP/2 connection window; closing it (1008) so the other \
                             tunnels on the link keep their window",
                            dir.destination(),
                            opts.link_budget.as_ref().map(|b| b.stopped_after).unwrap_or_default()
                        );
                        break End::Stalled;
                    }
                }
            }
            () = &mut cancelled => break End::Stopped,
            () = &mut silence, if silence_limit.is_some() => {
                let quiet_until = last_read + silence_limit.unwrap_or_default();
                if tokio::time::Instant::now() >= quiet_until {
                    break End::Idle;
                }
                silence.as_mut().reset(quiet_until);
                continue;
            }
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
                let due = last_read.max(last_ping) + ping.unwrap_or_default();
                if tokio::time::Instant::now() < due {
                    idle.as_mut().reset(due);
                    continue;
                }
                // Keepalive toward the visitor, only between frames (and behind every byte
                // already read: none may be waiting in the backlog).
                if observer.at_boundary()
                    && !held.is_pending()
                    && !observer.stats().closed
                    && (dst.write_all(&SERVER_PING_FRAME).await.is_err()
                        || dst.flush().await.is_err())
                {
                    break End::WriteError;
                }
                if observer.at_boundary() && !held.is_pending() && !observer.stats().closed {
                    ends.sink.ping_sent();
                    if let Ok(mut p) = ends.shared.pinged.lock() {
                        *p = Some(tokio::time::Instant::now());
                    }
                }
                last_ping = tokio::time::Instant::now();
                if let Some(p) = ping {
                    idle.as_mut().reset(last_ping + p);
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
                if held.is_pending() || pace.is_some() {
                    held.push(&buf[..n]);
                    let paced = pace.as_ref().is_some_and(|p| p.holding());
                    if !paced && held.stalled_on_small_frames(stall_buffer) {
                        let _ = ends.shared.verdict.set(Verdict {
                            code: CLOSE_POLICY_VIOLATION,
                            reason: format!("the {} stopped reading", dir.destination()),
                        });
                        tracing::warn!(
                            held = held.bytes.len(),
                            reads = held.reads,
                            "the {} of a WebSocket stopped reading while small messages kept \
                             coming; closing it (1008) before the agent link's HTTP/2 budget for \
                             small frames runs out",
                            dir.destination()
                        );
                        break End::Stalled;
                    }
                    if reserved == 0
                        && held.bytes.len() >= stall_buffer
                        && held.small_frames_lately()
                        && !pause_within(opts.link_budget.as_deref(), &held, &mut reserved)
                    {
                        if let (true, Some(rate)) = (paced, rate) {
                            let _ = ends.shared.verdict.set(Verdict {
                                code: CLOSE_POLICY_VIOLATION,
                                reason: format!("over the tunnel's limit of {rate} bytes/s"),
                            });
                            tracing::warn!(
                                held = held.bytes.len(),
                                reads = held.reads,
                                "a WebSocket's small messages toward the {} came faster than \
                                 the tunnel's limit of {rate} bytes/s for longer than its backlog \
                                 holds, and the agent link has no room left for more of them \
                                 waiting in HTTP/2; closing it (1008)",
                                dir.destination()
                            );
                            break End::OverLimit;
                        }
                        let _ = ends.shared.verdict.set(Verdict {
                            code: CLOSE_POLICY_VIOLATION,
                            reason: format!(
                                "the {} reads too slowly for the small messages it is sent",
                                dir.destination()
                            ),
                        });
                        tracing::warn!(
                            held = held.bytes.len(),
                            reads = held.reads,
                            "the {} of a WebSocket reads too slowly for the small messages it is \
                             sent, and the agent link has no room left for more of them waiting in \
                             HTTP/2; closing it (1008)",
                            dir.destination()
                        );
                        break End::Stalled;
                    }
                } else if stall_buffer > 0 {
                    if poll_fn(|cx| poll_write_now(&mut dst, &buf[..n], &mut held, cx))
                        .await
                        .is_err()
                    {
                        break End::WriteError;
                    }
                } else if dst.write_all(&buf[..n]).await.is_err() || dst.flush().await.is_err() {
                    break End::WriteError;
                }
                total += n as u64;
                since_yield += n;
                if opts.yield_after > 0 && since_yield >= opts.yield_after {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                    if stop.is_cancelled() {
                        break End::Stopped;
                    }
                }
                if next_len > buf.len() {
                    buf.resize(next_len, 0);
                    shrink
                        .as_mut()
                        .reset(tokio::time::Instant::now() + SHRINK_AFTER);
                } else if next_len < buf.len() {
                    buf = vec![0u8; next_len];
                }
                last_read = tokio::time::Instant::now();
                if let Some(rate) = rate {
                    // Hold the average at `rate`: wait until `total` bytes are due (with a
                    // backlog, `pace` makes the writes wait instead).
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
                    if pace.is_none() {
                        tokio::select! {
                            () = tokio::time::sleep_until(due) => {}
                            () = stop.cancelled() => break End::Stopped,
                        }
                    }
                }
            }
            Err(_) => break End::ReadError,
        }
    };
    if reserved > 0 {
        if let Some(b) = &opts.link_budget {
            b.give(reserved);
        }
    }
    // The destination was given up on while the edge closed the connection: it gets nothing
    // more, but the connection still ends as the verdict says.
    let mut cut = false;
    if held.is_pending() && end != End::WriteError && end != End::Stalled {
        // Bytes read but not yet taken by the destination go out before anything else: at
        // the byte rate's next turn when the source ended by itself, at once when the edge
        // is closing the connection.
        if let (End::Eof, Some(p)) = (end, &pace) {
            if p.holding() {
                tokio::select! {
                    () = tokio::time::sleep_until(p.wait.deadline()) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
        let bytes = std::mem::take(&mut held.bytes);
        let closing =
            matches!(end, End::OverLimit | End::Stopped) && ends.shared.verdict.get().is_some();
        if !closing {
            if dst.write_all(&bytes).await.is_err() || dst.flush().await.is_err() {
                end = End::WriteError;
            }
        } else {
            // The edge is closing: the backlog goes out within `close_timeout` (a destination
            // that stopped reading meanwhile must not hold the relay for ever), and the source
            // is read all the while, so what it still sends does not wait in h2 (small frames
            // there would spend the link's budget). Of what it sends, the rest of the frame
            // under way is kept, for the close frame to land on a boundary; the rest is dropped,
            // as it would be after the close.
            let mut tail = Vec::new();
            let tail_cap = stall_buffer.max(buf.len());
            let mut src_done = false;
            let write = async {
                dst.write_all(&bytes).await?;
                dst.flush().await
            };
            let mut write = std::pin::pin!(write);
            let deadline = tokio::time::sleep(opts.close_timeout);
            let mut deadline = std::pin::pin!(deadline);
            loop {
                tokio::select! {
                    r = &mut write => {
                        if r.is_err() {
                            end = End::WriteError;
                        }
                        break;
                    }
                    // The rest of a large frame waits in the source beyond the tail's cap.
                    r = src.read(&mut buf), if !src_done && tail.len() < tail_cap => match r {
                        Ok(0) | Err(_) => src_done = true,
                        Ok(n) => {
                            let keep = observer.bytes_to_boundary().min(n);
                            observer.observe(&buf[..keep]);
                            tail.extend_from_slice(&buf[..keep]);
                        }
                    },
                    () = &mut deadline => {
                        tracing::debug!(
                            "the {} took too long to take the rest of its backlog; dropping it",
                            dir.destination()
                        );
                        cut = true;
                        break;
                    }
                }
            }
            if end != End::WriteError
                && !cut
                && !tail.is_empty()
                && (dst.write_all(&tail).await.is_err() || dst.flush().await.is_err())
            {
                end = End::WriteError;
            }
        }
    }
    if matches!(end, End::Eof | End::Stopped | End::OverLimit)
        && !cut
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
    // A stalled destination gets nothing more: writing to it would wait for ever.
    if !matches!(end, End::WriteError | End::Stalled)
        && !cut
        && observer.at_boundary()
        && !observer.stats().closed
    {
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
    if end != End::Stalled && !cut {
        let _ = dst.shutdown().await;
    }
    if matches!(end, End::Idle | End::OverLimit | End::Stalled) {
        stop.cancel();
    }
    if ends.shared.verdict.get().is_some()
        && matches!(end, End::Eof | End::Stopped | End::OverLimit | End::Stalled)
    {
        // The edge closed the connection: keep reading (and dropping) what the source still
        // sends, so a peer blocked writing gets to read the close frame and answer it — and,
        // after a stall, so the source's small frames do not pile up in h2 after all.
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
    use super::{tcp_halves, Direction, Violations};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_read_ahead_buffer_is_let_go_once_its_bytes_are_read() {
        // As hyper hands over what it read past a head: pieces split off one read buffer.
        let mut buf = bytes::BytesMut::with_capacity(8192);
        buf.extend_from_slice(b"head");
        let head = buf.split().freeze();
        let empty = buf.split().freeze();
        buf.extend_from_slice(b"ab");
        let ahead = buf.split().freeze();
        drop(buf);
        // An empty read-ahead still shares the buffer: the relay must not keep it.
        let p = super::Prefixed::new(empty, tokio::io::empty());
        let mut p2 = super::Prefixed::new(ahead, tokio::io::empty());
        assert!(
            !head.is_unique(),
            "the read-ahead should share the buffer before it is read"
        );
        let mut got = Vec::new();
        p2.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ab");
        assert!(
            head.is_unique(),
            "a read-ahead (empty, or read) still holds the buffer"
        );
        drop((p, p2));
    }

    #[tokio::test]
    async fn tcp_halves_read_the_prefix_first_and_leave_the_stream_open_until_both_drop() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = tcp_halves(ours, bytes::Bytes::from_static(b"read ahead|"));
        peer.write_all(b"then the socket").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        while got.len() < b"read ahead|then the socket".len() {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "ended early after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"read ahead|then the socket");
        w.write_all(b"back").await.unwrap();
        // The write half dropped alone sends no FIN: the peer reads what was written, then
        // nothing (not an end of stream) while the read half lives.
        drop(w);
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        let mut one = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), peer.read(&mut one))
                .await
                .is_err(),
            "the stream ended with only its write half dropped"
        );
        drop(r);
        let n = tokio::time::timeout(Duration::from_secs(5), peer.read(&mut one))
            .await
            .expect("no end of stream after both halves dropped")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

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

#[cfg(test)]
mod stall_tests {
    use super::{relay, Direction, RelayOptions};
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    /// An agent-link stream stand-in: each read returns one chunk sent on the channel (as one
    /// HTTP/2 DATA frame would), writes are collected.
    struct Chunks {
        rx: mpsc::UnboundedReceiver<Vec<u8>>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => {
                    assert!(chunk.len() <= buf.remaining());
                    buf.put_slice(&chunk);
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(None) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Chunks {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.written.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    pub(super) fn opts() -> RelayOptions {
        RelayOptions {
            buffer: 64 * 1024,
            ping_interval: None,
            idle_timeout: None,
            max_bytes_per_second: None,
            rate_limit_grace: Duration::from_secs(1),
            close_timeout: Duration::from_millis(200),
            extensions_agreed: false,
            link_source: Some(Direction::ToVisitor),
            stall_buffer: 16 * 1024,
            link_budget: None,
            yield_after: super::DEFAULT_YIELD_AFTER,
        }
    }

    /// [`opts`] with a byte rate of 1,000 bytes/s, a link with no room to pause a stream of
    /// small frames, and a grace far longer than any test: only the full backlog can end the
    /// connection.
    fn over_the_rate() -> RelayOptions {
        RelayOptions {
            max_bytes_per_second: Some(1000),
            rate_limit_grace: Duration::from_secs(60),
            link_budget: Some(super::LinkBudget::new(
                4,
                3_000,
                super::DEFAULT_STOPPED_READER_GRACE,
            )),
            ..opts()
        }
    }

    /// Sends each of `chunks` as one DATA frame of the stand-in, then reads what reaches the
    /// visitor until the relay ends the connection; `None` when that takes longer than `limit`.
    async fn send_then_read_to_end(
        tx: &mpsc::UnboundedSender<Vec<u8>>,
        chunks: impl IntoIterator<Item = Vec<u8>>,
        peer: &mut tokio::io::DuplexStream,
        limit: Duration,
    ) -> Option<Vec<u8>> {
        for c in chunks {
            tx.send(c).unwrap();
        }
        let mut got = Vec::new();
        let read = tokio::time::timeout(limit, peer.read_to_end(&mut got)).await;
        read.ok()?.unwrap();
        Some(got)
    }

    /// What the local server side wrote into the stand-in.
    type Written = Arc<Mutex<Vec<u8>>>;

    fn agent() -> (Chunks, mpsc::UnboundedSender<Vec<u8>>, Written) {
        let (tx, rx) = mpsc::unbounded_channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let chunks = Chunks {
            rx,
            written: Arc::clone(&written),
        };
        (chunks, tx, written)
    }

    /// Checks that `back` (what the local server's side got) is exactly one masked close frame
    /// (client to server) with 1008 and `reason`.
    fn assert_masked_1008(back: &[u8], reason: &[u8]) {
        assert!(
            back.len() == 6 + 2 + reason.len() && back[0] == 0x88,
            "{back:?}"
        );
        assert_eq!(usize::from(back[1] & 0x7f), 2 + reason.len());
        let mask = [back[2], back[3], back[4], back[5]];
        let payload: Vec<u8> = back[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(&payload[..2], &1008u16.to_be_bytes());
        assert_eq!(&payload[2..], reason);
    }

    #[tokio::test]
    async fn a_visitor_that_stops_reading_small_frames_is_closed_with_1008_toward_the_local_server()
    {
        let (chunks, tx, written) = agent();
        // The visitor's socket holds 1 KiB and is never read.
        let (visitor, _stalled) = tokio::io::duplex(1024);
        let run = tokio::spawn(relay(visitor, chunks, opts(), CancellationToken::new()));
        // 3-byte text messages, one per DATA frame: far more than the backlog may hold.
        for _ in 0..20_000 {
            tx.send(b"\x81\x01a".to_vec()).unwrap();
        }
        let report = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the relay ended")
            .unwrap();
        // The local server got a close frame (masked, client to server) with 1008 and why.
        assert_masked_1008(&written.lock().unwrap(), b"the visitor stopped reading");
        // It stopped near the backlog's size, not after taking every message.
        assert!(report.to_visitor.bytes < 20_000 * 3, "{report:?}");
    }

    /// What [`paused_visitor`] leaves running.
    struct Paused {
        peer: tokio::io::DuplexStream,
        tx: mpsc::UnboundedSender<Vec<u8>>,
        written: Written,
        run: tokio::task::JoinHandle<super::RelayReport>,
    }

    /// A relay with `opts` from a stand-in agent stream to a visitor socket of 1 KiB that
    /// nobody reads yet.
    fn relayed(opts: RelayOptions) -> Paused {
        let (chunks, tx, written) = agent();
        let (visitor, peer) = tokio::io::duplex(1024);
        let run = tokio::spawn(relay(visitor, chunks, opts, CancellationToken::new()));
        Paused {
            peer,
            tx,
            written,
            run,
        }
    }

    /// Binary messages of 4000 bytes (each its own frame), 1 MiB in all.
    fn large_messages() -> Vec<Vec<u8>> {
        (0..262u32)
            .map(|i| {
                let mut m = vec![0x82, 126, 0x0f, 0xa0];
                m.extend((0..4000u32).map(|j| (i * 7 + j) as u8));
                m
            })
            .collect()
    }

    /// Sends `messages` from the local side (one frame each) to a visitor that reads nothing
    /// for 300 ms, checks the relay is still open, then reads and compares every byte.
    async fn paused_visitor(messages: Vec<Vec<u8>>) -> Paused {
        let mut p = relayed(opts());
        let sent: Vec<u8> = messages.concat();
        for m in messages {
            p.tx.send(m).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!p.run.is_finished());
        let mut got = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(10), p.peer.read_exact(&mut got))
            .await
            .expect("every byte in time")
            .unwrap();
        assert!(got == sent, "the bytes differ");
        p
    }

    #[tokio::test]
    async fn a_visitor_that_pauses_on_large_frames_gets_every_byte_in_order_and_stays_open() {
        // Large frames, 1 MiB in all: the backlog fills and the relay waits.
        let mut p = paused_visitor(large_messages()).await;
        // Still open: a close from the local server's side still gets through.
        p.tx.send(b"\x88\x02\x03\xe8".to_vec()).unwrap();
        let mut close = [0u8; 4];
        p.peer.read_exact(&mut close).await.unwrap();
        assert_eq!(&close, b"\x88\x02\x03\xe8");
        p.peer.shutdown().await.unwrap();
        drop(p.tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), p.run).await;
    }

    #[tokio::test]
    async fn a_short_pause_on_small_frames_loses_nothing_and_cuts_nothing() {
        // 12 KB of 3-byte messages: more than the socket holds, less than the backlog.
        let messages = (0..4000u32)
            .map(|i| vec![0x81, 0x01, b'a' + (i % 26) as u8])
            .collect();
        let p = paused_visitor(messages).await;
        assert!(p.written.lock().unwrap().is_empty(), "nothing went back");
        drop(p.tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), p.run).await;
    }
    #[tokio::test]
    async fn a_slow_reader_of_small_frames_is_not_cut_while_it_keeps_reading() {
        // The messages come at twice the visitor's pace, so its backlog fills while it reads.
        let (got, sent, back) = slow_visitor(opts(), usize::MAX, Duration::ZERO).await;
        assert!(got == sent, "the bytes differ");
        assert!(back.is_empty(), "nothing went back");
    }

    /// A relay from a stand-in agent stream fed 3-byte messages at about 600 KB/s (60 KB in
    /// all) to a visitor that reads 600 bytes every 2 ms until it has `read_first` bytes,
    /// pauses for `pause`, then reads the rest. Returns what the visitor got, what was sent,
    /// and what went back toward the local server.
    async fn slow_visitor(
        opts: RelayOptions,
        read_first: usize,
        pause: Duration,
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let (chunks, tx, written) = agent();
        let (visitor, mut peer) = tokio::io::duplex(1024);
        let run = tokio::spawn(relay(visitor, chunks, opts, CancellationToken::new()));
        let sent: Vec<u8> = (0..20_000u32)
            .flat_map(|i| [0x81, 0x01, b'a' + (i % 26) as u8])
            .collect();
        let feed = sent.clone();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            for burst in feed.chunks(600) {
                for m in burst.chunks(3) {
                    let _ = tx2.send(m.to_vec());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 600];
        let mut paused = false;
        while got.len() < sent.len() {
            if !paused && got.len() >= read_first {
                paused = true;
                tokio::time::sleep(pause).await;
            }
            match tokio::time::timeout(Duration::from_secs(5), peer.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
        let back = written.lock().unwrap().clone();
        (got, sent, back)
    }

    /// A relay whose visitor lets its backlog of 3-byte messages fill past half, reads 600
    /// bytes (slow, not stopped), and then reads nothing while the backlog fills up.
    async fn slow_then_full(opts: RelayOptions) -> Paused {
        let mut p = relayed(opts);
        let tx = p.tx.clone();
        let feed = |from: u32, to: u32| {
            for i in from..to {
                let _ = tx.send(vec![0x81, 0x01, b'a' + (i % 26) as u8]);
            }
        };
        feed(0, 4_000); // 12 KB: the backlog (16 KiB) is past half
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 600];
        let n = p.peer.read(&mut buf).await.unwrap();
        assert!(n > 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        feed(4_000, 20_000); // the backlog fills up
        tokio::time::sleep(Duration::from_millis(200)).await;
        p
    }

    #[tokio::test]
    async fn slow_readers_of_small_frames_pause_only_while_the_links_budget_has_room() {
        // Room for one paused stream of 3-byte frames (1,000 frames of a 3,000-byte window at
        // 253 each), not two.
        let budget = super::LinkBudget::new(1_200_000, 3_000, super::DEFAULT_STOPPED_READER_GRACE);
        let with_budget = || RelayOptions {
            link_budget: Some(Arc::clone(&budget)),
            ..opts()
        };
        // The first slow visitor pauses its stream and takes the room.
        let first = slow_then_full(with_budget()).await;
        assert!(!first.run.is_finished());
        assert!(first.written.lock().unwrap().is_empty());
        // The second, as slow, finds none when its backlog fills: closed with 1008.
        let second = slow_then_full(with_budget()).await;
        assert_masked_1008(
            &second.written.lock().unwrap(),
            b"the visitor reads too slowly for the small messages it is sent",
        );
        // The first reads on and gets every byte; its room is given back.
        let mut first = first;
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        while rest.len() < 60_000 - 600 {
            let n = tokio::time::timeout(Duration::from_secs(5), first.peer.read(&mut buf))
                .await
                .expect("bytes in time")
                .unwrap();
            assert!(n > 0);
            rest.extend_from_slice(&buf[..n]);
        }
        assert!(
            first.written.lock().unwrap().is_empty(),
            "the first was cut"
        );
        assert_eq!(
            budget.left.load(std::sync::atomic::Ordering::Acquire),
            300_000
        );
    }

    #[tokio::test]
    async fn a_rate_limited_direction_reads_its_source_ahead_and_delays_only_its_writes() {
        // The agent side holds 64 bytes: without reading ahead, 8,000 bytes at 20,000 bytes/s
        // would take the sender 400 ms to hand over.
        let (agent_side, mut local) = tokio::io::duplex(64);
        let (visitor, mut peer) = tokio::io::duplex(64 * 1024);
        let o = RelayOptions {
            max_bytes_per_second: Some(20_000),
            rate_limit_grace: Duration::from_secs(30),
            ..opts()
        };
        let run = tokio::spawn(relay(visitor, agent_side, o, CancellationToken::new()));
        let sent: Vec<u8> = (0..2000u32)
            .flat_map(|i| [0x81, 0x02, b'a' + (i % 26) as u8, b'z'])
            .collect();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_millis(150), local.write_all(&sent))
            .await
            .expect("the relay read its source ahead")
            .unwrap();
        let mut got = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("every byte in time")
            .unwrap();
        assert!(got == sent, "the bytes differ");
        // The visitor still got them at the rate, not at once.
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        drop(local);
        let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    }

    #[tokio::test]
    async fn small_frames_over_the_rate_for_longer_than_the_backlog_holds_are_closed_as_over_the_limit(
    ) {
        let (chunks, tx, written) = agent();
        let (visitor, mut peer) = tokio::io::duplex(64 * 1024);
        let o = over_the_rate();
        let run = tokio::spawn(relay(visitor, chunks, o, CancellationToken::new()));
        let sent: Vec<u8> = (0..20_000u32)
            .flat_map(|i| [0x81, 0x01, b'a' + (i % 26) as u8])
            .collect();
        let got = send_then_read_to_end(
            &tx,
            sent.chunks(3).map(<[u8]>::to_vec),
            &mut peer,
            Duration::from_secs(5),
        )
        .await
        .expect("the relay closed the connection long before the grace ran out");
        // What came first is whole messages, as sent (the backlog is not lost), then the close.
        let reason = b"over the tunnel's limit of 1000 bytes/s";
        let close_at = got.len() - 4 - reason.len();
        assert_eq!(close_at % 3, 0, "{close_at}");
        assert!(close_at >= 16 * 1024, "the backlog was lost: {close_at}");
        assert!(got[..close_at] == sent[..close_at], "the bytes differ");
        assert_eq!(
            &got[close_at..close_at + 4],
            &[0x88, 2 + reason.len() as u8, 0x03, 0xf0]
        );
        assert_eq!(&got[close_at + 4..], reason);
        // The local server's side was told too (a masked close frame).
        let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
        let back = written.lock().unwrap().clone();
        assert!(back.len() > 6 && back[0] == 0x88, "{back:?}");
    }

    #[tokio::test]
    async fn small_frames_after_large_ones_over_the_rate_are_closed_after_a_few_reads() {
        let (chunks, tx, _written) = agent();
        let (visitor, mut peer) = tokio::io::duplex(64 * 1024);
        // As above, but the backlog fills with large frames first: the switch to small ones
        // shows in the last few reads, long before in the average of every read (which would
        // take some 60 small reads, 7 s at this rate, to fall under the small-frame size).
        let o = RelayOptions {
            stall_buffer: 64 * 1024,
            ..over_the_rate()
        };
        let run = tokio::spawn(relay(visitor, chunks, o, CancellationToken::new()));
        let mut frames: Vec<Vec<u8>> = (0..16u8)
            .map(|i| {
                let mut f = vec![0x82, 126, 0x0f, 0xfc];
                f.resize(4096, i);
                f
            })
            .collect();
        let large: usize = frames.iter().map(Vec::len).sum();
        // 127-byte text messages: a write of the rate's 1,024-byte quantum lets 8 in.
        frames.extend((0..2_000u32).map(|i| {
            let mut f = vec![0x81, 125];
            f.resize(127, b'a' + (i % 26) as u8);
            f
        }));
        let sent = frames.concat();
        let got = send_then_read_to_end(&tx, frames, &mut peer, Duration::from_secs(4))
            .await
            .expect("the relay closed the connection after a few small reads");
        let reason = b"over the tunnel's limit of 1000 bytes/s";
        assert!(got.len() > large + 4 + reason.len(), "{}", got.len());
        let close_at = got.len() - 4 - reason.len();
        assert!(got[..close_at] == sent[..close_at], "the bytes differ");
        assert_eq!(
            &got[close_at..close_at + 4],
            &[0x88, 2 + reason.len() as u8, 0x03, 0xf0]
        );
        assert_eq!(&got[close_at + 4..], reason);
        // Every large frame went out, then only the few small ones read before the close.
        assert!(close_at >= large, "the backlog was lost: {close_at}");
        assert_eq!((close_at - large) % 127, 0, "{close_at}");
        let small = (close_at - large) / 127;
        assert!(
            small < 16,
            "{small} small frames were read before the close"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    }

    #[tokio::test]
    async fn a_close_over_the_rate_toward_a_visitor_that_stopped_reading_ends_within_the_close_timeout(
    ) {
        let (chunks, tx, written) = agent();
        // The visitor's socket holds 1 KiB and is never read: the backlog can never go out.
        let (visitor, _stalled) = tokio::io::duplex(1024);
        let o = over_the_rate();
        let run = tokio::spawn(relay(visitor, chunks, o, CancellationToken::new()));
        for i in 0..20_000u32 {
            tx.send(vec![0x81, 0x01, b'a' + (i % 26) as u8]).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(3), run)
            .await
            .expect("the relay ended within its close timeout")
            .unwrap();
        // The source was read to the end meanwhile (nothing of it waits in h2), and the local
        // server's side was told why.
        assert!(tx.is_closed());
        assert_masked_1008(
            &written.lock().unwrap(),
            b"over the tunnel's limit of 1000 bytes/s",
        );
    }

    /// Large frames (4,000-byte messages, 1 MiB) toward a visitor that reads nothing, on a
    /// link whose connection window is `connection` (stream windows of 65,535), with readers
    /// counted as stopped after 100 ms.
    async fn stopped_on_large_frames(connection: u32) -> (Paused, Arc<super::LinkBudget>) {
        let budget = super::LinkBudget::new(connection, 65_535, Duration::from_millis(100));
        let o = RelayOptions {
            link_budget: Some(Arc::clone(&budget)),
            ..opts()
        };
        let p = relayed(o);
        for m in large_messages() {
            p.tx.send(m).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        (p, budget)
    }

    #[tokio::test]
    async fn a_visitor_that_stops_on_large_frames_holds_a_stream_window_of_the_link_while_it_has_room(
    ) {
        let (mut p, budget) = stopped_on_large_frames(4 * 65_535).await;
        assert!(!p.run.is_finished());
        assert!(p.written.lock().unwrap().is_empty());
        // Half the connection window, less the stream window it holds.
        let left = || {
            budget
                .windows_left
                .load(std::sync::atomic::Ordering::Acquire)
        };
        assert_eq!(left(), 2 * 65_535 - 65_535);
        // It reads again: every byte arrives and the window is given back.
        let mut got = vec![0u8; 262 * 4004];
        tokio::time::timeout(Duration::from_secs(10), p.peer.read_exact(&mut got))
            .await
            .expect("every byte in time")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(left(), 2 * 65_535);
        assert!(p.written.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_visitor_that_stops_on_large_frames_is_closed_when_stopped_readers_hold_half_the_window(
    ) {
        // Half of this connection window is less than one stream window: no room at all.
        let (p, _budget) = stopped_on_large_frames(65_535).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), p.run).await;
        assert_masked_1008(&p.written.lock().unwrap(), b"the visitor stopped reading");
    }
}

#[cfg(test)]
mod yield_tests {
    use super::{relay, RelayOptions};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::io::{AsyncRead, ReadBuf};
    use tokio_util::sync::CancellationToken;

    /// The reading side of one end of the relay (writes go to `tokio::io::sink`). With
    /// `given`, a visitor sending one endless masked binary frame that is always ready (a bulk upload that never makes the
    /// relay wait), counting the bytes it handed out; without, a local server that sends
    /// nothing.
    struct End {
        given: Option<Arc<AtomicUsize>>,
    }

    impl AsyncRead for End {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let Some(given) = &self.given else {
                return Poll::Pending;
            };
            if given.load(Ordering::SeqCst) == 0 {
                // FIN + binary, masked, 64-bit length of 2^40, mask key.
                buf.put_slice(&[0x82, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
            } else {
                buf.put_slice(&vec![0x5a; buf.remaining()]);
            }
            given.fetch_add(buf.filled().len(), Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
    }

    /// On one thread, a relay whose source never makes it wait still lets another task run
    /// every `yield_after` bytes (plus at most one read), and keeps moving bytes between.
    #[tokio::test(flavor = "current_thread")]
    async fn a_bulk_direction_lets_the_other_tasks_of_its_thread_run() {
        let yield_after = 32 * 1024;
        let given = Arc::new(AtomicUsize::new(0));
        let visitor = tokio::io::join(
            End {
                given: Some(Arc::clone(&given)),
            },
            tokio::io::sink(),
        );
        let opts = RelayOptions {
            link_source: None,
            yield_after,
            ..super::stall_tests::opts()
        };
        let stop = CancellationToken::new();
        let run = tokio::spawn(relay(
            visitor,
            tokio::io::join(End { given: None }, tokio::io::sink()),
            opts.clone(),
            stop.clone(),
        ));
        let mut seen = 0;
        for turn in 0..20 {
            // This task gets the thread back only when the relay yields.
            tokio::task::yield_now().await;
            let now = given.load(Ordering::SeqCst);
            let moved = now - seen;
            assert!(
                moved <= yield_after + opts.buffer,
                "turn {turn}: the relay moved {moved} bytes before it let this task run"
            );
            if turn > 0 {
                assert!(moved > 0, "turn {turn}: the relay moved nothing");
            }
            seen = now;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the relay ends once stopped")
            .expect("the relay task did not panic");
    }
}
