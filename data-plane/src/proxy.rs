//! The visitor listener: parses HTTP/1.1 with hyper, routes by `Host`, and forwards each
//! request as one HTTP/2 stream to the agent that holds the tunnel.

use crate::headers::{strip_hop_by_hop, strip_internal};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_proto::tunnel::{
    HEADER_AGENT_ERROR, HEADER_PEER, HEADER_STATUS, HEADER_TUNNEL, HEADER_UPGRADE,
};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::early::{Early, Mark, Recorder};
use crate::registry::{LaneStream, Route, UpBody};
use crate::relay::{relay_halves, tcp_halves, Prefixed, RelayOptions, RelaySink};
use crate::{pages, State};

/// How many times `--max-header-bytes` hyper itself reads of a request head before it gives
/// up with a 431 of its own (replaced by a page, see [`crate::bare`]). Heads between the limit
/// and this backstop reach [`refused`], whose page also tells a URL too long (414) from a head
/// too large (431); the read buffer was already this large (`max_buf_size`), so no connection
/// holds more.
const HEAD_BACKSTOP: usize = 4;

/// How long a WebSocket upgrade waits for the agent's HTTP/2 settings on a brand-new agent
/// connection.
const READY_WAIT: Duration = Duration::from_secs(5);

/// What [`Early`] said when a request arrived: where the stream stood, and whether the
/// connection's first request already had bytes behind its head.
struct EarlyCheck {
    early: Arc<Early>,
    mark: Mark,
    beyond_head: bool,
}

/// The 400 page's sentence for bytes sent before the 101 (see [`crate::early`]).
const EARLY_BYTES: &str = "The client sent data after its upgrade request without waiting for \
     the server's 101 Switching Protocols answer (RFC 6455 §4.1).";

/// Accepts visitor connections until `shutdown`. `tls` makes it the HTTPS listener.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(state.config.limits.max_visitor_connections));
    let scheme = if tls.is_some() { "https" } else { "http" };
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
                tracing::warn!(err = %e, "cannot accept a visitor connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state_outer = &state;
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let t2 = tracker.clone();
        let visit = move |stream: TcpStream| async move {
            let _permit = permit;
            state.metrics.visitor_connection();
            state
                .registry
                .visitor_connections
                .fetch_add(1, Ordering::Relaxed);
            match tls {
                None => serve_connection(stream, peer, scheme, state.clone(), shutdown, t2).await,
                Some(acceptor) => {
                    let timeout = state.config.limits.header_read_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            serve_connection(s, peer, scheme, state.clone(), shutdown, t2).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, err = %e, "visitor TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "visitor TLS handshake timed out"),
                    }
                }
            }
            state
                .registry
                .visitor_connections
                .fetch_sub(1, Ordering::Relaxed);
        };
        // Visitors take turns, so two that arrive one after the other (a download and a
        // chat) are served by different threads.
        turn = turn.wrapping_add(1);
        crate::spawn_on_turn(state_outer, &tracker, turn, stream, visit);
    }
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &state.config.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes.saturating_mul(HEAD_BACKSTOP))
        .max_buf_size(
            limits
                .max_header_bytes
                .max(8192)
                .saturating_mul(HEAD_BACKSTOP),
        )
        .header_read_timeout(limits.header_read_timeout);
    let svc_state = Arc::clone(&state);
    let early = Early::new(limits.max_header_bytes.saturating_add(1024));
    let io = Recorder::new(io, Arc::clone(&early));
    let handed_back: crate::bare::Slot<_> = Arc::default();
    let io = crate::bare::Held::new(io, Arc::clone(&handed_back), limits.max_header_bytes);
    // Credentials this visitor connection has proven (tunnel policies' basic auth).
    let visitor = Arc::new(crate::policy::Visitor::default());
    let svc = service_fn(move |req| {
        let state = Arc::clone(&svc_state);
        let tracker = tracker.clone();
        let early = Arc::clone(&early);
        let visitor = Arc::clone(&visitor);
        async move {
            // Taken before the policy checks, so bytes that arrive while a password is
            // verified count as sent before the 101 too.
            let (mark, beyond_head) = early.mark();
            let early = EarlyCheck {
                early,
                mark,
                beyond_head,
            };
            let gate = Arc::clone(&state);
            let inner =
                |req| async move { handle(req, peer, scheme, state, tracker, &early).await };
            let timer = gate.metrics.request(&gate, &req);
            let mut resp = match refused(&req, peer, gate.config.limits.max_header_bytes) {
                Some(page) => page,
                None => crate::policy::guard(req, peer, &gate, &visitor, inner).await,
            };
            // An answer that came over the agent's HTTP/2 link says HTTP/2; toward the visitor
            // it is HTTP/1.1, which also lets hyper answer an HTTP/1.0 keep-alive request with
            // the `Connection: keep-alive` such a client needs to keep the connection.
            *resp.version_mut() = http::Version::HTTP_11;
            timer.finish(&resp);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    // In a block of its own, so hyper's hold on the stream ends with it.
    let ended = {
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r.err(),
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(state.config.limits.drain_timeout, conn).await;
                None
            }
        }
    };
    if let Some(e) = &ended {
        tracing::debug!(%peer, err = %e, "visitor connection ended with an error");
    }
    let held = match handed_back.lock() {
        Ok(mut s) => s.take(),
        Err(p) => p.into_inner().take(),
    };
    if let Some(handed) = held {
        crate::bare::answer(handed, ended.as_ref(), &state.config.limits).await;
    }
}

