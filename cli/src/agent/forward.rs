//! Serving the edge's streams: each HTTP/2 stream is one visitor request, forwarded to the
//! local server; an extended CONNECT stream is an upgrade (WebSocket) relayed byte for byte.

use burrow_edge::headers::{strip_hop_by_hop, strip_internal};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use burrow_edge::relay::{relay, relay_halves, tcp_halves, LinkBudget, NoSink, RelayOptions};
use burrow_proto::tunnel::{
    CONTROL_CLOSED, CONTROL_READY, HEADER_AGENT_ERROR, HEADER_CONTROL, HEADER_REASON,
    HEADER_STATUS, HEADER_TUNNEL, HEADER_UPGRADE,
};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::dial::{Dialer, LocalConn, LocalConnector, LocalIo};
use super::target::{HostHeader, Target};

/// Body type of requests the agent sends to the local server: read ahead from the edge
/// (`burrow_edge::backlog::drain`).
pub(crate) type UpBody = BoxBody<Bytes, burrow_edge::backlog::BoxError>;

/// Body type of responses the agent sends to the edge.
pub(crate) type DownBody = BoxBody<Bytes, hyper::Error>;

/// How long connecting to the local server may take.
pub(crate) const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the local server may take to send its response head.
pub(crate) const LOCAL_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Relay buffer size for upgraded connections.
const RELAY_BUFFER: usize = 64 * 1024;
/// After one direction of an upgraded connection ends, how long the other may continue.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One tunnel as the agent runs it.
#[derive(Debug, Clone)]
pub(crate) struct TunnelSpec {
    /// Key echoed by the edge in `burrow-tunnel`.
    pub(crate) key: String,
    /// Wanted subdomain (empty: random).
    pub(crate) subdomain: String,
    pub(crate) target: Target,
    /// `target` as text (`host:port`, or `https://host:port`), for records and messages.
    pub(crate) target_text: String,
    /// `scheme://host:port` of the target: every absolute request URL starts with it.
    pub(crate) origin: String,
    /// The `Host` the agent sets (`--host-header rewrite` or a value); `None` keeps the
    /// visitor's.
    pub(crate) host: Option<HeaderValue>,
    /// Rules the edge enforces for this tunnel (basic-auth passwords already hashed).
    pub(crate) policy: Option<burrow_proto::v1::TunnelPolicy>,
}

impl TunnelSpec {
    /// A tunnel to `target`, with what every request to it needs worked out once.
    pub(crate) fn new(
        key: String,
        subdomain: String,
        target: Target,
        host_header: &HostHeader,
        policy: Option<burrow_proto::v1::TunnelPolicy>,
    ) -> anyhow::Result<Self> {
        let host = match host_header {
            HostHeader::Preserve => None,
            HostHeader::Rewrite => {
                Some(HeaderValue::from_str(&target.authority()).map_err(|_| {
                    anyhow::anyhow!(
                        "{:?}: the host name has characters a Host header cannot carry",
                        target.authority()
                    )
                })?)
            }
            HostHeader::Value(v) => Some(
                HeaderValue::from_str(v)
                    .map_err(|_| anyhow::anyhow!("{v:?} cannot be a Host header value"))?,
            ),
        };
        Ok(Self {
            key,
            subdomain,
            target_text: target.to_string(),
            origin: format!("{}://{}", target.scheme(), target.authority()),
            target,
            host,
            policy,
        })
    }
}

/// Callback for a tunnel the edge ended for good: `(key, reason)`.
pub(crate) type OnClosed = Box<dyn Fn(&str, &str) + Send + Sync>;

