//! Typed configuration of the control plane. Built by `main` from flags and environment, or
//! directly by tests; validated by [`Config::validate`] before anything binds.

use std::path::PathBuf;
use std::time::Duration;

use crate::hashing::Metrics;

/// Names nobody may reserve or bind, because they are commonly used for the platform itself.
pub const DEFAULT_RESERVED_SUBDOMAINS: &[&str] = &[
    "www",
    "api",
    "admin",
    "edge",
    "app",
    "mail",
    "smtp",
    "imap",
    "pop",
    "ftp",
    "ns",
    "ns1",
    "ns2",
    "dns",
    "status",
    "docs",
    "help",
    "support",
    "login",
    "auth",
    "console",
    "dashboard",
    "control",
    "internal",
    "localhost",
    "static",
    "assets",
    "cdn",
    "blog",
    "root",
    "burrow",
];

/// Longest any configured duration may be: far beyond every sensible setting, and short enough
/// that adding it to the current time can never overflow (which would panic).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Certificate and key (PEM files) for serving gRPC over TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key: PathBuf,
}

/// Everything the control plane can be tuned with. Every limit is here, named and documented.
#[derive(Clone, Debug)]
pub struct Config {
    /// Subdomains nobody may reserve or bind (compared after case-folding).
    pub reserved_subdomains: Vec<String>,
    /// How long a verified token stays in the in-memory cache, so argon2 runs once per token
    /// per TTL instead of once per call. Revocation drops entries at once regardless.
    pub token_cache_ttl: Duration,
    /// Most entries in the verified-token cache; bounds memory under a flood of valid tokens.
    pub token_cache_capacity: usize,
    /// How long a vanished agent's subdomains stay held for its team after an unclean close.
    pub reconnect_grace: Duration,
    /// How long an edge may trust an `AuthorizeAgent` answer (its `expires_at`).
    pub authorization_ttl: Duration,
    /// How often edges are asked to heartbeat.
    pub heartbeat_interval: Duration,
    /// Serve gRPC over TLS with these files; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// Longest wait for a database connection before a call fails with UNAVAILABLE; the pool
    /// must be built with it (see [`crate::pool_options`]). Long enough for a burst of calls
    /// that queue behind row locks (fifty reservations of one name at once), short enough to
    /// answer before an edge's own call timeout (10 s) when the database is down.
    pub db_acquire_timeout: Duration,
    /// Most database connections in the pool.
    pub db_max_connections: u32,
    /// Most argon2 computations running at once (each takes ~19 MiB and a core for ~20 ms).
    pub max_concurrent_hashes: usize,
    /// Failed authentication or login attempts allowed per peer address per
    /// `failed_auth_window` before further attempts are refused with RESOURCE_EXHAUSTED.
    pub max_failed_auth_per_peer: u32,
    /// Failed login attempts allowed per email per `failed_auth_window`.
    pub max_failed_login_per_email: u32,
    /// The window over which failed attempts are counted.
    pub failed_auth_window: Duration,
    /// How often change-log tailers poll when no NOTIFY arrives (NOTIFY is only a nudge).
    pub change_poll_interval: Duration,
    /// Capacity of each server stream's channel (`Watch`, `WatchTunnels`); a slow reader
    /// applies backpressure instead of growing memory.
    pub stream_buffer: usize,
    /// Longest overlap a rotated token's old secret may keep working.
    pub max_rotation_overlap: Duration,
    /// How long in-flight calls get to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Longest a unary call may take before it fails with CANCELLED/DEADLINE_EXCEEDED, so a
    /// stuck dependency never holds a caller forever. (Server streams are not cut by it.)
    pub request_timeout: Duration,
    /// HTTP/2 PING interval on idle connections, so a vanished edge's `Watch` stream is
    /// noticed and its task freed.
    pub http2_keepalive_interval: Duration,
    /// Most concurrent calls (HTTP/2 streams) on one connection.
    pub max_concurrent_streams: u32,
    /// Limits handed to edges with every authorization: the platform defaults, which a
    /// platform admin can override per team (`TeamService.SetTunnelLimits`).
    pub tunnel_limits: TunnelLimits,
    /// Most days one `UsageService.GetUsage` call may span, so one call reads a bounded
    /// number of rows per team.
    pub max_usage_range_days: u32,
    /// Longest `/readyz` waits for `SELECT 1` on the pool before answering 503.
    pub readiness_timeout: Duration,
    /// Most connections served at once on the admin listener (`/metrics`, `/healthz`,
    /// `/readyz`); more wait for a free slot.
    pub admin_max_connections: usize,
    /// How long an admin client may take to send its request head.
    pub admin_header_timeout: Duration,
    /// Counters the server updates (argon2 verifications, …); clone it before calling
    /// [`crate::run`] to read them.
    pub metrics: Metrics,
}

