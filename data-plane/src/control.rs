//! The edge's side of the control plane: authorizing agents (with a bounded, expiring cache so
//! live tunnels and known agents survive a control-plane outage), recording tunnel sessions,
//! registering, heartbeating and following the `Watch` stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use burrow_proto::v1::edge_service_client::EdgeServiceClient;
use burrow_proto::v1::{self as pb, watch_event::Event};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::config::{ControlConfig, Limits};
use crate::policy::Policy;
use crate::registry::{Registry, RouteLimits};

/// Why the control plane (or the edge on its behalf) refused an agent. The variant picks the
/// gRPC-style code name sent in `EdgeHello.error_code`, which tells the agent whether retrying
/// can help.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error in the control plane")]
    Internal,
}

impl ControlError {
    /// The code name carried in `EdgeHello.error_code`.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::AlreadyExists(_) => "ALREADY_EXISTS",
            Self::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }
}

impl From<tonic::Status> for ControlError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_owned();
        match s.code() {
            Code::Unauthenticated => Self::Unauthenticated(msg),
            Code::PermissionDenied => Self::PermissionDenied(msg),
            Code::InvalidArgument => Self::InvalidArgument(msg),
            Code::AlreadyExists => Self::AlreadyExists(msg),
            Code::FailedPrecondition | Code::ResourceExhausted => Self::FailedPrecondition(msg),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                Self::Unavailable("control plane unavailable; the agent will retry".to_owned())
            }
            _ => {
                tracing::warn!(code = ?s.code(), message = %s.message(), "control plane error");
                Self::Internal
            }
        }
    }
}

/// What an agent token may do, as the control plane answered.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub(crate) token_id: String,
    pub(crate) team_id: String,
    pub(crate) team_name: String,
    /// The requested subdomains, validated and case-folded, in request order.
    pub(crate) allowed: Vec<String>,
    /// The policy pinned on each allowed subdomain's reservation (same order as `allowed`).
    pub(crate) pinned: Vec<Option<pb::TunnelPolicy>>,
    pub(crate) limits: Option<pb::TunnelLimits>,
    pub(crate) scopes: Vec<String>,
}

/// Attaches the edge token to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = EdgeServiceClient<InterceptedService<Channel, Bearer>>;

enum Backend {
    Remote(Client),
    Standalone {
        /// SHA-256 of each accepted agent token.
        token_hashes: Vec<[u8; 32]>,
    },
}

/// One cached authorization.
struct Cached {
    grant: Grant,
    until: Instant,
}

/// The edge's handle on the control plane.
pub(crate) struct Control {
    backend: Backend,
    /// Edge id from `RegisterEdge`; `None` until registered.
    edge_id: RwLock<Option<String>>,
    /// Whether the latest registration or heartbeat got an answer (`/readyz`).
    reachable: std::sync::atomic::AtomicBool,
    /// Reconnect grace announced by the control plane.
    grace: RwLock<Option<Duration>>,
    /// Authorizations keyed by SHA-256(token) and the requested names.
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    limits: Limits,
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn cache_key(token: &str, requested: &[String]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    for r in requested {
        h.update([0u8]);
        h.update(r.as_bytes());
    }
    h.finalize().into()
}

/// A random session id for sessions the edge records itself.
fn local_session_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut s = String::from("local-");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Control {
    pub(crate) fn new(config: &ControlConfig, limits: &Limits) -> anyhow::Result<Self> {
        let backend = match config {
            ControlConfig::Remote {
                url,
                edge_token,
                ca_pem,
            } => {
                let mut endpoint = Channel::from_shared(url.clone())
                    .map_err(|e| anyhow::anyhow!("control-plane URL {url:?} is invalid: {e}"))?
                    .connect_timeout(limits.control_call_timeout)
                    .timeout(limits.control_call_timeout);
                if url.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new();
                    if let Some(pem) = ca_pem {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| anyhow::anyhow!("control-plane TLS settings: {e}"))?;
                }
                let channel = endpoint.connect_lazy();
                let value: MetadataValue<_> = format!("Bearer {}", edge_token.expose_secret())
                    .parse()
                    .map_err(|_| anyhow::anyhow!("the edge token has invalid characters"))?;
                Backend::Remote(EdgeServiceClient::with_interceptor(channel, Bearer(value)))
            }
            ControlConfig::Standalone { agent_tokens } => Backend::Standalone {
                token_hashes: agent_tokens
                    .iter()
                    .map(|t: &SecretString| sha256(t.expose_secret()))
                    .collect(),
            },
        };
        let edge_id = match backend {
            Backend::Standalone { .. } => Some("standalone".to_owned()),
            Backend::Remote(_) => None,
        };
        Ok(Self {
            backend,
            edge_id: RwLock::new(edge_id),
            reachable: std::sync::atomic::AtomicBool::new(true),
            grace: RwLock::new(None),
            cache: Mutex::new(HashMap::new()),
            limits: limits.clone(),
        })
    }

