//! Byte-exact WebSocket passthrough, as a property: random frame sequences — every opcode
//! (reserved ones too), RSV bits, fragmented messages with control frames in between, masked
//! and unmasked frames, empty to 16 MiB payloads, invalid UTF-8 in text frames, over-long
//! length encodings, close frames with and without codes — go both ways through a real tunnel
//! (in-process edge, the real `burrow` agent) between a raw-TCP visitor and a raw-TCP local
//! server, and arrive byte for byte as sent. The only bytes allowed to differ are the edge's
//! own keepalive pings toward the visitor, which must sit between frames.
//!
//! Each end half-closes its connection once it has received everything the other end sent
//! (the closing handshake of RFC 6455 §7.1.1). `BURROW_PROPTEST_EAGER_FIN=1` makes both ends
//! half-close right behind their own close frame instead, racing the relays' shutdown.
//!
//! One tunnel and one local server serve every case of a test; each case is a new visitor
//! connection. `BURROW_PROPTEST_CASES` sets the cases per test (default
//! [`DEFAULT_CASES`]); each test prints its count, and the file runs [`TESTS`] of them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod tunnel_support;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestError, TestRunner};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tunnel_support::*;

/// Cases per test unless `BURROW_PROPTEST_CASES` says otherwise; with [`TESTS`] tests the
/// file runs over 1,000 cases.
const DEFAULT_CASES: u32 = 256;
/// Property tests in this file.
const TESTS: u32 = 4;
/// Longest one case may take (a 16 MiB frame each way included).
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest payload of one frame (the "0–16 MiB").
const MAX_PAYLOAD: usize = 16 << 20;
/// The edge's keepalive ping toward a visitor: an empty, unmasked, final ping frame.
const EDGE_PING: [u8; 2] = [0x89, 0x00];
/// Keepalive interval of the test that checks where pings land.
const SHORT_PING: Duration = Duration::from_millis(10);

fn cases() -> u32 {
    std::env::var("BURROW_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

// ---------------------------------------------------------------------------------------
// The frames
// ---------------------------------------------------------------------------------------

/// A frame payload: literal bytes, or `len` bytes of a seeded pattern (so multi-MiB payloads
/// cost nothing to generate and shrink to a short length).
#[derive(Clone)]
enum Payload {
    Bytes(Vec<u8>),
    Pattern { len: usize, seed: u32 },
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Pattern { len, .. } => *len,
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Bytes(b) => out.extend_from_slice(b),
            Payload::Pattern { len, seed } => {
                let mut x = u64::from(*seed) | 1;
                out.reserve(*len);
                for _ in 0..*len {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    out.push(x as u8);
                }
            }
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Bytes(b) if b.len() <= 32 => write!(f, "{b:02x?}"),
            Payload::Bytes(b) => write!(f, "{} bytes {:02x?}…", b.len(), &b[..32]),
            Payload::Pattern { len, seed } => write!(f, "pattern(len {len}, seed {seed})"),
        }
    }
}

/// One frame as sent on the wire (RFC 6455 §5.2), valid or not.
#[derive(Clone)]
struct Frame {
    fin: bool,
    /// RSV1..RSV3 as the low three bits.
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Use a longer length encoding than needed (126 or 127 for a short payload).
    wide_len: bool,
    /// The unmasked payload.
    payload: Payload,
}

impl Frame {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.fin) << 7 | (self.rsv & 7) << 4 | (self.opcode & 0xf));
        let m = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload.len();
        if len < 126 && !self.wide_len {
            out.push(m | len as u8);
        } else if len <= 0xffff && !(len >= 126 && self.wide_len) {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if let Some(k) = self.mask {
            out.extend_from_slice(&k);
        }
        let start = out.len();
        self.payload.write_to(out);
        if let Some(k) = self.mask {
            for (i, b) in out[start..].iter_mut().enumerate() {
                *b ^= k[i % 4];
            }
        }
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.opcode {
            0 => "cont",
            1 => "text",
            2 => "binary",
            8 => "close",
            9 => "ping",
            10 => "pong",
            3..=7 => "reserved-data",
            _ => "reserved-control",
        };
        write!(f, "{name}(op {:#x}", self.opcode)?;
        if !self.fin {
            write!(f, ", !fin")?;
        }
        if self.rsv != 0 {
            write!(f, ", rsv {:03b}", self.rsv)?;
        }
        if let Some(k) = self.mask {
            write!(f, ", mask {k:02x?}")?;
        }
        if self.wide_len {
            write!(f, ", wide len")?;
        }
        write!(f, ", {:?})", self.payload)
    }
}

