//! The inspector's HTTP server: the page (assets embedded in the binary), the `/api/` JSON
//! API, and `/api/events`, a server-sent event stream that carries every change live.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;

use super::frame::Dir;
use super::record::{Captured, Entry, Event, Filter, Recorder, Summary};
use super::replay::{replay, ReplayEdits, Replayer};

/// Connections the inspector serves at once (each open page holds one for its events).
const MAX_CONNECTIONS: usize = 64;
/// Largest request body the API accepts (a replay with an edited body), in bytes.
const MAX_API_BODY: usize = 32 * 1024 * 1024;
/// Longest list `GET /api/exchanges` returns.
const MAX_LIST: usize = 10_000;
/// How long reading a request head may take.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

type OutBody = BoxBody<Bytes, Infallible>;

/// Why an API call failed; the single place statuses are chosen is [`ApiError::status`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("no such exchange (it may have left the ring of kept exchanges)")]
    NotFound,
    #[error("not found")]
    NoRoute,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the local server: {0}")]
    Upstream(String),
    #[error("this inspector only answers requests addressed to localhost")]
    ForeignHost,
    #[error("method not allowed")]
    Method,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::ForeignHost => StatusCode::FORBIDDEN,
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<OutBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<OutBody> {
    match serde_json::to_vec(v) {
        Ok(b) => full(status, "application/json", b),
        Err(_) => full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "internal error",
        ),
    }
}

/// Serves the inspector on `listener` until `shutdown`.
/// Replays to `https://` targets talk TLS as set by `local_tls`.
pub(crate) async fn serve(
    listener: TcpListener,
    rec: Recorder,
    shutdown: CancellationToken,
    local_tls: Option<crate::agent::dial::LocalTls>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let replayer = Arc::new(Replayer::new(local_tls));
    let bound = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            p = Arc::clone(&permits).acquire_owned() => p,
        };
        let Ok(permit) = permit else { return };
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(err = %e, "inspector accept failed");
                    continue;
                }
            },
        };
        let rec = rec.clone();
        let replayer = Arc::clone(&replayer);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let rec = rec.clone();
                let replayer = Arc::clone(&replayer);
                let stop = stop.clone();
                async move {
                    let r = route(req, &rec, &replayer, &stop, bound).await;
                    Ok::<_, Infallible>(r.unwrap_or_else(|e| {
                        json(e.status(), &serde_json::json!({ "error": e.to_string() }))
                    }))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Only requests naming a loopback host are served, so a web page elsewhere cannot reach
/// the inspector through DNS rebinding.
fn host_allowed(req: &Request<Incoming>, bound: Option<SocketAddr>) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
        || bound.is_some_and(|b| name.trim_matches(['[', ']']) == b.ip().to_string())
}

async fn route(
    req: Request<Incoming>,
    rec: &Recorder,
    replayer: &Replayer,
    stop: &CancellationToken,
    bound: Option<SocketAddr>,
) -> Result<Response<OutBody>, ApiError> {
    if !host_allowed(&req, bound) {
        return Err(ApiError::ForeignHost);
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let m = req.method().clone();
    match (m.clone(), parts.as_slice()) {
        (Method::GET, [""]) => Ok(full(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)),
        (Method::GET, ["assets", "app.js"]) => Ok(full(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            APP_JS,
        )),
        (Method::GET, ["assets", "app.css"]) => {
            Ok(full(StatusCode::OK, "text/css; charset=utf-8", APP_CSS))
        }
        (Method::GET, ["api", "status"]) => Ok(json(StatusCode::OK, &rec.status())),
        (Method::GET, ["api", "exchanges"]) => {
            let (filter, limit) = parse_filter(&query)?;
            let list = rec.list(&filter, limit);
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "exchanges": list }),
            ))
        }
        (Method::DELETE, ["api", "exchanges"]) => {
            rec.clear();
            Ok(full(StatusCode::NO_CONTENT, "text/plain", ""))
        }
        (Method::GET, ["api", "exchanges", id]) => {
            let id = parse_id(id)?;
            let d = rec.get(id, detail).ok_or(ApiError::NotFound)?;
            Ok(json(StatusCode::OK, &d))
        }
        (Method::POST, ["api", "exchanges", id, "replay"]) => {
            let id = parse_id(id)?;
            let body = Limited::new(req.into_body(), MAX_API_BODY)
                .collect()
                .await
                .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?
                .to_bytes();
            let edits: ReplayEdits = if body.iter().all(u8::is_ascii_whitespace) {
                ReplayEdits::default()
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    ApiError::BadRequest(format!("the replay body is not valid: {e}"))
                })?
            };
            let out = replay(rec, replayer, id, edits).await?;
            Ok(json(StatusCode::OK, &out))
        }
        (Method::GET, ["api", "events"]) => {
            let rx = rec.subscribe().ok_or(ApiError::NoRoute)?;
            Ok(events(rx, stop.clone()))
        }
        (_, ["api", "exchanges"] | ["api", "exchanges", _] | ["api", "exchanges", _, "replay"]) => {
            Err(ApiError::Method)
        }
        _ => Err(ApiError::NoRoute),
    }
}

fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("{s:?} is not an exchange id")))
}

/// Decodes `%XX` and `+` in a query value.
fn decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_filter(query: &str) -> Result<(Filter, usize), ApiError> {
    let mut f = Filter::default();
    let mut limit = MAX_LIST;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v);
        if v.is_empty() {
            continue;
        }
        match k {
            "kind" => {
                if v != "http" && v != "ws" {
                    return Err(ApiError::BadRequest("kind must be http or ws".into()));
                }
                f.kind = Some(v);
            }
            "status" => {
                let c = v.trim_end_matches("xx").trim_end_matches("XX");
                f.status_class = match c.parse::<u16>() {
                    Ok(n) if n <= 5 => Some(n),
                    _ => return Err(ApiError::BadRequest("status must be 1xx … 5xx".into())),
                };
            }
            "path" => f.path = Some(v),
            "q" => f.q = Some(v),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest("limit must be a number".into()))?
                    .min(MAX_LIST);
            }
            _ => return Err(ApiError::BadRequest(format!("unknown filter {k:?}"))),
        }
    }
    Ok((f, limit))
}

// === event stream ===

fn sse_event(kind: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

fn events(rx: broadcast::Receiver<Event>, stop: CancellationToken) -> Response<OutBody> {
    let hello = futures::stream::once(async {
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(
            b"retry: 1000\n: connected\n\n",
        )))
    });
    let rest = futures::stream::unfold((rx, stop), |(mut rx, stop)| async move {
        let ev = tokio::select! {
            () = stop.cancelled() => return None,
            ev = rx.recv() => ev,
        };
        let bytes = match ev {
            Ok(Event::Exchange { summary, .. }) => {
                let data = serde_json::to_string(&*summary).unwrap_or_default();
                sse_event("exchange", &data)
            }
            Ok(Event::Cleared) => sse_event("cleared", "{}"),
            Err(broadcast::error::RecvError::Lagged(_)) => sse_event("resync", "{}"),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(Frame::data(bytes)), (rx, stop)))
    });
    let body = StreamBody::new(hello.chain(rest));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

// === detail ===

/// Everything kept about one exchange: `GET /api/exchanges/{id}`.
#[derive(Debug, Serialize)]
pub(crate) struct Detail {
    #[serde(flatten)]
    summary: Summary,
    request: Side,
    response: Side,
    websocket: Option<WsDetail>,
}

#[derive(Debug, Serialize)]
struct Side {
    headers: Vec<(String, String)>,
    body: BodyView,
}

/// A captured body, ready to show: pretty JSON, text, or a hex dump.
#[derive(Debug, Serialize)]
struct BodyView {
    /// Bytes the body had in full.
    size: u64,
    /// Bytes kept.
    captured: usize,
    truncated: bool,
    /// `none`, `json`, `text` or `hex`.
    encoding: &'static str,
    content: String,
}

#[derive(Debug, Serialize)]
struct WsDetail {
    subprotocol: Option<String>,
    extensions: Option<String>,
    frames: Vec<FrameView>,
    /// Older frames no longer kept (the counters still include them).
    frames_dropped: u64,
}

#[derive(Debug, Serialize)]
struct FrameView {
    /// `in` (visitor to local server) or `out`.
    dir: &'static str,
    opcode: &'static str,
    fin: bool,
    size: u64,
    /// Milliseconds since the session opened.
    at_ms: f64,
    preview: Option<String>,
}

