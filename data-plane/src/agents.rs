//! The agent listener: TLS, the `AgentHello`/`EdgeHello` handshake, binding names, then
//! reversed-role HTTP/2 (the edge is the client) for as long as the agent stays.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use burrow_proto::tunnel::{
    read_message, write_message, CONTROL_KEEPALIVE, CONTROL_READY, HEADER_CONTROL,
    HEADER_KEEPALIVE_MS, PROTOCOL_VERSION,
};
use burrow_proto::v1 as pb;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::control::{AgentInfo, ControlError, Grant};
use crate::policy::{Policies, Policy, Refusals};
use crate::registry::{
    AgentSession, BindingHold, Counters, Lane, RateWindow, Route, RouteLimits, UpBody,
};
use crate::State;

/// How often a draining agent connection checks whether visitors are done.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Most attempts at finding a random free name.
const RANDOM_NAME_ATTEMPTS: usize = 8;
/// Length of a random subdomain (lower-case letters and digits).
const RANDOM_NAME_LEN: usize = 10;
/// An extra lane is refused while fewer than 1/`LANE_RESERVE` of `max_agent_connections` are
/// free, so agents' first connections always find room.
const LANE_RESERVE: usize = 4;

/// The byte stream from an agent: TLS, or plain TCP with `Config::agent_plaintext`.
trait AgentIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AgentIo for T {}

/// One accepted agent connection's place under `Limits::max_agent_connections`: counted in
/// `open` until dropped with the connection.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            open: Arc::clone(open),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts agent connections until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(state.config.limits.max_agent_connections));
    // Connections accepted and not yet ended (the permit the loop holds for the next
    // connection is not one of them).
    let open = Arc::new(AtomicUsize::new(0));
    let mut turn = 0usize;
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(err = %e, "cannot accept an agent connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        let slot = Slot::new(permit, &open);
        let span = tracing::info_span!("agent", %peer, instance = tracing::field::Empty);
        let outer = Arc::clone(&state);
        let serve = move |stream: TcpStream| {
            async move {
                if let Err(e) = handle(stream, peer, acceptor, state, shutdown, &slot.open).await {
                    tracing::info!(err = %format!("{e:#}"), "agent connection ended");
                }
            }
            .instrument(span)
        };
        // Agent connections take turns apart from visitors. An agent opens its lanes one
        // after another and serves lane I on its thread I mod its thread count, so the lanes
        // one edge thread serves tend to share an agent thread too.
        turn = turn.wrapping_add(1);
        crate::spawn_on_turn(&outer, &tracker, turn, stream, serve);
    }
}

/// A bound tunnel before it is routable.
struct Bound {
    key: String,
    subdomain: String,
    session_id: String,
    /// The agent's own policy, compiled.
    policy: Option<Arc<Policy>>,
    /// The policy pinned on the subdomain's reservation, compiled.
    pinned: Option<Arc<Policy>>,
    /// Keeps other handshakes off the name until the route is in the table.
    hold: Option<BindingHold>,
    /// The route of another connection this tunnel replaces.
    replaces: Option<Takeover>,
}

