//! Waiting for a [`CancellationToken`] from a future that is polled on every message.
//!
//! A pending `CancellationToken::cancelled()` takes two mutex locks each time it is polled
//! (the token's tree node, then its `Notify`'s list of waiters), whatever woke the task. A
//! relay direction, or the task driving an agent's HTTP/2 connection, is polled several times
//! per WebSocket message, and those locks were 3 to 5 % of the instructions of a round trip
//! (callgrind; BENCHMARKS.md, "Instructions per round trip").
//!
//! [`Cancelled`] registers with the token once, through a waker of its own that notes that the
//! token fired before it wakes the task. It polls the token again only after that waker was
//! woken; any other poll is an [`AtomicWaker`] registration and one atomic swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The waker the token's future is polled with: records the wake, passes it to the task.
struct Relay {
    /// The token's future must be polled again (it was woken, or was never polled).
    fired: AtomicBool,
    /// The task waiting on [`Cancelled`].
    task: AtomicWaker,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

pin_project_lite::pin_project! {
    /// Completes once the token is cancelled (at once if it already is), like
    /// `CancellationToken::cancelled_owned`, at a fraction of the cost per poll.
    pub struct Cancelled {
        #[pin]
        inner: WaitForCancellationFutureOwned,
        relay: Arc<Relay>,
        waker: Waker,
    }
}

impl Cancelled {
    pub fn new(token: &CancellationToken) -> Self {
        let relay = Arc::new(Relay {
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            inner: token.clone().cancelled_owned(),
            waker: Waker::from(Arc::clone(&relay)),
            relay,
        }
    }
}

impl Future for Cancelled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // Registered before `fired` is read: a wake in between reaches this task.
        this.relay.task.register(cx.waker());
        if !this.relay.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
