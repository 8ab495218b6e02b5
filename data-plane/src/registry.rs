//! Live state of the edge: agent sessions and the route table (subdomain → tunnel).
//!
//! Teardown is by ownership: an agent session owns a child [`CancellationToken`]; cancelling it
//! ends the agent's connection task, which removes the session's routes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use burrow_proto::tunnel::{
    CONTROL_CLOSED, CONTROL_PROBE, HEADER_CONTROL, HEADER_REASON, HEADER_TUNNEL,
};
use burrow_proto::v1 as pb;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http2::SendRequest;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::policy::{Policies, Policy, Reason, Refusals, Verifier};

/// Body type of requests the edge sends to agents.
pub(crate) type UpBody = BoxBody<Bytes, crate::backlog::BoxError>;

/// Most names remembered as "recently offline"; older ones are forgotten first.
const MAX_OFFLINE_NAMES: usize = 100_000;
/// How long a pinned-policy change is remembered for its name, so a tunnel whose binding was
/// in flight when the change arrived (authorized with the old policy) still gets the new one.
/// Longer than any binding takes (handshake and control-plane timeouts are seconds).
const RECENT_PIN_KEEP: Duration = Duration::from_secs(120);
/// Most pinned-policy changes remembered at once; the oldest is forgotten first.
const MAX_RECENT_PINS: usize = 10_000;

/// Checks and case-folds one subdomain label (RFC 1035 label, lower case).
pub(crate) fn normalize_subdomain(s: &str) -> Result<String, String> {
    let l = s.to_ascii_lowercase();
    let ok = !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-');
    if ok {
        Ok(l)
    } else {
        Err(format!(
            "{s:?} is not a valid subdomain: use 1-63 letters, digits or hyphens, not starting or ending with a hyphen"
        ))
    }
}

/// Live counters of one tunnel.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_open: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) websocket_messages: AtomicU64,
    /// WebSockets open now.
    pub(crate) websockets_open: AtomicU64,
}

/// The limits in force for one tunnel (0: unlimited).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RouteLimits {
    pub(crate) max_websockets: u32,
    pub(crate) max_requests_per_second: u32,
    /// Per WebSocket connection, each direction.
    pub(crate) max_bytes_per_second: u64,
}

impl RouteLimits {
    /// The control plane's limits, each zero replaced by the edge's default.
    pub(crate) fn resolve(granted: &pb::TunnelLimits, defaults: &Limits) -> Self {
        let pick = |granted: u32, default: u32| if granted > 0 { granted } else { default };
        Self {
            max_websockets: pick(
                granted.max_websocket_connections,
                defaults.default_max_websockets_per_tunnel,
            ),
            max_requests_per_second: pick(
                granted.max_new_connections_per_second,
                defaults.default_max_requests_per_second_per_tunnel,
            ),
            max_bytes_per_second: if granted.max_bytes_per_second_per_connection > 0 {
                granted.max_bytes_per_second_per_connection
            } else {
                defaults.default_max_websocket_bytes_per_second
            },
        }
    }
}

/// A fixed one-second window counter: at most `max` admissions per window.
#[derive(Debug)]
pub(crate) struct RateWindow {
    origin: Instant,
    state: Mutex<(u64, u32)>,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            state: Mutex::new((0, 0)),
        }
    }
}

impl RateWindow {
    /// Counts one admission; false when this second already had `max`.
    pub(crate) fn admit(&self, max: u32) -> bool {
        let second = self.origin.elapsed().as_secs();
        let Ok(mut st) = self.state.lock() else {
            return true;
        };
        if st.0 != second {
            *st = (second, 0);
        }
        if st.1 >= max {
            return false;
        }
        st.1 += 1;
        true
    }
}

