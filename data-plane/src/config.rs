//! The edge's typed configuration, validated before any socket is bound.

use std::time::Duration;

use secrecy::SecretString;

use crate::tls::TlsIdentity;

/// Longest any configured duration may be: far beyond every sensible setting, and short enough
/// that adding it to the current time can never overflow (which would panic).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Everything an edge needs to run. Build it directly in tests; `main` builds it from flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// Stable name of this edge (shown in `burrow tunnel list`; the control plane keys
    /// re-registrations by it).
    pub name: String,
    /// Domain tunnels live under: visitors reach `<subdomain>.<domain>`.
    pub domain: String,
    /// Public visitor URL template with `{sub}` for the subdomain. `None` derives
    /// `http://{sub}.<domain>:<visitor port>` (and an `https://` one when HTTPS is served).
    pub public_url_template: Option<String>,
    /// Where agents should connect, as announced to the control plane (host:port). `None`
    /// announces the agent listener's bound address.
    pub agent_addr: Option<String>,
    /// Who authorizes agents.
    pub control: ControlConfig,
    /// Certificate the agent listener presents.
    pub agent_tls: TlsIdentity,
    /// Serve agents over plain TCP instead of TLS (`agent_tls` unused). Only for measuring
    /// what TLS costs on one machine: tokens would cross the network in the clear.
    pub agent_plaintext: bool,
    /// Certificate the HTTPS visitor listener presents (required when an HTTPS listener is
    /// given to [`crate::run`]).
    pub visitor_tls: Option<TlsIdentity>,
    /// Every limit and timeout.
    pub limits: Limits,
}

/// Who decides which agents may connect and which names they may bind.
#[derive(Debug, Clone)]
pub enum ControlConfig {
    /// The real control plane, reached over gRPC with an edge token.
    Remote {
        /// Control-plane URL (`http://127.0.0.1:50051`, `https://api.example.com`).
        url: String,
        /// The edge token (`brw_edge_…`).
        edge_token: SecretString,
        /// Extra CA certificate (PEM) to trust for an `https://` control plane with a private
        /// or self-signed certificate.
        ca_pem: Option<String>,
    },
    /// No control plane: a fixed list of agent tokens, all of one team, any free name
    /// first-come. For trying Burrow on one machine; nothing is recorded.
    Standalone {
        /// Agent tokens that may connect.
        agent_tokens: Vec<SecretString>,
    },
}

/// Most `Limits::worker_threads`.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Default of `Limits::max_agent_lanes`.
pub const DEFAULT_MAX_AGENT_LANES: usize = 8;

