//! The executor hyper's HTTP/2 connections spawn their tasks on (the agent link, both ends).
//!
//! hyper's HTTP/2 code wakes a task from inside that task's own poll on every chunk it sends:
//! the task that feeds an upgraded stream (a WebSocket) into `h2` registers its waker for a
//! stream reset, then reserves send capacity, and `h2` answers a granted reservation by waking
//! the registered waker, which is the task's own. Tokio treats a task woken while it runs as a
//! task that yields: it goes to the back of the run queue and another worker thread is woken to
//! steal it. On a busy machine that costs a futex wake and two context switches per message
//! per direction, for a poll that finds nothing to do (measured in BENCHMARKS.md).
//!
//! [`Executor`] spawns every such task inside [`Repoll`], which notices a wake that arrives
//! while the task is being polled and polls the task again at once instead, a bounded number
//! of times and only while Tokio's cooperative budget lasts; past either bound the wake goes
//! to Tokio as usual, so a task that yields on purpose still yields.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake};

use futures::task::AtomicWaker;

use crate::gate::OwnWaker;

/// Most polls of one task in a row, inside one poll by Tokio, because it woke itself.
pub const MAX_REPOLLS: u32 = 8;

/// hyper's executor for HTTP/2 connections: `tokio::spawn`, each future inside [`Repoll`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Repoll::new(fut));
    }
}

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// What the inner future's waker shares with [`Repoll`].
struct Shared {
    state: AtomicU8,
    /// Tokio's waker for the task, as of the last poll.
    outer: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // Being polled now: the poll loop sees this and polls again.
            Ok(_) | Err(WOKEN) => {}
            _ => self.outer.wake(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A future polled again in place when it wakes itself while being polled (see the module
    /// documentation).
    pub struct Repoll<F> {
        #[pin]
        inner: F,
        own: OwnWaker<Shared>,
    }
}

impl<F: Future> Repoll<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        Self {
            inner,
            own: OwnWaker::new(Shared {
                state: AtomicU8::new(IDLE),
                outer: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for Repoll<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        let shared = &this.own.state;
        shared.outer.register(cx.waker());
        let mut inner_cx = Context::from_waker(&this.own.waker);
        for _ in 0..MAX_REPOLLS {
            shared.state.store(POLLING, Ordering::Release);
            if let Poll::Ready(v) = this.inner.as_mut().poll(&mut inner_cx) {
                shared.state.store(IDLE, Ordering::Release);
                return Poll::Ready(v);
            }
            if shared.state.swap(IDLE, Ordering::AcqRel) != WOKEN {
                return Poll::Pending;
            }
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Waker;

    /// Wakes itself `n` times, then finishes; counts its polls.
    struct SelfWaking {
        left: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Future for SelfWaking {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.left == 0 {
                return Poll::Ready(());
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_self_wake_is_polled_again_in_place_up_to_the_bound() {
        let outer = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&outer));
        let mut cx = Context::from_waker(&waker);
        let polls = Arc::new(AtomicUsize::new(0));
        let mut f = Box::pin(Repoll::new(SelfWaking {
            left: 3,
            polls: Arc::clone(&polls),
        }));
        // Three self-wakes fit inside one outer poll: no wake reaches the outer waker.
        assert!(f.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 4);
        assert_eq!(outer.0.load(Ordering::Relaxed), 0);

        // More than the bound: the outer waker is woken so the scheduler gets its turn back.
        polls.store(0, Ordering::Relaxed);
        let mut f = Box::pin(Repoll::new(SelfWaking {
            left: 100,
            polls: Arc::clone(&polls),
        }));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), MAX_REPOLLS as usize);
        assert_eq!(outer.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_wake_between_polls_reaches_the_outer_waker() {
        let outer = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&outer));
        let mut cx = Context::from_waker(&waker);
        let stored: Arc<std::sync::Mutex<Option<Waker>>> = Arc::default();
        let s2 = Arc::clone(&stored);
        let mut f = Box::pin(Repoll::new(std::future::poll_fn(move |cx| {
            *s2.lock().unwrap() = Some(cx.waker().clone());
            Poll::<()>::Pending
        })));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(outer.0.load(Ordering::Relaxed), 0);
        stored.lock().unwrap().take().unwrap().wake();
        assert_eq!(outer.0.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn futures_spawned_by_the_executor_run_to_completion() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        hyper::rt::Executor::execute(&Executor, async move {
            tokio::task::yield_now().await;
            let _ = tx.send(7);
        });
        assert_eq!(rx.await.ok(), Some(7));
    }
}