/// One agent connection.
pub(crate) struct AgentSession {
    /// Edge-local id.
    pub(crate) id: u64,
    pub(crate) token_id: String,
    /// Team the agent's token belongs to.
    pub(crate) team_id: String,
    /// The agent process's instance id: random per run, the same across its reconnects.
    pub(crate) instance: String,
    /// Where the agent connected from.
    pub(crate) peer: SocketAddr,
    /// When the agent's first connection was accepted.
    pub(crate) since: Instant,
    /// Cancelled to end the agent connection.
    pub(crate) cancel: CancellationToken,
    /// The first connection (the one that bound the names).
    pub(crate) primary: Arc<Lane>,
    /// Extra connections the agent opened with the session's lane key (`Limits::max_agent_lanes`).
    pub(crate) extra: RwLock<Vec<Arc<Lane>>>,
    /// Secret an extra lane presents to join this session; empty when lanes are off.
    pub(crate) lane_key: String,
    /// Round-robin start for picking among equally busy lanes.
    pub(crate) next_lane: AtomicU64,
    /// Becomes true once the agent has acknowledged its settings (extended CONNECT usable).
    pub(crate) ready: watch::Receiver<bool>,
    /// Cancelled when the first connection is gone: its lanes end with it.
    pub(crate) lanes_end: CancellationToken,
}

/// How long a lane's byte count is averaged over when choosing where a new stream goes.
pub(crate) const LANE_SAMPLE: Duration = Duration::from_millis(50);

/// One HTTP/2 connection of an agent session.
pub(crate) struct Lane {
    /// Opens streams to the agent.
    pub(crate) sender: SendRequest<UpBody>,
    /// What this connection's relays may leave waiting in h2 as small frames.
    pub(crate) small_frames: Arc<crate::relay::LinkBudget>,
    /// Bytes read and written on the connection so far (counted by the agent listener).
    pub(crate) bytes: Arc<AtomicU64>,
    recent: Recent,
    /// Visitor streams open on the connection now ([`LaneStream`]s alive).
    streams: AtomicU64,
    /// The worker thread the connection is served on (`crate::shards`).
    shard: Option<usize>,
}

/// One visitor stream's claim on its lane: counted as open until dropped.
pub(crate) struct LaneStream(Arc<Lane>);

impl std::ops::Deref for LaneStream {
    type Target = Lane;

    fn deref(&self) -> &Lane {
        &self.0
    }
}

impl Drop for LaneStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lane {
    pub(crate) fn new(
        sender: SendRequest<UpBody>,
        small_frames: Arc<crate::relay::LinkBudget>,
        bytes: Arc<AtomicU64>,
    ) -> Self {
        Self {
            sender,
            small_frames,
            bytes,
            recent: Recent::new(Instant::now()),
            streams: AtomicU64::new(0),
            shard: crate::shards::current(),
        }
    }

    /// How loaded the lane is: (visitor streams open, bytes moved lately); `None` when the
    /// connection has failed (not yet removed).
    fn load(&self, now: Instant) -> Option<(u64, u64)> {
        if self.sender.is_closed() {
            return None;
        }
        Some((
            self.streams.load(Ordering::Relaxed),
            self.recent.busy(self.bytes.load(Ordering::Relaxed), now),
        ))
    }
}

/// How many bytes a connection moved lately, from its running total, looked at lazily.
struct Recent(Mutex<(Instant, u64, u64)>);

impl Recent {
    fn new(now: Instant) -> Self {
        Self(Mutex::new((now, 0, 0)))
    }

    /// Bytes of the current sample period plus the one before it; after a longer gap, the
    /// average per period since the last look.
    fn busy(&self, total: u64, now: Instant) -> u64 {
        let Ok(mut s) = self.0.lock() else {
            return 0;
        };
        let (at, at_total, before) = *s;
        let since = now.saturating_duration_since(at);
        let moved = total.saturating_sub(at_total);
        if since < LANE_SAMPLE {
            return before + moved;
        }
        let periods = (since.as_nanos() / LANE_SAMPLE.as_nanos()).max(1);
        let per_period = u64::try_from(u128::from(moved) / periods).unwrap_or(u64::MAX);
        *s = (now, total, per_period);
        per_period
    }
}

