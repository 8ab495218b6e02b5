//! Prometheus metrics of the edge, and its admin listener: `/metrics` (text exposition format
//! 0.0.4), `/healthz` and `/readyz`.
//!
//! # Cardinality
//! Per-tunnel series carry two labels, `team` (the team's name) and `tunnel` (the subdomain),
//! and exist only while the tunnel does: each [`Route`](crate::registry::Route) owns a
//! [`TunnelSeries`], and when the last route of a `(team, tunnel)` pair is gone (including
//! requests and WebSockets still in flight through it) every series of that pair is removed.
//! The number of series is therefore bounded by the live tunnels
//! ([`Limits::max_agent_connections`](crate::Limits) × `max_tunnels_per_agent`), times a
//! fixed number per tunnel. No label ever carries a visitor-supplied value: requests for
//! unknown names are counted without the name, and close codes outside the registered set are
//! counted as `other`. A tunnel that comes back starts its counters from zero again, which
//! Prometheus' `rate()` handles as a counter reset.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{header, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::frame::FrameStats;
use crate::registry::Route;
use crate::relay::{Direction, RelaySink};
use crate::State;

/// Upper bounds (seconds) of the request-duration buckets: 1 ms to 60 s.
const REQUEST_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];
/// Upper bounds (seconds) of the keepalive round-trip buckets: 0.5 ms to 10 s.
const PING_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// HTTP status classes, the `status_class` label.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The `code` label of close frames that carried no status code.
const CLOSE_NO_CODE: &str = "none";
/// The `code` label of close codes outside [`CLOSE_CODES`].
const CLOSE_OTHER: &str = "other";
/// Close codes with their own `code` label value: the ones RFC 6455 §7.4.1 and the IANA
/// registry define for use in close frames. Any other code is counted as `other`.
const CLOSE_CODES: [(u16, &str); 13] = [
    (1000, "1000"),
    (1001, "1001"),
    (1002, "1002"),
    (1003, "1003"),
    (1007, "1007"),
    (1008, "1008"),
    (1009, "1009"),
    (1010, "1010"),
    (1011, "1011"),
    (1012, "1012"),
    (1013, "1013"),
    (1014, "1014"),
    (1015, "1015"),
];

/// Values the `code` label takes: one per entry of [`CLOSE_CODES`], then "none" and "other".
const CLOSE_LABELS: usize = CLOSE_CODES.len() + 2;

/// Where a close code's `code` label value sits among the [`CLOSE_LABELS`].
fn close_code_index(code: Option<u16>) -> usize {
    match code {
        None => CLOSE_CODES.len(),
        Some(c) => CLOSE_CODES
            .iter()
            .position(|(k, _)| *k == c)
            .unwrap_or(CLOSE_CODES.len() + 1),
    }
}

/// The `code` label value of a close code.
fn close_code_label(code: Option<u16>) -> &'static str {
    match CLOSE_CODES.get(close_code_index(code)) {
        Some((_, label)) => label,
        None if code.is_none() => CLOSE_NO_CODE,
        None => CLOSE_OTHER,
    }
}

/// The `direction` label of a relay direction.
fn direction_label(dir: Direction) -> &'static str {
    match dir {
        Direction::ToLocal => "to_local",
        Direction::ToVisitor => "to_visitor",
    }
}

