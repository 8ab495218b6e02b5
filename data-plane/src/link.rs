//! The agent link's HTTP/2 streams as the rest of the code sees them, on the `h2` crate
//! directly: a request or response body ([`RecvBody`]), sending a body with HTTP/2 flow
//! control ([`send_body`]), and an upgraded stream as a byte pipe ([`Upgraded`]).
//!
//! Both ends drive the link with `h2` itself rather than through hyper so that a relay
//! writes straight into the stream's send queue: hyper hands each write of an upgraded
//! stream to a task of its own, one more thread hop per message in each process
//! (BENCHMARKS.md, "Where the time goes").

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body arriving on an HTTP/2 stream. Flow-control credit goes back to the peer as the
/// bytes are taken, so a slow consumer slows the sender instead of filling memory.
#[derive(Debug)]
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
}

impl RecvBody {
    /// Wraps a received stream.
    pub fn new(stream: RecvStream) -> Self {
        Self {
            stream,
            data_done: false,
        }
    }

    /// The stream, to read it as raw bytes (an upgrade).
    pub fn into_inner(self) -> RecvStream {
        self.stream
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stream.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

/// Waits for send capacity on `tx` for up to `want` bytes; `Ok(n)` with `n > 0` is what may
/// be sent now. Capacity is requested only when there is something to send: held idle, it
/// would pin the connection's window.
fn poll_send_capacity(
    tx: &mut SendStream<Bytes>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if let Poll::Ready(r) = tx.poll_reset(cx) {
        return Poll::Ready(Err(match r {
            Ok(reason) => reset_error(reason),
            Err(e) => h2_io_error(e),
        }));
    }
    tx.reserve_capacity(want);
    loop {
        let have = tx.capacity();
        if have > 0 {
            return Poll::Ready(Ok(have.min(want)));
        }
        match ready!(tx.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the stream is closed",
                )))
            }
        }
    }
}

fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("the peer reset the stream ({reason})"),
    )
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Sends `data` on `tx` as flow control allows, ending the stream with it when `end`.
async fn send_data(tx: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> io::Result<()> {
    if data.is_empty() {
        if end {
            tx.send_data(data, true).map_err(h2_io_error)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        let n = poll_fn(|cx| poll_send_capacity(tx, data.len(), cx)).await?;
        let chunk = data.split_to(n);
        tx.send_data(chunk, end && data.is_empty())
            .map_err(h2_io_error)?;
    }
    Ok(())
}

/// Sends every frame of `body` on `tx` (data with flow control, then trailers) and ends the
/// stream. A failing body resets the stream, so the peer sees an error rather than a body
/// that looks complete.
pub async fn send_body<B>(body: B, mut tx: SendStream<Bytes>) -> Result<(), BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    if body.is_end_stream() {
        tx.send_data(Bytes::new(), true)?;
        return Ok(());
    }
    loop {
        // Watch for a reset while the body has nothing to give.
        let next = poll_fn(|cx| {
            if let Poll::Ready(r) = tx.poll_reset(cx) {
                let e = match r {
                    Ok(reason) => reset_error(reason),
                    Err(e) => h2_io_error(e),
                };
                return Poll::Ready(Err(e));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        match next {
            None => {
                tx.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(e)) => {
                tx.send_reset(Reason::INTERNAL_ERROR);
                return Err(e.into());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    send_data(&mut tx, data, end).await?;
                    if end {
                        return Ok(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.send_trailers(trailers)?;
                        return Ok(());
                    }
                }
            },
        }
    }
}

/// An upgraded HTTP/2 stream (extended CONNECT) as a byte pipe: reads take DATA frames in
/// order, writes become DATA frames within the stream's flow-control window, shutdown ends
/// the stream (END_STREAM).
#[derive(Debug)]
pub struct Upgraded {
    tx: SendStream<Bytes>,
    rx: RecvStream,
    /// Received bytes not read yet.
    pending: Bytes,
    ended: bool,
}

impl Upgraded {
    /// The pipe over one stream's two halves.
    pub fn new(tx: SendStream<Bytes>, rx: RecvStream) -> Self {
        Self {
            tx,
            rx,
            pending: Bytes::new(),
            ended: false,
        }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.rx.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        // The peer ended the stream without an error: end of stream.
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                        Some(reason) if e.is_reset() => Err(reset_error(reason)),
                        _ => Err(h2_io_error(e)),
                    });
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        let _ = self.rx.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.ended {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream was shut down",
            )));
        }
        let n = ready!(poll_send_capacity(&mut self.tx, buf.len(), cx))?;
        self.tx
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes queued frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            // Fails only when the stream is already closed or reset: nothing left to end.
            let _ = self.tx.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}