/// Index of the least loaded of `n` lanes (`load(i)`: streams open, then bytes moved lately;
/// `None` for a failed lane), looking from `start` on so that equally loaded lanes take turns;
/// 0 when every lane failed.
fn least_loaded(n: usize, start: usize, load: impl Fn(usize) -> Option<(u64, u64)>) -> usize {
    least_loaded_working(n, start, load).unwrap_or(0)
}

/// Like [`least_loaded`], `None` when every lane failed.
fn least_loaded_working(
    n: usize,
    start: usize,
    load: impl Fn(usize) -> Option<(u64, u64)>,
) -> Option<usize> {
    let mut best: Option<(usize, (u64, u64))> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if let Some(l) = load(i) {
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((i, l));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Like [`least_loaded`], among the lanes served on worker thread `here` (`shard(i)`) when any
/// of them works; among all lanes otherwise. Each lane's load is looked at once, unless none
/// on `here` works.
fn least_loaded_near(
    n: usize,
    start: usize,
    here: Option<usize>,
    shard: impl Fn(usize) -> Option<usize>,
    load: impl Fn(usize) -> Option<(u64, u64)>,
) -> usize {
    if here.is_some() {
        let near = |i: usize| if shard(i) == here { load(i) } else { None };
        if let Some(i) = least_loaded_working(n, start, near) {
            return i;
        }
    }
    least_loaded(n, start, load)
}

impl AgentSession {
    /// The lane a new visitor stream should use: among the lanes served on the caller's worker
    /// thread (all lanes when none is), the one with the fewest streams open, then the one that
    /// moved the fewest bytes lately, taking turns among equal ones. The stream counts as open
    /// on it until the returned claim is dropped.
    pub(crate) fn pick(&self) -> LaneStream {
        let lane = self.least_loaded_lane();
        lane.streams.fetch_add(1, Ordering::Relaxed);
        LaneStream(lane)
    }

    fn least_loaded_lane(&self) -> Arc<Lane> {
        let extra = match self.extra.read() {
            Ok(e) if !e.is_empty() => e,
            _ => return Arc::clone(&self.primary),
        };
        let n = extra.len() + 1;
        let start = (self.next_lane.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
        let now = Instant::now();
        let lane = |i: usize| {
            if i == 0 {
                &self.primary
            } else {
                &extra[i - 1]
            }
        };
        let i = least_loaded_near(
            n,
            start,
            crate::shards::current(),
            |i| lane(i).shard,
            |i| lane(i).load(now),
        );
        Arc::clone(lane(i))
    }

    /// Whether the agent answers a liveness probe on its first connection within `timeout`.
    pub(crate) async fn is_alive(&self, timeout: Duration) -> bool {
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri("http://burrow.control/")
            .header(HEADER_CONTROL, CONTROL_PROBE)
            .body(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
        let Ok(req) = req else { return false };
        let mut sender = self.primary.sender.clone();
        matches!(
            tokio::time::timeout(timeout, sender.send_request(req)).await,
            Ok(Ok(resp)) if resp.status().is_success()
        )
    }

    /// How many connections the session uses now.
    pub(crate) fn lanes(&self) -> usize {
        1 + self.extra.read().map(|e| e.len()).unwrap_or(0)
    }
}

/// One bound tunnel.
pub(crate) struct Route {
    pub(crate) subdomain: String,
    /// The agent's key for this tunnel, echoed in `burrow-tunnel`.
    pub(crate) key: String,
    /// Control-plane session id.
    pub(crate) session_id: String,
    pub(crate) agent: Arc<AgentSession>,
    pub(crate) counters: Counters,
    /// The limits in force; replaced when the team's limits change.
    pub(crate) live_limits: RwLock<RouteLimits>,
    pub(crate) rate: RateWindow,
    /// The agent's and the pinned policy.
    pub(crate) policies: Policies,
    /// Visitors refused by a policy, by reason.
    pub(crate) refusals: Refusals,
    /// The tunnel's Prometheus series (shared by routes of the same team and name).
    pub(crate) metrics: Arc<crate::metrics::TunnelSeries>,
}

impl Route {
    /// The tunnel's counters so far, for `ReportTunnelStats`.
    pub(crate) fn stats(&self) -> pb::TunnelStats {
        let c = &self.counters;
        pb::TunnelStats {
            session_id: self.session_id.clone(),
            connections_total: c.connections_total.load(Ordering::Relaxed),
            connections_open: c.connections_open.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            websocket_messages: c.websocket_messages.load(Ordering::Relaxed),
            lanes: u32::try_from(self.agent.lanes()).unwrap_or(u32::MAX),
        }
    }

    /// The limits in force now.
    pub(crate) fn limits(&self) -> RouteLimits {
        self.live_limits.read().map(|l| *l).unwrap_or_default()
    }
}

/// Policy refusals of one live tunnel, for metrics.
#[allow(dead_code)] // Read by the metrics exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefusalCount {
    pub(crate) team_id: String,
    pub(crate) subdomain: String,
    /// `basic_auth`, `ip` or `origin`.
    pub(crate) reason: &'static str,
    pub(crate) count: u64,
}

/// Totals for the heartbeat.
pub(crate) struct Counts {
    pub(crate) agent_sessions: u32,
    /// Connections of those sessions, extra lanes included.
    pub(crate) agent_lanes: u32,
    pub(crate) tunnels: u32,
    pub(crate) visitor_connections: u64,
}

/// A pinned-policy change (`None`: cleared) and when it arrived.
type RecentPin = (Instant, Option<Arc<Policy>>);

/// The edge's live state.
pub(crate) struct Registry {
    routes: RwLock<HashMap<String, Arc<Route>>>,
    /// Names whose tunnel vanished recently, with when to forget them.
    offline: Mutex<HashMap<String, Instant>>,
    /// Names an agent handshake is binding right now (claimed, not routed yet).
    binding: Mutex<HashSet<String>>,
    agents: Mutex<HashMap<u64, Arc<AgentSession>>>,
    next_agent_id: AtomicU64,
    /// Open visitor connections.
    pub(crate) visitor_connections: AtomicU64,
    /// Basic-auth verification, shared by every tunnel.
    pub(crate) verifier: Verifier,
    /// Recent pinned-policy changes by name, with when they arrived.
    recent_pins: Mutex<HashMap<String, RecentPin>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(&Limits::default())
    }
}

impl Registry {
    pub(crate) fn new(limits: &Limits) -> Self {
        Self {
            routes: RwLock::default(),
            offline: Mutex::default(),
            binding: Mutex::default(),
            agents: Mutex::default(),
            next_agent_id: AtomicU64::new(0),
            visitor_connections: AtomicU64::new(0),
            verifier: Verifier::new(limits),
            recent_pins: Mutex::default(),
        }
    }

    pub(crate) fn next_agent_id(&self) -> u64 {
        self.next_agent_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The route for `subdomain`, if live.
    pub(crate) fn route(&self, subdomain: &str) -> Option<Arc<Route>> {
        self.routes.read().ok()?.get(subdomain).cloned()
    }

    /// Whether `subdomain` had a tunnel that vanished within the grace period.
    pub(crate) fn is_offline(&self, subdomain: &str) -> bool {
        self.offline
            .lock()
            .ok()
            .and_then(|m| m.get(subdomain).copied())
            .is_some_and(|until| until > Instant::now())
    }

    /// Whether a name is bound on this edge right now.
    pub(crate) fn is_bound(&self, subdomain: &str) -> bool {
        self.route(subdomain).is_some()
    }

    /// Claims `subdomain` for one agent handshake until the returned hold is dropped; `None`
    /// when another handshake is binding it right now.
    pub(crate) fn hold_binding(self: &Arc<Self>, subdomain: &str) -> Option<BindingHold> {
        let mut b = self.binding.lock().ok()?;
        b.insert(subdomain.to_owned()).then(|| BindingHold {
            registry: Arc::clone(self),
            subdomain: subdomain.to_owned(),
        })
    }

    pub(crate) fn add_agent(&self, agent: Arc<AgentSession>) {
        if let Ok(mut a) = self.agents.lock() {
            a.insert(agent.id, agent);
        }
    }

    /// The live agent session with edge-local id `id`.
    pub(crate) fn agent(&self, id: u64) -> Option<Arc<AgentSession>> {
        self.agents.lock().ok()?.get(&id).cloned()
    }

    pub(crate) fn remove_agent(&self, id: u64) {
        if let Ok(mut a) = self.agents.lock() {
            a.remove(&id);
        }
    }

    /// Installs routes, replacing any older route of the same name (a reconnecting agent
    /// takes its names over at once).
    pub(crate) fn insert_routes(&self, routes: &[Arc<Route>]) {
        if let Ok(mut table) = self.routes.write() {
            for r in routes {
                table.insert(r.subdomain.clone(), Arc::clone(r));
            }
        }
        if let Ok(mut off) = self.offline.lock() {
            for r in routes {
                off.remove(&r.subdomain);
            }
        }
    }

    /// Removes the routes of agent `agent_id` that are still its own; marks them offline for
    /// `grace` when given. Returns the removed routes.
    pub(crate) fn remove_routes_of(
        &self,
        agent_id: u64,
        grace: Option<Duration>,
    ) -> Vec<Arc<Route>> {
        let mut removed = Vec::new();
        if let Ok(mut table) = self.routes.write() {
            table.retain(|_, r| {
                if r.agent.id == agent_id {
                    removed.push(Arc::clone(r));
                    false
                } else {
                    true
                }
            });
        }
        if let (Some(grace), Ok(mut off)) = (grace, self.offline.lock()) {
            let now = Instant::now();
            if off.len() >= MAX_OFFLINE_NAMES {
                off.retain(|_, until| *until > now);
            }
            if off.len() < MAX_OFFLINE_NAMES {
                for r in &removed {
                    off.insert(r.subdomain.clone(), now + grace);
                }
            }
        }
        removed
    }

    /// Ends the tunnel recorded as `session_id`: tells its agent why, then unroutes it.
    pub(crate) async fn end_tunnel(&self, session_id: &str, reason: &str) {
        let route = self
            .routes
            .read()
            .ok()
            .and_then(|t| t.values().find(|r| r.session_id == session_id).cloned());
        let Some(route) = route else { return };
        if let Ok(mut table) = self.routes.write() {
            if table
                .get(&route.subdomain)
                .is_some_and(|r| Arc::ptr_eq(r, &route))
            {
                table.remove(&route.subdomain);
            }
        }
        tell_closed(&route, reason).await;
        tracing::info!(subdomain = %route.subdomain, reason, "tunnel ended");
        self.end_agent_if_idle(&route.agent);
    }

    /// Deals with `old`, a route a newer agent connection just replaced: tells its agent
    /// why (unless `reason` is `None`: the same agent reconnected, and its old connection
    /// must not hear that the name is gone), then ends that connection if it routes nothing
    /// else.
    pub(crate) async fn retire(&self, old: &Route, reason: Option<&str>) {
        if let Some(reason) = reason {
            tell_closed(old, reason).await;
        }
        self.end_agent_if_idle(&old.agent);
    }

    /// Ends `agent`'s connection when no route leads to it any more.
    fn end_agent_if_idle(&self, agent: &AgentSession) {
        let agent_has_more = self
            .routes
            .read()
            .map(|t| t.values().any(|r| r.agent.id == agent.id))
            .unwrap_or(false);
        if !agent_has_more {
            agent.cancel.cancel();
        }
    }

    /// Ends every agent connection that authenticated with `token_id`.
    pub(crate) async fn end_token(&self, token_id: &str, reason: &str) {
        let routes: Vec<Arc<Route>> = self
            .routes
            .read()
            .map(|t| {
                t.values()
                    .filter(|r| r.agent.token_id == token_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for r in &routes {
            tell_closed(r, reason).await;
        }
        let agents: Vec<Arc<AgentSession>> = self
            .agents
            .lock()
            .map(|a| {
                a.values()
                    .filter(|s| s.token_id == token_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for a in agents {
            tracing::info!(reason, "ending agent connection");
            a.cancel.cancel();
        }
    }

    /// Applies a new pinned policy to the live tunnel on `subdomain`, if any, and remembers it
    /// briefly for a tunnel being bound on that name right now (see [`Self::catch_up_pins`]).
    pub(crate) fn set_pinned_policy(&self, subdomain: &str, policy: Option<Arc<Policy>>) {
        if let Ok(mut recent) = self.recent_pins.lock() {
            let now = Instant::now();
            if recent.len() >= MAX_RECENT_PINS {
                recent.retain(|_, (at, _)| now.duration_since(*at) < RECENT_PIN_KEEP);
            }
            if recent.len() >= MAX_RECENT_PINS {
                if let Some(k) = recent
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                {
                    recent.remove(&k);
                }
            }
            recent.insert(subdomain.to_owned(), (now, policy.clone()));
        }
        if let Some(r) = self.route(subdomain) {
            tracing::info!(
                %subdomain,
                pinned = policy.is_some(),
                "the reservation's pinned policy changed"
            );
            r.policies.set_pinned(policy);
        }
    }

    /// Gives freshly installed `routes` any pinned-policy change that arrived after their
    /// binding started at `since`: their authorization may predate it.
    pub(crate) fn catch_up_pins(&self, routes: &[Arc<Route>], since: Instant) {
        let Ok(recent) = self.recent_pins.lock() else {
            return;
        };
        for r in routes {
            if let Some((at, policy)) = recent.get(&r.subdomain) {
                if *at >= since {
                    tracing::info!(subdomain = %r.subdomain, "applying a pinned-policy change that arrived while the tunnel was being bound");
                    r.policies.set_pinned(policy.clone());
                }
            }
        }
    }

    /// Applies a team's new limits to its live tunnels (new requests and WebSockets see them).
    pub(crate) fn set_team_limits(&self, team_id: &str, limits: RouteLimits) {
        let Ok(t) = self.routes.read() else { return };
        for r in t.values().filter(|r| r.agent.team_id == team_id) {
            if let Ok(mut l) = r.live_limits.write() {
                *l = limits;
            }
        }
    }

    /// Policy refusals of every live tunnel, by reason (counted since each tunnel was bound).
    #[allow(dead_code)] // Read by the metrics exporter.
    pub(crate) fn refusal_counts(&self) -> Vec<RefusalCount> {
        let Ok(t) = self.routes.read() else {
            return Vec::new();
        };
        t.values()
            .flat_map(|r| {
                Reason::ALL.into_iter().map(|reason| RefusalCount {
                    team_id: r.agent.team_id.clone(),
                    subdomain: r.subdomain.clone(),
                    reason: reason.as_str(),
                    count: r.refusals.get(reason),
                })
            })
            .collect()
    }

    pub(crate) fn counts(&self) -> Counts {
        let agents: Vec<Arc<AgentSession>> = self
            .agents
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        Counts {
            agent_sessions: agents.len() as u32,
            agent_lanes: agents.iter().map(|a| a.lanes()).sum::<usize>() as u32,
            tunnels: self.routes.read().map(|t| t.len()).unwrap_or(0) as u32,
            visitor_connections: self.visitor_connections.load(Ordering::Relaxed),
        }
    }

    /// Counters of every live tunnel, for `ReportTunnelStats`.
    pub(crate) fn stats(&self) -> Vec<pb::TunnelStats> {
        let Ok(t) = self.routes.read() else {
            return Vec::new();
        };
        t.values()
            .filter(|r| !r.session_id.starts_with("local-"))
            .map(|r| r.stats())
            .collect()
    }
}

/// Sends the agent a `closed` control message for `route` (best effort, bounded in time).
/// A name held for one agent handshake (see [`Registry::hold_binding`]); dropping it frees
/// the name for other handshakes.
pub(crate) struct BindingHold {
    registry: Arc<Registry>,
    subdomain: String,
}

impl Drop for BindingHold {
    fn drop(&mut self) {
        if let Ok(mut b) = self.registry.binding.lock() {
            b.remove(&self.subdomain);
        }
    }
}

async fn tell_closed(route: &Route, reason: &str) {
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri("http://burrow.control/")
        .header(HEADER_CONTROL, CONTROL_CLOSED)
        .header(HEADER_TUNNEL, route.key.as_str())
        .header(
            HEADER_REASON,
            http::HeaderValue::from_str(reason)
                .unwrap_or_else(|_| http::HeaderValue::from_static("ended")),
        )
        .body(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
    let Ok(req) = req else { return };
    let mut sender = route.agent.primary.sender.clone();
    let _ = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_counts_a_burst_at_once_and_forgets_it_after_two_quiet_periods() {
        let t0 = Instant::now();
        let r = Recent::new(t0);
        assert_eq!(r.busy(0, t0), 0);
        // A transfer that just started counts before its period is over.
        assert_eq!(r.busy(300_000, t0 + LANE_SAMPLE / 2), 300_000);
        // Next period: the last one's bytes still count, plus the new ones.
        assert_eq!(r.busy(400_000, t0 + LANE_SAMPLE), 400_000);
        assert_eq!(r.busy(400_000, t0 + LANE_SAMPLE + LANE_SAMPLE / 2), 400_000);
        // Quiet for two periods: nothing lately.
        assert_eq!(r.busy(400_000, t0 + LANE_SAMPLE * 2), 0);
        assert_eq!(r.busy(400_000, t0 + LANE_SAMPLE * 3), 0);
    }

    #[test]
    fn after_a_long_gap_a_lane_counts_its_average_per_period() {
        let t0 = Instant::now();
        let r = Recent::new(t0);
        // 1 MB over ten periods: 100 kB per period.
        assert_eq!(r.busy(1_000_000, t0 + LANE_SAMPLE * 10), 100_000);
    }

    #[test]
    fn the_least_loaded_lane_is_picked_and_equal_ones_take_turns() {
        // Fewest streams first; a lane that just finished a transfer (many bytes, no stream)
        // beats one where a transfer has just begun.
        let load = [Some((1, 300_000)), Some((0, 1 << 20)), Some((1, 10)), None];
        assert_eq!(least_loaded(4, 0, |i| load[i]), 1);
        let load = [Some((1, 5_000_000)), Some((1, 10)), Some((1, 10)), None];
        assert_eq!(least_loaded(4, 0, |i| load[i]), 1);
        assert_eq!(least_loaded(4, 2, |i| load[i]), 2);
        // The failed lane is never picked, even from its own turn.
        assert_eq!(least_loaded(4, 3, |i| load[i]), 1);
        let idle = [Some((0, 0)); 3];
        let picks: Vec<usize> = (0..3).map(|s| least_loaded(3, s, |i| idle[i])).collect();
        assert_eq!(picks, [0, 1, 2]);
        assert_eq!(least_loaded(2, 1, |_| None), 0);
    }

    #[test]
    fn a_lane_on_the_callers_own_thread_is_preferred_while_one_works() {
        // Lanes 0 and 2 on thread 0, 1 and 3 on thread 1; lane 1 is the least loaded.
        let shard = |i: usize| Some(i % 2);
        let load = [Some((3, 0)), Some((0, 0)), Some((2, 0)), Some((4, 0))];
        assert_eq!(least_loaded_near(4, 0, Some(0), shard, |i| load[i]), 2);
        assert_eq!(least_loaded_near(4, 0, Some(1), shard, |i| load[i]), 1);
        // Not on a worker thread, or on one without lanes: every lane counts.
        assert_eq!(least_loaded_near(4, 0, None, shard, |i| load[i]), 1);
        assert_eq!(least_loaded_near(4, 0, Some(5), shard, |i| load[i]), 1);
        // Thread 0's lanes have failed: the others serve.
        let failed = [None, Some((1, 0)), None, Some((0, 0))];
        assert_eq!(least_loaded_near(4, 0, Some(0), shard, |i| failed[i]), 3);
    }
}
