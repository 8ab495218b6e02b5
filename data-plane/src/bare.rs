//! hyper's own answers to visitor requests it cannot parse, replaced by the edge's pages.
//!
//! hyper answers a request head it cannot parse, or one over its limits, by itself: a bare
//! status line with `connection: close`, `content-length: 0` and no word on what was wrong
//! (`Transfer-Encoding: gzip` gets a 400 that does not say it is the coding, a head over
//! hyper's cap a 431 that names no setting). No hook lets the service answer instead, so
//! [`Held`] wraps the visitor's stream and holds back a write that looks like such an answer:
//! one lone head of a 4xx with `connection: close` and `content-length: 0`. hyper closes the
//! connection after it either way. Once `serve_connection` has returned, its error says
//! whether the write was hyper's answer to a parse error ([`answer`] sends the page for that
//! error) or a real response that looks like one (sent unchanged).
//!
//! A bare answer hyper writes together with earlier bytes (a pipelined request behind a
//! response still waiting in the socket) is not recognised, and goes out as hyper wrote it.
//! Once a 101 has gone out the stream carries WebSocket frames, not HTTP, and nothing more is
//! held back.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use crate::config::Limits;
use crate::pages;

/// Longest write hyper's bare answers take (a status line and three short headers).
const BARE_MAX: usize = 256;

/// Where [`Held`] leaves the stream and the held write when hyper drops it.
pub(crate) type Slot<I> = Arc<Mutex<Option<Handed<I>>>>;

/// What [`Held`] hands back when hyper drops it with a write held back.
#[derive(Debug)]
pub(crate) struct Handed<I> {
    pub(crate) io: I,
    pub(crate) held: Vec<u8>,
    /// The first request line was over the head limit (or never ended within it).
    pub(crate) url_too_long: bool,
}

/// The visitor's stream, holding back what looks like hyper's own answer to a parse error.
#[derive(Debug)]
pub(crate) struct Held<I> {
    /// `None` only while being dropped.
    inner: Option<I>,
    held: Vec<u8>,
    slot: Slot<I>,
    /// Whether the stream still carries HTTP/1.1: cleared by a 101 (an upgrade).
    http: bool,
    /// Bytes read before the first line feed the visitor sent (the first request line),
    /// while none has come yet; then `line` says how long that line was.
    before_line_end: usize,
    line: Option<usize>,
    /// `--max-header-bytes`: a first request line longer than this is a URL too long.
    max_head: usize,
}

impl<I> Held<I> {
    pub(crate) fn new(inner: I, slot: Slot<I>, max_head: usize) -> Self {
        Self {
            inner: Some(inner),
            held: Vec::new(),
            slot,
            http: true,
            before_line_end: 0,
            line: None,
            max_head,
        }
    }

    /// Notes the bytes just read, until the first request line has ended.
    fn saw(&mut self, read: &[u8]) {
        if self.line.is_some() {
            return;
        }
        match read.iter().position(|b| *b == b'\n') {
            Some(i) => self.line = Some(self.before_line_end + i),
            None => self.before_line_end += read.len(),
        }
    }

    /// Whether the first request line is longer than the head limit, or has not ended after
    /// more than that: a head too large then is a URL too long (414), not a head (431). Later
    /// requests on the connection are not tracked.
    fn line_over(&self) -> bool {
        self.line.unwrap_or(self.before_line_end) > self.max_head
    }

    /// The stream, unless a write is still held back (then `self` again).
    pub(crate) fn into_inner(mut self) -> Result<I, Self> {
        if !self.held.is_empty() {
            return Err(self);
        }
        // `Drop` finds nothing held and leaves the slot alone.
        self.inner.take().ok_or(self)
    }

    /// Whether to hold back `buf`, the start of a write.
    fn holds(&mut self, buf: &[u8]) -> bool {
        if !self.http {
            return false;
        }
        if buf.starts_with(b"HTTP/1.1 101 ") {
            self.http = false;
            return false;
        }
        looks_bare(buf)
    }
}

impl<I> Drop for Held<I> {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        if let Some(io) = self.inner.take() {
            let handed = Handed {
                io,
                held: std::mem::take(&mut self.held),
                url_too_long: self.line_over(),
            };
            match self.slot.lock() {
                Ok(mut s) => *s = Some(handed),
                Err(p) => *p.into_inner() = Some(handed),
            }
        }
    }
}

/// Whether `buf` is a whole response head as hyper writes its own answer to a request it
/// cannot read: `HTTP/1.1 4xx`, `connection: close`, `content-length: 0`, nothing after.
fn looks_bare(buf: &[u8]) -> bool {
    buf.len() <= BARE_MAX
        && buf.starts_with(b"HTTP/1.1 4")
        && buf.ends_with(b"\r\n\r\n")
        && buf.windows(4).filter(|w| w == b"\r\n\r\n").count() == 1
        && contains(buf, b"\r\nconnection: close\r\n")
        && contains(buf, b"\r\ncontent-length: 0\r\n")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "visitor stream already handed back",
    )
}

