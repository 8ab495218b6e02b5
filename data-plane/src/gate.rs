//! Futures that share a task but are polled only when what they wait on woke them.
//!
//! A task that waits on several futures (a `select!`, or the two directions of a relay)
//! polls all of them whenever any one of them wakes it. For a future polled on every
//! WebSocket message that is work for nothing: a pending `CancellationToken::cancelled()`
//! takes two mutex locks per poll (the token's tree node, then its `Notify`'s list of
//! waiters), and a relay direction whose source is quiet reads its socket again, polls its
//! timers and its cancellation, only because the other direction moved a message
//! (callgrind; BENCHMARKS.md, "Instructions per round trip").
//!
//! [`Gated`] polls the future it wraps with a waker of its own, which notes the wake before
//! it passes it on to the task; any other poll is an [`AtomicWaker`] registration and one
//! atomic swap. [`Cancelled`] is a token's cancellation behind such a gate.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The waker a gated future is polled with: records the wake, passes it to the task.
struct Flag {
    /// The future must be polled again (it was woken, or was never polled).
    woken: AtomicBool,
    /// The task waiting on the [`Gated`] future.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// A waker of a wrapper's own over the state `S` it shares with that waker: the wrapper polls
/// its inner future with `waker` and reads `state` to learn what the waker saw (here and in
/// [`crate::exec::Repoll`]).
pub(crate) struct OwnWaker<S> {
    pub(crate) state: Arc<S>,
    pub(crate) waker: Waker,
}

impl<S: Wake + Send + Sync + 'static> OwnWaker<S> {
    pub(crate) fn new(state: S) -> Self {
        let state = Arc::new(state);
        Self {
            waker: Waker::from(Arc::clone(&state)),
            state,
        }
    }
}

pin_project_lite::pin_project! {
    /// `inner`, polled only after something it registered with woke it (and at its first
    /// poll). Whatever `inner` waits on must wake the waker it was polled with, as every
    /// future must; a future that relies on being polled again for no reason (state another
    /// future changes without a wake) must not be gated.
    pub struct Gated<F> {
        #[pin]
        inner: F,
        own: OwnWaker<Flag>,
    }
}

impl<F> Gated<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner,
            own: OwnWaker::new(Flag {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before `woken` is read: a wake in between reaches this task.
        this.own.state.task.register(cx.waker());
        if !this.own.state.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(&this.own.waker))
    }
}

pin_project_lite::pin_project! {
    /// Completes once the token is cancelled (at once if it already is), like
    /// `CancellationToken::cancelled_owned`, at a fraction of the cost per poll.
    pub struct Cancelled {
        #[pin]
        inner: Gated<WaitForCancellationFutureOwned>,
    }
}

impl Cancelled {
    pub fn new(token: &CancellationToken) -> Self {
        Self {
            inner: Gated::new(token.clone().cancelled_owned()),
        }
    }
}

impl Future for Cancelled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Pending until its stored waker is woken `left` times; counts its polls.
    struct Counted {
        polls: Arc<std::sync::atomic::AtomicUsize>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
        left: usize,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.left == 0 {
                return Poll::Ready(());
            }
            self.left -= 1;
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_gated_future_is_polled_only_when_its_own_waker_was_woken() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waker: Arc<std::sync::Mutex<Option<Waker>>> = Arc::default();
        let mut gated = Box::pin(Gated::new(Counted {
            polls: Arc::clone(&polls),
            waker: Arc::clone(&waker),
            left: 1,
        }));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let task = tokio::spawn(async move {
            let mut other_wakes = 0;
            loop {
                tokio::select! {
                    biased;
                    () = &mut gated => return other_wakes,
                    Some(()) = rx.recv() => other_wakes += 1,
                }
            }
        });
        // The task is woken five times by something else: the gated future is not polled.
        for _ in 0..5 {
            tx.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "polled without its own wake"
        );
        // Its own waker: polled again, and done.
        waker.lock().unwrap().take().unwrap().wake();
        let other_wakes = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the gated future was never polled after its wake")
            .unwrap();
        assert_eq!(other_wakes, 5);
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn completes_when_the_token_is_cancelled_later() {
        let token = CancellationToken::new();
        let child = token.child_token();
        let waiting = tokio::spawn(async move {
            let c = Cancelled::new(&child);
            tokio::pin!(c);
            // Polled many times while pending, as a relay's select polls it.
            let mut spins = 0u32;
            loop {
                tokio::select! {
                    biased;
                    () = &mut c => return spins,
                    () = tokio::time::sleep(Duration::from_millis(1)) => spins += 1,
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            !waiting.is_finished(),
            "finished before the token was cancelled"
        );
        token.cancel();
        let spins = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("Cancelled never completed after cancel()")
            .expect("task panicked");
        assert!(
            spins > 3,
            "the future was polled while pending ({spins} times)"
        );
    }

    #[tokio::test]
    async fn completes_at_once_for_a_token_already_cancelled() {
        let token = CancellationToken::new();
        token.cancel();
        tokio::time::timeout(Duration::from_secs(1), Cancelled::new(&token))
            .await
            .expect("an already cancelled token must complete at the first poll");
    }

    #[tokio::test]
    async fn wakes_a_task_that_waits_on_nothing_else() {
        let token = CancellationToken::new();
        let t2 = token.clone();
        let waiting = tokio::spawn(async move { Cancelled::new(&t2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting task was never woken")
            .expect("task panicked");
    }
}
