//! Finding bytes a visitor sent after a WebSocket upgrade request but before the 101.
//!
//! RFC 6455 §4.1 lets a client send frames only once it has seen the server's 101. Bytes that
//! arrive earlier are either a broken client or an attempt to smuggle a second request past
//! the edge (to be read by a local server that, unlike the edge, treats them as HTTP). The
//! edge refuses such an upgrade with 400.
//!
//! hyper does not say how many bytes it has read beyond a request head, so [`Recorder`] wraps
//! the visitor's stream and counts every byte hyper reads; for the connection's first request
//! it also keeps the bytes themselves (up to a cap), so the end of the head can be found with
//! `httparse`. Two checks follow:
//! - when the upgrade request reaches the edge's handler: bytes already read beyond the first
//!   request's head (sent in the same packets as the request) — nothing is forwarded;
//! - just before the 101 goes out: any byte read since the handler started. hyper keeps
//!   reading while a request is in flight (to notice a vanished client), so this catches bytes
//!   that arrived while the local server was answering.
//!
//! Bytes still in the kernel's buffer when the 101 is sent cannot be told apart from frames a
//! fast client sends right after seeing the 101, and are relayed as frames.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a [`Recorder`] has seen, shared with the request handler.
#[derive(Debug)]
pub(crate) struct Early {
    /// Bytes read from the visitor so far.
    total: AtomicU64,
    /// Whether the first request's bytes are still being kept.
    recording: AtomicBool,
    /// The connection's first bytes, up to `cap`.
    first: Mutex<Vec<u8>>,
    cap: usize,
}

/// A point in the stream, taken when a request reaches the handler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    total: u64,
}

impl Early {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicU64::new(0),
            recording: AtomicBool::new(true),
            first: Mutex::new(Vec::new()),
            cap,
        })
    }

    /// Called when a request reaches the handler. Returns the mark to compare against later,
    /// and whether bytes beyond the head of the connection's first request were already read
    /// (only known for the first request; later ones answer `false`).
    pub(crate) fn mark(&self) -> (Mark, bool) {
        let total = self.total.load(Ordering::Acquire);
        let mut beyond_head = false;
        if self.recording.swap(false, Ordering::AcqRel) {
            let first = match self.first.lock() {
                Ok(mut g) => std::mem::take(&mut *g),
                Err(p) => std::mem::take(&mut *p.into_inner()),
            };
            beyond_head = head_len(&first).is_some_and(|n| first.len() > n);
        }
        (Mark { total }, beyond_head)
    }

    /// Whether any byte was read since `mark`.
    pub(crate) fn read_since(&self, mark: Mark) -> bool {
        self.total.load(Ordering::Acquire) > mark.total
    }

    fn record(&self, bytes: &[u8]) {
        self.total.fetch_add(bytes.len() as u64, Ordering::AcqRel);
        if self.recording.load(Ordering::Acquire) {
            if let Ok(mut first) = self.first.lock() {
                let room = self.cap.saturating_sub(first.len());
                first.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
        }
    }
}

/// Length of the request head at the start of `bytes`, when it is complete.
fn head_len(bytes: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => Some(n),
        _ => None,
    }
}

/// The visitor's stream, counting what is read from it.
#[derive(Debug)]
pub(crate) struct Recorder<I> {
    inner: I,
    early: Arc<Early>,
}

impl<I> Recorder<I> {
    pub(crate) fn new(inner: I, early: Arc<Early>) -> Self {
        Self { inner, early }
    }

    /// The stream, no longer counted (once the 101 is out nothing can arrive early).
    pub(crate) fn into_inner(self) -> I {
        self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Recorder<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.early.record(new);
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Recorder<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_after_the_first_head_are_found() {
        let early = Early::new(1024);
        early.record(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n\x81\x00");
        let (_, beyond) = early.mark();
        assert!(beyond);
    }

    #[test]
    fn a_lone_head_is_clean_and_later_reads_are_noticed() {
        let early = Early::new(1024);
        early.record(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let (mark, beyond) = early.mark();
        assert!(!beyond);
        assert!(!early.read_since(mark));
        early.record(b"x");
        assert!(early.read_since(mark));
        // Only the first request is inspected for bytes beyond its head.
        early.record(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nextra");
        assert!(!early.mark().1);
    }
}