impl<I: AsyncWrite + Unpin> Held<I> {
    /// Writes what was held back: hyper wrote on after it, so it was not its last answer.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut *inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Held<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let before = buf.filled().len();
        let polled = Pin::new(inner).poll_read(cx, buf);
        if this.line.is_none() {
            this.saw(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Held<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_release(cx))?;
        if this.holds(buf) {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_release(cx))?;
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        match (filled.next(), filled.next()) {
            (Some(only), None) if this.holds(only) => {
                this.held.extend_from_slice(only);
                return Poll::Ready(Ok(only.len()));
            }
            (Some(first), Some(_)) => {
                // A head with its body: never held, but a 101 still ends HTTP.
                this.holds(first);
            }
            _ => {}
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What is held waits for `answer`; the rest is flushed.
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.held.is_empty() {
            // `answer` writes the held answer (or the page for it) and shuts down then.
            return Poll::Ready(Ok(()));
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

/// Sends what [`Held`] held back once the connection is over: the page for hyper's parse
/// error `err`, or the held bytes unchanged when the connection ended without one. At most
/// `limits.header_read_timeout`, as the visitor may take no longer to send a head either.
pub(crate) async fn answer<I: AsyncWrite + Unpin>(
    handed: Handed<I>,
    err: Option<&hyper::Error>,
    limits: &Limits,
) {
    let Handed {
        mut io,
        held,
        url_too_long,
    } = handed;
    let bytes = err
        .and_then(|e| page_for(e, &held, url_too_long, limits))
        .unwrap_or(held);
    let send = async {
        io.write_all(&bytes).await?;
        io.shutdown().await
    };
    if let Ok(Err(e)) = tokio::time::timeout(limits.header_read_timeout, send).await {
        tracing::debug!(err = %e, "cannot send the answer to an unreadable request");
    }
}

/// The page (whole HTTP/1.1 response bytes) for hyper's parse error `err`, whose bare answer
/// was `held`; `None` when `err` is no parse error.
fn page_for(
    err: &hyper::Error,
    held: &[u8],
    url_too_long: bool,
    limits: &Limits,
) -> Option<Vec<u8>> {
    let max = limits.max_header_bytes;
    let (status, title, sentence) = if err.is_parse_too_large() {
        // Past its read buffer hyper answers 431 whatever filled it, so the length of the
        // request line decides; a 414 of hyper's own stands.
        if held.starts_with(b"HTTP/1.1 414") || url_too_long {
            (
                StatusCode::URI_TOO_LONG,
                "URL too long",
                format!(
                    "The request's URL is too long: this edge accepts request heads of at most \
                     {max} bytes (its --max-header-bytes setting). Shorten the URL, or send \
                     the data in a request body."
                ),
            )
        } else {
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request headers too large",
                format!(
                    "The request's head (request line and headers) is larger than this edge \
                     accepts: at most {max} bytes (its --max-header-bytes setting) in at most \
                     {} headers (its --max-headers setting). Send fewer or smaller headers, \
                     such as cookies.",
                    limits.max_headers
                ),
            )
        }
    } else if err.is_parse() {
        // hyper's kinds of header error are not public; its message names the one that
        // matters here (the RFC 9112 §6.1 case the edge's own check cannot see, since hyper
        // refuses such a request before the edge is asked).
        let message = err.to_string();
        if message.contains("invalid transfer-encoding") {
            (
                StatusCode::NOT_IMPLEMENTED,
                "Not implemented",
                "The request body is sent in a transfer coding this edge does not decode: \
                 chunked must be its last and only transfer coding; send the body with \
                 Transfer-Encoding: chunked alone, or with a Content-Length (RFC 9112 §6.1)."
                    .to_owned(),
            )
        } else {
            (
                StatusCode::BAD_REQUEST,
                "Bad request",
                format!("The edge could not read the request as HTTP/1.1: {message}."),
            )
        }
    } else {
        return None;
    };
    Some(pages::raw(status, title, &sentence))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_empty_closing_4xx_head_looks_bare() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                     content-length: 0\r\ndate: Fri, 04 Dec 2026 18:00:00 GMT\r\n\r\n";
        assert!(looks_bare(bare));
        let with_body = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
                          content-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
        assert!(!looks_bare(with_body));
        let kept_alive = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert!(!looks_bare(kept_alive));
        let ok = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert!(!looks_bare(ok));
    }

    #[test]
    fn the_first_request_line_is_measured_across_reads() {
        let mut held = Held::new(tokio::io::sink(), Slot::default(), 10);
        held.saw(b"GET /abc");
        assert!(!held.line_over());
        held.saw(b"def");
        // 11 bytes and no line feed yet: over the limit already.
        assert!(held.line_over());
        held.saw(b" HTTP/1.1\r\nHost: x\r\n");
        assert!(held.line_over(), "a line of 21 bytes, CR included");
        let mut held = Held::new(tokio::io::sink(), Slot::default(), 64);
        held.saw(b"GET / HTTP/1.1\r\nX-Big: ");
        held.saw(&[b'h'; 200]);
        assert!(
            !held.line_over(),
            "long headers after a short line are not a long URL"
        );
        // Only the first line counts: a later long one leaves the answer alone.
        held.saw(b"\r\n\r\nGET /");
        held.saw(&[b'u'; 200]);
        assert!(!held.line_over());
    }

    #[test]
    fn after_a_101_nothing_is_held_back() {
        let bare = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let mut held = Held::new(tokio::io::sink(), Slot::default(), 8192);
        assert!(held.holds(bare));
        assert!(!held.holds(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"));
        // A WebSocket message that happens to read like hyper's answer is relayed.
        assert!(!held.holds(bare));
    }
}
