//! The recorder: a cheap cloneable handle on a bounded ring of the last exchanges, live
//! counters for the terminal panel, and a broadcast of every change for the page.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use http::HeaderMap;
use serde::Serialize;
use tokio::sync::broadcast;

use super::frame::{Dir, Opcode, ParsedFrame};
use super::Settings;

/// Events buffered per subscriber (page or panel); a slower one skips ahead.
const EVENT_BUFFER: usize = 1024;
/// Latencies kept for the panel's percentiles.
const LATENCY_SAMPLES: usize = 1000;
/// Completion times kept for the requests-per-minute figure.
const RATE_SAMPLES: usize = 100_000;
/// Window of the requests-per-minute figure.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Shortest interval between two change events for one busy WebSocket session; changes in
/// between are sent by [`Recorder::flush_loop`], so the page never shows stale counts.
pub(crate) const NOTIFY_INTERVAL: Duration = Duration::from_millis(100);

/// A handle on the process's traffic record; every method is a no-op when disabled.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    settings: Settings,
    next_id: AtomicU64,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
}

#[derive(Default)]
struct State {
    ring: VecDeque<Entry>,
    /// Bytes held by bodies, headers and frame previews in `ring`, for the memory bound.
    held: usize,
    stats: Stats,
    meta: Meta,
}

/// What the panel shows about the agent's session with the edge.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Meta {
    /// `connecting`, `online` or `reconnecting`.
    pub(crate) status: String,
    pub(crate) team: String,
    pub(crate) edge: String,
    /// `(public URL, local address)` pairs.
    pub(crate) forwards: Vec<(String, String)>,
    pub(crate) inspector: Option<String>,
    /// Why the last attempt to reach the edge failed, while the agent is not online.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) edge_error: Option<String>,
}

#[derive(Default)]
struct Stats {
    open: u64,
    total: u64,
    latencies: VecDeque<f64>,
    completions: VecDeque<Instant>,
}

/// Counters the panel and `/api/status` show.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatusView {
    #[serde(flatten)]
    pub(crate) meta: Meta,
    pub(crate) connections_open: u64,
    pub(crate) connections_total: u64,
    pub(crate) requests_per_minute: usize,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p90_ms: Option<f64>,
    pub(crate) kept: usize,
    pub(crate) kept_bytes: usize,
}

/// A change, as sent to the page and the panel.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// An exchange started or changed; `done` when it just ended.
    Exchange { summary: Arc<Summary>, done: bool },
    /// Every exchange was removed.
    Cleared,
}

// === records ===

#[derive(Default)]
pub(super) struct Captured {
    pub(super) data: Vec<u8>,
    pub(super) size: u64,
}

impl Captured {
    fn push(&mut self, chunk: &[u8], cap: usize) -> usize {
        self.size += chunk.len() as u64;
        let room = cap.saturating_sub(self.data.len());
        let take = room.min(chunk.len());
        self.data.extend_from_slice(&chunk[..take]);
        take
    }
}

pub(super) struct Entry {
    pub(super) id: u64,
    pub(super) ws: bool,
    pub(super) target: String,
    pub(super) started_at: DateTime<Utc>,
    pub(super) started: Instant,
    pub(super) duration: Option<Duration>,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) status: Option<u16>,
    pub(super) error: Option<String>,
    pub(super) replay_of: Option<u64>,
    pub(super) req_headers: Vec<(String, String)>,
    pub(super) resp_headers: Vec<(String, String)>,
    pub(super) req_body: Captured,
    pub(super) resp_body: Captured,
    pub(super) socket: Option<Socket>,
    /// When subscribers last heard of this record.
    pub(super) notified: Option<Instant>,
    /// Changed since subscribers last heard of it.
    pub(super) dirty: bool,
}

/// WebSocket specifics of an exchange.
#[derive(Default)]
pub(super) struct Socket {
    pub(super) opened: Option<Instant>,
    pub(super) open: bool,
    pub(super) frames: VecDeque<FrameRecord>,
    pub(super) frames_dropped: u64,
    /// Bytes of the previews in `frames`.
    pub(super) preview_bytes: usize,
    pub(super) counts: WsCounts,
}

pub(super) struct FrameRecord {
    pub(super) dir: Dir,
    pub(super) opcode: Opcode,
    pub(super) fin: bool,
    pub(super) size: u64,
    pub(super) at: Duration,
    pub(super) preview: Option<String>,
}