/// The tunnel name in `host` (`Chat.Example.com:8080` → `chat`), if it is one label directly
/// under `domain`. Case-insensitive; the port is ignored.
pub(crate) fn subdomain_of(host: &str, domain: &str) -> Option<String> {
    // Compared in place, case-insensitively: one allocation (the answer) per request.
    let host = host.trim();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_end_matches('.');
    let domain = domain.trim_end_matches('.');
    let split = host.len().checked_sub(domain.len())?;
    let (head, tail) = (host.get(..split)?, host.get(split..)?);
    if !tail.eq_ignore_ascii_case(domain) {
        return None;
    }
    let sub = head.strip_suffix('.')?;
    if sub.is_empty() || sub.contains('.') {
        return None;
    }
    Some(sub.to_ascii_lowercase())
}

/// The page for a request the edge refuses before routing it anywhere, if it is one. Each
/// such page closes the connection: where the request's body ends is unknown or untrusted, so
/// nothing after it on this connection can be read as a request.
fn refused(
    req: &Request<Incoming>,
    peer: SocketAddr,
    max_header_bytes: usize,
) -> Option<Response<UpBody>> {
    let (line, head) = head_size(req);
    let page = if head > max_header_bytes {
        tracing::info!(%peer, line, head, "request head over --max-header-bytes refused");
        pages::head_too_large(line, head, max_header_bytes)
    } else if req.method() == http::Method::CONNECT {
        // RFC 9110 §9.3.6: CONNECT asks for a tunnel to the host it names. The edge is a
        // gateway for its own names, not a forward proxy. (Visitors speak HTTP/1.1, so this
        // is never an extended CONNECT, RFC 8441.)
        tracing::info!(%peer, target = %req.uri(), "CONNECT request refused");
        pages::not_implemented(
            "This edge does not proxy CONNECT requests: it forwards requests to its tunnels, \
             not tunnels to other hosts.",
        )
    } else if is_asterisk_form(req.uri()) && req.method() != http::Method::OPTIONS {
        // RFC 9112 §3.2.4: `*` names the server as a whole, which only OPTIONS can ask about.
        pages::bad_request(&format!(
            "The request target * (the server as a whole) is only for OPTIONS, not {}.",
            req.method()
        ))
    } else if let Some(sentence) = ambiguous(req.headers()) {
        tracing::info!(%peer, reason = sentence, "ambiguous request refused");
        pages::bad_request(sentence)
    } else if let Some(sentence) = invalid_host(req.headers()) {
        tracing::info!(%peer, reason = sentence, "request with an invalid Host refused");
        pages::bad_request(sentence)
    } else if let Some((status, sentence)) = transfer_codings(req.headers()) {
        tracing::info!(%peer, reason = %sentence, "request body's transfer coding refused");
        if status == StatusCode::NOT_IMPLEMENTED {
            pages::not_implemented(&sentence)
        } else {
            pages::bad_request(&sentence)
        }
    } else {
        return None;
    };
    let mut page = page;
    page.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(page)
}

