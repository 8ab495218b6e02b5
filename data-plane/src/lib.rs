//! Burrow edge worker: accepts agents on a TLS listener and proxies visitors' HTTP and
//! WebSocket traffic to them.
//!
//! Each agent holds one TLS connection that carries HTTP/2 with reversed roles: the agent
//! serves, the edge is the client and opens one stream per visitor request (an RFC 8441
//! extended CONNECT stream per WebSocket). See `agent.proto` for the handshake.
//!
//! # Layout
//! - [`config`]: the typed, validated [`Config`] and its [`Limits`].
//! - [`tls`]: certificates for the listeners ([`TlsIdentity`]).
//! - `control`: the control-plane client (authorize, sessions, register, heartbeat, watch).
//! - `registry`: live agent sessions and the route table.
//! - `agents`: the agent listener and handshake.
//! - `proxy`: the visitor listener, routing by `Host`, header handling.
//! - `early`: refusing bytes a visitor sends before the 101 of an upgrade.
//! - `bare`: pages instead of hyper's bare answers to requests it cannot parse.
//! - [`exec`]: the executor of the agent link's HTTP/2 tasks (also used by the agent).
//! - [`backlog`]: reading a response body ahead of a visitor that stopped reading.
//! - [`relay`]: byte-exact relaying of upgraded connections (also used by the agent).
//! - [`frame`]: the WebSocket frame observer used by the relay.
//! - [`headers`]: hop-by-hop and internal header removal (also used by the agent).
//! - `pages`: the edge's own error pages.
//! - `metrics`: Prometheus metrics and the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - `policy`: tunnel policies (basic auth, IP and Origin allow lists, header rules).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use burrow_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod agents;
pub mod backlog;
mod bare;
pub mod config;
mod control;
mod early;
pub mod exec;
pub mod frame;
pub mod gate;
pub mod headers;
pub mod logs;
mod metrics;
mod pages;
mod policy;
mod proxy;
mod registry;
pub mod relay;
pub mod shards;
pub mod tls;

pub use config::{Config, ConfigError, ControlConfig, Limits};
pub use tls::TlsIdentity;

/// The sockets an edge serves, bound by the caller (tests bind `127.0.0.1:0` and read the
/// addresses before calling [`run`]).
#[derive(Debug)]
pub struct Listeners {
    /// Plain-HTTP visitor listener.
    pub http: Option<TcpListener>,
    /// HTTPS visitor listener (needs [`Config::visitor_tls`]).
    pub https: Option<TcpListener>,
    /// Agent listener (TLS).
    pub agent: TcpListener,
    /// Admin listener: `/metrics`, `/healthz` and `/readyz` over plain HTTP. Keep it off
    /// the public network (the default binds loopback).
    pub admin: Option<TcpListener>,
}

/// Shared state of a running edge.
pub(crate) struct State {
    pub(crate) config: Config,
    pub(crate) registry: Arc<registry::Registry>,
    pub(crate) control: Arc<control::Control>,
    /// Public URL templates, `{sub}` to be replaced.
    pub(crate) url_templates: Vec<String>,
    /// Prometheus metrics.
    pub(crate) metrics: metrics::EdgeMetrics,
    /// True once the listeners accept, false again when shutdown starts (`/readyz`).
    pub(crate) accepting: std::sync::atomic::AtomicBool,
    /// Worker threads connections are handed to (`Limits::worker_threads`); `None` runs them
    /// on the caller's runtime.
    pub(crate) shards: Option<shards::Shards>,
}

impl State {
    /// The public URLs of `subdomain`.
    pub(crate) fn public_urls(&self, subdomain: &str) -> Vec<String> {
        self.url_templates
            .iter()
            .map(|t| t.replace("{sub}", subdomain))
            .collect()
    }
}

fn template(scheme: &str, domain: &str, addr: Option<SocketAddr>, default_port: u16) -> String {
    match addr.map(|a| a.port()) {
        Some(p) if p != default_port => format!("{scheme}://{{sub}}.{domain}:{p}"),
        _ => format!("{scheme}://{{sub}}.{domain}"),
    }
}

/// Runs `make(io)`'s future on worker thread `turn mod N` (see `shards`), or on the caller's
/// runtime when the edge has no worker threads of its own.
pub(crate) fn spawn_on_turn<T, F, Fut>(
    state: &State,
    tracker: &TaskTracker,
    turn: usize,
    io: T,
    make: F,
) where
    T: shards::Movable,
    F: FnOnce(T) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match &state.shards {
        Some(shards) => shards.spawn_connection(turn, tracker, io, make),
        None => {
            tracker.spawn(make(io));
        }
    }
}