/// What the agent's serving side needs, shared by every stream of a connection.
pub(crate) struct Forwarder {
    pub(crate) tunnels: HashMap<String, Arc<TunnelSpec>>,
    pub(crate) client: Client<LocalConnector, crate::inspect::TapBody<UpBody>>,
    /// Opens connections to local targets (also under `client`).
    pub(crate) dialer: Arc<Dialer>,
    /// Called with the tunnel key when the edge ends a tunnel for good.
    pub(crate) on_closed: OnClosed,
    /// Backlog an upgraded connection keeps reading from the edge while the local server
    /// reads nothing (`RelayOptions::stall_buffer`, `--stall-buffer-bytes`): when it is
    /// full and came in small frames, the agent closes that WebSocket (1008) rather than let
    /// h2's budget for small frames end the whole connection to the edge.
    pub(crate) stall_buffer: usize,
    /// Bytes a relay direction moves with data always ready before it yields
    /// (`RelayOptions::yield_after`, `--relay-yield-bytes`).
    pub(crate) relay_yield: usize,
    /// Cancelled when the agent shuts down: open WebSockets get a 1001 close.
    pub(crate) stop: tokio_util::sync::CancellationToken,
    /// Called once when the edge says the tunnels are routable.
    pub(crate) on_ready: Box<dyn Fn() + Send + Sync>,
}

/// The HTTP client toward local targets, connecting through `dialer`.
pub(crate) fn local_client(
    dialer: Arc<Dialer>,
) -> Client<LocalConnector, crate::inspect::TapBody<UpBody>> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(LocalConnector(dialer))
}

fn text(status: StatusCode, body: String) -> Response<DownBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

fn empty(status: StatusCode) -> Response<DownBody> {
    let mut r = Response::new(Empty::new().map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

/// A 502 the edge turns into its "local server unreachable" page, with `reason`.
fn agent_error(reason: &str) -> Response<DownBody> {
    let mut r = text(StatusCode::BAD_GATEWAY, format!("{reason}\n"));
    if let Ok(v) = HeaderValue::from_str(reason) {
        r.headers_mut().insert(HEADER_AGENT_ERROR, v);
    }
    r
}

fn set_host(headers: &mut HeaderMap, spec: &TunnelSpec) {
    if let Some(v) = &spec.host {
        headers.insert(header::HOST, v.clone());
    }
}

fn connect_error_reason(target: &Target, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            format!("connection refused by {target} (is the local server running?)")
        }
        std::io::ErrorKind::TimedOut => format!("connecting to {target} timed out"),
        _ => format!("cannot connect to {target}: {e}"),
    }
}

/// The head of `parts` again, to send once more should its first connection fail before any
/// answer came, if the request may be sent twice: an idempotent method (RFC 9110 §9.2.2) and
/// no body (a body has been read by then, and is gone). Its target is origin-form, for a
/// connection of its own.
fn replayable(parts: &http::request::Parts, body: &Incoming) -> Option<Request<()>> {
    let idempotent = [
        http::Method::GET,
        http::Method::HEAD,
        http::Method::OPTIONS,
        http::Method::DELETE,
    ]
    .contains(&parts.method);
    if !idempotent || !body.is_end_stream() {
        return None;
    }
    let mut again = Request::new(());
    *again.method_mut() = parts.method.clone();
    *again.uri_mut() = parts.uri.path_and_query()?.as_str().parse().ok()?;
    *again.version_mut() = parts.version;
    *again.headers_mut() = parts.headers.clone();
    Some(again)
}

/// Whether the pooled client's request failed because the local server closed the connection
/// before answering (hyper: "connection closed before message completed", or the request
/// could not be written). A local server closes a kept-alive connection it finds idle when it
/// likes (its keep-alive timeout); a request sent at that moment meets the close.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
        }
        cur = err.source();
    }
    false
}

/// Why the pooled client's exchange with the local server failed, in words for the 502 page.
fn client_error_reason(target: &Target, e: &hyper_util::client::legacy::Error) -> String {
    if e.is_connect() {
        let io = std::error::Error::source(e)
            .and_then(find_io_error)
            .map(|io| connect_error_reason(target, io));
        io.unwrap_or_else(|| format!("cannot connect to {target}"))
    } else {
        exchange_error_reason(target, e)
    }
}

