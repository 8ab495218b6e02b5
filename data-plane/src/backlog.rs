//! A body read ahead from the agent link by a task of its own, into a bounded backlog (the
//! edge for response bodies, the agent for request bodies).
//!
//! hyper's HTTP/1 server polls a response body only while it can write to the visitor. A
//! visitor that stops reading therefore leaves the rest of the body in h2, and h2 charges
//! every buffered DATA frame under 256 bytes against one budget for the whole agent
//! connection: a stream of small pieces (Server-Sent Events, say) to a few stalled visitors
//! would end the connection with ENHANCE_YOUR_CALM, and every tunnel on it. [`drain`] keeps
//! reading such a body into a backlog that costs its size, not a frame each. When the backlog
//! is full and came in small frames, the body ends with [`StalledReader`] (the visitor's
//! connection is cut, the agent's stream reset); a body of large frames just waits, as
//! before, and flow control holds the sender.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::CancellationToken;

use crate::relay::{LinkBudget, StoppedWatch, SMALL_FRAMES_BELOW};

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a drained body ended early: its reader stopped while the body kept coming in small
/// frames, or (`small_frames` false) it took nothing for the link's
/// [`LinkBudget::stopped_after`] while readers that stopped already held their share of the
/// link's connection window.
#[derive(Debug)]
pub struct StalledReader {
    pub small_frames: bool,
}

impl std::fmt::Display for StalledReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.small_frames {
            f.write_str("the reader stopped reading while the body kept coming in small frames")
        } else {
            f.write_str(
                "the reader stopped reading while readers that stopped already held half of \
                 the link's connection window",
            )
        }
    }
}

impl std::error::Error for StalledReader {}

/// What the reading task and the body share.
#[derive(Default)]
struct State {
    data: VecDeque<Bytes>,
    /// Bytes in `data`.
    len: usize,
    /// Frames read (and their bytes) since the reader last emptied the backlog.
    frames: u64,
    frame_bytes: u64,
    trailers: Option<HeaderMap>,
    /// Bytes the reader took so far.
    taken: u64,
    /// Set when the reading task is done: `Ok` at the end of the body.
    done: Option<Result<(), BoxError>>,
    /// The body was dropped: the reading task stops.
    reader_gone: bool,
    reader: Option<Waker>,
    /// The reading task, waiting for room in the backlog.
    task: Option<Waker>,
    /// The reading task, waiting for the body (woken only when the reader goes away).
    task_idle: Option<Waker>,
}

type Shared = Arc<Mutex<State>>;

/// Reads `body` ahead into a backlog of at most about `cap` bytes (one frame more), on a task
/// of its own; see the module documentation. An empty body, or `cap` 0, is passed through.
/// `reader` names who reads the body, for the log ("visitor", "local server"). The token is
/// cancelled when the body is cut for a stalled reader: whoever waits on that reader (for an
/// answer, say) can give up at once. With the link's `budget`, a reader that stops for the
/// link's [`LinkBudget::stopped_after`] holds a stream window of it, and is cut when it has
/// no room left.
pub fn drain<B>(
    body: B,
    cap: usize,
    reader: &'static str,
    budget: Option<Arc<LinkBudget>>,
) -> (
    http_body_util::combinators::BoxBody<Bytes, BoxError>,
    CancellationToken,
)
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt as _;
    let stalled = CancellationToken::new();
    if cap == 0 || body.is_end_stream() {
        return (body.map_err(Into::into).boxed(), stalled);
    }
    let remaining = body.size_hint().exact();
    let shared = Shared::default();
    tokio::spawn(read_ahead(
        body,
        Arc::clone(&shared),
        cap,
        reader,
        stalled.clone(),
        budget.map(StoppedWatch::new),
    ));
    let body = Drained {
        shared,
        remaining,
        finished: false,
    };
    (body.boxed(), stalled)
}