/// Runs the edge until `shutdown` is cancelled, then drains for
/// [`Limits::drain_timeout`].
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    if listeners.https.is_some() && config.visitor_tls.is_none() {
        anyhow::bail!(
            "an HTTPS listener needs a visitor certificate (--tls-cert/--tls-key or --self-signed)"
        );
    }
    let agent_tls = config
        .agent_tls
        .server_config(&[burrow_proto::tunnel::ALPN])
        .context("agent listener certificate")?;
    let visitor_tls = match (&config.visitor_tls, &listeners.https) {
        (Some(id), Some(_)) => Some(TlsAcceptor::from(
            id.server_config(&[b"http/1.1"])
                .context("visitor listener certificate")?,
        )),
        _ => None,
    };
    let http_addr = listeners.http.as_ref().and_then(|l| l.local_addr().ok());
    let https_addr = listeners.https.as_ref().and_then(|l| l.local_addr().ok());
    let agent_addr = listeners.agent.local_addr().ok();
    let url_templates = match &config.public_url_template {
        Some(t) => vec![t.clone()],
        None => {
            let mut v = Vec::new();
            if https_addr.is_some() {
                v.push(template("https", &config.domain, https_addr, 443));
            }
            if http_addr.is_some() {
                v.push(template("http", &config.domain, http_addr, 80));
            }
            v
        }
    };
    let control = Arc::new(control::Control::new(&config.control, &config.limits)?);
    let registry = Arc::new(registry::Registry::new(&config.limits));
    let registration = pb::RegisterEdgeRequest {
        name: config.name.clone(),
        domain: config.domain.clone(),
        public_url_template: url_templates.first().cloned().unwrap_or_default(),
        agent_addr: config
            .agent_addr
            .clone()
            .or_else(|| agent_addr.map(|a| a.to_string()))
            .unwrap_or_default(),
        internal_addr: String::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let config_threads = config.limits.worker_threads;
    let state = Arc::new(State {
        config,
        registry: Arc::clone(&registry),
        control: Arc::clone(&control),
        url_templates,
        metrics: metrics::EdgeMetrics::new(Arc::clone(&registry)),
        accepting: std::sync::atomic::AtomicBool::new(false),
        shards: match config_threads {
            0 => None,
            n => Some(
                shards::Shards::start(n, "burrow-edge")
                    .context("cannot start the worker threads")?,
            ),
        },
    });
    // The admin listener outlives the drain, so `/readyz` says "shutting down" meanwhile.
    let admin_stop = CancellationToken::new();
    let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(l) = listeners.admin {
        let limits = burrow_admin::AdminLimits {
            max_connections: state.config.limits.admin_max_connections,
            header_timeout: state.config.limits.admin_header_timeout,
        };
        let endpoints = Arc::new(metrics::EdgeEndpoints(Arc::clone(&state)));
        tokio::spawn(burrow_admin::serve(
            l,
            endpoints,
            limits,
            admin_stop.clone(),
        ));
    }
    let tracker = TaskTracker::new();
    tracker.spawn(Arc::clone(&control).run_background(
        registration,
        Arc::clone(&registry),
        shutdown.clone(),
    ));
    if state.config.agent_plaintext {
        tracing::warn!(
            "the agent listener speaks plain TCP (--agent-plaintext): for benchmarks only"
        );
    }
    // Each accept loop runs on a worker thread (the agent listener's on the last one), so a
    // connection whose turn is that thread's starts there without waking another thread.
    let (agent_acceptor, st, stop, t) = (
        (!state.config.agent_plaintext).then(|| TlsAcceptor::from(agent_tls)),
        Arc::clone(&state),
        shutdown.clone(),
        tracker.clone(),
    );
    let last = state.shards.as_ref().map_or(0, |s| s.len() - 1);
    spawn_on_turn(&state, &tracker, last, listeners.agent, move |l| {
        agents::serve(l, agent_acceptor, st, stop, t)
    });
    if let Some(l) = listeners.http {
        let (st, stop, t) = (Arc::clone(&state), shutdown.clone(), tracker.clone());
        spawn_on_turn(&state, &tracker, 0, l, move |l| {
            proxy::serve(l, None, st, stop, t)
        });
    }
    if let (Some(l), Some(acceptor)) = (listeners.https, visitor_tls) {
        let (st, stop, t) = (Arc::clone(&state), shutdown.clone(), tracker.clone());
        spawn_on_turn(&state, &tracker, 1.min(last), l, move |l| {
            proxy::serve(l, Some(acceptor), st, stop, t)
        });
    }
    state
        .accepting
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        http = ?http_addr,
        https = ?https_addr,
        agents = ?agent_addr,
        admin = ?admin_addr,
        domain = %state.config.domain,
        "edge running"
    );
    shutdown.cancelled().await;
    state
        .accepting
        .store(false, std::sync::atomic::Ordering::Relaxed);
    tracker.close();
    if tokio::time::timeout(state.config.limits.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; dropping remaining connections");
    }
    if let Some(shards) = &state.shards {
        shards.stop();
    }
    admin_stop.cancel();
    Ok(())
}