/// What one side sends: frames, always ending in a close frame, and where to pause.
#[derive(Clone)]
struct Script {
    frames: Vec<Frame>,
    /// Byte offsets (as fractions of the whole, in 1/65536) where the sender flushes and
    /// pauses: the stream is written in pieces, often inside a frame.
    pauses: Vec<u16>,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[")?;
        for fr in &self.frames {
            writeln!(f, "      {fr:?},")?;
        }
        write!(f, "    ] pauses at {:?}/65536", self.pauses)
    }
}

/// The bytes of a script and where each frame ends.
struct Wire {
    bytes: Vec<u8>,
    /// End offset of each frame.
    ends: Vec<usize>,
    /// Offsets to pause at, ascending.
    pauses: Vec<usize>,
}

impl Script {
    fn wire(&self) -> Wire {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for fr in &self.frames {
            fr.encode(&mut bytes);
            ends.push(bytes.len());
        }
        let mut pauses: Vec<usize> = self
            .pauses
            .iter()
            .map(|p| (bytes.len() as u64 * u64::from(*p) / 65536) as usize)
            .collect();
        pauses.sort_unstable();
        pauses.dedup();
        Wire {
            bytes,
            ends,
            pauses,
        }
    }
}

/// Both directions of one case.
#[derive(Clone)]
struct Case {
    from_visitor: Script,
    from_server: Script,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Case {{")?;
        writeln!(f, "  visitor → server: {:?}", self.from_visitor)?;
        writeln!(f, "  server → visitor: {:?}", self.from_server)?;
        write!(f, "}}")
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Which way a frame goes: clients mask (RFC 6455 §5.3), servers don't — mostly.
#[derive(Clone, Copy)]
enum Side {
    Visitor,
    Server,
}

fn mask(side: Side) -> BoxedStrategy<Option<[u8; 4]>> {
    let (masked, unmasked) = match side {
        Side::Visitor => (6, 1),
        Side::Server => (1, 6),
    };
    prop_oneof![
        masked => any::<[u8; 4]>().prop_map(Some),
        unmasked => Just(None),
    ]
    .boxed()
}

/// Mostly small payloads; boundary lengths around the 7/16/64-bit length encodings; invalid
/// UTF-8 and valid text.
fn small_payload() -> BoxedStrategy<Payload> {
    prop_oneof![
        6 => vec(any::<u8>(), 0..48).prop_map(Payload::Bytes),
        2 => "\\PC{0,24}".prop_map(|s| Payload::Bytes(s.into_bytes())),
        2 => prop::sample::select(vec![
            vec![0xff],
            vec![0xc3],                   // truncated 2-byte sequence
            vec![0xc0, 0xaf],             // overlong '/'
            vec![0xed, 0xa0, 0x80],       // UTF-16 surrogate
            vec![0xf4, 0x90, 0x80, 0x80], // above U+10FFFF
            b"ok\xe2\x82".to_vec(),       // cut inside '€'
        ])
        .prop_map(Payload::Bytes),
        2 => (
            prop::sample::select(vec![0usize, 1, 125, 126, 127, 128, 65_535, 65_536, 65_537]),
            any::<u32>(),
        )
            .prop_map(|(len, seed)| Payload::Pattern { len, seed }),
        1 => (0usize..300_000, any::<u32>()).prop_map(|(len, seed)| Payload::Pattern { len, seed }),
    ]
    .boxed()
}

/// A 1–16 MiB payload.
fn big_payload() -> BoxedStrategy<Payload> {
    (
        prop_oneof![Just(MAX_PAYLOAD), (1usize << 20)..MAX_PAYLOAD],
        any::<u32>(),
    )
        .prop_map(|(len, seed)| Payload::Pattern { len, seed })
        .boxed()
}

/// Mostly clear RSV bits; sometimes RSV1 (what permessage-deflate sets) or any of them.
fn rsv() -> BoxedStrategy<u8> {
    prop_oneof![6 => Just(0u8), 1 => Just(4u8), 1 => 0u8..8].boxed()
}

fn frame(
    opcode: BoxedStrategy<u8>,
    fin: BoxedStrategy<bool>,
    payload: BoxedStrategy<Payload>,
    side: Side,
) -> BoxedStrategy<Frame> {
    (
        opcode,
        fin,
        rsv(),
        mask(side),
        prop::bool::weighted(0.1),
        payload,
    )
        .prop_map(|(opcode, fin, rsv, mask, wide_len, payload)| Frame {
            fin,
            rsv,
            opcode,
            mask,
            wide_len,
            payload,
        })
        .boxed()
}

/// Any opcode but close (close only ends a script): data, control, and reserved ones.
fn any_opcode_but_close() -> BoxedStrategy<u8> {
    prop_oneof![
        4 => prop::sample::select(vec![1u8, 2]),
        2 => prop::sample::select(vec![9u8, 10]),
        1 => prop::sample::select(vec![0u8, 3, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf]),
    ]
    .boxed()
}

/// A control (or reserved control) frame, the kind allowed between fragments.
fn control(side: Side) -> BoxedStrategy<Frame> {
    frame(
        prop::sample::select(vec![9u8, 10, 0xb, 0xc, 0xd, 0xe, 0xf]).boxed(),
        prop::bool::weighted(0.9).boxed(),
        small_payload(),
        side,
    )
}

/// A fragmented message: a non-final first frame, continuations, control frames in between.
fn fragmented(side: Side) -> BoxedStrategy<Vec<Frame>> {
    let first = frame(
        prop::sample::select(vec![1u8, 2, 3, 7]).boxed(),
        Just(false).boxed(),
        small_payload(),
        side,
    );
    let cont = frame(
        Just(0u8).boxed(),
        Just(false).boxed(),
        small_payload(),
        side,
    );
    let piece = (cont, vec(control(side), 0..3));
    (first, vec(piece, 0..4), control(side), small_payload())
        .prop_map(|(first, pieces, last_template, last_payload)| {
            let mut out = vec![first];
            for (c, ctrls) in pieces {
                out.extend(ctrls);
                out.push(c);
            }
            // The final continuation, masked like the first frame.
            let mut last = out[0].clone();
            last.opcode = 0;
            last.fin = true;
            last.rsv = last_template.rsv;
            last.payload = last_payload;
            out.push(last);
            out
        })
        .boxed()
}

/// A close frame: no payload, a code alone, a code and a reason (maybe invalid UTF-8), or a
/// lone byte (invalid).
fn close(side: Side) -> BoxedStrategy<Frame> {
    let body = prop_oneof![
        Just(Vec::new()),
        any::<u16>().prop_map(|c| c.to_be_bytes().to_vec()),
        (
            prop::sample::select(vec![1000u16, 1001, 1002, 1005, 1011, 3000, 4999, 999]),
            vec(any::<u8>(), 0..40)
        )
            .prop_map(|(c, r)| {
                let mut b = c.to_be_bytes().to_vec();
                b.extend(r);
                b
            }),
        any::<u8>().prop_map(|b| vec![b]),
    ];
    frame(
        Just(8u8).boxed(),
        prop::bool::weighted(0.95).boxed(),
        body.prop_map(Payload::Bytes).boxed(),
        side,
    )
}

/// A script for one side: a few messages (single frames or fragmented), rarely one big
/// frame, and a close frame last.
fn script(side: Side) -> BoxedStrategy<Script> {
    let single = frame(
        any_opcode_but_close(),
        prop::bool::weighted(0.9).boxed(),
        small_payload(),
        side,
    )
    .prop_map(|f| vec![f]);
    let big = frame(
        prop::sample::select(vec![1u8, 2, 0, 5]).boxed(),
        Just(true).boxed(),
        big_payload(),
        side,
    )
    .prop_map(|f| vec![f]);
    // About one case in 25 carries a big frame: a few dozen over the file.
    let message = prop_oneof![120 => single, 40 => fragmented(side), 1 => big];
    (vec(message, 0..6), close(side), vec(any::<u16>(), 0..4))
        .prop_map(|(messages, close, pauses)| {
            let mut frames: Vec<Frame> = messages.into_iter().flatten().collect();
            // Bound one case: at most one big frame per side.
            let mut big_seen = false;
            frames.retain(|f| {
                let big = f.payload.len() > (1 << 20);
                let keep = !(big && big_seen);
                big_seen |= big;
                keep
            });
            frames.push(close);
            Script { frames, pauses }
        })
        .boxed()
}

fn case() -> BoxedStrategy<Case> {
    (script(Side::Visitor), script(Side::Server))
        .prop_map(|(from_visitor, from_server)| Case {
            from_visitor,
            from_server,
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------
// Checking what arrived
// ---------------------------------------------------------------------------------------

/// Total length of the frame starting at `b`, when its header is complete.
fn frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (ext, len) = match b[1] & 0x7f {
        126 => (
            2,
            u64::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)),
        n => (0, u64::from(n)),
    };
    Some(2 + ext + if masked { 4 } else { 0 } + usize::try_from(len).ok()?)
}

fn show(b: &[u8]) -> String {
    if b.len() <= 24 {
        format!("{b:02x?}")
    } else {
        format!("{} bytes starting {:02x?}", b.len(), &b[..24])
    }
}

/// Byte-exact comparison of one direction without anything inserted.
fn exact(dir: &str, sent: &Wire, got: &[u8]) -> Result<(), String> {
    if got == sent.bytes {
        return Ok(());
    }
    let at = sent
        .bytes
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(sent.bytes.len().min(got.len()));
    let frame = sent.ends.iter().position(|e| *e > at);
    Err(format!(
        "{dir}: sent {} bytes, received {}; first difference at byte {at} (inside sent frame \
         #{frame:?}); sent there {}, received {}",
        sent.bytes.len(),
        got.len(),
        show(&sent.bytes[at.min(sent.bytes.len())..]),
        show(&got[at.min(got.len())..]),
    ))
}

/// Compares the server → visitor direction, where the edge may add its own empty pings, but
/// only between frames. `Ok(None)`: a correct prefix so far; `Ok(Some((pings, used)))`: every
/// sent frame arrived, in `used` bytes with `pings` added pings.
fn match_but_pings(sent: &Wire, got: &[u8]) -> Result<Option<(u64, usize)>, String> {
    let mut pings = 0;
    let mut at = 0;
    let mut start = 0;
    for (i, end) in sent.ends.iter().enumerate() {
        let want = &sent.bytes[start..*end];
        loop {
            let rest = &got[at..];
            if rest.starts_with(want) {
                at += want.len();
                break;
            }
            if rest.starts_with(&EDGE_PING) {
                pings += 1;
                at += EDGE_PING.len();
                continue;
            }
            if want.starts_with(rest) || EDGE_PING.starts_with(rest) {
                return Ok(None);
            }
            let len = frame_len(rest).map_or(rest.len(), |l| l.min(rest.len()));
            return Err(format!(
                "server → visitor: sent frame #{i} ({}) at byte {start}; received instead at \
                 byte {at} {} ({pings} pings stripped so far)",
                show(want),
                show(&rest[..len]),
            ));
        }
        start = *end;
    }
    Ok(Some((pings, at)))
}

/// Whether each end half-closes its TCP connection right after sending its close frame
/// (`BURROW_PROPTEST_EAGER_FIN=1`) instead of after receiving everything the other end sent,
/// as RFC 6455 §7.1.1 has servers do. See the module docs for what the eager mode shows.
fn eager_fin() -> bool {
    std::env::var("BURROW_PROPTEST_EAGER_FIN").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------
// The two ends
// ---------------------------------------------------------------------------------------

/// What the local server does for one case, looked up by the path `/case/ID`.
struct ServerJob {
    wire: Arc<Wire>,
    /// How many bytes the visitor sends.
    expect: usize,
    pause: Duration,
    received: oneshot::Sender<Result<Vec<u8>, String>>,
}

type Jobs = Arc<Mutex<HashMap<u64, ServerJob>>>;

/// A raw-TCP local server: answers each upgrade with a hand-written 101, then sends its
/// case's script and records every byte until end of stream.
async fn raw_server() -> (SocketAddr, Jobs) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let jobs: Jobs = Arc::default();
    let jobs2 = Arc::clone(&jobs);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let jobs = Arc::clone(&jobs2);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let id: Option<u64> = head
                    .split(' ')
                    .nth(1)
                    .and_then(|p| p.strip_prefix("/case/"))
                    .and_then(|n| n.parse().ok());
                let Some(job) = id.and_then(|id| jobs.lock().unwrap().remove(&id)) else {
                    let _ = w
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                let mut out = switching_protocols(&head, "").into_bytes();
                // The head and the first frames in one write when there is no pause first.
                let first = job
                    .wire
                    .pauses
                    .first()
                    .copied()
                    .unwrap_or(job.wire.bytes.len());
                out.extend_from_slice(&job.wire.bytes[..first]);
                let wire = Arc::clone(&job.wire);
                let pause = job.pause;
                let eager = eager_fin();
                let expect = job.expect;
                let res = async move {
                    let writer = async {
                        w.write_all(&out).await?;
                        send_rest(&mut w, &wire, first, pause).await?;
                        if eager {
                            w.shutdown().await?;
                        }
                        Ok::<_, std::io::Error>(())
                    };
                    let reader = async {
                        let mut got = Vec::new();
                        let mut buf = vec![0u8; 64 * 1024];
                        while got.len() < expect {
                            let n = r.read(&mut buf).await?;
                            if n == 0 {
                                break;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        Ok::<_, std::io::Error>(got)
                    };
                    let (sent, got) = tokio::join!(writer, reader);
                    sent.map_err(|e| format!("the local server could not send: {e}"))?;
                    let mut got =
                        got.map_err(|e| format!("the local server could not read: {e}"))?;
                    // Everything arrived (or the stream ended): end the connection, then take
                    // whatever else still comes.
                    let _ = w.shutdown().await;
                    r.read_to_end(&mut got)
                        .await
                        .map_err(|e| format!("the local server could not read: {e}"))?;
                    Ok(got)
                }
                .await;
                let _ = job.received.send(res);
            });
        }
    });
    (addr, jobs)
}

/// Writes `wire.bytes[from..]`, flushing and sleeping `pause` at each pause offset.
async fn send_rest<W: AsyncWrite + Unpin>(
    w: &mut W,
    wire: &Wire,
    from: usize,
    pause: Duration,
) -> std::io::Result<()> {
    let mut at = from;
    for p in wire.pauses.iter().copied().filter(|p| *p >= from) {
        w.write_all(&wire.bytes[at..p]).await?;
        w.flush().await?;
        if pause.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pause).await;
        }
        at = p;
    }
    w.write_all(&wire.bytes[at..]).await?;
    w.flush().await
}