/// Whether `uri` is the asterisk-form target `*` (RFC 9112 §3.2.4). It crosses the agent
/// link as the HTTP/2 `:path` `*` (RFC 9113 §8.3.1), and reaches the local server as sent.
fn is_asterisk_form(uri: &Uri) -> bool {
    uri.authority().is_none() && uri.path_and_query().is_some_and(|p| p.as_str() == "*")
}

/// The size in bytes of a request's line and of its whole head (line and headers), counted
/// as `METHOD TARGET HTTP/1.1`, each header as `name: value`, each line with its CRLF, and the
/// blank line that ends the head. Spaces around values are not counted, so this can be a few
/// bytes under what the visitor sent, never over.
fn head_size(req: &Request<Incoming>) -> (usize, usize) {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = req.method().as_str().len() + 1 + target + 1 + "HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    (line, line + headers + 2)
}

/// Why a request is ambiguous, if it is: more than one Host (RFC 9112 §3.2: a 400, since the
/// edge and the local server could each route by a different one). Such a request is
/// refused, never forwarded.
fn ambiguous(headers: &HeaderMap) -> Option<&'static str> {
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Some("The request has more than one Host header.");
    }
    None
}

/// What is wrong with a request body's transfer codings, if anything (RFC 9112 §6.1), as the
/// status and sentence of the page. hyper itself refuses a body whose last coding is not
/// `chunked` before the edge is asked (its 400 becomes a 501 page in [`crate::bare`]), and
/// decodes only `chunked`: a coding listed before it (`gzip, chunked`)
/// would reach the local server still applied, with the header that says so removed
/// (`Transfer-Encoding` is hop-by-hop), so it is refused here, as a coding the edge does not
/// implement (501). `chunked` twice is malformed (400): a sender applies it only once.
fn transfer_codings(headers: &HeaderMap) -> Option<(StatusCode, String)> {
    let mut chunked = 0usize;
    let mut other = None;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return Some((
                StatusCode::BAD_REQUEST,
                "The request's Transfer-Encoding header is not ASCII text.".to_owned(),
            ));
        };
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else if other.is_none() {
                other = Some(coding.to_owned());
            }
        }
    }
    if chunked > 1 {
        return Some((
            StatusCode::BAD_REQUEST,
            "The request's Transfer-Encoding lists chunked more than once; a body is chunked \
             only once (RFC 9112 §6.1)."
                .to_owned(),
        ));
    }
    other.map(|coding| {
        (
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "The request body is sent in the transfer coding {coding:?}, which this edge \
                 does not decode; send it with Transfer-Encoding: chunked alone, or with a \
                 Content-Length (RFC 9112 §6.1)."
            ),
        )
    })
}

/// Why the request's `Host` header is not a host, if it is not (RFC 9110 §7.2: `uri-host
/// [ ":" port ]`, no user info). A value that is not ASCII, or holds spaces or an `@`, would
/// otherwise be taken for a missing Host (`to_str` fails) or looked up as a tunnel name. An
/// empty value is left to routing, which answers that it names no tunnel.
fn invalid_host(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get(header::HOST)?;
    if value.is_empty() {
        return None;
    }
    let valid = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<http::uri::Authority>().ok())
        .is_some_and(|a| !a.as_str().contains('@'));
    if valid {
        return None;
    }
    Some(
        "The request's Host header is not a valid host name: a host is ASCII letters, digits, \
         dots and hyphens with an optional :port (an international name goes in its xn-- \
         form).",
    )
}