/// The reading task of [`drain`].
async fn read_ahead<B>(
    body: B,
    shared: Shared,
    cap: usize,
    reader: &'static str,
    stalled: CancellationToken,
    mut watch: Option<StoppedWatch>,
) where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    /// What the reading task got.
    enum Next {
        Frame(Frame<Bytes>),
        End,
        Failed(BoxError),
        /// The body was dropped.
        Gone,
    }
    let mut body = pin!(body);
    loop {
        let next = poll_fn(|cx| {
            {
                let Ok(mut st) = shared.lock() else {
                    return Poll::Ready(Next::Gone);
                };
                if st.reader_gone {
                    return Poll::Ready(Next::Gone);
                }
                if st.len >= cap {
                    if st.frames > 0 && st.frame_bytes / st.frames < SMALL_FRAMES_BELOW {
                        return Poll::Ready(Next::Failed(Box::new(StalledReader {
                            small_frames: true,
                        })));
                    }
                    if let Some(w) = watch.as_mut() {
                        if w.poll_full(st.taken, cx).is_ready() {
                            return Poll::Ready(Next::Failed(Box::new(StalledReader {
                                small_frames: false,
                            })));
                        }
                    }
                    st.task = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                if let Some(w) = watch.as_mut() {
                    w.not_full();
                }
                if !st
                    .task_idle
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    st.task_idle = Some(cx.waker().clone());
                }
            }
            body.as_mut().poll_frame(cx).map(|f| match f {
                None => Next::End,
                Some(Ok(frame)) => Next::Frame(frame),
                Some(Err(e)) => Next::Failed(e.into()),
            })
        })
        .await;
        let Ok(mut st) = shared.lock() else {
            return;
        };
        match next {
            Next::Gone => return,
            Next::End => st.done = Some(Ok(())),
            Next::Failed(e) => {
                if let Some(why) = e.downcast_ref::<StalledReader>() {
                    stalled.cancel();
                    // The response is cut: what waits for the stalled visitor goes too.
                    let (held, frames) = (st.len, st.frames);
                    st.data.clear();
                    st.len = 0;
                    if why.small_frames {
                        tracing::warn!(
                            held,
                            frames,
                            "the {reader} stopped reading a body that kept coming in small \
                             pieces; ending it before the agent link's HTTP/2 budget for small \
                             frames runs out"
                        );
                    } else {
                        tracing::warn!(
                            held,
                            "the {reader} stopped reading a body, and readers that stopped \
                             already hold half of the agent link's HTTP/2 connection window; \
                             ending it so the other tunnels on the link keep their window"
                        );
                    }
                }
                st.done = Some(Err(e));
            }
            Next::Frame(frame) => match frame.into_data() {
                Ok(data) => {
                    st.frames += 1;
                    st.frame_bytes += data.len() as u64;
                    st.len += data.len();
                    st.data.push_back(data);
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        st.trailers = Some(t);
                    }
                }
            },
        }
        let finished = st.done.is_some();
        if let Some(w) = st.reader.take() {
            w.wake();
        }
        if finished {
            return;
        }
    }
}

/// The reading side of [`drain`].
struct Drained {
    shared: Shared,
    /// Bytes still to come when the body's length was known.
    remaining: Option<u64>,
    finished: bool,
}