/// A live route a new agent connection takes over.
struct Takeover {
    old: Arc<Route>,
    /// Whether the old route's agent is told it lost the name: not when it is the same agent
    /// process reconnecting.
    tell: bool,
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown: CancellationToken,
    open: &AtomicUsize,
) -> anyhow::Result<()> {
    let limits = &state.config.limits;
    let _ = stream.set_nodelay(true);
    let mut tls: Box<dyn AgentIo> = match acceptor {
        Some(acceptor) => Box::new(
            tokio::time::timeout(
                limits.agent_handshake_timeout,
                acceptor.accept(crate::tls::buffered(stream)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))??,
        ),
        None => Box::new(stream),
    };
    let hello: pb::AgentHello = read_message(&mut tls).await?;
    tracing::Span::current().record("instance", hello.agent_instance.as_str());
    if !hello.lane_key.is_empty() {
        return join_lane(tls, &hello.lane_key, peer, &state, open).await;
    }

    let bind_started = std::time::Instant::now();
    let (grant, bound) = match bind(&state, &hello, peer).await {
        Ok(b) => b,
        Err(e) => {
            tracing::info!(%peer, code = e.code(), err = %e, "agent refused");
            let answer = pb::EdgeHello {
                error: e.to_string(),
                error_code: e.code().to_owned(),
                edge_name: state.config.name.clone(),
                ..Default::default()
            };
            write_message(&mut tls, &answer).await?;
            let _ = tls.shutdown().await;
            return Ok(());
        }
    };
    let agent_id = state.registry.next_agent_id();
    let lanes = limits.max_agent_lanes.max(1);
    let lane_key = if lanes > 1 {
        let secret: [u8; 32] = rand::random();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        format!("{agent_id}.{hex}")
    } else {
        String::new()
    };
    let answer = pb::EdgeHello {
        lanes: u32::try_from(lanes).unwrap_or(u32::MAX),
        lane_key: lane_key.clone(),
        session_id: bound
            .first()
            .map(|b| b.session_id.clone())
            .unwrap_or_default(),
        tunnels: bound
            .iter()
            .map(|b| pb::BoundTunnel {
                key: b.key.clone(),
                subdomain: b.subdomain.clone(),
                public_urls: state.public_urls(&b.subdomain),
                pinned_policy: b.pinned.is_some(),
            })
            .collect(),
        team: grant.team_name.clone(),
        edge_name: state.config.name.clone(),
        limits: grant.limits,
        ..Default::default()
    };
    if let Err(e) = write_message(&mut tls, &answer).await {
        release(&state, &bound, false).await;
        return Err(e.into());
    }

    let lanes_end = CancellationToken::new();
    let (lane, mut driver) = match link(tls, limits, peer).await {
        Ok(x) => x,
        Err(e) => {
            release(&state, &bound, false).await;
            return Err(e);
        }
    };
    let (ready_tx, ready_rx) = watch::channel(false);
    let agent = Arc::new(AgentSession {
        id: agent_id,
        token_id: grant.token_id.clone(),
        team_id: grant.team_id.clone(),
        instance: hello.agent_instance.clone(),
        peer,
        since: bind_started,
        cancel: shutdown.child_token(),
        primary: lane,
        extra: RwLock::new(Vec::new()),
        lane_key,
        next_lane: AtomicU64::new(0),
        ready: ready_rx,
        lanes_end: lanes_end.clone(),
    });
    let route_limits = RouteLimits::resolve(&grant.limits.unwrap_or_default(), limits);
    let routes: Vec<Arc<Route>> = bound
        .iter()
        .map(|b| {
            Arc::new(Route {
                subdomain: b.subdomain.clone(),
                key: b.key.clone(),
                session_id: b.session_id.clone(),
                agent: Arc::clone(&agent),
                counters: Counters::default(),
                live_limits: RwLock::new(route_limits),
                rate: RateWindow::default(),
                policies: Policies::new(b.policy.clone(), b.pinned.clone()),
                refusals: Refusals::default(),
                metrics: state.metrics.tunnel(&grant.team_name, &b.subdomain),
            })
        })
        .collect();
    state.registry.add_agent(Arc::clone(&agent));
    state.registry.insert_routes(&routes);
    state.registry.catch_up_pins(&routes, bind_started);
    let mut bound = bound;
    for b in &mut bound {
        b.hold = None;
        if let Some(t) = b.replaces.take() {
            let state = Arc::clone(&state);
            let reason = format!(
                "{} was taken over by a new agent of your team connected from {peer}, after \
                 this agent did not answer the edge's liveness probe",
                b.subdomain
            );
            tokio::spawn(async move {
                state
                    .registry
                    .retire(&t.old, t.tell.then_some(reason.as_str()))
                    .await;
                state.control.report_final_stats(vec![t.old.stats()]).await;
            });
        }
    }
    for b in &bound {
        tracing::info!(
            %peer,
            subdomain = %b.subdomain,
            team = %grant.team_name,
            policy = b.policy.is_some(),
            pinned_policy = b.pinned.is_some(),
            "tunnel live"
        );
    }

    // Tell the agent its tunnels are routable; its answer also proves the agent's SETTINGS
    // (extended CONNECT) have arrived.
    let probe = ready(agent.primary.sender.clone());

    let outcome = tokio::select! {
        r = &mut driver => Some(r),
        () = agent.cancel.cancelled() => None,
        r = tokio::time::timeout(limits.agent_handshake_timeout, probe) => {
            match r {
                Ok(Ok(())) => {
                    let _ = ready_tx.send(true);
                    tokio::select! {
                        r = &mut driver => Some(r),
                        () = agent.cancel.cancelled() => None,
                    }
                }
                Ok(Err(e)) => {
                    tracing::info!(%peer, err = %format!("{e:#}"), "agent did not acknowledge");
                    None
                }
                Err(_) => {
                    tracing::info!(%peer, "agent did not acknowledge in time");
                    None
                }
            }
        }
    };
    // A graceful HTTP/2 shutdown by the agent (GOAWAY) is a clean goodbye; anything else
    // (reset, timeout, edge shutdown) keeps the names held for the grace period.
    let clean = matches!(outcome, Some(Ok(Ok(()))));
    if let Some(Ok(Err(e))) = &outcome {
        let reason = crate::proxy::h2_error(e).and_then(h2::Error::reason);
        if reason == Some(h2::Reason::ENHANCE_YOUR_CALM) {
            tracing::warn!(
                %peer,
                "agent connection ended by HTTP/2 flood protection (ENHANCE_YOUR_CALM): the \
                 edge held too many small DATA frames unread, typically for WebSocket visitors \
                 that stopped reading while their local server kept sending small messages; \
                 every tunnel of this agent dropped (docs/architecture.md, known limit)"
            );
        } else {
            tracing::info!(%peer, err = %e, "agent connection ended with an error");
        }
    }
    let mut removed = Vec::new();
    if outcome.is_none() {
        if shutdown.is_cancelled() {
            // Edge shutdown: stop routing new requests here, let visitor requests already in
            // flight finish (bounded by the drain timeout), then drop the connection.
            removed = state
                .registry
                .remove_routes_of(agent.id, Some(state.control.offline_grace()));
            let deadline = tokio::time::Instant::now() + limits.drain_timeout;
            while state.registry.visitor_connections.load(Ordering::Relaxed) > 0
                && tokio::time::Instant::now() < deadline
                && !driver.is_finished()
            {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        }
        driver.abort();
    }
    // The session's extra lanes end with its first connection (their visitors were drained
    // above on an edge shutdown).
    lanes_end.cancel();
    let grace = if clean {
        None
    } else {
        Some(state.control.offline_grace())
    };
    removed.extend(state.registry.remove_routes_of(agent.id, grace));
    state.registry.remove_agent(agent.id);
    // WebSockets still open add their bytes when their relay ends, which the agent's
    // departure makes happen at once; give them until the close timeout.
    let settle = tokio::time::Instant::now() + state.config.limits.ws_close_timeout;
    while tokio::time::Instant::now() < settle
        && removed
            .iter()
            .any(|r| r.counters.connections_open.load(Ordering::Relaxed) > 0)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state
        .control
        .report_final_stats(removed.iter().map(|r| r.stats()).collect())
        .await;
    let removed: Vec<Bound> = removed
        .iter()
        .map(|r| Bound {
            key: r.key.clone(),
            subdomain: r.subdomain.clone(),
            session_id: r.session_id.clone(),
            policy: None,
            pinned: None,
            hold: None,
            replaces: None,
        })
        .collect();
    release(&state, &removed, clean).await;
    tracing::info!(%peer, clean, "agent disconnected");
    Ok(())
}

/// Starts HTTP/2 (the edge as client) on an agent connection whose hellos are done; returns
/// the lane and the task driving the connection (which fails when the agent goes silent:
/// `keepalive`).
async fn link(
    io: Box<dyn AgentIo>,
    limits: &crate::config::Limits,
    peer: SocketAddr,
) -> anyhow::Result<(Arc<Lane>, tokio::task::JoinHandle<hyper::Result<()>>)> {
    let bytes = Arc::new(AtomicU64::new(0));
    let read = Arc::new(AtomicU64::new(0));
    let silent = Arc::new(AtomicBool::new(false));
    let io = Metered {
        inner: io,
        bytes: Arc::clone(&bytes),
        read: Arc::clone(&read),
        silent: Arc::clone(&silent),
    };
    let mut builder = hyper::client::conn::http2::Builder::new(crate::exec::Executor);
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        .max_frame_size(limits.h2_max_frame_size)
        .max_header_list_size(limits.agent_max_header_list_bytes)
        .max_send_buf_size(limits.h2_stream_window as usize);
    let (sender, conn) = builder.handshake(TokioIo::new(io)).await?;
    let ended = CancellationToken::new();
    let driver = tokio::spawn({
        let ended = ended.clone();
        async move {
            // Also when the task is aborted.
            let _ended = ended.drop_guard();
            conn.await
        }
    });
    tokio::spawn(keepalive(
        sender.clone(),
        limits.agent_keepalive_interval,
        (read, silent),
        ended,
        peer,
    ));
    let lane = Lane::new(
        sender,
        crate::relay::LinkBudget::new(
            limits.h2_connection_window,
            limits.h2_stream_window,
            limits.stopped_reader_grace,
        ),
        bytes,
    );
    Ok((Arc::new(lane), driver))
}

/// Every `interval`, asks the agent for a sign of life ([`CONTROL_KEEPALIVE`]). When neither
/// the answer nor any other byte (`read` counts them) came from the agent within the next
/// `interval`, the connection is dead or the agent frozen: `silent` makes its reads and writes
/// fail from then on, so HTTP/2 ends it with that error and every request on it gets an
/// answer (a 502 page) at once. Ends with the connection (`ended`).
async fn keepalive(
    mut sender: SendRequest<UpBody>,
    interval: Duration,
    (read, silent): (Arc<AtomicU64>, Arc<AtomicBool>),
    ended: CancellationToken,
    peer: SocketAddr,
) {
    let millis = interval.as_millis().to_string();
    let request = || {
        http::Request::builder()
            .method(http::Method::POST)
            .uri("http://burrow.control/")
            .header(HEADER_CONTROL, CONTROL_KEEPALIVE)
            .header(HEADER_KEEPALIVE_MS, &millis)
            .body(Empty::<Bytes>::new().map_err(|n| match n {}).boxed())
    };
    loop {
        tokio::select! {
            () = ended.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let before = read.load(Ordering::Relaxed);
        let Ok(ping) = request() else { return };
        let answer = tokio::select! {
            () = ended.cancelled() => return,
            r = tokio::time::timeout(interval, sender.send_request(ping)) => r,
        };
        match answer {
            Ok(Ok(_)) => {}
            // The connection failed: its driver ends by itself and says why.
            Ok(Err(_)) => return,
            Err(_) if read.load(Ordering::Relaxed) != before => {}
            Err(_) => {
                tracing::warn!(
                    %peer,
                    "the agent sent nothing, not even the answer to a keepalive, for {interval:?}; \
                     dropping its connection (its names stay held for the grace period)"
                );
                silent.store(true, Ordering::Relaxed);
                // Wake the connection's task (a new stream does) so it meets the failure now.
                if let Ok(wake) = request() {
                    let _ = tokio::time::timeout(interval, sender.send_request(wake)).await;
                }
                return;
            }
        }
    }
}

/// Tells the agent the connection is routable; its answer also proves the agent's SETTINGS
/// (extended CONNECT) have arrived.
async fn ready(mut sender: SendRequest<UpBody>) -> anyhow::Result<()> {
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri("http://burrow.control/")
        .header(HEADER_CONTROL, CONTROL_READY)
        .body(Empty::<Bytes>::new().map_err(|n| match n {}).boxed())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "the agent answered {} to the ready message",
        resp.status()
    );
    Ok(())
}

/// An extra lane of a live session: checks its key, starts HTTP/2 on it and offers it for new
/// streams until it or the session's first connection ends.
async fn join_lane(
    mut io: Box<dyn AgentIo>,
    key: &str,
    peer: SocketAddr,
    state: &Arc<State>,
    open: &AtomicUsize,
) -> anyhow::Result<()> {
    let limits = &state.config.limits;
    let agent = key
        .split_once('.')
        .and_then(|(id, _)| id.parse::<u64>().ok())
        .and_then(|id| state.registry.agent(id))
        .filter(|a| {
            !a.lane_key.is_empty() && bool::from(a.lane_key.as_bytes().ct_eq(key.as_bytes()))
        });
    let refusal = match &agent {
        None => Some((
            "NOT_FOUND",
            "this lane's session is gone (its first connection ended); reconnect".to_owned(),
        )),
        Some(a) if a.lanes() >= limits.max_agent_lanes => Some((
            "RESOURCE_EXHAUSTED",
            format!(
                "this session already uses the edge's limit of {} connections",
                limits.max_agent_lanes
            ),
        )),
        // Lanes are optional: the last quarter of the agent connections is kept for agents'
        // first connections, so lanes never keep a new agent out. `open` counts this
        // connection and every other accepted one, whichever thread serves it and however far
        // it has got.
        Some(_)
            if limits
                .max_agent_connections
                .saturating_sub(open.load(Ordering::Relaxed))
                < limits.max_agent_connections / LANE_RESERVE =>
        {
            Some((
                "RESOURCE_EXHAUSTED",
                format!(
                    "the edge is near its limit of {} agent connections; this session keeps the \
                     lanes it has",
                    limits.max_agent_connections
                ),
            ))
        }
        Some(_) => None,
    };
    let answer = pb::EdgeHello {
        error: refusal.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
        error_code: refusal.as_ref().map(|r| r.0.to_owned()).unwrap_or_default(),
        edge_name: state.config.name.clone(),
        lanes: u32::try_from(limits.max_agent_lanes).unwrap_or(u32::MAX),
        ..Default::default()
    };
    write_message(&mut io, &answer).await?;
    let Some(agent) = agent.filter(|_| refusal.is_none()) else {
        tracing::info!(%peer, err = %answer.error, "agent lane refused");
        let _ = io.shutdown().await;
        return Ok(());
    };
    let (lane, mut driver) = link(io, limits, peer).await?;
    let acknowledged =
        tokio::time::timeout(limits.agent_handshake_timeout, ready(lane.sender.clone())).await;
    if !matches!(acknowledged, Ok(Ok(()))) {
        driver.abort();
        anyhow::bail!("the agent did not acknowledge its lane");
    }
    if let Ok(mut extra) = agent.extra.write() {
        extra.push(Arc::clone(&lane));
    }
    tracing::debug!(%peer, lanes = agent.lanes(), "agent lane open");
    let outcome = tokio::select! {
        r = &mut driver => Some(r),
        () = agent.lanes_end.cancelled() => None,
    };
    if let Ok(mut extra) = agent.extra.write() {
        extra.retain(|l| !Arc::ptr_eq(l, &lane));
    }
    driver.abort();
    if let Some(Ok(Err(e))) = outcome {
        tracing::info!(%peer, err = %e, "agent lane ended with an error");
    }
    Ok(())
}

/// An agent connection that counts the bytes it moves, so new streams can go to the least
/// loaded lane (`AgentSession::pick`).
struct Metered {
    inner: Box<dyn AgentIo>,
    bytes: Arc<AtomicU64>,
    /// Bytes read only: a sign of life for the keepalive.
    read: Arc<AtomicU64>,
    /// Set by the keepalive when the agent went silent: reads and writes fail from then on.
    silent: Arc<AtomicBool>,
}

/// The error a silent agent's connection fails with.
fn silent_agent() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the agent sent nothing, not even the answer to a keepalive, for a keepalive interval",
    )
}