/// Whether the request asks for a protocol upgrade (RFC 9110 §7.8).
fn upgrade_protocol(headers: &HeaderMap) -> Option<String> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    tracker: TaskTracker,
    early: &EarlyCheck,
) -> Response<UpBody> {
    let started = Instant::now();
    let domain = &state.config.domain;
    // RFC 9112 §3.2.2: an absolute-form target's authority wins over `Host`.
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(host) = host else {
        return pages::bad_request("The request has no Host header.");
    };
    let Some(sub) = subdomain_of(&host, domain) else {
        return pages::no_tunnel_host(&host, domain);
    };
    let Some(route) = state.registry.route(&sub) else {
        if state.registry.is_offline(&sub) {
            return pages::tunnel_offline(&sub);
        }
        return pages::unknown_tunnel(&sub, domain);
    };

    let upgrade = upgrade_protocol(req.headers());
    let max_rate = route.limits().max_requests_per_second;
    if max_rate > 0 && !route.rate.admit(max_rate) {
        return pages::too_many(&format!(
            "The tunnel {sub:?} receives more than {max_rate} new requests per second; try again shortly."
        ));
    }
    // Held for the WebSocket's life; releases its slot when dropped.
    let ws_slot = match &upgrade {
        Some(_) => match WsSlot::take(&route) {
            Some(slot) => Some(slot),
            None => {
                return pages::too_many(&format!(
                    "The tunnel {sub:?} already has {} WebSocket connections open, its limit.",
                    route.limits().max_websockets
                ))
            }
        },
        None => None,
    };
    if upgrade.is_some() {
        let has_body = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
            || req.headers().contains_key(header::TRANSFER_ENCODING);
        if has_body {
            return pages::bad_request("An upgrade request must not carry a body.");
        }
        if early.beyond_head {
            tracing::info!(subdomain = %sub, %peer, "upgrade refused: bytes sent before the 101");
            return pages::bad_request(EARLY_BYTES);
        }
    }
    let visitor_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    strip_internal(&mut headers);
    // Room for the five below at once, rather than growing the map on the way.
    headers.reserve(5);
    // `insert` replaces every value the visitor sent under these names.
    let (ip, ip_port) = peer_values(peer);
    headers.insert(X_FORWARDED_FOR, ip);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    match HeaderValue::from_str(&host) {
        Ok(v) => {
            headers.insert(X_FORWARDED_HOST, v.clone());
            headers.insert(header::HOST, v);
        }
        Err(_) => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&route.key) {
        headers.insert(HEADER_TUNNEL, v);
    }
    headers.insert(HEADER_PEER, ip_port);
    let authority = format!("{sub}.{domain}");
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path.as_str())
        .build();
    let Ok(uri) = uri else {
        return pages::bad_request("The request target is not valid.");
    };
    let mut up = Request::new(match upgrade {
        Some(_) => Empty::<Bytes>::new().map_err(|n| match n {}).boxed(),
        None => crate::backlog::Coalesce::new(
            Counted {
                inner: body,
                route: Arc::clone(&route),
                inbound: true,
                _lane: None,
            },
            state.config.limits.h2_max_frame_size as usize,
        )
        .map_err(Into::into)
        .boxed(),
    });
    *up.uri_mut() = uri;
    *up.headers_mut() = headers;
    if let Some(proto) = &upgrade {
        *up.method_mut() = http::Method::CONNECT;
        if let Ok(v) = HeaderValue::from_str(proto) {
            up.headers_mut().insert(HEADER_UPGRADE, v);
        }
        let token = proto
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        up.extensions_mut()
            .insert(hyper::ext::Protocol::from(token.as_str()));
    } else {
        *up.method_mut() = method.clone();
    }

    let counters = &route.counters;
    counters.connections_total.fetch_add(1, Ordering::Relaxed);
    counters.connections_open.fetch_add(1, Ordering::Relaxed);
    let resp = forward(&route, up, upgrade.is_some(), &state).await;
    let (resp, lane) = match resp {
        Ok(r) => r,
        Err(page) => {
            counters.connections_open.fetch_sub(1, Ordering::Relaxed);
            return *page;
        }
    };
    let mut resp = resp;
    if let Some(reason) = resp.headers().get(HEADER_AGENT_ERROR) {
        counters.connections_open.fetch_sub(1, Ordering::Relaxed);
        let reason = reason.to_str().unwrap_or("unknown error").to_owned();
        return pages::local_failure(&sub, &reason);
    }

    let switching = upgrade.is_some()
        && resp.status().is_success()
        && resp
            .headers()
            .get(HEADER_STATUS)
            .is_some_and(|v| v.as_bytes() == b"101");
    if switching && early.early.read_since(early.mark) {
        // The local server accepted, but the visitor did not wait for its answer; dropping
        // `resp` ends the agent stream, so the local server sees its connection close.
        counters.connections_open.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(subdomain = %sub, %peer, "upgrade refused: bytes sent before the 101");
        return pages::bad_request(EARLY_BYTES);
    }
    if let (true, Some(visitor_upgrade)) = (switching, visitor_upgrade) {
        let agent_upgrade = hyper::upgrade::on(&mut resp);
        let proto = resp.headers().get(HEADER_UPGRADE).cloned().or_else(|| {
            upgrade
                .as_deref()
                .and_then(|u| HeaderValue::from_str(u).ok())
        });
        let mut out = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
        *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let mut h = std::mem::take(resp.headers_mut());
        let extensions_agreed = h.contains_key(header::SEC_WEBSOCKET_EXTENSIONS);
        strip_hop_by_hop(&mut h);
        strip_internal(&mut h);
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = proto {
            h.insert(header::UPGRADE, p);
        }
        *out.headers_mut() = h;
        let opts = RelayOptions {
            buffer: state.config.limits.relay_buffer_bytes,
            ping_interval: state.config.limits.ws_ping_interval,
            idle_timeout: state.config.limits.ws_idle_timeout,
            max_bytes_per_second: Some(route.limits().max_bytes_per_second).filter(|r| *r > 0),
            close_timeout: state.config.limits.ws_close_timeout,
            rate_limit_grace: state.config.limits.ws_rate_limit_grace,
            extensions_agreed,
            link_source: Some(crate::relay::Direction::ToVisitor),
            stall_buffer: state.config.limits.stall_buffer_bytes,
            link_budget: Some(Arc::clone(&lane.small_frames)),
            yield_after: state.config.limits.relay_yield_bytes,
        };
        let route = Arc::clone(&route);
        let stop = route.agent.cancel.clone();
        tracker.spawn(async move {
            let _slot = ws_slot;
            let _lane = lane;
            let (v, a) = match tokio::join!(visitor_upgrade, agent_upgrade) {
                (Ok(v), Ok(a)) => (v, a),
                (v, a) => {
                    tracing::debug!(
                        visitor_ok = v.is_ok(),
                        agent_ok = a.is_ok(),
                        "upgrade failed"
                    );
                    route
                        .counters
                        .connections_open
                        .fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            };
            let sink = Arc::new(route.metrics.websocket());
            let report = relay_visitor(v, a, opts, stop, sink).await;
            let c = &route.counters;
            c.connections_open.fetch_sub(1, Ordering::Relaxed);
            c.bytes_in
                .fetch_add(report.to_local.bytes, Ordering::Relaxed);
            c.bytes_out
                .fetch_add(report.to_visitor.bytes, Ordering::Relaxed);
            c.websocket_messages.fetch_add(
                report.to_local.messages + report.to_visitor.messages,
                Ordering::Relaxed,
            );
            tracing::debug!(
                subdomain = %route.subdomain,
                %peer,
                messages_in = report.to_local.messages,
                messages_out = report.to_visitor.messages,
                close = ?report.to_visitor.close_code.or(report.to_local.close_code),
                "websocket closed"
            );
        });
        tracing::debug!(subdomain = %sub, %peer, %method, path, "websocket open");
        return out;
    }

    counters.connections_open.fetch_sub(1, Ordering::Relaxed);
    let (mut parts, body) = resp.into_parts();
    if upgrade.is_some() {
        // A 2xx answer to an upgrade crosses the CONNECT stream as 502 plus its real status.
        if let Some(status) = parts
            .headers
            .get(HEADER_STATUS)
            .and_then(|v| StatusCode::from_bytes(v.as_bytes()).ok())
            .filter(StatusCode::is_success)
        {
            parts.status = status;
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    strip_internal(&mut parts.headers);
    tracing::debug!(
        subdomain = %sub,
        %peer,
        %method,
        path,
        status = parts.status.as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    let budget = Arc::clone(&lane.small_frames);
    let body = Counted {
        inner: body,
        route,
        inbound: false,
        _lane: Some(lane),
    };
    // The visitor's connection is cut with the body (hyper sees the error when it next
    // polls); nothing else waits on it, so the stall signal goes unused here.
    let (body, _stalled) = crate::backlog::drain(
        body,
        state.config.limits.stall_buffer_bytes,
        "visitor",
        Some(budget),
    );
    Response::from_parts(parts, body)
}

/// One open WebSocket of a tunnel, counted against its limit until dropped.
struct WsSlot(Arc<Route>);

impl WsSlot {
    /// Takes a slot, or `None` when the tunnel is at its limit.
    fn take(route: &Arc<Route>) -> Option<Self> {
        let open = route
            .counters
            .websockets_open
            .fetch_add(1, Ordering::AcqRel);
        let max = u64::from(route.limits().max_websockets);
        let slot = Self(Arc::clone(route));
        if max > 0 && open >= max {
            return None; // dropping `slot` gives the count back
        }
        Some(slot)
    }
}

impl Drop for WsSlot {
    fn drop(&mut self) {
        self.0
            .counters
            .websockets_open
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// A body that adds the bytes passing through to its tunnel's counters.
struct Counted {
    inner: Incoming,
    route: Arc<Route>,
    /// Visitor → local (`bytes_in`) rather than local → visitor (`bytes_out`).
    inbound: bool,
    /// A response's lane, whose stream is open until the body is done.
    _lane: Option<LaneStream>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                let c = &self.route.counters;
                let counter = if self.inbound {
                    &c.bytes_in
                } else {
                    &c.bytes_out
                };
                counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                self.route.metrics.body_bytes(self.inbound, d.len() as u64);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Sends `up` to the route's agent over its least loaded lane (held as open on it for as long
/// as the returned claim lives); an `Err` is the page to show instead.
async fn forward(
    route: &Route,
    up: Request<UpBody>,
    upgrade: bool,
    state: &State,
) -> Result<(Response<Incoming>, LaneStream), Box<Response<UpBody>>> {
    let agent = &route.agent;
    let lane = agent.pick();
    let mut sender = lane.sender.clone();
    if upgrade && !*agent.ready.borrow() {
        let mut ready = agent.ready.clone();
        let _ = tokio::time::timeout(READY_WAIT, ready.wait_for(|r| *r)).await;
    }
    let timeout = state.config.limits.upstream_response_timeout;
    match tokio::time::timeout(timeout, sender.send_request(up)).await {
        Err(_) => Err(Box::new(pages::agent_timeout(&route.subdomain))),
        // Only this stream failed (the connection is fine): the answer was refused or cut.
        Ok(Err(e)) if stream_reset(&e) => {
            tracing::info!(subdomain = %route.subdomain, err = %e, "the agent's answer failed");
            // The edge resets a stream itself only for a head over its limit; a reset from the
            // agent means the local server's answer broke off so soon that the head had not
            // left the agent yet (h2 drops a stream's queued frames when it is reset).
            let reason = if h2_error(&e).is_some_and(h2::Error::is_remote) {
                "its answer could not be relayed (the local server's response broke off before \
                 its head reached the edge)"
                    .to_owned()
            } else {
                format!(
                    "its answer could not be relayed (a response head over {} bytes is refused)",
                    state.config.limits.agent_max_header_list_bytes
                )
            };
            Err(Box::new(pages::local_failure(&route.subdomain, &reason)))
        }
        Ok(Err(e)) => {
            tracing::info!(subdomain = %route.subdomain, err = %e, "cannot reach the agent");
            Err(Box::new(pages::tunnel_offline(&route.subdomain)))
        }
        Ok(Ok(r)) => Ok((r, lane)),
    }
}

/// Whether `e` ended only its own HTTP/2 stream (a reset), not the agent's connection.
fn stream_reset(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(h2::Error::is_reset)
}

/// The HTTP/2 error behind a hyper error, if there is one.
pub(crate) fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = s.source();
    }
    None
}

/// The visitor's stream as the edge served it (`serve_connection`): `S` under the layers
/// that watch its HTTP/1.1.
type Served<S> = TokioIo<crate::bare::Held<Recorder<S>>>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The visitor's address as header values: the IP (`X-Forwarded-For`) and IP and port
/// (`Burrow-Peer`, `[ip]:port` for IPv6). An IPv4 address, the common case, is written
/// digit by digit into one buffer both values share, without the formatting machinery.
fn peer_values(peer: SocketAddr) -> (HeaderValue, HeaderValue) {
    let (text, ip_len) = match peer {
        SocketAddr::V4(a) => {
            let mut t = String::with_capacity(21);
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    t.push('.');
                }
                push_decimal(&mut t, u32::from(octet));
            }
            let ip_len = t.len();
            t.push(':');
            push_decimal(&mut t, u32::from(a.port()));
            (t, ip_len)
        }
        SocketAddr::V6(a) => {
            let ip = a.ip().to_string();
            let n = ip.len();
            (format!("{ip}|{a}"), n)
        }
    };
    let all = Bytes::from(text);
    let (ip, ip_port) = match peer {
        SocketAddr::V4(_) => (all.slice(..ip_len), all),
        SocketAddr::V6(_) => (all.slice(..ip_len), all.slice(ip_len + 1..)),
    };
    // Digits, dots, colons and brackets: always valid header values.
    let value =
        |b: Bytes| HeaderValue::from_maybe_shared(b).unwrap_or(HeaderValue::from_static(""));
    (value(ip), value(ip_port))
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// The halves of a visitor stream other than plain TCP, boxed: one relay for all of them.
type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

fn boxed_halves<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> Halves {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

/// Relays an upgraded visitor connection `v` and the agent's upgraded stream `a`.
///
/// Once the 101 is out, the layers around the visitor's stream (hyper's upgrade, its
/// read-ahead and I/O adapters, the edge's watch for early bytes and for hyper's bare
/// answers) have nothing left to do but cost a little on every message, so the relay gets
/// the stream itself, after what hyper had read past the request head: a plain TCP stream
/// as its own two halves (no lock per read or write), a TLS stream whole.
async fn relay_visitor(
    v: hyper::upgrade::Upgraded,
    a: hyper::upgrade::Upgraded,
    opts: RelayOptions,
    stop: CancellationToken,
    sink: Arc<dyn RelaySink>,
) -> crate::relay::RelayReport {
    let (ar, aw) = tokio::io::split(TokioIo::new(a));
    let (prefix, (vr, vw)) = match v.downcast::<Served<TcpStream>>() {
        Ok(parts) => match parts.io.into_inner().into_inner() {
            Ok(recorder) => {
                let (vr, vw) = tcp_halves(recorder.into_inner(), parts.read_buf);
                return relay_halves(vr, vw, ar, aw, opts, stop, sink).await;
            }
            Err(held) => (parts.read_buf, boxed_halves(held)),
        },
        Err(v) => match v.downcast::<Served<tokio_rustls::server::TlsStream<TcpStream>>>() {
            Ok(parts) => match parts.io.into_inner().into_inner() {
                Ok(recorder) => (parts.read_buf, boxed_halves(recorder.into_inner())),
                Err(held) => (parts.read_buf, boxed_halves(held)),
            },
            // hyper's upgraded stream gives its read-ahead itself.
            Err(v) => (Bytes::new(), boxed_halves(TokioIo::new(v))),
        },
    };
    relay_halves(Prefixed::new(prefix, vr), vw, ar, aw, opts, stop, sink).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_values_are_the_ip_and_the_ip_with_its_port() {
        for (addr, ip, ip_port) in [
            ("1.2.3.4:5", "1.2.3.4", "1.2.3.4:5"),
            ("0.0.0.0:0", "0.0.0.0", "0.0.0.0:0"),
            (
                "255.255.255.255:65535",
                "255.255.255.255",
                "255.255.255.255:65535",
            ),
            ("10.0.100.9:8080", "10.0.100.9", "10.0.100.9:8080"),
            ("[::1]:443", "::1", "[::1]:443"),
            ("[2001:db8::7]:61000", "2001:db8::7", "[2001:db8::7]:61000"),
        ] {
            let peer: SocketAddr = addr.parse().unwrap();
            let (a, b) = peer_values(peer);
            assert_eq!((a.to_str().unwrap(), b.to_str().unwrap()), (ip, ip_port));
            assert_eq!((ip, ip_port), (peer.ip().to_string().as_str(), addr));
        }
    }

    #[test]
    fn the_subdomain_is_found_case_insensitively_and_without_the_port() {
        assert_eq!(
            subdomain_of("Chat.Localhost:8080", "localhost").as_deref(),
            Some("chat")
        );
        assert_eq!(
            subdomain_of("chat.example.com.", "example.com").as_deref(),
            Some("chat")
        );
        assert_eq!(subdomain_of("example.com", "example.com"), None);
        assert_eq!(subdomain_of("a.b.example.com", "example.com"), None);
        assert_eq!(
            subdomain_of(" CHAT.Example.COM:443 ", "example.com.").as_deref(),
            Some("chat")
        );
        assert_eq!(subdomain_of("[::1]:8080", "localhost"), None);
        assert_eq!(subdomain_of("chat.localhost:80a", "localhost"), None);
        // Not ASCII: no panic on a byte offset inside a character, and no match.
        assert_eq!(subdomain_of("é.localhost", "ocalhost"), None);
        assert_eq!(subdomain_of("aé", "x"), None);
        assert_eq!(subdomain_of("", "localhost"), None);
        assert_eq!(subdomain_of("chatexample.com", "example.com"), None);
    }
}