impl Body for Drained {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut st) = self.shared.lock() else {
            return Poll::Ready(Some(Err("the body's reading task failed".into())));
        };
        if st.len > 0 {
            // Everything waiting, as one piece: a slow reader gets fewer, larger writes.
            let data = if st.data.len() == 1 {
                st.data.pop_front().unwrap_or_default()
            } else {
                let mut all = BytesMut::with_capacity(st.len);
                for d in st.data.drain(..) {
                    all.extend_from_slice(&d);
                }
                all.freeze()
            };
            st.len = 0;
            st.frames = 0;
            st.frame_bytes = 0;
            st.taken += data.len() as u64;
            if let Some(w) = st.task.take() {
                w.wake();
            }
            drop(st);
            if let Some(r) = self.remaining.as_mut() {
                *r = r.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(t) = st.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match st.done.take() {
            Some(Ok(())) => {
                drop(st);
                self.finished = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                drop(st);
                self.finished = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                st.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        match (self.finished, self.remaining) {
            (true, _) => SizeHint::with_exact(0),
            (false, Some(n)) => SizeHint::with_exact(n),
            (false, None) => SizeHint::default(),
        }
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.lock() {
            st.reader_gone = true;
            for w in [st.task.take(), st.task_idle.take()].into_iter().flatten() {
                w.wake();
            }
        }
    }
}

/// A body passed on with the data frames that are ready at once merged, up to `max` bytes
/// per frame. A visitor's upload in many small chunks (hyper yields one frame per chunk, even
/// when one socket read brought hundreds) then crosses the agent link as a few large HTTP/2
/// DATA frames instead of one per chunk: less framing work on both ends, and the agent's h2
/// budget for small frames (`too_many_data_frames`, which ends the whole connection) stays out
/// of reach even while the agent is too busy to read for a moment. Nothing waits to be merged:
/// what is not ready yet goes in a later frame.
pub struct Coalesce<B: Body> {
    inner: B,
    max: usize,
    /// What came after the merged data: the next frame, or the inner body's error.
    stash: Option<Result<Frame<Bytes>, B::Error>>,
    /// The inner body has ended.
    ended: bool,
}

impl<B: Body> Coalesce<B> {
    pub fn new(inner: B, max: usize) -> Self {
        Self {
            inner,
            max,
            stash: None,
            ended: false,
        }
    }
}

impl<B> Body for Coalesce<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let first = match this.stash.take() {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None if this.ended => return Poll::Ready(None),
            None => match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Some(Ok(f)) => f,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            },
        };
        let first = match first.into_data() {
            Ok(d) if d.len() < this.max => d,
            Ok(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
            Err(other) => return Poll::Ready(Some(Ok(other))),
        };
        let mut merged: Option<BytesMut> = None;
        loop {
            let len = merged.as_ref().map_or(first.len(), BytesMut::len);
            if len >= this.max || this.ended {
                break;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    this.ended = true;
                    break;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.stash = Some(Err(e));
                    break;
                }
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) if len + d.len() <= this.max => {
                        merged
                            .get_or_insert_with(|| {
                                let mut m = BytesMut::with_capacity(this.max);
                                m.extend_from_slice(&first);
                                m
                            })
                            .extend_from_slice(&d);
                    }
                    Ok(d) => {
                        this.stash = Some(Ok(Frame::data(d)));
                        break;
                    }
                    Err(other) => {
                        this.stash = Some(Ok(other));
                        break;
                    }
                },
            }
        }
        Poll::Ready(Some(Ok(Frame::data(
            merged.map_or(first, BytesMut::freeze),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.stash.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            let n = match &self.stash {
                Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
                _ => 0,
            };
            return SizeHint::with_exact(n);
        }
        let mut hint = self.inner.size_hint();
        if let Some(Ok(f)) = &self.stash {
            let n = f.data_ref().map_or(0, |d| d.len() as u64);
            hint.set_lower(hint.lower().saturating_add(n));
            if let Some(u) = hint.upper() {
                hint.set_upper(u.saturating_add(n));
            }
        }
        hint
    }
}

#[cfg(test)]
mod coalesce_tests {
    use super::Coalesce;
    use bytes::Bytes;
    use futures::StreamExt as _;
    use http_body::{Body as _, Frame};
    use http_body_util::{BodyExt as _, StreamBody};
    use std::pin::Pin;
    use std::task::{Context, Poll};

    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn chunks(n: usize, size: usize) -> Vec<Item> {
        (0..n)
            .map(|i| Ok(Frame::data(Bytes::from(vec![b'a' + (i % 26) as u8; size]))))
            .collect()
    }

    /// `input` behind a [`Coalesce`] of 1000 bytes, every frame ready at once.
    fn coalesced(
        input: Vec<Item>,
    ) -> Coalesce<StreamBody<futures::stream::Iter<std::vec::IntoIter<Item>>>> {
        Coalesce::new(StreamBody::new(futures::stream::iter(input)), 1000)
    }

    /// The length of `body`'s next frame, which must be data.
    async fn next_data_len<B: http_body::Body<Data = Bytes> + Unpin>(body: &mut B) -> usize
    where
        B::Error: std::fmt::Debug,
    {
        let frame = body.frame().await.unwrap().unwrap();
        frame.into_data().unwrap().len()
    }

    #[tokio::test]
    async fn ready_small_chunks_leave_as_few_frames_no_larger_than_the_cap_in_order() {
        let input = chunks(100, 60);
        let expected: Vec<u8> = input
            .iter()
            .flat_map(|f| f.as_ref().unwrap().data_ref().unwrap().to_vec())
            .collect();
        let mut body = coalesced(input);
        let (mut got, mut frames) = (Vec::new(), 0);
        while let Some(f) = body.frame().await {
            let d = f.unwrap().into_data().unwrap();
            assert!(d.len() <= 1000, "{}", d.len());
            got.extend_from_slice(&d);
            frames += 1;
        }
        assert_eq!(got, expected);
        assert!(frames <= 7, "{frames} frames for 6000 bytes");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn trailers_and_errors_after_merged_data_still_arrive_after_it() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        let mut input = chunks(3, 10);
        input.push(Ok(Frame::trailers(trailers)));
        let mut body = coalesced(input);
        assert_eq!(next_data_len(&mut body).await, 30);
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        assert!(body.frame().await.is_none());

        let mut input = chunks(2, 10);
        input.push(Err(std::io::Error::other("cut")));
        let mut body = coalesced(input);
        assert_eq!(next_data_len(&mut body).await, 20);
        assert!(body.frame().await.unwrap().is_err());
    }

    #[test]
    fn what_is_ready_goes_at_once_without_waiting_for_more() {
        let stream = futures::stream::iter(chunks(3, 10)).chain(futures::stream::pending());
        let mut body = Coalesce::new(StreamBody::new(stream), 1000);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => assert_eq!(f.into_data().unwrap().len(), 30),
            other => panic!("{other:?}"),
        }
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
    }
}