/// The status class of `status`, or `None` outside 100–599.
fn status_class(status: StatusCode) -> Option<usize> {
    match status.as_u16() {
        100..=599 => Some(usize::from(status.as_u16() / 100 - 1)),
        _ => None,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    team: String,
    tunnel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    team: String,
    tunnel: String,
    status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnroutedLabels {
    status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WsLabels {
    team: String,
    tunnel: String,
    direction: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    team: String,
    tunnel: String,
    direction: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    team: String,
    tunnel: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    team: String,
    tunnel: String,
    reason: String,
}

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

/// Values read at scrape time from the edge's live state.
struct Sampled(Arc<crate::registry::Registry>);

impl std::fmt::Debug for Sampled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sampled")
    }
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counts = self.0.counts();
        let gauges = [
            (
                "agent_sessions",
                "Agent connections bound to this edge.",
                i64::from(counts.agent_sessions),
            ),
            (
                "agent_lanes",
                "Connections of those agents: each one's first and its extra lanes.",
                i64::from(counts.agent_lanes),
            ),
            (
                "tunnels",
                "Tunnels routable on this edge.",
                i64::from(counts.tunnels),
            ),
            (
                "visitor_connections_open",
                "Visitor TCP connections open (HTTP and HTTPS listeners).",
                i64::try_from(counts.visitor_connections).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let c = ConstCounter::new(self.0.verifier.runs());
        c.encode(encoder.encode_descriptor(
            "basic_auth_verifications",
            "argon2id verifications of visitors' basic-auth passwords (cache misses).",
            None,
            c.metric_type(),
        )?)
    }
}

/// Every metric family of the edge.
struct Families {
    visitor_connections: Counter,
    unrouted_requests: Family<UnroutedLabels, Counter>,
    http_requests: Family<StatusLabels, Counter>,
    http_duration: Family<TunnelLabels, Histogram, fn() -> Histogram>,
    websockets_open: Family<TunnelLabels, Gauge>,
    websockets: Family<TunnelLabels, Counter>,
    ws_messages: Family<WsLabels, Counter>,
    ws_bytes: Family<WsLabels, Counter>,
    ws_closes: Family<CloseLabels, Counter>,
    ping_rtt: Histogram,
    pings: Counter,
    refusals: Family<RefusalLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
}

/// The edge's metrics: a Prometheus registry plus the live tunnels' label sets.
pub(crate) struct EdgeMetrics {
    registry: Registry,
    f: Arc<Families>,
    /// How many [`TunnelSeries`] exist per label set; the series go when it drops to zero.
    live: Arc<Mutex<HashMap<TunnelLabels, usize>>>,
}

impl EdgeMetrics {
    pub(crate) fn new(registry: Arc<crate::registry::Registry>) -> Self {
        let f = Families {
            visitor_connections: Counter::default(),
            unrouted_requests: Family::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(request_histogram),
            websockets_open: Family::default(),
            websockets: Family::default(),
            ws_messages: Family::default(),
            ws_bytes: Family::default(),
            ws_closes: Family::default(),
            ping_rtt: Histogram::new(PING_BUCKETS),
            pings: Counter::default(),
            refusals: Family::default(),
            bytes: Family::default(),
        };
        let mut r = Registry::with_prefix("burrow_edge");
        r.register(
            "visitor_connections",
            "Visitor TCP connections accepted",
            f.visitor_connections.clone(),
        );
        r.register(
            "unrouted_requests",
            "Visitor requests that named no live tunnel (no Host, another domain, unknown or offline name), by status class",
            f.unrouted_requests.clone(),
        );
        r.register(
            "http_requests",
            "Visitor requests to a tunnel, by the status class of the answer (upgrades included: 101 is 1xx)",
            f.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from a visitor's request head to the response head the edge sends back",
            f.http_duration.clone(),
        );
        r.register(
            "websockets_open",
            "WebSocket connections being relayed",
            f.websockets_open.clone(),
        );
        r.register(
            "websockets",
            "WebSocket connections relayed (counted when the relay starts)",
            f.websockets.clone(),
        );
        r.register(
            "websocket_messages",
            "WebSocket messages relayed: complete data messages (class=data) and control frames (class=control)",
            f.ws_messages.clone(),
        );
        r.register(
            "websocket_bytes",
            "WebSocket bytes relayed, frame headers included, by frame class",
            f.ws_bytes.clone(),
        );
        r.register(
            "websocket_close_frames",
            "WebSocket close frames that reached a side, relayed or written by the edge, by status code",
            f.ws_closes.clone(),
        );
        r.register(
            "websocket_ping_rtt_seconds",
            "Round trip of the edge's keepalive pings to idle visitor WebSockets (ping sent to empty pong seen)",
            f.ping_rtt.clone(),
        );
        r.register(
            "websocket_pings",
            "Keepalive pings the edge sent to idle visitor WebSockets",
            f.pings.clone(),
        );
        r.register(
            "policy_refusals",
            "Visitors refused by a tunnel's policy, by reason",
            f.refusals.clone(),
        );
        r.register(
            "tunnel_bytes",
            "Bytes through a tunnel: request and response bodies plus WebSocket traffic (in: visitor to local server, out: back)",
            f.bytes.clone(),
        );
        r.register_collector(Box::new(Sampled(registry)));
        Self {
            registry: r,
            f: Arc::new(f),
            live: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The series of one tunnel, created (at zero) if this is the first route of the pair.
    pub(crate) fn tunnel(&self, team: &str, tunnel: &str) -> Arc<TunnelSeries> {
        let labels = TunnelLabels {
            team: team.to_owned(),
            tunnel: tunnel.to_owned(),
        };
        if let Ok(mut live) = self.live.lock() {
            *live.entry(labels.clone()).or_insert(0) += 1;
        }
        let f = &self.f;
        let status = STATUS_CLASSES.map(|c| {
            f.http_requests.get_or_create_owned(&StatusLabels {
                team: labels.team.clone(),
                tunnel: labels.tunnel.clone(),
                status_class: c.to_owned(),
            })
        });
        let ws = |dir: &str, class: &str, fam: &Family<WsLabels, Counter>| {
            fam.get_or_create_owned(&WsLabels {
                team: labels.team.clone(),
                tunnel: labels.tunnel.clone(),
                direction: dir.to_owned(),
                class: class.to_owned(),
            })
        };
        let bytes = |dir: &str| {
            f.bytes.get_or_create_owned(&BytesLabels {
                team: labels.team.clone(),
                tunnel: labels.tunnel.clone(),
                direction: dir.to_owned(),
            })
        };
        Arc::new(TunnelSeries {
            status,
            duration: f.http_duration.get_or_create_owned(&labels),
            websockets_open: f.websockets_open.get_or_create_owned(&labels),
            websockets: f.websockets.get_or_create_owned(&labels),
            // [to_local, to_visitor] × [data, control]
            messages: [
                [
                    ws("to_local", "data", &f.ws_messages),
                    ws("to_local", "control", &f.ws_messages),
                ],
                [
                    ws("to_visitor", "data", &f.ws_messages),
                    ws("to_visitor", "control", &f.ws_messages),
                ],
            ],
            ws_bytes: [
                [
                    ws("to_local", "data", &f.ws_bytes),
                    ws("to_local", "control", &f.ws_bytes),
                ],
                [
                    ws("to_visitor", "data", &f.ws_bytes),
                    ws("to_visitor", "control", &f.ws_bytes),
                ],
            ],
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            closes: Default::default(),
            families: Arc::clone(&self.f),
            live: Arc::clone(&self.live),
            labels,
        })
    }

    /// Counts an accepted visitor connection.
    pub(crate) fn visitor_connection(&self) {
        self.f.visitor_connections.inc();
    }

    /// Starts timing a visitor request; [`RequestTimer::finish`] counts it.
    pub(crate) fn request(
        &self,
        state: &State,
        req: &Request<hyper::body::Incoming>,
    ) -> RequestTimer {
        let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        let route = host
            .and_then(|h| crate::proxy::subdomain_of(h, &state.config.domain))
            .and_then(|sub| state.registry.route(&sub));
        RequestTimer {
            started: Instant::now(),
            route,
            families: Arc::clone(&self.f),
        }
    }

    /// The text exposition of every metric, values read now.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            return String::new();
        }
        burrow_admin::to_text_format(&out)
    }
}

/// The series of one tunnel (one `(team, tunnel)` pair), owned by its route. Handles are
/// resolved once, so counting costs an atomic add and no label hashing.
pub(crate) struct TunnelSeries {
    labels: TunnelLabels,
    status: [Counter; 5],
    duration: Histogram,
    websockets_open: Gauge,
    websockets: Counter,
    /// Indexed by [direction][class]: direction 0 = to_local, class 0 = data.
    messages: [[Counter; 2]; 2],
    ws_bytes: [[Counter; 2]; 2],
    bytes_in: Counter,
    bytes_out: Counter,
    /// Close frames by [direction][code label], each series made on its first close frame
    /// (most tunnels only ever see a few codes) and then kept, so counting one is an add.
    closes: [[OnceLock<Counter>; CLOSE_LABELS]; 2],
    families: Arc<Families>,
    live: Arc<Mutex<HashMap<TunnelLabels, usize>>>,
}

impl TunnelSeries {
    /// Counts body bytes of a request (`inbound`) or a response.
    pub(crate) fn body_bytes(&self, inbound: bool, n: u64) {
        if inbound {
            self.bytes_in.inc_by(n);
        } else {
            self.bytes_out.inc_by(n);
        }
    }

    /// Counts a visitor refused by the tunnel's policy for `reason`.
    pub(crate) fn refused(&self, reason: &'static str) {
        self.families
            .refusals
            .get_or_create(&RefusalLabels {
                team: self.labels.team.clone(),
                tunnel: self.labels.tunnel.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A WebSocket relay starts: counted open until the returned sink is dropped.
    pub(crate) fn websocket(self: &Arc<Self>) -> WebSocketSink {
        self.websockets.inc();
        self.websockets_open.inc();
        WebSocketSink(Arc::clone(self))
    }

    fn close_frame(&self, dir: Direction, code: Option<u16>) {
        let d = match dir {
            Direction::ToLocal => 0,
            Direction::ToVisitor => 1,
        };
        let slot = &self.closes[d][close_code_index(code)];
        slot.get_or_init(|| {
            self.families.ws_closes.get_or_create_owned(&CloseLabels {
                team: self.labels.team.clone(),
                tunnel: self.labels.tunnel.clone(),
                direction: direction_label(dir).to_owned(),
                code: close_code_label(code).to_owned(),
            })
        })
        .inc();
    }
}

impl Drop for TunnelSeries {
    fn drop(&mut self) {
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        let last = match live.get_mut(&self.labels) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => true,
        };
        if !last {
            return;
        }
        live.remove(&self.labels);
        // Removed while `live` is held, so a new route of the same pair cannot slip in
        // between and lose its series.
        let f = &self.families;
        let TunnelLabels { team, tunnel } = &self.labels;
        let (team, tunnel) = (team.clone(), tunnel.clone());
        for c in STATUS_CLASSES.iter().chain(["other"].iter()) {
            f.http_requests.remove(&StatusLabels {
                team: team.clone(),
                tunnel: tunnel.clone(),
                status_class: (*c).to_owned(),
            });
        }
        f.http_duration.remove(&self.labels);
        f.websockets_open.remove(&self.labels);
        f.websockets.remove(&self.labels);
        for direction in ["to_local", "to_visitor"] {
            for class in ["data", "control"] {
                let l = WsLabels {
                    team: team.clone(),
                    tunnel: tunnel.clone(),
                    direction: direction.to_owned(),
                    class: class.to_owned(),
                };
                f.ws_messages.remove(&l);
                f.ws_bytes.remove(&l);
            }
            let codes = CLOSE_CODES.iter().map(|(_, l)| *l);
            for code in codes.chain([CLOSE_NO_CODE, CLOSE_OTHER]) {
                f.ws_closes.remove(&CloseLabels {
                    team: team.clone(),
                    tunnel: tunnel.clone(),
                    direction: direction.to_owned(),
                    code: code.to_owned(),
                });
            }
        }
        for direction in ["in", "out"] {
            f.bytes.remove(&BytesLabels {
                team: team.clone(),
                tunnel: tunnel.clone(),
                direction: direction.to_owned(),
            });
        }
        for reason in crate::policy::Reason::ALL {
            f.refusals.remove(&RefusalLabels {
                team: team.clone(),
                tunnel: tunnel.clone(),
                reason: reason.as_str().to_owned(),
            });
        }
    }
}

/// Times one visitor request; counts it when the response head is ready.
pub(crate) struct RequestTimer {
    started: Instant,
    route: Option<Arc<Route>>,
    families: Arc<Families>,
}

impl RequestTimer {
    /// Counts the request with the status of `resp`.
    pub(crate) fn finish<B>(self, resp: &Response<B>) {
        let class = status_class(resp.status());
        match &self.route {
            Some(route) => {
                let m = &route.metrics;
                match class {
                    Some(i) => {
                        m.status[i].inc();
                    }
                    None => {
                        m.families
                            .http_requests
                            .get_or_create(&StatusLabels {
                                team: m.labels.team.clone(),
                                tunnel: m.labels.tunnel.clone(),
                                status_class: "other".to_owned(),
                            })
                            .inc();
                    }
                }
                m.duration.observe(self.started.elapsed().as_secs_f64());
            }
            None => {
                let label = class.map_or("other", |i| STATUS_CLASSES[i]);
                self.families
                    .unrouted_requests
                    .get_or_create(&UnroutedLabels {
                        status_class: label.to_owned(),
                    })
                    .inc();
            }
        }
    }
}

/// Counts what one relayed WebSocket carries, as it goes; open until dropped.
pub(crate) struct WebSocketSink(Arc<TunnelSeries>);

impl Drop for WebSocketSink {
    fn drop(&mut self) {
        self.0.websockets_open.dec();
    }
}

impl RelaySink for WebSocketSink {
    fn frames(&self, dir: Direction, before: &FrameStats, after: &FrameStats) {
        let m = &self.0;
        let d = match dir {
            Direction::ToLocal => 0,
            Direction::ToVisitor => 1,
        };
        let data_messages = after.messages - before.messages;
        let control_frames = after.control_frames - before.control_frames;
        let control_bytes = after.control_bytes - before.control_bytes;
        let all_bytes = after.bytes - before.bytes;
        let data_bytes = all_bytes.saturating_sub(control_bytes);
        if data_messages > 0 {
            m.messages[d][0].inc_by(data_messages);
        }
        if control_frames > 0 {
            m.messages[d][1].inc_by(control_frames);
        }
        if data_bytes > 0 {
            m.ws_bytes[d][0].inc_by(data_bytes);
        }
        if control_bytes > 0 {
            m.ws_bytes[d][1].inc_by(control_bytes);
        }
        match dir {
            Direction::ToLocal => m.bytes_in.inc_by(all_bytes),
            Direction::ToVisitor => m.bytes_out.inc_by(all_bytes),
        };
        if after.closed && !before.closed {
            m.close_frame(dir, after.close_code);
        }
    }

    fn injected_close(&self, dir: Direction, code: u16) {
        self.0.close_frame(dir, Some(code));
    }

    fn ping_sent(&self) {
        self.0.families.pings.inc();
    }

    fn ping_answered(&self, rtt: Duration) {
        self.0.families.ping_rtt.observe(rtt.as_secs_f64());
    }
}

/// Whether the edge should get traffic: `Err` says why not.
fn readiness(state: &State) -> Result<(), String> {
    if !state.accepting.load(Ordering::Relaxed) {
        return Err("the edge is not accepting connections (starting or shutting down)".into());
    }
    state.control.readiness()
}

/// The edge's admin endpoints.
pub(crate) struct EdgeEndpoints(pub(crate) Arc<State>);

impl burrow_admin::Endpoints for EdgeEndpoints {
    fn metrics(&self) -> String {
        self.0.metrics.render()
    }

    async fn ready(&self) -> Result<(), String> {
        readiness(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rare_close_codes_share_one_label() {
        assert_eq!(close_code_label(Some(1000)), "1000");
        assert_eq!(close_code_label(Some(4321)), "other");
        assert_eq!(close_code_label(Some(1006)), "other");
        assert_eq!(close_code_label(None), "none");
        assert_eq!(close_code_label(Some(1015)), "1015");
        let indexes: std::collections::HashSet<usize> = [None, Some(1000), Some(1015), Some(4321)]
            .into_iter()
            .map(close_code_index)
            .collect();
        assert_eq!(indexes.len(), 4);
        assert!(indexes.iter().all(|i| *i < CLOSE_LABELS));
    }

    fn edge_metrics() -> EdgeMetrics {
        EdgeMetrics::new(Arc::new(crate::registry::Registry::new(
            &crate::Limits::default(),
        )))
    }

    /// The registry in the text format, as `/metrics` would send it.
    fn encoded(m: &EdgeMetrics) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode_registry(&mut s, &m.registry).unwrap();
        s
    }

    #[test]
    fn close_frames_add_up_per_direction_and_code_and_go_with_the_tunnel() {
        let m = edge_metrics();
        let a = m.tunnel("team", "chat");
        let b = m.tunnel("team", "chat");
        for _ in 0..3 {
            a.close_frame(Direction::ToLocal, Some(1000));
        }
        b.close_frame(Direction::ToLocal, Some(1000));
        a.close_frame(Direction::ToVisitor, Some(1000));
        a.close_frame(Direction::ToVisitor, Some(4000));
        a.close_frame(Direction::ToVisitor, Some(4001));
        a.close_frame(Direction::ToVisitor, None);
        let text = encoded(&m);
        let series = |dir: &str, code: &str| {
            format!(
                "burrow_edge_websocket_close_frames_total{{team=\"team\",tunnel=\"chat\",direction=\"{dir}\",code=\"{code}\"}}"
            )
        };
        for (dir, code, n) in [
            ("to_local", "1000", 4),
            ("to_visitor", "1000", 1),
            ("to_visitor", "other", 2),
            ("to_visitor", "none", 1),
        ] {
            assert!(
                text.contains(&format!("{} {n}\n", series(dir, code))),
                "{text}"
            );
        }
        assert!(!text.contains(&series("to_local", "none")), "{text}");
        drop(a);
        drop(b);
        assert!(!encoded(&m).contains("chat"));
    }

    #[test]
    fn a_tunnels_series_go_with_its_last_route() {
        let m = edge_metrics();
        let a = m.tunnel("team", "chat");
        let b = m.tunnel("team", "chat");
        a.body_bytes(true, 5);
        drop(a);
        let text = burrow_admin::to_text_format(&encoded(&m));
        assert!(text.contains(
            "burrow_edge_tunnel_bytes_total{team=\"team\",tunnel=\"chat\",direction=\"in\"} 5"
        ));
        drop(b);
        let s = encoded(&m);
        assert!(!s.contains("chat"), "{s}");
    }
}
