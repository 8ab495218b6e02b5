//! Log lines written to standard output or standard error from a thread of their own.
//!
//! A program that logs with blocking writes from the threads that serve connections stops
//! serving when whatever reads its output stops reading: a terminal paused with Ctrl-S, a
//! pipe into a pager, a log shipper that fell behind. Once the pipe's buffer (64 KiB on
//! Linux) is full, the next log line blocks the thread that wrote it, and every connection
//! that thread serves with it. Log lines a visitor can cause (a refused request head, say)
//! make that an easy way to stall an edge.
//!
//! [`to`] gives a [`MakeWriter`] for `tracing_subscriber`: each log line is queued, and a
//! thread of its own writes the queue out. When the queue is full (at most
//! [`ENV_LOG_QUEUE_LINES`] lines, default [`DEFAULT_LOG_QUEUE_LINES`]) a new line is dropped
//! and counted instead of waiting; the next line written says how many were dropped. The
//! [`Flush`] guard writes out what is still queued when the program ends (waiting at most
//! [`FLUSH_WAIT`] for an output that does not take it).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Environment variable: how many log lines may wait for the output before new ones are
/// dropped (counted, and reported in the next line written).
pub const ENV_LOG_QUEUE_LINES: &str = "BURROW_LOG_QUEUE_LINES";
/// Log lines that may wait for the output when [`ENV_LOG_QUEUE_LINES`] is not set.
pub const DEFAULT_LOG_QUEUE_LINES: usize = 8192;
/// Most log lines [`ENV_LOG_QUEUE_LINES`] may ask for.
pub const MAX_LOG_QUEUE_LINES: usize = 1 << 20;
/// How long the program waits at its end for queued lines to be written out.
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Which of the program's outputs the lines go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

impl Output {
    fn write_now(self, bytes: &[u8]) {
        // Nothing useful can be done when the output itself fails.
        let _ = match self {
            Output::Stdout => io::stdout().lock().write_all(bytes),
            Output::Stderr => io::stderr().lock().write_all(bytes),
        };
    }
}

struct Shared {
    output: Output,
    dropped: AtomicU64,
    closing: AtomicBool,
}

/// The [`MakeWriter`] of queued log lines (cheap to clone).
#[derive(Clone)]
pub struct Lines {
    /// `None` when the writing thread could not be started: lines are then written at once.
    tx: Option<SyncSender<Vec<u8>>>,
    shared: Arc<Shared>,
}

/// Writes out the lines still queued when dropped (see [`FLUSH_WAIT`]).
#[must_use = "queued log lines are written out when this is dropped"]
pub struct Flush {
    tx: Option<SyncSender<Vec<u8>>>,
    shared: Arc<Shared>,
    done: Option<Receiver<()>>,
}

/// The queue length [`ENV_LOG_QUEUE_LINES`] asks for, or why it cannot be used.
pub fn queue_lines_from_env() -> Result<usize, String> {
    match std::env::var(ENV_LOG_QUEUE_LINES) {
        Err(_) => Ok(DEFAULT_LOG_QUEUE_LINES),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_LOG_QUEUE_LINES).contains(&n) => Ok(n),
            _ => Err(format!(
                "{ENV_LOG_QUEUE_LINES} is {v:?}; it must be a number of lines from 1 to \
                 {MAX_LOG_QUEUE_LINES}"
            )),
        },
    }
}