#[cfg(test)]
mod tests {
    use super::{drain, StalledReader};
    use bytes::Bytes;
    use http_body::{Body, Frame, SizeHint};
    use http_body_util::BodyExt as _;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};

    /// A body fed from a channel (each item one frame, as from h2), that says when dropped.
    struct Fed {
        rx: mpsc::UnboundedReceiver<Frame<Bytes>>,
        hint: SizeHint,
        _dropped: oneshot::Sender<()>,
    }

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.rx.poll_recv(cx).map(|f| f.map(Ok))
        }
        fn size_hint(&self) -> SizeHint {
            self.hint
        }
    }

    fn fed(
        hint: SizeHint,
    ) -> (
        Fed,
        mpsc::UnboundedSender<Frame<Bytes>>,
        oneshot::Receiver<()>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (dtx, drx) = oneshot::channel();
        let body = Fed {
            rx,
            hint,
            _dropped: dtx,
        };
        (body, tx, drx)
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order_then_the_trailers() {
        let (body, tx, _) = fed(SizeHint::with_exact(400 * 4000));
        let (mut body, stalled) = drain(body, 16 * 1024, "test", None);
        assert_eq!(body.size_hint().exact(), Some(400 * 4000));
        let mut sent = Vec::new();
        for i in 0..400u32 {
            let d: Vec<u8> = (0..4000u32).map(|j| (i * 3 + j) as u8).collect();
            sent.extend_from_slice(&d);
            tx.send(Frame::data(Bytes::from(d))).unwrap();
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-done", "yes".parse().unwrap());
        tx.send(Frame::trailers(trailers)).unwrap();
        drop(tx);
        // Nobody reads for a while: large frames only wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        let mut seen_trailers = None;
        while let Some(f) = body.frame().await {
            let f = f.expect("no error");
            match f.into_data() {
                Ok(d) => got.extend_from_slice(&d),
                Err(f) => seen_trailers = f.into_trailers().ok(),
            }
        }
        assert!(got == sent, "the bytes differ");
        assert_eq!(seen_trailers.unwrap()["x-done"], "yes");
        assert!(body.is_end_stream());
        assert!(!stalled.is_cancelled());
    }

    #[tokio::test]
    async fn small_pieces_for_a_reader_that_stopped_end_the_body_and_drop_the_source() {
        let (body, tx, dropped) = fed(SizeHint::default());
        let (mut body, stalled) = drain(body, 4096, "test", None);
        for _ in 0..10_000 {
            if tx
                .send(Frame::data(Bytes::from_static(b"data: x\n\n")))
                .is_err()
            {
                break;
            }
        }
        // The source is let go (its stream reset) without anyone reading.
        tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .expect("the source was dropped")
            .unwrap_err();
        // The reader, when it comes back, gets the error rather than a body that looks whole.
        let e = loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("the body ended as if complete"),
            }
        };
        assert!(e.is::<StalledReader>(), "{e}");
        assert!(stalled.is_cancelled());
    }

    #[tokio::test]
    async fn a_body_dropped_by_its_reader_lets_the_source_go() {
        let (body, _tx, dropped) = fed(SizeHint::default());
        let (body, _) = drain(body, 4096, "test", None);
        tokio::task::yield_now().await;
        drop(body);
        tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .expect("the source was dropped")
            .unwrap_err();
    }

    /// Large frames for a reader that takes nothing: with room in the link's budget the body
    /// only waits, and its reader later gets every byte; without room it ends, as stopped.
    async fn large_frames_for_a_reader_that_stops(room: bool) -> Result<usize, super::BoxError> {
        let window = 65_535;
        let connection = if room { 4 * window } else { window };
        let budget = crate::relay::LinkBudget::new(connection, window, Duration::from_millis(100));
        let (body, tx, _dropped) = fed(SizeHint::default());
        let (mut body, stalled) = drain(body, 16 * 1024, "test", Some(budget));
        for _ in 0..16 {
            tx.send(Frame::data(Bytes::from(vec![7u8; 4000]))).unwrap();
        }
        drop(tx);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(stalled.is_cancelled(), !room);
        let mut got = 0;
        while let Some(f) = body.frame().await {
            got += f?.into_data().map_or(0, |d| d.len());
        }
        Ok(got)
    }

    #[tokio::test]
    async fn a_reader_that_stops_on_large_frames_waits_while_the_link_has_room() {
        assert_eq!(
            large_frames_for_a_reader_that_stops(true).await.unwrap(),
            64_000
        );
    }

    #[tokio::test]
    async fn a_reader_that_stops_on_large_frames_is_cut_when_stopped_readers_hold_half_the_window()
    {
        let e = large_frames_for_a_reader_that_stops(false)
            .await
            .unwrap_err();
        let why = e.downcast_ref::<StalledReader>().expect("a stalled reader");
        assert!(!why.small_frames);
    }
}