fn header_value<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn body_view(b: &Captured, headers: &[(String, String)]) -> BodyView {
    let truncated = (b.data.len() as u64) < b.size;
    let (encoding, content) = if b.data.is_empty() {
        ("none", String::new())
    } else {
        let ctype = header_value(headers, "content-type").unwrap_or("");
        let pretty = (!truncated
            && (ctype.contains("json") || matches!(b.data.first(), Some(b'{' | b'['))))
        .then(|| serde_json::from_slice::<serde_json::Value>(&b.data).ok())
        .flatten()
        .and_then(|v| serde_json::to_string_pretty(&v).ok());
        match pretty {
            Some(p) => ("json", p),
            None => match std::str::from_utf8(&b.data) {
                Ok(t) if !t.contains('\0') => ("text", t.to_owned()),
                Err(e)
                    if truncated
                        && e.valid_up_to() + 4 > b.data.len()
                        && e.error_len().is_none() =>
                {
                    (
                        "text",
                        String::from_utf8_lossy(&b.data[..e.valid_up_to()]).into_owned(),
                    )
                }
                _ => ("hex", hex_dump(&b.data)),
            },
        }
    };
    BodyView {
        size: b.size,
        captured: b.data.len(),
        truncated,
        encoding,
        content,
    }
}

/// `offset  hex bytes  |ascii|`, 16 bytes a line.
fn hex_dump(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 4);
    for (i, line) in data.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}  ", i * 16));
        for j in 0..16 {
            match line.get(j) {
                Some(b) => out.push_str(&format!("{b:02x} ")),
                None => out.push_str("   "),
            }
            if j == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(line.iter().map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    out
}

fn detail(e: &Entry) -> Detail {
    let websocket = e.socket.as_ref().map(|s| WsDetail {
        subprotocol: header_value(&e.resp_headers, "sec-websocket-protocol").map(str::to_owned),
        extensions: header_value(&e.resp_headers, "sec-websocket-extensions").map(str::to_owned),
        frames: s
            .frames
            .iter()
            .map(|f| FrameView {
                dir: match f.dir {
                    Dir::In => "in",
                    Dir::Out => "out",
                },
                opcode: f.opcode.name(),
                fin: f.fin,
                size: f.size,
                at_ms: (f.at.as_secs_f64() * 10_000.0).round() / 10.0,
                preview: f.preview.clone(),
            })
            .collect(),
        frames_dropped: s.frames_dropped,
    });
    Detail {
        summary: e.summary(),
        request: Side {
            headers: e.req_headers.clone(),
            body: body_view(&e.req_body, &e.req_headers),
        },
        response: Side {
            headers: e.resp_headers.clone(),
            body: body_view(&e.resp_body, &e.resp_headers),
        },
        websocket,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(decode("a%20b+c%2Fd"), "a b c/d");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }

    #[test]
    fn bodies_show_as_pretty_json_text_or_hex() {
        let c = |d: &[u8]| Captured {
            data: d.to_vec(),
            size: d.len() as u64,
        };
        let j = body_view(&c(br#"{"a":1}"#), &[]);
        assert_eq!(
            (j.encoding, j.content.as_str()),
            ("json", "{\n  \"a\": 1\n}")
        );
        assert_eq!(body_view(&c(b"plain"), &[]).encoding, "text");
        let h = body_view(&c(&[0, 159, 146, 150]), &[]);
        assert_eq!(h.encoding, "hex");
        assert!(h.content.starts_with("00000000  00 9f 92 96"));
        assert_eq!(body_view(&c(b""), &[]).encoding, "none");
    }

    #[test]
    fn unknown_filters_and_bad_status_classes_are_refused() {
        assert!(parse_filter("colour=red").is_err());
        assert!(parse_filter("status=9xx").is_err());
        let (f, l) = parse_filter("status=4xx&kind=ws&q=a+b&limit=5").unwrap();
        assert_eq!(
            (f.status_class, f.kind.as_deref(), f.q.as_deref(), l),
            (Some(4), Some("ws"), Some("a b"), 5)
        );
    }
}