/// Message and byte counters of a WebSocket session, by direction: `in` is from the
/// visitor to the local server, `out` the other way.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct WsCounts {
    pub(crate) messages_in: u64,
    pub(crate) messages_out: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) frames_in: u64,
    pub(crate) frames_out: u64,
    pub(crate) close_code: Option<u16>,
    pub(crate) close_reason: Option<String>,
    /// Which side sent the first close frame: `visitor` or `local`.
    pub(crate) closed_by: Option<&'static str>,
}

/// One line of the list: what the page, the panel and `GET /api/exchanges` show.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) id: u64,
    /// `http` or `ws`.
    pub(crate) kind: &'static str,
    /// `pending`, `done`, `error`, `open`, `closed`, or `refused` (a WebSocket upgrade the
    /// local server answered without switching protocols).
    pub(crate) state: &'static str,
    pub(crate) started_at: String,
    pub(crate) target: String,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) status: Option<u16>,
    pub(crate) duration_ms: Option<f64>,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    pub(crate) error: Option<String>,
    pub(crate) replay_of: Option<u64>,
    pub(crate) ws: Option<WsCounts>,
}

fn header_pairs(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn headers_size(h: &[(String, String)]) -> usize {
    h.iter().map(|(k, v)| k.len() + v.len()).sum()
}

impl Entry {
    fn held(&self) -> usize {
        let frames = self.socket.as_ref().map_or(0, |s| {
            s.frames.len() * std::mem::size_of::<FrameRecord>() + s.preview_bytes
        });
        std::mem::size_of::<Entry>()
            + self.req_body.data.len()
            + self.resp_body.data.len()
            + headers_size(&self.req_headers)
            + headers_size(&self.resp_headers)
            + self.path.len()
            + frames
    }

    fn state(&self) -> &'static str {
        match (&self.socket, self.duration, &self.error) {
            (_, _, Some(_)) => "error",
            (Some(_), Some(_), _) if self.status.is_some_and(|c| c != 101) => "refused",
            (Some(s), _, _) if s.open => "open",
            (Some(_), Some(_), _) => "closed",
            (None, Some(_), _) => "done",
            _ => "pending",
        }
    }

    pub(super) fn summary(&self) -> Summary {
        let duration = self.duration.or_else(|| {
            self.socket
                .as_ref()
                .filter(|s| s.open)
                .map(|_| self.started.elapsed())
        });
        Summary {
            id: self.id,
            kind: if self.ws { "ws" } else { "http" },
            state: self.state(),
            started_at: self
                .started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            target: self.target.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            status: self.status,
            duration_ms: duration.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
            request_bytes: self.req_body.size,
            response_bytes: self.resp_body.size,
            error: self.error.clone(),
            replay_of: self.replay_of,
            ws: self.socket.as_ref().map(|s| s.counts.clone()),
        }
    }
}

// === impl Recorder ===

impl Recorder {
    /// A recorder that keeps nothing and whose every method returns at once.
    pub(crate) fn disabled() -> Self {
        Self { inner: None }
    }