/// Why an exchange with the local server failed after the connection was made, in words for
/// the visitor's 502 page and the agent's log: hyper's own message for such errors ("client
/// error (SendRequest)") names no cause, so the cause is looked up in the error's sources.
fn exchange_error_reason(target: &Target, e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() {
                return format!("{target} closed the connection without a complete response");
            }
            if h.is_parse_too_large() {
                return format!("{target} sent a response head that is too large");
            }
            if h.is_parse_version_h2() {
                return format!(
                    "{target} answered in HTTP/2 without negotiation; tunnels speak HTTP/1.1 to \
                     local servers"
                );
            }
            if h.is_parse() || h.is_parse_status() {
                return format!("{target} did not answer with valid HTTP/1.1 ({h})");
            }
            if h.is_timeout() {
                return format!("{target} timed out");
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionReset => {
                    format!("{target} reset the connection")
                }
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof => {
                    format!("{target} closed the connection without a complete response")
                }
                _ => format!("{target} failed: {io}"),
            };
        }
        cur = err.source();
    }
    // No known cause: every message of the chain, outermost first.
    let mut words = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        words.push_str(": ");
        words.push_str(&s.to_string());
        src = s.source();
    }
    format!("{target} failed: {words}")
}

impl Forwarder {
    /// Handles one stream from the edge; `small_frames` is the budget of the connection
    /// (lane) it came on.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        small_frames: Arc<LinkBudget>,
    ) -> Response<DownBody> {
        if let Some(c) = req.headers().get(HEADER_CONTROL) {
            return self.control(c.as_bytes(), &req);
        }
        let key = req
            .headers()
            .get(HEADER_TUNNEL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some(spec) = self.tunnels.get(key).cloned() else {
            return agent_error("the agent has no such tunnel");
        };
        // Boxed: hyper keeps each stream's task (and so this future's inline size) for as long
        // as the stream lives — for a WebSocket, its whole life. Boxing frees the connect and
        // handshake state once the answer is out (BENCHMARKS.md: memory per idle WebSocket).
        if req.method() == http::Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_some()
        {
            Box::pin(self.upgrade(req, spec, small_frames)).await
        } else {
            Box::pin(self.plain(req, spec, small_frames)).await
        }
    }

    fn control(&self, kind: &[u8], req: &Request<Incoming>) -> Response<DownBody> {
        if kind == CONTROL_READY.as_bytes() {
            (self.on_ready)();
        } else if kind == CONTROL_CLOSED.as_bytes() {
            let key = req
                .headers()
                .get(HEADER_TUNNEL)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let reason = req
                .headers()
                .get(HEADER_REASON)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("ended by the edge");
            (self.on_closed)(key, reason);
        }
        empty(StatusCode::NO_CONTENT)
    }

    async fn plain(
        &self,
        req: Request<Incoming>,
        spec: Arc<TunnelSpec>,
        small_frames: Arc<LinkBudget>,
    ) -> Response<DownBody> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        // `OPTIONS *` (RFC 9112 §3.2.4) goes out as sent, on a connection of its own: the
        // pooled client takes only absolute URLs, and `http://host*` is none.
        let asterisk = path == "*";
        let uri = if asterisk {
            Ok(http::Uri::from_static("*"))
        } else {
            format!("{}{path}", spec.origin).parse()
        };
        let Ok(uri) = uri else {
            return agent_error("the request target is not valid");
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        strip_internal(&mut parts.headers);
        set_host(&mut parts.headers, &spec);
        let replay = replayable(&parts, &body);
        let tap = crate::inspect::recorder().http_started(
            &spec.target_text,
            &method,
            &path,
            &parts.headers,
        );
        // Read ahead, so a local server that stops reading an upload of small pieces gets it
        // cut (its stream reset) instead of h2's budget for small frames ending the agent's
        // whole connection.
        let (body, stalled) = burrow_edge::backlog::drain(
            body,
            self.stall_buffer,
            "local server",
            Some(small_frames),
        );
        let mut req = Request::from_parts(parts, tap.request_body(body));
        let captured = hyper_util::client::legacy::connect::capture_connection(&mut req);
        let exchange = async {
            if asterisk {
                return self.send_alone(req, &spec.target).await;
            }
            match (self.client.request(req).await, replay) {
                (Ok(r), _) => Ok(r),
                // Only a kept-alive connection: one the local server closed at once when new
                // would close on the request again.
                (Err(e), Some(again))
                    if closed_unanswered(&e)
                        && LocalConn::of(&captured).is_some_and(|c| c.was_reused()) =>
                {
                    tracing::debug!(
                        %method, path, err = %e,
                        "the local server closed the connection without answering; sending the \
                         request again on a new connection"
                    );
                    let empty = Empty::<Bytes>::new().map_err(|n| match n {}).boxed();
                    let again = again.map(|()| tap.request_body(empty));
                    self.send_alone(again, &spec.target).await
                }
                (Err(e), _) => Err(client_error_reason(&spec.target, &e)),
            }
        };
        let resp = tokio::select! {
            r = tokio::time::timeout(LOCAL_RESPONSE_TIMEOUT, exchange) => r,
            // The request's pooled connection is reset: dropping it would leave it open.
            () = stalled.cancelled() => {
                if let Some(r) = LocalConn::of(&captured) {
                    r.reset();
                }
                let reason = format!(
                    "{} stopped reading the request body",
                    spec.target
                );
                log_request(&method, &path, 502, started, 0, Some(&reason));
                tap.failed(502, &reason);
                return agent_error(&reason);
            }
        };
        let resp = match resp {
            Err(_) => {
                if let Some(r) = LocalConn::of(&captured) {
                    r.reset();
                }
                let reason = format!(
                    "{} did not answer within {} s",
                    spec.target,
                    LOCAL_RESPONSE_TIMEOUT.as_secs()
                );
                log_request(&method, &path, 502, started, 0, Some(&reason));
                tap.failed(502, &reason);
                return agent_error(&reason);
            }
            Ok(Err(reason)) => {
                log_request(&method, &path, 502, started, 0, Some(&reason));
                tap.failed(502, &reason);
                return agent_error(&reason);
            }
            Ok(Ok(r)) => r,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        strip_internal(&mut parts.headers);
        let status = parts.status.as_u16();
        tap.response(parts.status, &parts.headers);
        let body = Logged {
            inner: body,
            bytes: 0,
            target: spec.target.clone(),
            line: Some(LogLine {
                method,
                path,
                status,
                started,
            }),
        };
        // Merged as the edge merges request bodies (`Coalesce`): a local server writing in
        // tiny pieces costs the link a few large frames, not one per write.
        let body = burrow_edge::backlog::Coalesce::new(body, super::session::MAX_FRAME as usize);
        Response::from_parts(parts, tap.response_body(body).boxed())
    }

    /// Sends `req` (its target in origin- or asterisk-form) to the local server on a new
    /// connection of its own, outside the pool and closed after the answer; an `Err` is the
    /// reason for the 502 page.
    async fn send_alone(
        &self,
        req: Request<crate::inspect::TapBody<UpBody>>,
        target: &Target,
    ) -> Result<Response<Incoming>, String> {
        let io = self
            .dialer
            .open(&target.host, target.port, target.tls)
            .await
            .map_err(|e| connect_error_reason(target, &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| exchange_error_reason(target, &e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(err = %e, "local connection of one request ended with an error");
            }
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| exchange_error_reason(target, &e))
    }

    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        spec: Arc<TunnelSpec>,
        small_frames: Arc<LinkBudget>,
    ) -> Response<DownBody> {
        let started = Instant::now();
        let edge_upgrade = hyper::upgrade::on(&mut req);
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        let proto = req
            .headers()
            .get(HEADER_UPGRADE)
            .cloned()
            .or_else(|| {
                req.extensions()
                    .get::<hyper::ext::Protocol>()
                    .and_then(|p| HeaderValue::from_str(p.as_str()).ok())
            })
            .unwrap_or_else(|| HeaderValue::from_static("websocket"));

        let io = match self
            .dialer
            .open(&spec.target.host, spec.target.port, spec.target.tls)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let r = connect_error_reason(&spec.target, &e);
                log_request(&http::Method::GET, &path, 502, started, 0, Some(&r));
                return agent_error(&r);
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await
        {
            Ok(x) => x,
            Err(e) => {
                let r = exchange_error_reason(&spec.target, &e);
                log_request(&http::Method::GET, &path, 502, started, 0, Some(&r));
                return agent_error(&r);
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(err = %e, "local upgrade connection ended with an error");
            }
        });

        let (mut parts, _body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        strip_internal(&mut parts.headers);
        set_host(&mut parts.headers, &spec);
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&spec.target.authority()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto);
        let mut local_req = Request::new(Empty::<Bytes>::new());
        *local_req.method_mut() = http::Method::GET;
        *local_req.uri_mut() = match path.parse() {
            Ok(u) => u,
            Err(_) => return agent_error("the request target is not valid"),
        };
        *local_req.headers_mut() = parts.headers;
        let ws =
            crate::inspect::recorder().ws_opened(&spec.target_text, &path, local_req.headers());

        let resp = match tokio::time::timeout(
            LOCAL_RESPONSE_TIMEOUT,
            sender.send_request(local_req),
        )
        .await
        {
            Err(_) => {
                return agent_error(&format!(
                    "{} did not answer the upgrade within {} s",
                    spec.target,
                    LOCAL_RESPONSE_TIMEOUT.as_secs()
                ))
            }
            Ok(Err(e)) => {
                let r = exchange_error_reason(&spec.target, &e);
                log_request(&http::Method::GET, &path, 502, started, 0, Some(&r));
                return agent_error(&r);
            }
            Ok(Ok(r)) => r,
        };
        ws.response(resp.status(), resp.headers());
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Any other answer, a 2xx from a server that is not a WebSocket server included,
            // is the local server's to give (RFC 6455 §4.1: the client fails the connection
            // itself). A 2xx travels as 502 plus `burrow-status` (see `HEADER_STATUS`).
            let status = resp.status();
            log_request(&http::Method::GET, &path, status.as_u16(), started, 0, None);
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            strip_internal(&mut parts.headers);
            if status.is_success() {
                parts.status = StatusCode::BAD_GATEWAY;
                parts
                    .headers
                    .insert(HEADER_STATUS, HeaderValue::from(status.as_u16()));
            }
            return Response::from_parts(parts, body.boxed());
        }

        let mut resp = resp;
        let local_upgrade = hyper::upgrade::on(&mut resp);
        let mut headers = std::mem::take(resp.headers_mut());
        let upgrade_value = headers.get(header::UPGRADE).cloned();
        let extensions_agreed = headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS);
        strip_hop_by_hop(&mut headers);
        strip_internal(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(HEADER_STATUS, HeaderValue::from_static("101"));
        if let Some(u) = upgrade_value {
            headers.insert(HEADER_UPGRADE, u);
        }
        let mut out = empty(StatusCode::OK);
        *out.headers_mut() = headers;

        let stop = self.stop.clone();
        let stall_buffer = self.stall_buffer;
        let yield_after = self.relay_yield;
        let link_budget = Some(small_frames);
        tokio::spawn(async move {
            let (edge, local) = match tokio::join!(edge_upgrade, local_upgrade) {
                (Ok(e), Ok(l)) => (e, l),
                (e, l) => {
                    tracing::debug!(edge_ok = e.is_ok(), local_ok = l.is_ok(), "upgrade failed");
                    return;
                }
            };
            let opts = RelayOptions {
                buffer: RELAY_BUFFER,
                ping_interval: None,
                idle_timeout: None,
                max_bytes_per_second: None,
                rate_limit_grace: CLOSE_TIMEOUT,
                close_timeout: CLOSE_TIMEOUT,
                extensions_agreed,
                link_source: Some(burrow_edge::relay::Direction::ToLocal),
                stall_buffer,
                link_budget,
                yield_after,
            };
            // The edge's stream is the "visitor" side here: close frames toward it are
            // unmasked (server to client), toward the local server masked.
            let edge = ws.visitor_io(TokioIo::new(edge));
            // Boxed: as one allocation with this task the relay cost 2.5 KiB more per idle
            // WebSocket (BENCHMARKS.md, "What changed in this round").
            let report = match local.downcast::<TokioIo<LocalIo>>() {
                // The local TCP connection itself, out of hyper's upgrade, as its own two
                // halves (no lock per read or write), what hyper read past the 101 first.
                Ok(parts) => match parts.io.into_inner() {
                    LocalIo::Plain(tcp) => {
                        let (lr, lw) = tcp_halves(tcp, parts.read_buf);
                        let (er, ew) = tokio::io::split(edge);
                        let sink = Arc::new(NoSink);
                        Box::pin(relay_halves(er, ew, ws.local_io(lr), lw, opts, stop, sink)).await
                    }
                    tls => {
                        let (lr, lw) = tokio::io::split(tls);
                        let lr = burrow_edge::relay::Prefixed::new(parts.read_buf, lr);
                        let (er, ew) = tokio::io::split(edge);
                        let sink = Arc::new(NoSink);
                        Box::pin(relay_halves(er, ew, ws.local_io(lr), lw, opts, stop, sink)).await
                    }
                },
                Err(local) => {
                    let local = ws.local_io(TokioIo::new(local));
                    Box::pin(relay(edge, local, opts, stop)).await
                }
            };
            let close = report
                .to_visitor
                .close_code
                .or(report.to_local.close_code)
                .map(|c| c.to_string())
                .unwrap_or_else(|| "none".to_owned());
            ws.closed(report.to_visitor.close_code.or(report.to_local.close_code));
            tracing::info!(
                "WS  {path} {} ms, in {} msgs/{} B, out {} msgs/{} B, close {close}",
                started.elapsed().as_millis(),
                report.to_local.messages,
                report.to_local.bytes,
                report.to_visitor.messages,
                report.to_visitor.bytes,
            );
        });
        out
    }
}