/// Limits and timeouts. Each one bounds memory or time an outsider can make the edge spend.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most visitor connections open at once; the next visitor waits for a free slot.
    pub max_visitor_connections: usize,
    /// Most agent connections open at once. Each lane of an agent counts; extra lanes are
    /// refused while fewer than a quarter of these are free, so new agents always find room.
    pub max_agent_connections: usize,
    /// Most tunnels one agent connection may bind.
    pub max_tunnels_per_agent: usize,
    /// Most connections (lanes) one agent session may use, its first included; the edge
    /// spreads new visitor streams over them so one bulk transfer does not hold up every
    /// other visitor's frames in a single TCP stream. 1 turns extra lanes off.
    pub max_agent_lanes: usize,
    /// Largest visitor request head (request line + headers), in bytes. A larger one gets a
    /// page naming `--max-header-bytes`: 414 when the request line alone is larger, else 431.
    /// hyper stops reading a head at four times this; its 431 is then replaced by a page too.
    pub max_header_bytes: usize,
    /// Most headers in one visitor request; more gets 431.
    pub max_headers: usize,
    /// How long a visitor may take to send a complete request head (slowloris defence).
    pub header_read_timeout: Duration,
    /// How long the TLS handshake plus the agent's hello may take.
    pub agent_handshake_timeout: Duration,
    /// When an agent asks for a name another agent connection of the same team holds on this
    /// edge, how long that holder has to answer a liveness probe: one that answers keeps the
    /// name (the newcomer is refused), one that does not is taken to be dead and loses it.
    pub takeover_probe_timeout: Duration,
    /// How long the edge waits for the agent's response head to a visitor request.
    pub upstream_response_timeout: Duration,
    /// HTTP/2 per-stream flow-control window toward the agent, in bytes. Every byte a bulk
    /// stream may have in flight can sit in the shared connection's socket buffers ahead of
    /// other visitors' small messages, so this bounds head-of-line delay (measured: 4 MiB gave
    /// 70–100 ms p99 under a bulk stream on loopback); on long round trips it also bounds one
    /// stream's throughput (window / round trip).
    pub h2_stream_window: u32,
    /// HTTP/2 connection flow-control window toward the agent, in bytes.
    pub h2_connection_window: u32,
    /// HTTP/2 largest frame payload, in bytes (16 KiB – 16 MiB).
    pub h2_max_frame_size: u32,
    /// Largest response head an agent may send (HTTP/2 header list size: names, values and
    /// 32 bytes per field), in bytes; a larger one is refused and the visitor gets a 502 page.
    pub agent_max_header_list_bytes: u32,
    /// Interval of keepalive messages on agent connections: an agent that sends nothing for
    /// one interval after one is dropped, and the agent drops an edge whose keepalives stop for
    /// twice this long (plus a second).
    pub agent_keepalive_interval: Duration,
    /// Largest relay buffer of an upgraded (WebSocket) connection per direction, in bytes
    /// (4 KiB at first, this much under bulk transfer, 4 KiB again once a burst is over).
    pub relay_buffer_bytes: usize,
    /// Bytes a relay direction moves while its source keeps data ready before it lets the
    /// other tasks of its worker thread run (`relay::RelayOptions::yield_after`), so a bulk
    /// transfer does not hold back a small message of another connection. `0` never yields.
    pub relay_yield_bytes: usize,
    /// Backlog the edge keeps reading from the agent link for a visitor that does not read,
    /// in bytes, per WebSocket (`relay::RelayOptions::stall_buffer`) and per response body
    /// (`backlog::drain`). When it is full and came in small frames the edge ends that
    /// WebSocket (1008) or response, before h2's budget for small frames would end the
    /// agent's whole connection. `0` turns it off.
    pub stall_buffer_bytes: usize,
    /// How long a visitor may take nothing while its backlog (`stall_buffer_bytes`) is full
    /// before it counts as stopped (`relay::LinkBudget`): a stopped reader then holds one
    /// stream window of half the agent connection's window, and one more stopped reader than
    /// that half holds has its WebSocket (1008) or response ended, so readers that stopped
    /// cannot take the whole connection window and freeze every tunnel on the link.
    pub stopped_reader_grace: Duration,
    /// Idle time after which the edge pings a visitor WebSocket at a frame boundary; `None`
    /// disables keepalive pings.
    pub ws_ping_interval: Option<Duration>,
    /// A visitor WebSocket that sends nothing (no data, no pong) for this long is closed
    /// (1001 toward the local server); `None` never closes idle visitors. Must exceed
    /// `ws_ping_interval` so a live client has time to answer a ping.
    pub ws_idle_timeout: Option<Duration>,
    /// Most WebSockets open at once through one tunnel when the control plane sets no limit
    /// (0: unlimited). Over it, visitors get 429 before the upgrade.
    pub default_max_websockets_per_tunnel: u32,
    /// Most new visitor requests (WebSocket upgrades included) per second to one tunnel when
    /// the control plane sets no limit (0: unlimited). Over it, visitors get 429.
    pub default_max_requests_per_second_per_tunnel: u32,
    /// Most bytes per second in each direction of one WebSocket when the control plane sets
    /// no limit (0: unlimited). Excess is delayed, not dropped.
    pub default_max_websocket_bytes_per_second: u64,
    /// How long one direction of a WebSocket may stay over its byte rate (its sender kept
    /// waiting the whole time) before the edge closes it with 1008 and a reason. Bursts
    /// shorter than this are only slowed.
    pub ws_rate_limit_grace: Duration,
    /// After one direction of a WebSocket ends, how long the other may keep going before the
    /// edge drops the connection.
    pub ws_close_timeout: Duration,
    /// How long a cached `AuthorizeAgent` answer is trusted at most (the control plane's own
    /// expiry may be shorter).
    pub authorization_cache_ttl: Duration,
    /// Most cached `AuthorizeAgent` answers.
    pub authorization_cache_entries: usize,
    /// How long a disconnected tunnel shows the "offline" page (503) rather than "unknown"
    /// (404). The control plane's reconnect grace, when it announces one, wins.
    pub offline_grace: Duration,
    /// How long shutdown waits for in-flight connections.
    pub drain_timeout: Duration,
    /// Timeout of each call to the control plane.
    pub control_call_timeout: Duration,
    /// Most connections served at once on the admin listener (`/metrics`, `/healthz`,
    /// `/readyz`); more wait for a free slot.
    pub admin_max_connections: usize,
    /// How long an admin client may take to send its request head.
    pub admin_header_timeout: Duration,
    /// How long a tunnel remembers a verified basic-auth `Authorization` value (by its
    /// SHA-256), so a browser opening several connections pays argon2 once. Zero: verify
    /// once per visitor connection only.
    pub basic_auth_cache_ttl: Duration,
    /// Most verified `Authorization` values one tunnel remembers.
    pub basic_auth_cache_entries: usize,
    /// Most argon2 password verifications running at once on this edge; each holds its hash's
    /// memory, so this bounds what a flood of wrong passwords costs. Others wait their turn.
    pub basic_auth_max_concurrent_verifications: usize,
    /// Largest argon2 memory cost (KiB) a basic-auth password hash may ask for; larger
    /// policies are refused when the tunnel is bound.
    pub basic_auth_max_hash_memory_kib: u32,
    /// Largest argon2 time cost (passes) a basic-auth password hash may ask for.
    pub basic_auth_max_hash_passes: u32,
    /// Most entries in each list of a tunnel policy (users, addresses, origins, header rules).
    pub policy_max_rules: usize,
    /// Worker threads with an event loop each; every connection stays on the one it was
    /// handed to when accepted (see `shards`). Default: one per CPU. 0 runs connections on
    /// the caller's Tokio runtime instead.
    pub worker_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_visitor_connections: 10_000,
            max_agent_connections: 1_000,
            max_agent_lanes: DEFAULT_MAX_AGENT_LANES,
            max_tunnels_per_agent: 16,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            agent_handshake_timeout: Duration::from_secs(10),
            takeover_probe_timeout: Duration::from_secs(2),
            upstream_response_timeout: Duration::from_secs(120),
            h2_stream_window: 512 * 1024,
            h2_connection_window: 16 * 1024 * 1024,
            h2_max_frame_size: 65_536,
            agent_max_header_list_bytes: 256 * 1024,
            agent_keepalive_interval: Duration::from_secs(10),
            relay_buffer_bytes: 64 * 1024,
            relay_yield_bytes: crate::relay::DEFAULT_YIELD_AFTER,
            stall_buffer_bytes: crate::relay::DEFAULT_STALL_BUFFER,
            stopped_reader_grace: crate::relay::DEFAULT_STOPPED_READER_GRACE,
            ws_ping_interval: Some(Duration::from_secs(30)),
            ws_idle_timeout: Some(Duration::from_secs(75)),
            ws_close_timeout: Duration::from_secs(5),
            ws_rate_limit_grace: Duration::from_secs(10),
            default_max_websockets_per_tunnel: 0,
            default_max_requests_per_second_per_tunnel: 0,
            default_max_websocket_bytes_per_second: 0,
            authorization_cache_ttl: Duration::from_secs(600),
            authorization_cache_entries: 10_000,
            offline_grace: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            admin_max_connections: 32,
            admin_header_timeout: Duration::from_secs(5),
            control_call_timeout: Duration::from_secs(10),
            basic_auth_cache_ttl: Duration::from_secs(60),
            basic_auth_cache_entries: 1_000,
            basic_auth_max_concurrent_verifications: 4,
            basic_auth_max_hash_memory_kib: 64 * 1024,
            basic_auth_max_hash_passes: 8,
            policy_max_rules: 256,
            worker_threads: std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get),
        }
    }
}