impl tokio::io::AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.silent.load(Ordering::Relaxed) {
            return Poll::Ready(Err(silent_agent()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.bytes.fetch_add(read as u64, Ordering::Relaxed);
            self.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.silent.load(Ordering::Relaxed) {
            return Poll::Ready(Err(silent_agent()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.silent.load(Ordering::Relaxed) {
            return Poll::Ready(Err(silent_agent()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Closes the control-plane sessions of `bound`.
async fn release(state: &State, bound: &[Bound], clean: bool) {
    for b in bound {
        state.control.close_session(&b.session_id, clean).await;
    }
}

/// Authorizes the agent and claims each requested name.
async fn bind(
    state: &State,
    hello: &pb::AgentHello,
    peer: SocketAddr,
) -> Result<(Grant, Vec<Bound>), ControlError> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(ControlError::FailedPrecondition(format!(
            "this edge speaks tunnel protocol version {PROTOCOL_VERSION}, the agent speaks {}; upgrade burrow",
            hello.protocol_version
        )));
    }
    if hello.tunnels.is_empty() {
        return Err(ControlError::InvalidArgument(
            "the agent asked for no tunnels".to_owned(),
        ));
    }
    let max = state.config.limits.max_tunnels_per_agent;
    if hello.tunnels.len() > max {
        return Err(ControlError::FailedPrecondition(format!(
            "at most {max} tunnels per agent connection"
        )));
    }
    // Check the agent's policies before asking anyone anything.
    let mut policies = Vec::with_capacity(hello.tunnels.len());
    for t in &hello.tunnels {
        let compiled = match &t.policy {
            Some(p) => Policy::compile(p, &state.config.limits).map_err(|e| {
                let name = if t.subdomain.is_empty() {
                    String::new()
                } else {
                    format!(" for {}", t.subdomain)
                };
                ControlError::InvalidArgument(format!("the tunnel policy{name} is invalid: {e}"))
            })?,
            None => None,
        };
        policies.push(compiled.map(Arc::new));
    }
    let named: Vec<String> = hello
        .tunnels
        .iter()
        .filter(|t| !t.subdomain.is_empty())
        .map(|t| t.subdomain.clone())
        .collect();
    let grant = state.control.authorize(&hello.token, &named).await?;
    if let Some(max) = grant
        .limits
        .as_ref()
        .map(|l| l.max_tunnels_per_session as usize)
        .filter(|m| *m > 0)
    {
        if hello.tunnels.len() > max {
            return Err(ControlError::FailedPrecondition(format!(
                "your plan allows at most {max} tunnels per agent"
            )));
        }
    }
    let mut allowed = grant
        .allowed
        .iter()
        .zip(grant.pinned.iter().map(Some).chain(std::iter::repeat(None)));
    let mut bound: Vec<Bound> = Vec::new();
    for (t, policy) in hello.tunnels.iter().zip(policies) {
        let mut pinned = None;
        let info = AgentInfo {
            instance: hello.agent_instance.clone(),
            version: hello.agent_version.clone(),
            addr: peer.to_string(),
            local_addr: t.local_addr.clone(),
        };
        let mut replaces = None;
        let result = if t.subdomain.is_empty() {
            claim_random(state, &grant, &info).await
        } else {
            match allowed.next() {
                Some((name, Some(Some(p)))) if pinned_policy(state, name, p, &mut pinned).is_err() => {
                    Err(ControlError::FailedPrecondition(format!(
                        "the policy pinned on the reservation of {name} cannot be applied by this edge; ask a team admin to fix it"
                    )))
                }
                Some((name, _)) => match claim_named(state, &grant, hello, name).await {
                    Ok((hold, takeover)) => {
                        replaces = takeover;
                        state
                            .control
                            .open_session(&grant, name, &info)
                            .await
                            .map(|id| (name.clone(), id, hold))
                            .map_err(|e| explain_claim(e, name))
                    }
                    Err(e) => Err(e),
                },
                None => Err(ControlError::Internal),
            }
        };
        match result {
            Ok((subdomain, session_id, hold)) => {
                if bound.iter().any(|b| b.subdomain == subdomain) {
                    release(state, &bound, true).await;
                    return Err(ControlError::InvalidArgument(format!(
                        "{subdomain} is asked for twice"
                    )));
                }
                bound.push(Bound {
                    key: t.key.clone(),
                    subdomain,
                    session_id,
                    policy,
                    pinned,
                    hold: Some(hold),
                    replaces,
                });
            }
            Err(e) => {
                release(state, &bound, true).await;
                return Err(e);
            }
        }
    }
    Ok((grant, bound))
}

/// Compiles the policy pinned on `name`'s reservation into `out`; an error is logged (the
/// control plane should never send one the edge cannot apply).
fn pinned_policy(
    state: &State,
    name: &str,
    p: &pb::TunnelPolicy,
    out: &mut Option<Arc<Policy>>,
) -> Result<(), ()> {
    match Policy::compile(p, &state.config.limits) {
        Ok(compiled) => {
            *out = compiled.map(Arc::new);
            Ok(())
        }
        Err(e) => {
            tracing::error!(subdomain = %name, err = %e, "cannot apply the reservation's pinned policy");
            Err(())
        }
    }
}

/// Turns a claim refusal into a sentence naming the subdomain.
fn explain_claim(e: ControlError, name: &str) -> ControlError {
    match e {
        ControlError::AlreadyExists(m) if m.is_empty() => ControlError::AlreadyExists(format!(
            "{name} is in use by another live tunnel; choose another --subdomain"
        )),
        other => other,
    }
}

/// Decides whether the agent of `hello` may bind `name`, which this edge may route to
/// another agent connection already: never one of another team; at once one of the same agent
/// process (it reconnected before the edge noticed its old connection died); otherwise only
/// when the holder does not answer a liveness probe (`Limits::takeover_probe_timeout`). A
/// holder that answers keeps the name, so a second `burrow` started by mistake cannot quietly
/// steal a tunnel that is serving visitors.
async fn claim_named(
    state: &State,
    grant: &Grant,
    hello: &pb::AgentHello,
    name: &str,
) -> Result<(BindingHold, Option<Takeover>), ControlError> {
    let hold = state.registry.hold_binding(name).ok_or_else(|| {
        ControlError::AlreadyExists(format!(
            "{name} is being bound by another agent at this moment; choose another --subdomain"
        ))
    })?;
    let Some(old) = state.registry.route(name) else {
        return Ok((hold, None));
    };
    if old.agent.team_id != grant.team_id {
        return Err(ControlError::AlreadyExists(format!(
            "subdomain {name:?} is in use by another team's tunnel"
        )));
    }
    if old.agent.instance == hello.agent_instance && old.agent.token_id == grant.token_id {
        return Ok((hold, Some(Takeover { old, tell: false })));
    }
    let timeout = state.config.limits.takeover_probe_timeout;
    if old.agent.is_alive(timeout).await {
        return Err(ControlError::AlreadyExists(format!(
            "{name} is in use by a live tunnel of your team (an agent connected from {} for \
             {} s); stop that agent first, or choose another --subdomain",
            old.agent.peer,
            old.agent.since.elapsed().as_secs()
        )));
    }
    tracing::info!(
        subdomain = %name,
        holder = %old.agent.peer,
        "the agent holding this name did not answer the liveness probe; taking it over"
    );
    Ok((hold, Some(Takeover { old, tell: true })))
}

async fn claim_random(
    state: &State,
    grant: &Grant,
    info: &AgentInfo,
) -> Result<(String, String, BindingHold), ControlError> {
    // A scope like `demo-*` confines names to that prefix.
    let prefix = grant
        .scopes
        .iter()
        .find_map(|s| s.strip_suffix('*'))
        .unwrap_or("")
        .to_owned();
    let mut last = None;
    for _ in 0..RANDOM_NAME_ATTEMPTS {
        let name = format!("{prefix}{}", random_label(RANDOM_NAME_LEN));
        if state.registry.is_bound(&name) {
            continue;
        }
        let Some(hold) = state.registry.hold_binding(&name) else {
            continue;
        };
        match state.control.open_session(grant, &name, info).await {
            Ok(id) => return Ok((name, id, hold)),
            Err(e @ (ControlError::AlreadyExists(_) | ControlError::PermissionDenied(_))) => {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        ControlError::Unavailable("no free random subdomain found; retrying".to_owned())
    }))
}

fn random_label(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|i| {
            // Start with a letter so the name never looks like a number.
            let n = if i == 0 { 26 } else { ALPHABET.len() };
            ALPHABET[rand::random::<usize>() % n] as char
        })
        .collect()
}