/// Finds the `io::Error` in an error's source chain.
fn find_io_error<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    loop {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        e = e.source()?;
    }
}

struct LogLine {
    method: http::Method,
    path: String,
    status: u16,
    started: Instant,
}

fn log_request(
    method: &http::Method,
    path: &str,
    status: u16,
    started: Instant,
    bytes: u64,
    error: Option<&str>,
) {
    match error {
        Some(e) => tracing::warn!(
            "{method} {path} {status} {} ms {bytes} B: {e}",
            started.elapsed().as_millis()
        ),
        None => tracing::info!(
            "{method} {path} {status} {} ms {bytes} B",
            started.elapsed().as_millis()
        ),
    }
}

/// A response body that counts its bytes and logs the request's line when it ends: as a
/// warning naming what happened when the local server broke it off or the visitor left
/// before its end, so a cut download is not logged as a served one.
struct Logged {
    inner: Incoming,
    bytes: u64,
    /// The local server, named in the line of a body it broke off.
    target: Target,
    line: Option<LogLine>,
}

impl Logged {
    /// Logs the line, once; `broken` is why the body did not end as announced.
    fn finish(&mut self, broken: Option<&str>) {
        if let Some(l) = self.line.take() {
            log_request(&l.method, &l.path, l.status, l.started, self.bytes, broken);
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if self.line.is_none() {
            return;
        }
        // hyper stops polling a body that says it is at its end, without asking for the
        // `None`; any other body dropped here was given up by the edge's stream.
        if self.inner.is_end_stream() {
            self.finish(None);
        } else {
            self.finish(Some(
                "the response body was cut short: the visitor went away before its end",
            ));
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(None),
            Poll::Ready(Some(Err(e))) => {
                let why = format!(
                    "the response body broke off: {}",
                    exchange_error_reason(&self.target, e)
                );
                self.finish(Some(&why));
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(target: &str, host_header: &str) -> TunnelSpec {
        let host_header = HostHeader::parse(host_header).unwrap();
        let target = Target::parse(target).unwrap();
        TunnelSpec::new("0".into(), String::new(), target, &host_header, None).unwrap()
    }

    #[test]
    fn a_tunnel_works_out_its_origin_text_and_host_once() {
        let s = spec("3000", "rewrite");
        assert_eq!(
            (s.origin.as_str(), s.target_text.as_str()),
            ("http://localhost:3000", "localhost:3000")
        );
        assert_eq!(s.host.unwrap(), "localhost:3000");
        let s = spec("https://[::1]:8443", "preserve");
        assert_eq!(
            (s.origin.as_str(), s.target_text.as_str()),
            ("https://[::1]:8443", "https://[::1]:8443")
        );
        assert!(s.host.is_none());
        assert_eq!(spec("3000", "app.test").host.unwrap(), "app.test");
        let odd = Target::parse("bad\u{1}host:80").unwrap();
        let Err(err) = TunnelSpec::new("0".into(), String::new(), odd, &HostHeader::Rewrite, None)
        else {
            panic!("a host a header cannot carry is refused");
        };
        assert!(err.to_string().contains("cannot carry"), "{err}");
    }
}