/// A configuration that cannot work, with a sentence saying why.
#[derive(Debug, thiserror::Error)]
#[error("invalid edge configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks every field; call before binding anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_owned()));
        if self.name.trim().is_empty() {
            return bad("the edge name is empty");
        }
        let domain = self.domain.trim_end_matches('.');
        if domain.is_empty()
            || !domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            return bad(&format!("domain {:?} is not a valid DNS name", self.domain));
        }
        if let Some(t) = &self.public_url_template {
            if !t.contains("{sub}") {
                return bad("the public URL template must contain {sub}");
            }
        }
        match &self.control {
            ControlConfig::Remote { url, .. } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return bad(&format!(
                        "control-plane URL {url:?} must start with http:// or https://"
                    ));
                }
            }
            ControlConfig::Standalone { agent_tokens } => {
                if agent_tokens.is_empty() {
                    return bad("standalone mode needs at least one agent token");
                }
            }
        }
        if let Some(addr) = &self.agent_addr {
            let port = addr
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
                return bad(&format!("agent_addr {addr:?} must be host:port"));
            }
        }
        let l = &self.limits;
        if l.worker_threads > MAX_WORKER_THREADS {
            return bad(&format!(
                "worker_threads is {}; at most {MAX_WORKER_THREADS} (0 shares one pool of workers)",
                l.worker_threads
            ));
        }
        let positive = [
            (l.max_visitor_connections, "max_visitor_connections"),
            (l.max_agent_connections, "max_agent_connections"),
            (l.max_tunnels_per_agent, "max_tunnels_per_agent"),
            (l.max_agent_lanes, "max_agent_lanes"),
            (l.max_headers, "max_headers"),
            (l.relay_buffer_bytes, "relay_buffer_bytes"),
            (
                l.basic_auth_max_concurrent_verifications,
                "basic_auth_max_concurrent_verifications",
            ),
            (l.authorization_cache_entries, "authorization_cache_entries"),
            (l.admin_max_connections, "admin_max_connections"),
        ];
        for (v, name) in positive {
            if v == 0 {
                return bad(&format!("{name} must be at least 1"));
            }
        }
        if l.max_header_bytes < 8192 {
            return bad("max_header_bytes must be at least 8192");
        }
        if l.agent_max_header_list_bytes < 16_384 {
            return bad("agent_max_header_list_bytes must be at least 16384");
        }
        if !(16_384..=16_777_215).contains(&l.h2_max_frame_size) {
            return bad("h2_max_frame_size must be between 16384 and 16777215");
        }
        let max_window = (1u32 << 31) - 1;
        if l.h2_stream_window < 65_535 || l.h2_stream_window > max_window {
            return bad("h2_stream_window must be between 65535 and 2^31-1");
        }
        if l.h2_connection_window < 65_535 || l.h2_connection_window > max_window {
            return bad("h2_connection_window must be between 65535 and 2^31-1");
        }
        let durations = [
            (l.header_read_timeout, "header_read_timeout"),
            (l.agent_handshake_timeout, "agent_handshake_timeout"),
            (l.takeover_probe_timeout, "takeover_probe_timeout"),
            (l.upstream_response_timeout, "upstream_response_timeout"),
            (l.agent_keepalive_interval, "agent_keepalive_interval"),
            (l.ws_close_timeout, "ws_close_timeout"),
            (l.ws_rate_limit_grace, "ws_rate_limit_grace"),
            (l.stopped_reader_grace, "stopped_reader_grace"),
            (l.control_call_timeout, "control_call_timeout"),
            (l.admin_header_timeout, "admin_header_timeout"),
        ];
        for (d, name) in durations {
            if d.is_zero() {
                return bad(&format!("{name} must be longer than zero"));
            }
        }
        let may_be_zero = [
            (l.authorization_cache_ttl, "authorization_cache_ttl"),
            (l.offline_grace, "offline_grace"),
            (l.drain_timeout, "drain_timeout"),
            (l.basic_auth_cache_ttl, "basic_auth_cache_ttl"),
            (l.ws_ping_interval.unwrap_or_default(), "ws_ping_interval"),
            (l.ws_idle_timeout.unwrap_or_default(), "ws_idle_timeout"),
        ];
        for (d, name) in durations.into_iter().chain(may_be_zero) {
            if d > MAX_DURATION {
                return bad(&format!(
                    "{name} must be at most ten years ({} s)",
                    MAX_DURATION.as_secs()
                ));
            }
        }
        if l.ws_ping_interval.is_some_and(|d| d.is_zero()) {
            return bad("ws_ping_interval must be longer than zero (or disabled)");
        }
        if let (Some(idle), Some(ping)) = (l.ws_idle_timeout, l.ws_ping_interval) {
            if idle <= ping {
                return bad("ws_idle_timeout must be longer than ws_ping_interval");
            }
        }
        if l.ws_idle_timeout.is_some_and(|d| d.is_zero()) {
            return bad("ws_idle_timeout must be longer than zero (or disabled)");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            name: "edge".into(),
            domain: "example.com".into(),
            public_url_template: None,
            agent_addr: None,
            control: ControlConfig::Standalone {
                agent_tokens: vec!["t".to_owned().into()],
            },
            agent_tls: TlsIdentity::self_signed(&["localhost".to_owned()]).unwrap(),
            agent_plaintext: false,
            visitor_tls: None,
            limits: Limits::default(),
        }
    }

    #[test]
    fn the_default_limits_are_valid() {
        config().validate().unwrap();
    }

    #[test]
    fn an_announced_agent_address_with_a_host_and_port_is_accepted() {
        for addr in [
            "edge.example.com:4443",
            "203.0.113.7:443",
            "[2001:db8::1]:4443",
        ] {
            let mut c = config();
            c.agent_addr = Some(addr.into());
            c.validate().unwrap();
        }
    }

    type Tweak = Box<dyn Fn(&mut Config)>;

    #[test]
    fn each_bad_setting_is_refused_with_a_sentence_naming_it() {
        let cases: Vec<(Tweak, &str)> = vec![
            (Box::new(|c| c.domain = "bad domain".into()), "domain"),
            (
                Box::new(|c| c.public_url_template = Some("http://x".into())),
                "{sub}",
            ),
            (Box::new(|c| c.limits.max_headers = 0), "max_headers"),
            (
                Box::new(|c| c.limits.worker_threads = MAX_WORKER_THREADS + 1),
                "worker_threads",
            ),
            (
                Box::new(|c| c.limits.max_header_bytes = 100),
                "max_header_bytes",
            ),
            (
                Box::new(|c| c.limits.h2_max_frame_size = 1),
                "h2_max_frame_size",
            ),
            (
                Box::new(|c| c.limits.agent_max_header_list_bytes = 100),
                "agent_max_header_list_bytes",
            ),
            (
                Box::new(|c| c.limits.header_read_timeout = Duration::ZERO),
                "header_read_timeout",
            ),
            (
                Box::new(|c| c.limits.ws_ping_interval = Some(Duration::ZERO)),
                "ws_ping_interval",
            ),
            (
                Box::new(|c| c.limits.admin_header_timeout = Duration::ZERO),
                "admin_header_timeout",
            ),
            (
                Box::new(|c| c.limits.drain_timeout = MAX_DURATION + Duration::from_secs(1)),
                "drain_timeout",
            ),
            (
                Box::new(|c| c.limits.ws_idle_timeout = Some(Duration::MAX)),
                "ws_idle_timeout",
            ),
            (
                Box::new(|c| c.agent_addr = Some("edge.example.com".into())),
                "agent_addr",
            ),
            (
                Box::new(|c| c.agent_addr = Some(":4443".into())),
                "agent_addr",
            ),
            (
                Box::new(|c| {
                    c.control = ControlConfig::Remote {
                        url: "ftp://x".into(),
                        edge_token: "t".to_owned().into(),
                        ca_pem: None,
                    }
                }),
                "http://",
            ),
        ];
        for (tweak, needle) in cases {
            let mut c = config();
            tweak(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