    /// A recorder keeping what `settings` allow.
    pub(crate) fn new(settings: Settings) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            inner: Some(Arc::new(Inner {
                settings,
                next_id: AtomicU64::new(1),
                state: Mutex::new(State {
                    meta: Meta {
                        status: "connecting".to_owned(),
                        ..Meta::default()
                    },
                    ..State::default()
                }),
                events,
            })),
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether a new exchange gets a record: when the ring keeps finished ones, or when
    /// someone listens for their summaries (the panel, the JSON lines, the page's event
    /// stream). Otherwise only the counters change.
    pub(super) fn keeps_entries(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.settings.ring > 0 || i.events.receiver_count() > 0)
    }

    pub(super) fn settings(&self) -> Option<&Settings> {
        self.inner.as_ref().map(|i| &i.settings)
    }

    /// Subscribes to changes (the page's event stream, the panel).
    pub(crate) fn subscribe(&self) -> Option<broadcast::Receiver<Event>> {
        self.inner.as_ref().map(|i| i.events.subscribe())
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State, &Settings) -> R) -> Option<R> {
        let inner = self.inner.as_ref()?;
        let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut state, &inner.settings))
    }

    fn send(&self, ev: Event) {
        if let Some(i) = &self.inner {
            let _ = i.events.send(ev);
        }
    }

    /// Records the session's state with the edge (for the panel and `/api/status`).
    pub(crate) fn set_online(&self, edge: &str, team: &str, forwards: Vec<(String, String)>) {
        self.with_state(|s, _| {
            s.meta.status = "online".to_owned();
            s.meta.edge_error = None;
            s.meta.edge = edge.to_owned();
            s.meta.team = team.to_owned();
            s.meta.forwards = forwards;
        });
    }

    /// Records that the connection to the edge was lost.
    pub(crate) fn set_reconnecting(&self) {
        self.with_state(|s, _| s.meta.status = "reconnecting".to_owned());
    }

    /// Records why the last attempt to reach `edge` failed (cleared once online).
    pub(crate) fn set_edge_error(&self, edge: &str, error: &str) {
        self.with_state(|s, _| {
            s.meta.edge = edge.to_owned();
            s.meta.edge_error = Some(error.to_owned());
        });
    }

    pub(super) fn set_inspector_url(&self, url: &str) {
        self.with_state(|s, _| s.meta.inspector = Some(url.to_owned()));
    }

    /// Counters and session state.
    pub(crate) fn status(&self) -> Option<StatusView> {
        self.with_state(|s, _| {
            let now = Instant::now();
            while s
                .stats
                .completions
                .front()
                .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
            {
                s.stats.completions.pop_front();
            }
            let mut l: Vec<f64> = s.stats.latencies.iter().copied().collect();
            l.sort_unstable_by(f64::total_cmp);
            let pct = |p: usize| (!l.is_empty()).then(|| l[(l.len() - 1) * p / 100]);
            StatusView {
                meta: s.meta.clone(),
                connections_open: s.stats.open,
                connections_total: s.stats.total,
                requests_per_minute: s.stats.completions.len(),
                p50_ms: pct(50),
                p90_ms: pct(90),
                kept: s.ring.len(),
                kept_bytes: s.held,
            }
        })
    }

    /// Starts a record; returns its id (0 when disabled).
    pub(super) fn begin(
        &self,
        ws: bool,
        target: &str,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        replay_of: Option<u64>,
    ) -> u64 {
        let Some(inner) = &self.inner else { return 0 };
        if !self.keeps_entries() {
            // Nothing would read the record (no ring, nobody listening): count it only. Its
            // end finds no record and just counts too.
            return self
                .with_state(|s, _| {
                    s.stats.open += 1;
                    s.stats.total += 1;
                    inner.next_id.fetch_add(1, Ordering::Relaxed)
                })
                .unwrap_or(0);
        }
        let mut entry = Entry {
            id: 0,
            ws,
            target: target.to_owned(),
            started_at: Utc::now(),
            started: Instant::now(),
            duration: None,
            method: method.to_owned(),
            path: path.to_owned(),
            status: None,
            error: None,
            replay_of,
            req_headers: header_pairs(headers),
            resp_headers: Vec::new(),
            req_body: Captured::default(),
            resp_body: Captured::default(),
            socket: ws.then(Socket::default),
            notified: Some(Instant::now()),
            dirty: false,
        };
        let taken = self.with_state(|s, set| {
            // The id is taken under the lock, so the ring stays in id order: updates find
            // their record by binary search, and one pushed out of order would be lost (its
            // body and its end never recorded).
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            entry.id = id;
            let summary = entry.summary();
            s.stats.open += 1;
            s.stats.total += 1;
            s.held += entry.held();
            s.ring.push_back(entry);
            s.evict(set);
            (id, summary)
        });
        let Some((id, summary)) = taken else { return 0 };
        self.send(Event::Exchange {
            summary: Arc::new(summary),
            done: false,
        });
        id
    }

    /// Changes record `id` if it is still kept, keeping the byte count right, and tells
    /// subscribers when `notify`.
    pub(super) fn update(&self, id: u64, notify: bool, f: impl FnOnce(&mut Entry, &Settings)) {
        self.update_with(id, |e, set| {
            f(e, set);
            notify
        });
    }

    /// Like [`Recorder::update`]; `f` says whether subscribers should hear of it now.
    fn update_with(&self, id: u64, f: impl FnOnce(&mut Entry, &Settings) -> bool) {
        let summary = self.with_state(|s, set| {
            let pos = s.ring.binary_search_by_key(&id, |e| e.id).ok()?;
            let e = &mut s.ring[pos];
            let before = e.held();
            let notify = f(e, set);
            let after = e.held();
            s.held = s.held + after - before;
            let summary = notify.then(|| {
                e.notified = Some(Instant::now());
                e.dirty = false;
                e.summary()
            });
            s.evict(set);
            summary
        });
        if let Some(Some(summary)) = summary {
            self.send(Event::Exchange {
                summary: Arc::new(summary),
                done: false,
            });
        }
    }

    /// Ends record `id` (HTTP exchange finished, WebSocket closed, or failed).
    pub(super) fn end(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        let summary = self.with_state(|s, set| {
            s.stats.open = s.stats.open.saturating_sub(1);
            let now = Instant::now();
            let summary = match s.ring.binary_search_by_key(&id, |e| e.id) {
                Ok(pos) => {
                    let e = &mut s.ring[pos];
                    let before = e.held();
                    f(e);
                    e.duration = Some(e.started.elapsed());
                    if let Some(sock) = &mut e.socket {
                        sock.open = false;
                    }
                    let after = e.held();
                    s.held = s.held + after - before;
                    let summary = e.summary();
                    if set.ring == 0 {
                        // Kept only while open (see `begin`).
                        s.held -= after;
                        s.ring.remove(pos);
                    }
                    Some(summary)
                }
                Err(_) => None,
            };
            if let Some(d) = summary
                .as_ref()
                .filter(|x| x.kind == "http")
                .and_then(|x| x.duration_ms)
            {
                if s.stats.latencies.len() == LATENCY_SAMPLES {
                    s.stats.latencies.pop_front();
                }
                s.stats.latencies.push_back(d);
            }
            if s.stats.completions.len() == RATE_SAMPLES {
                s.stats.completions.pop_front();
            }
            s.stats.completions.push_back(now);
            summary
        });
        if let Some(Some(summary)) = summary {
            self.send(Event::Exchange {
                summary: Arc::new(summary),
                done: true,
            });
        }
    }

    /// Records a WebSocket frame of session `id`.
    pub(super) fn frame(&self, id: u64, dir: Dir, f: &ParsedFrame) {
        self.update_with(id, |e, set| {
            let Some(sock) = &mut e.socket else {
                return false;
            };
            let at = sock.opened.map(|o| o.elapsed()).unwrap_or_default();
            let c = &mut sock.counts;
            let data = !f.opcode.is_control();
            match dir {
                Dir::In => {
                    c.frames_in += 1;
                    if data {
                        c.bytes_in += f.size;
                        c.messages_in += u64::from(f.fin);
                    }
                }
                Dir::Out => {
                    c.frames_out += 1;
                    if data {
                        c.bytes_out += f.size;
                        c.messages_out += u64::from(f.fin);
                    }
                }
            }
            if f.opcode == Opcode::Close && c.close_code.is_none() {
                c.close_code = f.close_code;
                c.close_reason = f.close_reason.clone();
                c.closed_by = Some(match dir {
                    Dir::In => "visitor",
                    Dir::Out => "local",
                });
            }
            // Without a ring nothing keeps the record once it ends: the counts above are all
            // it shows, and a timeline would only cost memory per open session.
            if set.ring > 0 {
                if sock.frames.len() >= set.frames_per_session {
                    if let Some(old) = sock.frames.pop_front() {
                        sock.preview_bytes -= old.preview.as_ref().map_or(0, String::len);
                    }
                    sock.frames_dropped += 1;
                }
                sock.preview_bytes += f.preview.as_ref().map_or(0, String::len);
                sock.frames.push_back(FrameRecord {
                    dir,
                    opcode: f.opcode,
                    fin: f.fin,
                    size: f.size,
                    at,
                    preview: f.preview.clone(),
                });
            }
            let due = e.notified.is_none_or(|t| t.elapsed() >= NOTIFY_INTERVAL);
            e.dirty = !due;
            due
        });
    }

    /// Tells subscribers about records whose last changes were held back.
    pub(crate) fn flush(&self) {
        let summaries = self
            .with_state(|s, _| {
                let now = Instant::now();
                let mut out = Vec::new();
                for e in s.ring.iter_mut().filter(|e| e.dirty) {
                    e.dirty = false;
                    e.notified = Some(now);
                    out.push(e.summary());
                }
                out
            })
            .unwrap_or_default();
        for summary in summaries {
            self.send(Event::Exchange {
                summary: Arc::new(summary),
                done: false,
            });
        }
    }

    /// Runs [`Recorder::flush`] every [`NOTIFY_INTERVAL`] until `shutdown`.
    pub(crate) async fn flush_loop(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(NOTIFY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => self.flush(),
            }
        }
    }

    /// Summaries, newest first, matching `filter`, at most `limit`.
    pub(crate) fn list(&self, filter: &Filter, limit: usize) -> Vec<Summary> {
        self.with_state(|s, _| {
            s.ring
                .iter()
                .rev()
                .filter(|e| filter.matches(e))
                .take(limit)
                .map(Entry::summary)
                .collect()
        })
        .unwrap_or_default()
    }

    /// Runs `f` on record `id` if kept.
    pub(super) fn get<R>(&self, id: u64, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        self.with_state(|s, _| {
            let pos = s.ring.binary_search_by_key(&id, |e| e.id).ok()?;
            Some(f(&s.ring[pos]))
        })
        .flatten()
    }

    /// Forgets every record (counters stay).
    pub(crate) fn clear(&self) {
        self.with_state(|s, _| {
            s.ring.clear();
            s.held = 0;
        });
        self.send(Event::Cleared);
    }
}