/// One tunnel for all cases of a test.
struct Tunnel {
    edge: Edge,
    _agent: Agent,
    jobs: Jobs,
    /// Root of trust for the edge's HTTPS listener.
    tls: Option<tokio_rustls::TlsConnector>,
    /// Sleep at each pause point (zero: just separate writes).
    pause: Duration,
    next_id: AtomicU64,
    pings: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Clone, Copy)]
struct Setup {
    visitor_tls: bool,
    agent_plaintext: bool,
    ping_interval: Option<Duration>,
    inspect_payloads: bool,
}

async fn tunnel(setup: Setup) -> Tunnel {
    let (local, jobs) = raw_server().await;
    let id = identity();
    let edge = start_edge_full(
        standalone_control(),
        id.clone(),
        None,
        setup.visitor_tls,
        setup.agent_plaintext,
        |l| {
            l.ws_ping_interval = setup.ping_interval;
            l.ws_idle_timeout = None;
        },
    )
    .await;
    let port = local.port().to_string();
    let mut args = vec![
        "http",
        &port,
        "--subdomain",
        "prop",
        "--inspect",
        "127.0.0.1:0",
    ];
    if setup.inspect_payloads {
        args.push("--inspect-payloads");
    }
    let agent = start_agent(&edge, STANDALONE_TOKEN, &args).await;
    let tls = setup.visitor_tls.then(|| {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut id.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    });
    let pause = if setup.ping_interval.is_some() {
        SHORT_PING * 2
    } else {
        Duration::ZERO
    };
    Tunnel {
        edge,
        _agent: agent,
        jobs,
        tls,
        pause,
        next_id: AtomicU64::new(0),
        pings: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Tunnel {
    async fn visitor_stream(&self) -> Result<(Box<dyn Io>, u16), String> {
        match &self.tls {
            None => {
                let tcp = TcpStream::connect(self.edge.http)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((Box::new(tcp), self.edge.http.port()))
            }
            Some(c) => {
                let https = self.edge.https.unwrap();
                let tcp = TcpStream::connect(https).await.map_err(|e| e.to_string())?;
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = c
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS to the edge: {e}"))?;
                Ok((Box::new(tls), https.port()))
            }
        }
    }

    /// Runs one case: a new visitor connection, the scripts both ways, then the checks.
    async fn run(&self, case: &Case) -> Result<(), String> {
        let started = Instant::now();
        self.run_inner(case)
            .await
            .map_err(|e| format!("{e} (after {} ms)", started.elapsed().as_millis()))
    }

    async fn run_inner(&self, case: &Case) -> Result<(), String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let up = case.from_visitor.wire();
        let down = Arc::new(case.from_server.wire());
        let (tx, rx) = oneshot::channel();
        self.jobs.lock().unwrap().insert(
            id,
            ServerJob {
                wire: Arc::clone(&down),
                expect: up.bytes.len(),
                pause: self.pause,
                received: tx,
            },
        );
        let (stream, port) = self.visitor_stream().await?;
        let (r, mut w) = tokio::io::split(stream);
        let mut r = tokio::io::BufReader::new(r);
        let req = format!(
            "GET /case/{id} HTTP/1.1\r\nHost: prop.localhost:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        w.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("sending the upgrade: {e}"))?;
        w.flush().await.map_err(|e| e.to_string())?;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
                return Err(format!(
                    "the edge ended the connection in the head: {head:?}"
                ));
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("no 101: {head:?}"));
        }
        let pause = self.pause;
        let eager = eager_fin();
        let writer = async {
            send_rest(&mut w, &up, 0, pause).await?;
            if eager {
                w.shutdown().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let reader = async {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if match_but_pings(&down, &got)?.is_some() {
                    break;
                }
                let n = r
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("the visitor could not read: {e}"))?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            Ok::<_, String>(got)
        };
        let (sent, got) = tokio::join!(writer, reader);
        sent.map_err(|e| format!("the visitor could not send: {e}"))?;
        let mut got = got?;
        // Everything arrived (or the stream ended): end the connection, then take whatever
        // else still comes.
        let _ = w.shutdown().await;
        r.read_to_end(&mut got)
            .await
            .map_err(|e| format!("the visitor could not read: {e}"))?;
        let at_server = rx
            .await
            .map_err(|_| "the local server never got the connection".to_owned())?
            .map_err(|e| e.to_string())?;
        exact("visitor → server", &up, &at_server)?;
        let pings = match match_but_pings(&down, &got)? {
            Some((pings, used)) if used == got.len() => pings,
            Some((_, used)) => {
                return Err(format!(
                    "server → visitor: {} bytes after the close frame: {}",
                    got.len() - used,
                    show(&got[used..])
                ))
            }
            None => {
                return Err(format!(
                    "server → visitor: the stream ended after {} bytes, inside what was sent \
                     ({} bytes)",
                    got.len(),
                    down.bytes.len()
                ))
            }
        };
        self.pings.fetch_add(pings, Ordering::Relaxed);
        self.bytes.fetch_add(
            (up.bytes.len() + down.bytes.len()) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }
}

/// Runs the property over one tunnel set up as `setup`; returns the tunnel's totals.
fn check(name: &str, setup: Setup) -> (u32, u64, u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tunnel = rt.block_on(tunnel(setup));
    let n = cases();
    let config = ProptestConfig {
        cases: n,
        failure_persistence: None,
        max_shrink_iters: 4096,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    };
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |c| {
        rt.block_on(async {
            match tokio::time::timeout(CASE_TIMEOUT, tunnel.run(&c)).await {
                Ok(r) => r,
                Err(_) => Err(format!("the case took over {CASE_TIMEOUT:?}")),
            }
        })
        .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => {
            panic!("{name}: bytes changed in transit.\n{why}\nminimal counterexample:\n{case:?}")
        }
        Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
    }
    let pings = tunnel.pings.load(Ordering::Relaxed);
    let bytes = tunnel.bytes.load(Ordering::Relaxed);
    println!(
        "{name}: {n} cases passed in {:.1} s ({} MiB relayed, {pings} edge pings stripped); \
         this file runs {TESTS} such tests: {} cases in all",
        started.elapsed().as_secs_f64(),
        bytes >> 20,
        n * TESTS,
    );
    rt.block_on(tunnel.edge.stop());
    (n, pings, bytes)
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn random_frame_sequences_pass_byte_for_byte_between_a_plain_visitor_and_a_tls_agent() {
    check(
        "plain visitor, TLS agent",
        Setup {
            visitor_tls: false,
            agent_plaintext: false,
            ping_interval: None,
            inspect_payloads: false,
        },
    );
}

#[test]
fn random_frame_sequences_pass_byte_for_byte_between_a_tls_visitor_and_a_tls_agent() {
    check(
        "TLS visitor, TLS agent",
        Setup {
            visitor_tls: true,
            agent_plaintext: false,
            ping_interval: None,
            inspect_payloads: true,
        },
    );
}

#[test]
fn random_frame_sequences_pass_byte_for_byte_over_a_plaintext_agent_connection() {
    check(
        "plain visitor, plaintext agent",
        Setup {
            visitor_tls: false,
            agent_plaintext: true,
            ping_interval: None,
            inspect_payloads: false,
        },
    );
}

#[test]
fn keepalive_pings_toward_the_visitor_land_only_between_frames_and_nothing_else_changes() {
    let (_, pings, _) = check(
        "10 ms keepalive pings",
        Setup {
            visitor_tls: false,
            agent_plaintext: false,
            ping_interval: Some(SHORT_PING),
            inspect_payloads: false,
        },
    );
    assert!(pings > 0, "the edge never pinged: the test proved nothing");
}

#[test]
fn the_relays_frame_observer_follows_every_generated_script_to_its_close() {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let small = script(Side::Visitor).prop_filter("small", |s| {
        s.frames.iter().all(|f| f.payload.len() <= 1 << 20)
    });
    let result = runner.run(&small, |s| {
        let wire = s.wire();
        let mut obs = burrow_edge::frame::FrameObserver::new();
        obs.observe(&wire.bytes);
        let st = obs.stats();
        prop_assert!(obs.at_boundary());
        prop_assert_eq!(st.frames, s.frames.len() as u64);
        prop_assert!(st.closed, "close not seen: {:?}", st);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