/// Queued log lines for `output`, at most `queue` waiting at once.
pub fn to(output: Output, queue: usize) -> (Lines, Flush) {
    let shared = Arc::new(Shared {
        output,
        dropped: AtomicU64::new(0),
        closing: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(queue.max(1));
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    let writer = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name("burrow-log".into())
        .spawn(move || {
            write_out(&rx, &writer);
            // Closed before saying so: a line logged after this is written directly.
            drop(rx);
            let _ = done_tx.send(());
        });
    let (tx, done) = match spawned {
        Ok(_) => (Some(tx), Some(done_rx)),
        Err(e) => {
            output.write_now(
                format!("warning: cannot start the log writer ({e}); logging directly\n")
                    .as_bytes(),
            );
            (None, None)
        }
    };
    (
        Lines {
            tx: tx.clone(),
            shared: Arc::clone(&shared),
        },
        Flush { tx, shared, done },
    )
}

/// The writing thread: every queued line in order, until [`Flush`] asks it to end and the
/// queue is empty.
fn write_out(rx: &Receiver<Vec<u8>>, shared: &Shared) {
    while let Ok(line) = rx.recv() {
        report_dropped(shared);
        if !line.is_empty() {
            shared.output.write_now(&line);
        }
        if shared.closing.load(Ordering::Acquire) {
            // Whatever is queued now was logged before the end: write it, then stop.
            while let Ok(line) = rx.try_recv() {
                shared.output.write_now(&line);
            }
            report_dropped(shared);
            return;
        }
    }
}

fn report_dropped(shared: &Shared) {
    let n = shared.dropped.swap(0, Ordering::Relaxed);
    if n > 0 {
        shared.output.write_now(
            format!(
                "warning: {n} log line(s) dropped: the log output was not being read fast \
                 enough (queue: {ENV_LOG_QUEUE_LINES})\n"
            )
            .as_bytes(),
        );
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        let Some(tx) = self.tx.take() else { return };
        // Wakes the thread if it waits for a line; when the queue is full it is busy anyway
        // and sees `closing` after the line it is writing.
        let _ = tx.try_send(Vec::new());
        drop(tx);
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// One log line being formatted; queued when dropped.
pub struct Line<'a> {
    buf: Vec<u8>,
    lines: &'a Lines,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        let Some(tx) = &self.lines.tx else {
            self.lines.shared.output.write_now(&line);
            return;
        };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.lines.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writing thread has ended (the program is ending): write it here.
            Err(TrySendError::Disconnected(line)) => self.lines.shared.output.write_now(&line),
        }
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            buf: Vec::new(),
            lines: self,
        }
    }
}

/// Timestamps of log lines, as `tracing_subscriber`'s default writes them
/// (`2026-12-07T23:51:35.705118Z`: UTC, microseconds), written digit by digit: the default
/// goes through the formatting machinery for each field, a sizeable share of the cost of the
/// agent's line per request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timestamps;

impl tracing_subscriber::fmt::time::FormatTime for Timestamps {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let text = timestamp(since);
        w.write_str(std::str::from_utf8(&text).unwrap_or("?"))
    }
}

/// `since` the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (years 0 to 9999).
fn timestamp(since: Duration) -> [u8; 27] {
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let of_day = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds_across_leap_days_and_centuries() {
        for (secs, micros, text) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 7, "2000-02-29T00:00:00.000007Z"),
            (1_709_164_799, 999_999, "2024-02-28T23:59:59.999999Z"),
            (1_709_164_800, 120_000, "2024-02-29T00:00:00.120000Z"),
            (1_796_687_495, 705_118, "2026-12-07T23:51:35.705118Z"),
            (4_102_444_800, 0, "2100-01-01T00:00:00.000000Z"),
            (253_402_300_799, 1, "9999-12-31T23:59:59.000001Z"),
        ] {
            let t = timestamp(Duration::new(secs, micros * 1000));
            assert_eq!(std::str::from_utf8(&t).unwrap(), text, "{secs}");
        }
    }

    fn line(lines: &Lines, text: &str) {
        let mut w = lines.make_writer();
        w.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts_lines_instead_of_waiting() {
        // No writing thread drains this queue: the channel is built by hand.
        let (tx, rx) = mpsc::sync_channel(2);
        let lines = Lines {
            tx: Some(tx),
            shared: Arc::new(Shared {
                output: Output::Stderr,
                dropped: AtomicU64::new(0),
                closing: AtomicBool::new(false),
            }),
        };
        for i in 0..5 {
            line(&lines, &format!("line {i}\n"));
        }
        assert_eq!(rx.try_recv().unwrap(), b"line 0\n");
        assert_eq!(rx.try_recv().unwrap(), b"line 1\n");
        assert!(rx.try_recv().is_err());
        assert_eq!(lines.shared.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_flush_guard_returns_and_later_lines_are_still_written() {
        let (lines, flush) = to(Output::Stderr, 4);
        line(&lines, "before the end\n");
        let started = std::time::Instant::now();
        drop(flush);
        assert!(started.elapsed() < FLUSH_WAIT);
        // The thread has ended: the line is written directly, not lost or queued forever.
        line(&lines, "after the end\n");
        let tx = lines.tx.as_ref().unwrap();
        assert!(matches!(
            tx.try_send(Vec::new()),
            Err(TrySendError::Disconnected(_))
        ));
    }
}
