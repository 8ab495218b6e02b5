//! Worker threads that each run an event loop of their own (`Limits::worker_threads`).
//!
//! A connection, visitor or agent, is handed to one worker thread when it is accepted and all
//! of its tasks stay there: the HTTP/1 connection, its relays, and for an agent connection the
//! HTTP/2 connection task and its streams' tasks. A visitor stream prefers an agent lane that
//! lives on its own thread (`registry::AgentSession::pick`), so a message that crosses the edge
//! is read, framed and written by one thread, without waking another one. With one shared pool
//! of workers every hand-off between those tasks could wake a second thread to steal the task;
//! on a loaded machine that cost a futex wake and two context switches per hop (BENCHMARKS.md,
//! "Worker threads of their own").

use std::cell::Cell;
use std::future::Future;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker thread the caller runs on, if it is one of a [`Shards`]' threads.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// A fixed set of worker threads, each with a single-threaded Tokio runtime.
pub struct Shards {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Shards {
    /// Starts `n` worker threads (at least one), named `NAME-worker-I`.
    pub fn start(n: usize, name: &str) -> std::io::Result<Self> {
        // Dropped (so the threads already started end) if a later one cannot start.
        let mut shards = Self {
            handles: Vec::with_capacity(n.max(1)),
            stop: CancellationToken::new(),
        };
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let stop = shards.stop.clone();
            std::thread::Builder::new()
                .name(format!("{name}-worker-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(i)));
                    rt.block_on(stop.cancelled());
                })?;
            shards.handles.push(handle);
        }
        Ok(shards)
    }

    /// How many worker threads there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never: `start` makes at least one).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime of worker thread `i % len()`.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Runs `make(io)`'s future on worker thread `turn % len()`, tracked by `tracker`. A
    /// socket handed to another thread leaves the caller's event loop and joins that thread's.
    pub fn spawn_connection<T, F, Fut>(&self, turn: usize, tracker: &TaskTracker, io: T, make: F)
    where
        T: Movable,
        F: FnOnce(T) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if current() == Some(turn % self.handles.len()) {
            tracker.spawn(make(io));
            return;
        }
        let left = match io.leave() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(err = %e, "cannot hand a socket to a worker thread");
                return;
            }
        };
        tracker.spawn_on(
            async move {
                match T::join(left) {
                    Ok(io) => make(io).await,
                    Err(e) => {
                        tracing::warn!(err = %e, "cannot register a socket on a worker thread")
                    }
                }
            },
            self.handle(turn),
        );
    }
}

/// A Tokio socket that can leave one event loop and join another.
pub trait Movable: Sized + Send + 'static {
    /// The socket while it belongs to no event loop.
    type Left: Send + 'static;
    /// Leaves the event loop it is registered with.
    fn leave(self) -> std::io::Result<Self::Left>;
    /// Joins the caller's event loop.
    fn join(left: Self::Left) -> std::io::Result<Self>;
}

impl Movable for tokio::net::TcpStream {
    type Left = std::net::TcpStream;

    fn leave(self) -> std::io::Result<Self::Left> {
        self.into_std()
    }

    fn join(left: Self::Left) -> std::io::Result<Self> {
        Self::from_std(left)
    }
}

impl Movable for tokio::net::TcpListener {
    type Left = std::net::TcpListener;

    fn leave(self) -> std::io::Result<Self::Left> {
        self.into_std()
    }

    fn join(left: Self::Left) -> std::io::Result<Self> {
        Self::from_std(left)
    }
}

impl Shards {
    /// Ends the worker threads; the tasks still on them are dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_handed_out_in_turn_are_served_on_their_own_thread() {
        let shards = Shards::start(2, "test").unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(current(), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tracker = TaskTracker::new();
        for turn in 0..4usize {
            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            shards.spawn_connection(turn, &tracker, accepted, |mut s| async move {
                // Answers with the worker thread it runs on, then echoes one byte.
                let here = current().map_or(255, |i| i as u8);
                let mut b = [0u8; 1];
                s.write_all(&[here]).await.unwrap();
                s.read_exact(&mut b).await.unwrap();
                s.write_all(&b).await.unwrap();
            });
            let mut got = [0u8; 1];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0] as usize, turn % 2, "turn {turn}");
            client.write_all(b"x").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"x");
        }
        tracker.close();
        tracker.wait().await;
        shards.stop();
    }
}
