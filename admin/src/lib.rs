//! The admin listener both Burrow servers (`burrow-edge`, `burrow-control`) run beside their
//! public ones: `/metrics` in the Prometheus text format 0.0.4, `/healthz` (the process is
//! up) and `/readyz` (it should get traffic; the reason when not). Plain HTTP/1.1, meant for a
//! scraper and a health checker on a private address, so connections are capped and slow
//! request heads are cut off.
//!
//! # Layout
//! - [`Endpoints`]: what a server supplies (its rendered metrics and its readiness).
//! - [`serve`]: the accept loop.
//! - [`to_text_format`]: turns `prometheus-client`'s OpenMetrics output into the text format.
//! - [`get`] and [`sample`]: the scraper's side, for tests and scripts that read a listener.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Content type of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const PLAIN: &str = "text/plain; charset=utf-8";

/// What a server exposes on its admin listener.
pub trait Endpoints: Send + Sync + 'static {
    /// Every metric, in the Prometheus text format.
    fn metrics(&self) -> String;
    /// `Ok` when the process should get traffic; otherwise a sentence saying why not.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Limits of the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Most admin connections at once.
    pub max_connections: usize,
    /// How long a client may take to send a request head.
    pub header_timeout: Duration,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop`.
pub async fn serve<E: Endpoints>(
    listener: TcpListener,
    endpoints: Arc<E>,
    limits: AdminLimits,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(err = %e, "cannot accept an admin connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let endpoints = Arc::clone(&endpoints);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let endpoints = Arc::clone(&endpoints);
                async move { Ok::<_, Infallible>(answer(&req, &*endpoints).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn answer<B, E: Endpoints>(req: &Request<B>, endpoints: &E) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD are served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, METRICS_CONTENT_TYPE, endpoints.metrics()),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match endpoints.ready().await {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: this listener serves /metrics, /healthz and /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// Rewrites OpenMetrics text (what `prometheus-client` writes) as the Prometheus text format
/// 0.0.4: a counter's `# HELP`/`# TYPE` name its `_total` series, and there is no `# UNIT`
/// or `# EOF` line.
pub fn to_text_format(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len());
    let mut help: Option<&str> = None;
    for line in open_metrics.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "info" | "stateset" => (name.to_owned(), "gauge"),
                "gaugehistogram" => (name.to_owned(), "histogram"),
                k => (name.to_owned(), k),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// GETs `path` from an admin listener at `addr`: status, content type and body.
pub async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String, String), String> {
    use http_body_util::{BodyExt as _, Empty};
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::new())
            .map_err(|e| format!("request {path}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading {path}: {e}"))?
            .to_bytes();
        Ok((
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("GET {path} from {addr} took longer than {timeout:?}"))?
}

/// One scrape of an admin listener's `/metrics`, compared with another in tests. The methods
/// panic with the scrape's text when something is off: they are test helpers.
pub struct Scrape(pub String);

impl Scrape {
    /// Scrapes `addr`, asserting a 200 in the Prometheus text format.
    pub async fn take(addr: std::net::SocketAddr, timeout: Duration) -> Self {
        match get(addr, "/metrics", timeout).await {
            Ok((200, ct, body)) if ct == METRICS_CONTENT_TYPE => Self(body),
            Ok((status, ct, body)) => panic!("/metrics answered {status} ({ct}):\n{body}"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Scrapes `addr` until `ok` holds (metrics settle when a task ends), or panics after
    /// `timeout` naming `what` and showing the last scrape.
    pub async fn until(
        addr: std::net::SocketAddr,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&Scrape) -> bool,
    ) -> Self {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = Self::take(addr, timeout).await;
            if ok(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} never happened; last scrape:\n{}",
                s.0
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of the sample `name` whose labels include every pair of `labels`; 0 when
    /// there is none. Panics when more than one sample matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&self.0, name, labels)
            .unwrap_or_else(|e| panic!("{e}:\n{}", self.0))
            .unwrap_or(0.0)
    }

    /// How much `name{labels}` grew since `before`.
    pub fn delta(&self, before: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels) - before.get(name, labels)
    }
}

/// The value of the sample `name` in a text-format scrape whose labels include every pair of
/// `labels`: `Ok(None)` when there is none, `Err` when several match or a value is not a
/// number.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>, String> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if found.is_some() {
            return Err(format!("{name} {labels:?} matches more than one sample"));
        }
        let value = rest.rsplit(' ').next().unwrap_or_default();
        found = Some(
            value
                .parse::<f64>()
                .map_err(|_| format!("{name}: {value:?} is not a number"))?,
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_total_series_and_openmetrics_lines_go() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 1\n# EOF\n";
        let t = to_text_format(om);
        assert_eq!(
            t,
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let t = "# TYPE a counter\na_total{x=\"1\",y=\"2\"} 3\na_total{x=\"2\"} 4\nab 9\n";
        assert_eq!(sample(t, "a_total", &[("x", "1")]), Ok(Some(3.0)));
        assert_eq!(sample(t, "a_total", &[("x", "3")]), Ok(None));
        assert_eq!(sample(t, "a", &[]), Ok(None));
        assert!(sample(t, "a_total", &[]).is_err());
    }

    struct Fixed(Result<(), String>);

    impl Endpoints for Fixed {
        fn metrics(&self) -> String {
            "m 1\n".into()
        }
        async fn ready(&self) -> Result<(), String> {
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn paths_methods_and_readiness_are_answered() {
        let get = |path: &str| Request::get(path).body(()).map_err(|e| e.to_string());
        let up = Fixed(Ok(()));
        let down = Fixed(Err("the database is unreachable".into()));
        assert_eq!(answer(&get("/metrics").unwrap(), &up).await.status(), 200);
        assert_eq!(answer(&get("/healthz").unwrap(), &down).await.status(), 200);
        assert_eq!(answer(&get("/readyz").unwrap(), &up).await.status(), 200);
        assert_eq!(answer(&get("/readyz").unwrap(), &down).await.status(), 503);
        assert_eq!(answer(&get("/other").unwrap(), &up).await.status(), 404);
        let post = Request::post("/metrics")
            .body(())
            .map_err(|e| e.to_string());
        assert_eq!(answer(&post.unwrap(), &up).await.status(), 405);
    }
}
