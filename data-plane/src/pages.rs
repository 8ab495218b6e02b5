//! Error pages the edge itself answers with. Plain, short, and never a stack trace.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};

use crate::registry::UpBody;

/// Escapes text for HTML.
fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// The HTML of a page with `status`, a title and one explaining sentence.
fn html(status: StatusCode, title: &str, sentence: &str) -> String {
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status} {t}</title></head>\n<body><h1>{t}</h1>\n<p>{s}</p>\n<hr><p><small>burrow edge</small></p></body></html>\n",
        status = status.as_u16(),
        t = escape(title),
        s = escape(sentence),
    )
}

/// The same page as [`page`], as the bytes of a whole HTTP/1.1 response that closes its
/// connection: for answers written past hyper (see [`crate::bare`]).
pub(crate) fn raw(status: StatusCode, title: &str, sentence: &str) -> Vec<u8> {
    let body = html(status, title, sentence);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/html; charset=utf-8\r\ncache-control: no-store\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A small HTML page with `status`, a title and one explaining sentence.
pub(crate) fn page(status: StatusCode, title: &str, sentence: &str) -> Response<UpBody> {
    let body = html(status, title, sentence);
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

pub(crate) fn unknown_tunnel(sub: &str, domain: &str) -> Response<UpBody> {
    page(
        StatusCode::NOT_FOUND,
        "Tunnel not found",
        &format!("There is no tunnel named {sub:?} on {domain}. Check the address, or start one with `burrow http <port> --subdomain {sub}`."),
    )
}

pub(crate) fn no_tunnel_host(host: &str, domain: &str) -> Response<UpBody> {
    page(
        StatusCode::NOT_FOUND,
        "Not a tunnel address",
        &format!("{host:?} is not an address under {domain}; tunnels live at NAME.{domain}."),
    )
}

pub(crate) fn tunnel_offline(sub: &str) -> Response<UpBody> {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Tunnel offline",
        &format!(
            "The tunnel {sub:?} is offline: its agent disconnected. It may be back in a moment."
        ),
    )
}

pub(crate) fn agent_timeout(sub: &str) -> Response<UpBody> {
    page(
        StatusCode::GATEWAY_TIMEOUT,
        "Tunnel timed out",
        &format!("The agent of tunnel {sub:?} did not answer in time."),
    )
}

pub(crate) fn local_failure(sub: &str, reason: &str) -> Response<UpBody> {
    page(
        StatusCode::BAD_GATEWAY,
        "Local server unreachable",
        &format!("The tunnel {sub:?} is online, but its local server failed: {reason}."),
    )
}

pub(crate) fn bad_request(sentence: &str) -> Response<UpBody> {
    page(StatusCode::BAD_REQUEST, "Bad request", sentence)
}

pub(crate) fn not_implemented(sentence: &str) -> Response<UpBody> {
    page(StatusCode::NOT_IMPLEMENTED, "Not implemented", sentence)
}

/// The page for a request head over `--max-header-bytes`: 414 when its request line alone is
/// over it (RFC 9112 §3: the URL is what to shorten), else 431 (RFC 6585 §5).
pub(crate) fn head_too_large(line: usize, head: usize, limit: usize) -> Response<UpBody> {
    if line > limit {
        page(
            StatusCode::URI_TOO_LONG,
            "URL too long",
            &format!(
                "The request's URL is too long: its request line is {line} bytes, and this \
                 edge accepts request heads of at most {limit} bytes (its --max-header-bytes \
                 setting). Shorten the URL, or send the data in a request body."
            ),
        )
    } else {
        page(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request headers too large",
            &format!(
                "The request's head (request line and headers) is {head} bytes, and this edge \
                 accepts at most {limit} bytes (its --max-header-bytes setting). Send fewer or \
                 smaller headers, such as cookies."
            ),
        )
    }
}

pub(crate) fn too_many(sentence: &str) -> Response<UpBody> {
    let mut r = page(StatusCode::TOO_MANY_REQUESTS, "Too many requests", sentence);
    r.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    r
}