/// Per-tunnel limits the control plane hands to edges. Zero means "the edge's default".
#[derive(Clone, Debug, Default)]
pub struct TunnelLimits {
    /// Most WebSocket connections open at once through one tunnel.
    pub max_websocket_connections: u32,
    /// Most new visitor connections per second to one tunnel.
    pub max_new_connections_per_second: u32,
    /// Most bytes per second in each direction on one visitor connection.
    pub max_bytes_per_second_per_connection: u64,
    /// Most tunnels one agent session may bind.
    pub max_tunnels_per_session: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            reserved_subdomains: DEFAULT_RESERVED_SUBDOMAINS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            token_cache_ttl: Duration::from_secs(60),
            token_cache_capacity: 100_000,
            reconnect_grace: Duration::from_secs(60),
            authorization_ttl: Duration::from_secs(600),
            heartbeat_interval: Duration::from_secs(10),
            tls: None,
            db_acquire_timeout: Duration::from_secs(5),
            db_max_connections: 16,
            max_concurrent_hashes: 2,
            max_failed_auth_per_peer: 30,
            max_failed_login_per_email: 10,
            failed_auth_window: Duration::from_secs(60),
            change_poll_interval: Duration::from_secs(1),
            stream_buffer: 64,
            max_rotation_overlap: Duration::from_secs(7 * 24 * 3600),
            shutdown_grace: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            http2_keepalive_interval: Duration::from_secs(30),
            max_concurrent_streams: 1024,
            tunnel_limits: TunnelLimits {
                max_websocket_connections: 1000,
                max_new_connections_per_second: 200,
                max_bytes_per_second_per_connection: 0,
                max_tunnels_per_session: 16,
            },
            max_usage_range_days: 366,
            readiness_timeout: Duration::from_secs(2),
            admin_max_connections: 32,
            admin_header_timeout: Duration::from_secs(5),
            metrics: Metrics::default(),
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks every value before anything binds, so a bad setting is a sentence at start-up,
    /// not a surprise later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("token cache TTL", self.token_cache_ttl),
            ("authorization TTL", self.authorization_ttl),
            ("heartbeat interval", self.heartbeat_interval),
            ("database acquire timeout", self.db_acquire_timeout),
            ("failed-auth window", self.failed_auth_window),
            ("change poll interval", self.change_poll_interval),
            ("request timeout", self.request_timeout),
            ("HTTP/2 keepalive interval", self.http2_keepalive_interval),
            ("readiness timeout", self.readiness_timeout),
            ("admin header timeout", self.admin_header_timeout),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(ConfigError(format!("the {name} must be greater than zero")));
            }
        }
        let bounded = positive.into_iter().chain([
            ("reconnect grace", self.reconnect_grace),
            ("maximum rotation overlap", self.max_rotation_overlap),
            ("shutdown grace", self.shutdown_grace),
        ]);
        for (name, value) in bounded {
            if value > MAX_DURATION {
                return Err(ConfigError(format!(
                    "the {name} must be at most ten years ({} s)",
                    MAX_DURATION.as_secs()
                )));
            }
        }
        if self.db_max_connections == 0 {
            return Err(ConfigError(
                "the database pool needs at least one connection".into(),
            ));
        }
        if self.max_concurrent_hashes == 0 {
            return Err(ConfigError(
                "at least one argon2 computation must be allowed".into(),
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError(
                "at least one concurrent call per connection must be allowed".into(),
            ));
        }
        if self.stream_buffer == 0 {
            return Err(ConfigError(
                "the stream buffer must hold at least one event".into(),
            ));
        }
        if self.max_usage_range_days == 0 {
            return Err(ConfigError(
                "the usage range must allow at least one day".into(),
            ));
        }
        if self.admin_max_connections == 0 {
            return Err(ConfigError(
                "the admin listener must allow at least one connection".into(),
            ));
        }
        if self.token_cache_capacity == 0 {
            return Err(ConfigError(
                "the token cache needs room for at least one entry".into(),
            ));
        }
        for name in &self.reserved_subdomains {
            if name.is_empty() || name.len() > 63 {
                return Err(ConfigError(format!(
                    "reserved subdomain {name:?} is not a DNS label"
                )));
            }
        }
        if let Some(tls) = &self.tls {
            for (what, path) in [("certificate", &tls.cert), ("key", &tls.key)] {
                if !path.is_file() {
                    return Err(ConfigError(format!(
                        "the TLS {what} file {} does not exist",
                        path.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether `name` (already case-folded) is on the reserved list.
    pub(crate) fn is_reserved(&self, name: &str) -> bool {
        self.reserved_subdomains
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_duration_over_ten_years_is_refused_with_a_sentence_naming_it() {
        let too_long = MAX_DURATION + Duration::from_secs(1);
        type Set = fn(&mut Config, Duration);
        let cases: [(Set, &str); 3] = [
            (|c, d| c.request_timeout = d, "request timeout"),
            (|c, d| c.shutdown_grace = d, "shutdown grace"),
            (|c, d| c.max_rotation_overlap = d, "rotation overlap"),
        ];
        for (set, needle) in cases {
            let mut config = Config::default();
            set(&mut config, MAX_DURATION);
            config.validate().unwrap();
            set(&mut config, too_long);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