    fn edge_id(&self) -> Option<String> {
        self.edge_id.read().ok().and_then(|g| g.clone())
    }

    fn set_reachable(&self, yes: bool) {
        self.reachable
            .store(yes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the edge is connected to its control plane (always, standalone); `Err` says
    /// why not.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        if self.edge_id().is_none() {
            return Err("not registered with the control plane yet".to_owned());
        }
        if !self.reachable.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the control plane did not answer the latest heartbeat".to_owned());
        }
        Ok(())
    }

    /// How long a vanished tunnel's name shows as offline.
    pub(crate) fn offline_grace(&self) -> Duration {
        self.grace
            .read()
            .ok()
            .and_then(|g| *g)
            .unwrap_or(self.limits.offline_grace)
    }

    /// Checks an agent token and the names it asks for. Uses a cached answer when the control
    /// plane cannot be reached.
    pub(crate) async fn authorize(
        &self,
        token: &str,
        requested: &[String],
    ) -> Result<Grant, ControlError> {
        match &self.backend {
            Backend::Standalone { token_hashes } => {
                let given = sha256(token);
                let ok = token_hashes
                    .iter()
                    .fold(subtle::Choice::from(0), |acc, h| acc | h.ct_eq(&given));
                if !bool::from(ok) {
                    return Err(ControlError::Unauthenticated(
                        "the agent token is not valid for this edge".to_owned(),
                    ));
                }
                let allowed = requested
                    .iter()
                    .map(|s| crate::registry::normalize_subdomain(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ControlError::InvalidArgument)?;
                Ok(Grant {
                    token_id: "standalone".to_owned(),
                    team_id: "standalone".to_owned(),
                    team_name: "standalone".to_owned(),
                    pinned: vec![None; allowed.len()],
                    allowed,
                    limits: None,
                    scopes: vec!["*".to_owned()],
                })
            }
            Backend::Remote(client) => {
                let key = cache_key(token, requested);
                let Some(edge_id) = self.edge_id() else {
                    return self.cached(&key).ok_or_else(|| {
                        ControlError::Unavailable(
                            "control plane unavailable (edge not registered yet); the agent will retry"
                                .to_owned(),
                        )
                    });
                };
                let req = pb::AuthorizeAgentRequest {
                    agent_token: token.to_owned(),
                    requested_subdomains: requested.to_vec(),
                    edge_id,
                };
                match client.clone().authorize_agent(req).await {
                    Ok(resp) => {
                        let r = resp.into_inner();
                        let grant = Grant {
                            token_id: r.token_id,
                            team_id: r.team_id,
                            team_name: r.team_name,
                            allowed: r.allowed.iter().map(|a| a.subdomain.clone()).collect(),
                            pinned: r.allowed.into_iter().map(|a| a.pinned_policy).collect(),
                            limits: r.limits,
                            scopes: r.scopes,
                        };
                        let mut ttl = self.limits.authorization_cache_ttl;
                        if let Some(ts) = r.expires_at {
                            let now = std::time::SystemTime::now();
                            let exp = std::time::UNIX_EPOCH
                                + Duration::new(
                                    u64::try_from(ts.seconds).unwrap_or(0),
                                    u32::try_from(ts.nanos).unwrap_or(0),
                                );
                            ttl = ttl.min(exp.duration_since(now).unwrap_or(Duration::ZERO));
                        }
                        self.remember(key, grant.clone(), ttl);
                        Ok(grant)
                    }
                    Err(status) => {
                        let err = ControlError::from(status);
                        if matches!(err, ControlError::Unavailable(_)) {
                            if let Some(g) = self.cached(&key) {
                                tracing::info!(
                                    "control plane unreachable; using a cached authorization"
                                );
                                return Ok(g);
                            }
                        }
                        Err(err)
                    }
                }
            }
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Grant> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(key)
            .filter(|c| c.until > Instant::now())
            .map(|c| c.grant.clone())
    }

    fn remember(&self, key: [u8; 32], grant: Grant, ttl: Duration) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let now = Instant::now();
        if cache.len() >= self.limits.authorization_cache_entries {
            cache.retain(|_, c| c.until > now);
        }
        if cache.len() >= self.limits.authorization_cache_entries {
            // Still full of live entries: drop the one closest to expiry.
            if let Some(k) = cache.iter().min_by_key(|(_, c)| c.until).map(|(k, _)| *k) {
                cache.remove(&k);
            }
        }
        cache.insert(
            key,
            Cached {
                grant,
                until: now + ttl,
            },
        );
    }

    /// Forgets every cached authorization of `token_id` (it was revoked).
    fn forget_token(&self, token_id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, c| c.grant.token_id != token_id);
        }
    }

    /// Forgets every cached authorization (reservations changed).
    fn forget_all(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }

    /// Claims `subdomain` for an agent session; returns the session id.
    pub(crate) async fn open_session(
        &self,
        grant: &Grant,
        subdomain: &str,
        agent: &AgentInfo,
    ) -> Result<String, ControlError> {
        let Backend::Remote(client) = &self.backend else {
            return Ok(local_session_id());
        };
        let Some(edge_id) = self.edge_id() else {
            return Err(ControlError::Unavailable(
                "control plane unavailable; the agent will retry".to_owned(),
            ));
        };
        let req = pb::OpenTunnelSessionRequest {
            edge_id,
            token_id: grant.token_id.clone(),
            team_id: grant.team_id.clone(),
            subdomain: subdomain.to_owned(),
            agent_instance: agent.instance.clone(),
            agent_version: agent.version.clone(),
            agent_addr: agent.addr.clone(),
            local_addr: agent.local_addr.clone(),
        };
        match client.clone().open_tunnel_session(req).await {
            Ok(s) => Ok(s.into_inner().id),
            Err(status) => match ControlError::from(status) {
                // The agent was authorized (possibly from the cache): serve it unrecorded
                // rather than take a known agent offline during an outage. The edge itself
                // still refuses a name another team holds here.
                ControlError::Unavailable(_) => {
                    tracing::warn!(%subdomain, "control plane unreachable; binding without recording the session");
                    Ok(local_session_id())
                }
                e => Err(e),
            },
        }
    }

    /// Reports the last counters of sessions that are ending, so the traffic since the last
    /// heartbeat still reaches the team's usage (best effort).
    pub(crate) async fn report_final_stats(&self, stats: Vec<pb::TunnelStats>) {
        let (Backend::Remote(client), Some(edge_id)) = (&self.backend, self.edge_id()) else {
            return;
        };
        let stats: Vec<_> = stats
            .into_iter()
            .filter(|s| !s.session_id.starts_with("local-"))
            .collect();
        if stats.is_empty() {
            return;
        }
        let req = pb::ReportTunnelStatsRequest { edge_id, stats };
        if let Err(s) = client.clone().report_tunnel_stats(req).await {
            tracing::debug!(err = %s.message(), "cannot report the last tunnel stats");
        }
    }

    /// Ends a session (best effort: the control plane's own timeout covers a lost call).
    pub(crate) async fn close_session(&self, session_id: &str, clean: bool) {
        let Backend::Remote(client) = &self.backend else {
            return;
        };
        if session_id.starts_with("local-") {
            return;
        }
        let req = pb::CloseTunnelSessionRequest {
            session_id: session_id.to_owned(),
            clean,
        };
        if let Err(s) = client.clone().close_tunnel_session(req).await {
            tracing::warn!(session = %session_id, err = %s.message(), "cannot close tunnel session");
        }
    }

    /// Registers, heartbeats and follows `Watch` until `shutdown`. Does nothing standalone.
    pub(crate) async fn run_background(
        self: Arc<Self>,
        registration: pb::RegisterEdgeRequest,
        registry: Arc<Registry>,
        shutdown: CancellationToken,
    ) {
        let Backend::Remote(client) = &self.backend else {
            return;
        };
        let client = client.clone();
        let mut backoff = Backoff::new();
        let mut heartbeat_every = Duration::from_secs(10);
        // === register ===
        loop {
            match client.clone().register_edge(registration.clone()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::info!(edge_id = %r.edge_id, "registered with the control plane");
                    self.set_reachable(true);
                    if let Ok(mut g) = self.edge_id.write() {
                        *g = Some(r.edge_id);
                    }
                    if r.heartbeat_interval_seconds > 0 {
                        heartbeat_every =
                            Duration::from_secs(u64::from(r.heartbeat_interval_seconds));
                    }
                    if r.reconnect_grace_seconds > 0 {
                        if let Ok(mut g) = self.grace.write() {
                            *g = Some(Duration::from_secs(u64::from(r.reconnect_grace_seconds)));
                        }
                    }
                    break;
                }
                Err(s) => {
                    tracing::warn!(err = %s.message(), code = ?s.code(), "cannot register with the control plane; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff.next()) => {}
                    }
                }
            }
        }
        let watch = tokio::spawn(Arc::clone(&self).watch_loop(
            client.clone(),
            Arc::clone(&registry),
            shutdown.clone(),
        ));
        // === heartbeat ===
        let mut tick = tokio::time::interval(heartbeat_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let Some(edge_id) = self.edge_id() else {
                continue;
            };
            let counts = registry.counts();
            let hb = pb::HeartbeatRequest {
                edge_id: edge_id.clone(),
                agent_sessions: counts.agent_sessions,
                tunnels: counts.tunnels,
                visitor_connections: counts.visitor_connections,
            };
            match client.clone().heartbeat(hb).await {
                Ok(_) => self.set_reachable(true),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // The control plane forgot us (e.g. its database was reset): register again.
                    if let Ok(r) = client.clone().register_edge(registration.clone()).await {
                        if let Ok(mut g) = self.edge_id.write() {
                            *g = Some(r.into_inner().edge_id);
                        }
                    }
                }
                Err(s) => {
                    self.set_reachable(false);
                    tracing::debug!(err = %s.message(), "heartbeat failed");
                }
            }
            let stats = registry.stats();
            if !stats.is_empty() {
                let req = pb::ReportTunnelStatsRequest { edge_id, stats };
                if let Err(s) = client.clone().report_tunnel_stats(req).await {
                    tracing::debug!(err = %s.message(), "cannot report tunnel stats");
                }
            }
        }
        watch.abort();
    }

    async fn watch_loop(
        self: Arc<Self>,
        client: Client,
        registry: Arc<Registry>,
        shutdown: CancellationToken,
    ) {
        let mut after = 0i64;
        let mut backoff = Backoff::new();
        loop {
            let Some(edge_id) = self.edge_id() else {
                return;
            };
            let req = pb::WatchRequest {
                edge_id,
                after_revision: after,
            };
            // The channel's per-call timeout would cut a long-lived stream; the stream is
            // opened with its own deadline-free request.
            let mut request = tonic::Request::new(req);
            request.set_timeout(Duration::from_secs(365 * 24 * 3600));
            let mut c = client.clone();
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                r = c.watch(request) => r,
            };
            match stream {
                Ok(s) => {
                    let mut s = s.into_inner();
                    loop {
                        let msg = tokio::select! {
                            () = shutdown.cancelled() => return,
                            m = s.message() => m,
                        };
                        match msg {
                            Ok(Some(ev)) => {
                                backoff = Backoff::new();
                                if ev.revision > 0 {
                                    after = ev.revision;
                                }
                                self.apply(ev.event, &registry).await;
                            }
                            Ok(None) => break,
                            Err(s) => {
                                tracing::debug!(err = %s.message(), "watch stream ended");
                                break;
                            }
                        }
                    }
                }
                Err(s) => tracing::debug!(err = %s.message(), "cannot open the watch stream"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }

    async fn apply(&self, event: Option<Event>, registry: &Registry) {
        match event {
            Some(Event::Hello(h)) => {
                tracing::debug!(revision = h.current_revision, "watch stream open");
            }
            Some(Event::TokenRevoked(t)) => {
                self.forget_token(&t.token_id);
                registry
                    .end_token(&t.token_id, "the agent token was revoked")
                    .await;
            }
            Some(Event::TunnelKilled(k)) => {
                registry
                    .end_tunnel(&k.session_id, "the tunnel was ended through the Burrow API")
                    .await;
            }
            Some(Event::ReservationPolicyChanged(c)) => {
                self.forget_all();
                let pinned = match c.policy.as_ref().map(|p| Policy::compile(p, &self.limits)) {
                    None => None,
                    Some(Ok(p)) => p.map(Arc::new),
                    Some(Err(e)) => {
                        // Never leave the tunnel more open than its admin asked: refuse
                        // every visitor until a policy the edge can apply arrives.
                        tracing::error!(subdomain = %c.subdomain, err = %e, "cannot apply the new pinned policy; refusing every visitor");
                        Some(Arc::new(Policy::refuse_all(&self.limits)))
                    }
                };
                registry.set_pinned_policy(&c.subdomain, pinned);
            }
            Some(Event::TeamLimitsChanged(c)) => {
                self.forget_all();
                let limits = RouteLimits::resolve(&c.limits.unwrap_or_default(), &self.limits);
                registry.set_team_limits(&c.team_id, limits);
            }
            Some(Event::ReservationChanged(_)) | Some(Event::AccountDisabled(_)) => {
                self.forget_all();
            }
            None => {}
        }
    }
}

/// Who the agent is, for session records.
#[derive(Debug, Clone, Default)]
pub(crate) struct AgentInfo {
    pub(crate) instance: String,
    pub(crate) version: String,
    pub(crate) addr: String,
    pub(crate) local_addr: String,
}

/// Exponential backoff with jitter, 200 ms doubling up to 10 s.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: Duration::from_millis(200),
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        base.mul_f64(jitter)
    }
}