impl State {
    /// Drops the oldest records beyond the ring size or the memory cap (keeping at least
    /// the newest one).
    fn evict(&mut self, set: &Settings) {
        if set.ring == 0 {
            // No ring: a record stays only while its exchange is open, for the listeners'
            // summary when it ends (`Recorder::end` drops it then).
            return;
        }
        while self.ring.len() > set.ring || (self.held > set.max_held && self.ring.len() > 1) {
            match self.ring.pop_front() {
                Some(old) => self.held -= old.held(),
                None => break,
            }
        }
    }
}

/// A list filter, as given in `GET /api/exchanges?…`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Filter {
    /// `http` or `ws`.
    pub(crate) kind: Option<String>,
    /// Status class digit: `2` for 2xx, …; `0` for exchanges without a status yet.
    pub(crate) status_class: Option<u16>,
    /// Path prefix.
    pub(crate) path: Option<String>,
    /// Case-insensitive text looked for in the method, path, headers and captured bodies.
    pub(crate) q: Option<String>,
}

impl Filter {
    fn matches(&self, e: &Entry) -> bool {
        if let Some(k) = &self.kind {
            if (k == "ws") != e.ws {
                return false;
            }
        }
        if let Some(c) = self.status_class {
            if e.status.unwrap_or(0) / 100 != c {
                return false;
            }
        }
        if let Some(p) = &self.path {
            if !e.path.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(q) = &self.q {
            let q = q.to_lowercase();
            let hit = |t: &str| t.to_lowercase().contains(&q);
            let body = |b: &Captured| hit(&String::from_utf8_lossy(&b.data));
            if !(hit(&e.method)
                || hit(&e.path)
                || e.req_headers
                    .iter()
                    .chain(&e.resp_headers)
                    .any(|(k, v)| hit(k) || hit(v))
                || body(&e.req_body)
                || body(&e.resp_body))
            {
                return false;
            }
        }
        true
    }
}

impl Captured {
    /// Appends a chunk to record `id`'s body, keeping at most the body cap.
    pub(super) fn record(rec: &Recorder, id: u64, response: bool, chunk: &[u8]) {
        rec.update(id, false, |e, set| {
            let b = if response {
                &mut e.resp_body
            } else {
                &mut e.req_body
            };
            b.push(chunk, set.body_cap);
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings(ring: usize) -> Settings {
        Settings {
            ring,
            body_cap: 1024,
            ..Settings::default()
        }
    }

    #[test]
    fn exchanges_begun_on_many_threads_at_once_all_get_their_bodies_and_ends_recorded() {
        let rec = Recorder::new(settings(100_000));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let id = rec.begin(
                            false,
                            "localhost:3000",
                            "POST",
                            "/m",
                            &HeaderMap::new(),
                            None,
                        );
                        Captured::record(&rec, id, false, b"body");
                        rec.end(id, |e| e.status = Some(200));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let lost = rec
            .with_state(|s, _| {
                s.ring
                    .iter()
                    .filter(|e| e.req_body.size != 4 || e.duration.is_none())
                    .count()
            })
            .unwrap();
        assert_eq!(lost, 0, "records whose body or end was lost");
        assert_eq!(rec.status().unwrap().connections_open, 0);
    }

    /// A 5-byte text frame, as the tap parses it.
    fn text_frame(preview: Option<&str>) -> ParsedFrame {
        ParsedFrame {
            fin: true,
            opcode: Opcode::Text,
            size: 5,
            close_code: None,
            close_reason: None,
            preview: preview.map(str::to_owned),
        }
    }

    /// The summary of the first finished exchange among the events sent so far.
    fn finished(rx: &mut broadcast::Receiver<Event>) -> Arc<Summary> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .find_map(|ev| match ev {
                Event::Exchange {
                    summary,
                    done: true,
                } => Some(summary),
                _ => None,
            })
            .expect("a finished exchange")
    }

    #[test]
    fn without_a_ring_a_listener_still_hears_each_finished_exchange_and_nothing_stays_kept() {
        let rec = Recorder::new(settings(0));
        let mut rx = rec.subscribe().unwrap();
        let id = rec.begin(false, "t", "POST", "/b", &HeaderMap::new(), None);
        Captured::record(&rec, id, false, b"hello");
        rec.end(id, |e| e.status = Some(201));
        let done = finished(&mut rx);
        assert_eq!(
            (done.method.as_str(), done.path.as_str(), done.status),
            ("POST", "/b", Some(201))
        );
        assert_eq!(done.request_bytes, 5);
        let status = rec.status().unwrap();
        assert_eq!((status.connections_open, status.kept_bytes), (0, 0));
        assert_eq!(rec.with_state(|s, _| s.ring.len()), Some(0));
    }

    #[test]
    fn without_a_ring_an_open_websocket_keeps_its_counts_but_no_timeline() {
        let rec = Recorder::new(settings(0));
        let mut rx = rec.subscribe().unwrap();
        let id = rec.begin(true, "t", "GET", "/ws", &HeaderMap::new(), None);
        let frame = text_frame(None);
        for _ in 0..1000 {
            rec.frame(id, Dir::In, &frame);
        }
        let kept = rec.get(id, |e| e.socket.as_ref().unwrap().frames.len());
        assert_eq!(kept, Some(0));
        rec.end(id, |_| {});
        let done = finished(&mut rx);
        assert_eq!(done.ws.as_ref().unwrap().messages_in, 1000);
        assert_eq!(rec.with_state(|s, _| s.ring.len()), Some(0));
    }

    #[test]
    fn without_a_ring_or_a_listener_an_exchange_is_only_counted() {
        let rec = Recorder::new(settings(0));
        let id = rec.begin(false, "t", "GET", "/", &HeaderMap::new(), None);
        assert_eq!(rec.with_state(|s, _| s.ring.len()), Some(0));
        assert_eq!(rec.status().unwrap().connections_open, 1);
        rec.end(id, |e| e.status = Some(200));
        let status = rec.status().unwrap();
        assert_eq!((status.connections_open, status.connections_total), (0, 1));
    }

    #[test]
    fn the_ring_keeps_only_the_newest_exchanges_and_memory_stays_flat_over_10000_requests() {
        let rec = Recorder::new(settings(50));
        let body = vec![b'x'; 4096];
        let mut held_at_1000 = 0;
        for i in 0..10_000u32 {
            let id = rec.begin(
                false,
                "localhost:3000",
                "POST",
                &format!("/n/{i:05}"),
                &HeaderMap::new(),
                None,
            );
            Captured::record(&rec, id, false, &body);
            Captured::record(&rec, id, true, &body);
            rec.end(id, |e| e.status = Some(200));
            if i == 999 {
                held_at_1000 = rec.status().unwrap().kept_bytes;
            }
        }
        let st = rec.status().unwrap();
        assert_eq!(st.kept, 50);
        assert_eq!(st.connections_total, 10_000);
        assert_eq!(st.connections_open, 0);
        assert_eq!(
            st.kept_bytes, held_at_1000,
            "held bytes grew after the ring filled"
        );
        assert!(
            st.kept_bytes < 50 * (2 * 1024 + 1024),
            "{} bytes held",
            st.kept_bytes
        );
        let list = rec.list(&Filter::default(), 1000);
        assert_eq!(list.len(), 50);
        assert_eq!(list[0].path, "/n/09999");
        assert_eq!(list[0].request_bytes, 4096);
    }

    #[test]
    fn bodies_are_cut_at_the_cap_but_their_size_is_counted() {
        let rec = Recorder::new(settings(10));
        let id = rec.begin(false, "t", "POST", "/", &HeaderMap::new(), None);
        Captured::record(&rec, id, false, &[1u8; 800]);
        Captured::record(&rec, id, false, &[2u8; 800]);
        let (kept, size) = rec
            .get(id, |e| (e.req_body.data.len(), e.req_body.size))
            .unwrap();
        assert_eq!((kept, size), (1024, 1600));
    }

    #[test]
    fn filters_select_by_kind_status_class_path_and_text() {
        let rec = Recorder::new(settings(10));
        let mut h = HeaderMap::new();
        h.insert("x-needle", "haystack".parse().unwrap());
        let a = rec.begin(false, "t", "GET", "/api/users", &h, None);
        rec.end(a, |e| e.status = Some(200));
        let b = rec.begin(false, "t", "GET", "/static/x", &HeaderMap::new(), None);
        rec.end(b, |e| e.status = Some(404));
        let _ws = rec.begin(true, "t", "GET", "/socket", &HeaderMap::new(), None);
        let ids = |f: Filter| rec.list(&f, 10).iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(
            ids(Filter {
                kind: Some("http".into()),
                ..Filter::default()
            }),
            vec![b, a]
        );
        assert_eq!(
            ids(Filter {
                status_class: Some(4),
                ..Filter::default()
            }),
            vec![b]
        );
        assert_eq!(
            ids(Filter {
                path: Some("/api".into()),
                ..Filter::default()
            }),
            vec![a]
        );
        assert_eq!(
            ids(Filter {
                q: Some("HAYSTACK".into()),
                ..Filter::default()
            }),
            vec![a]
        );
    }

    #[test]
    fn the_memory_cap_drops_the_oldest_records_whatever_the_ring_size() {
        let rec = Recorder::new(Settings {
            ring: 1000,
            body_cap: 1024,
            max_held: 20 * 1024,
            ..Settings::default()
        });
        for _ in 0..100 {
            let id = rec.begin(false, "t", "POST", "/", &HeaderMap::new(), None);
            Captured::record(&rec, id, false, &[0u8; 1024]);
            rec.end(id, |_| {});
        }
        let st = rec.status().unwrap();
        assert!(st.kept_bytes <= 20 * 1024, "{}", st.kept_bytes);
        assert!((5..100).contains(&st.kept), "{}", st.kept);
    }

    #[test]
    fn a_busy_websocket_is_announced_at_most_once_per_interval_and_the_rest_on_flush() {
        let rec = Recorder::new(settings(10));
        let mut rx = rec.subscribe().unwrap();
        let id = rec.begin(true, "t", "GET", "/ws", &HeaderMap::new(), None);
        let frame = text_frame(Some("hello"));
        for _ in 0..100 {
            rec.frame(id, Dir::In, &frame);
        }
        let mut events = 0;
        while rx.try_recv().is_ok() {
            events += 1;
        }
        assert!(events <= 2, "{events} events for 100 frames");
        rec.flush();
        let Ok(Event::Exchange { summary, .. }) = rx.try_recv() else {
            panic!("flush sent nothing");
        };
        assert_eq!(summary.ws.as_ref().unwrap().messages_in, 100);
        let held = rec.status().unwrap().kept_bytes;
        for _ in 0..5000 {
            rec.frame(id, Dir::Out, &frame);
        }
        let kept = rec
            .get(id, |e| e.socket.as_ref().unwrap().frames.len())
            .unwrap();
        assert_eq!(kept, Settings::default().frames_per_session);
        assert!(rec.status().unwrap().kept_bytes < held + 1000 * 100);
    }

    #[test]
    fn a_disabled_recorder_keeps_nothing() {
        let rec = Recorder::disabled();
        assert_eq!(
            rec.begin(false, "t", "GET", "/", &HeaderMap::new(), None),
            0
        );
        assert!(rec.list(&Filter::default(), 10).is_empty());
        assert!(rec.status().is_none());
    }
}
