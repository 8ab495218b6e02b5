//! Taps the forwarding path wraps its streams in: they see every chunk as it passes and hand
//! the recorder at most the configured number of bytes, so nothing is buffered or delayed.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::{Dir, FrameParser};
use super::record::{Captured, Recorder};

// === impl HttpTap ===

struct Shared {
    rec: Recorder,
    id: u64,
    /// Whether the recorder made a record of this exchange (see `Recorder::keeps_entries`).
    kept: bool,
    done: AtomicBool,
}

impl Shared {
    fn end(&self, f: impl FnOnce(&mut super::record::Entry)) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.rec.end(self.id, f);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.end(|e| {
            if e.status.is_none() {
                e.error = Some("ended without a response".to_owned());
            }
        });
    }
}

/// One HTTP exchange being recorded; ends when the response body ends (or is dropped).
#[derive(Clone)]
pub(crate) struct HttpTap {
    shared: Option<Arc<Shared>>,
}

impl Recorder {
    /// Starts recording a request as the local server receives it.
    pub(crate) fn http_started(
        &self,
        target: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> HttpTap {
        self.http_started_replay(target, method, path, headers, None)
    }

    pub(super) fn http_started_replay(
        &self,
        target: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        replay_of: Option<u64>,
    ) -> HttpTap {
        if !self.is_enabled() {
            return HttpTap { shared: None };
        }
        let kept = self.keeps_entries();
        let id = self.begin(false, target, method.as_str(), path, headers, replay_of);
        HttpTap {
            shared: Some(Arc::new(Shared {
                rec: self.clone(),
                id,
                kept,
                done: AtomicBool::new(false),
            })),
        }
    }

    /// Starts recording a WebSocket (or other upgrade) request as the local server receives it.
    pub(crate) fn ws_opened(&self, target: &str, path: &str, headers: &HeaderMap) -> WsTap {
        if !self.is_enabled() {
            return WsTap { shared: None };
        }
        let kept = self.keeps_entries();
        let id = self.begin(true, target, "GET", path, headers, None);
        WsTap {
            shared: Some(Arc::new(Shared {
                rec: self.clone(),
                id,
                kept,
                done: AtomicBool::new(false),
            })),
        }
    }
}

impl HttpTap {
    /// The record's id (0 when the recorder is off).
    pub(crate) fn id(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.id)
    }

    /// Wraps the request body on its way to the local server.
    pub(crate) fn request_body<B>(&self, body: B) -> TapBody<B> {
        TapBody {
            inner: body,
            shared: self.shared.clone(),
            response: false,
        }
    }

    /// Records the local server's response head.
    pub(crate) fn response(&self, status: StatusCode, headers: &HeaderMap) {
        if let Some(s) = self.shared.as_ref().filter(|s| s.kept) {
            let pairs: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            s.rec.update(s.id, true, move |e, _| {
                e.status = Some(status.as_u16());
                e.resp_headers = pairs;
            });
        }
    }

    /// Wraps the response body on its way to the visitor; the exchange ends with it.
    pub(crate) fn response_body<B>(&self, body: B) -> TapBody<B> {
        TapBody {
            inner: body,
            shared: self.shared.clone(),
            response: true,
        }
    }

    /// Ends the exchange with the error answer the agent gave instead of a response.
    pub(crate) fn failed(&self, status: u16, reason: &str) {
        if let Some(s) = &self.shared {
            let reason = reason.to_owned();
            s.end(move |e| {
                e.status = Some(status);
                e.error = Some(reason);
            });
        }
    }
}

/// A body that records its first bytes (up to the body cap) and its size as it streams.
pub(crate) struct TapBody<B> {
    inner: B,
    shared: Option<Arc<Shared>>,
    response: bool,
}

impl<B> Drop for TapBody<B> {
    fn drop(&mut self) {
        if self.response {
            if let Some(s) = self.shared.take() {
                s.end(|_| {});
            }
        }
    }
}

impl<B> Body for TapBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(s) = &self.shared {
            match &r {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref().filter(|_| s.kept) {
                        Captured::record(&s.rec, s.id, self.response, d);
                    }
                }
                Poll::Ready(None) if self.response => {
                    if let Some(s) = self.shared.take() {
                        s.end(|_| {});
                    }
                }
                Poll::Ready(Some(Err(_))) if self.response => {
                    if let Some(s) = self.shared.take() {
                        s.end(|e| e.error = Some("the response body failed".to_owned()));
                    }
                }
                _ => {}
            }
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

// === impl WsTap ===

/// One WebSocket session being recorded: the upgrade, then every frame each way.
pub(crate) struct WsTap {
    shared: Option<Arc<Shared>>,
}

impl WsTap {
    /// Records the local server's answer to the upgrade (101, or a refusal that ends it).
    pub(crate) fn response(&self, status: StatusCode, headers: &HeaderMap) {
        let Some(s) = &self.shared else { return };
        if !s.kept {
            if status != StatusCode::SWITCHING_PROTOCOLS {
                s.end(|_| {});
            }
            return;
        }
        let pairs: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            s.rec.update(s.id, true, move |e, _| {
                e.status = Some(101);
                e.resp_headers = pairs;
                if let Some(sock) = &mut e.socket {
                    sock.open = true;
                    sock.opened = Some(Instant::now());
                }
            });
        } else {
            s.end(move |e| {
                e.status = Some(status.as_u16());
                e.resp_headers = pairs;
            });
        }
    }

    /// Wraps the edge (visitor) side of the relay: what it reads goes in.
    pub(crate) fn visitor_io<T>(&self, io: T) -> TapIo<T> {
        self.io(io, Dir::In)
    }

    /// Wraps the local server side of the relay: what it reads goes out.
    pub(crate) fn local_io<T>(&self, io: T) -> TapIo<T> {
        self.io(io, Dir::Out)
    }

    fn io<T>(&self, io: T, dir: Dir) -> TapIo<T> {
        // Without a record of the session (`--no-inspect` and nobody listening) there is
        // nothing to count into: skip the parse and the recorder's lock per frame.
        let keeps_frames = |s: &&Arc<Shared>| s.kept;
        let parser = self.shared.as_ref().filter(keeps_frames).map(|s| {
            let cap = s.rec.settings().map_or(0, |x| x.preview_cap);
            (Arc::clone(s), FrameParser::new(cap))
        });
        TapIo {
            inner: io,
            dir,
            parser,
        }
    }

    /// Ends the session; `close_code` is the relay's view, used when no close frame was seen
    /// (e.g. the agent closed it with 1001 while shutting down).
    pub(crate) fn closed(&self, close_code: Option<u16>) {
        if let Some(s) = &self.shared {
            s.end(move |e| {
                if let Some(sock) = &mut e.socket {
                    if sock.counts.close_code.is_none() {
                        sock.counts.close_code = close_code;
                    }
                }
            });
        }
    }
}

/// An upgraded stream whose reads are parsed as WebSocket frames for the recorder.
pub(crate) struct TapIo<T> {
    inner: T,
    dir: Dir,
    parser: Option<(Arc<Shared>, FrameParser)>,
}

impl<T: AsyncRead + Unpin> AsyncRead for TapIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some((s, p))) = (&r, &mut this.parser) {
            let fresh = &buf.filled()[before..];
            let dir = this.dir;
            p.feed(fresh, &mut |f| s.rec.frame(s.id, dir, &f));
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TapIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
