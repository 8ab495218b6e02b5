//! Prometheus metrics of the control plane, and its admin listener: `/metrics` (text
//! exposition format 0.0.4), `/healthz` and `/readyz`.
//!
//! RPCs are counted by a tower layer around every gRPC service ([`RpcLayer`]): the call's
//! gRPC status comes from the `grpc-status` response header (a trailers-only answer, which is
//! how tonic answers most errors) or from the trailers at the end of the response body (unary
//! successes and server streams). A call whose response is dropped before either, because
//! the client went away or the request timeout fired, counts as `CANCELLED`.
//!
//! Labels are bounded: `service` and `method` come from the compiled-in descriptor sets, and
//! any other path is counted as `other`; `code` is one of the 17 gRPC code names.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, Request, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use prost::Message as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::hashing::Metrics;

/// Content type of the Prometheus text exposition format.
/// Upper bounds (seconds) of the RPC latency buckets: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The `service` and `method` label of paths that name no known RPC.
const OTHER: &str = "other";

/// gRPC code names by number (the `code` label).
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: &str = "CANCELLED";
const UNKNOWN: &str = "UNKNOWN";

/// The code name in a `grpc-status` header or trailer, if there is one.
fn grpc_code(headers: &HeaderMap) -> Option<&'static str> {
    let v = headers.get("grpc-status")?;
    let n: usize = v.to_str().ok()?.trim().parse().ok()?;
    Some(CODES.get(n).copied().unwrap_or(UNKNOWN))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: Arc<String>,
    method: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: Arc<String>,
    method: Arc<String>,
    code: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// RPC counters shared by the layer's services.
#[derive(Debug)]
struct Rpc {
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// Known RPC paths (`/pkg.Service/Method`) and their labels.
    known: HashMap<String, MethodLabels>,
    other: MethodLabels,
}

impl Rpc {
    fn labels(&self, path: &str) -> MethodLabels {
        self.known
            .get(path)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }
}

/// Every `/package.Service/Method` in the encoded descriptor sets.
fn known_methods(sets: &[&[u8]]) -> HashMap<String, MethodLabels> {
    let mut known = HashMap::new();
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                let full = Arc::new(if package.is_empty() {
                    name
                } else {
                    format!("{package}.{name}")
                });
                for m in service.method {
                    let method = Arc::new(m.name.unwrap_or_default());
                    known.insert(
                        format!("/{full}/{method}"),
                        MethodLabels {
                            service: Arc::clone(&full),
                            method,
                        },
                    );
                }
            }
        }
    }
    for service in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        known.insert(
            format!("/{service}/ServerReflectionInfo"),
            MethodLabels {
                service: Arc::new(service.to_owned()),
                method: Arc::new("ServerReflectionInfo".to_owned()),
            },
        );
    }
    known
}

/// Values read at scrape time: the pool, argon2 and the token cache, server streams.
#[derive(Debug)]
struct Sampled {
    pool: PgPool,
    metrics: Metrics,
    max_connections: u32,
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counter = |encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64| {
            let c = ConstCounter::new(v);
            let e = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(e)
        };
        counter(
            &mut encoder,
            "argon2_verifications",
            "argon2id verifications of token secrets and passwords (dummy ones for unknown ids included).",
            self.metrics.argon2_verifications(),
        )?;
        counter(
            &mut encoder,
            "argon2_hashes",
            "argon2id hashes computed (new tokens, rotations, passwords).",
            self.metrics.argon2_hashes(),
        )?;
        counter(
            &mut encoder,
            "token_cache_hits",
            "Bearer tokens accepted from the verified-token cache, without argon2.",
            self.metrics.token_cache_hits(),
        )?;

        let idle = u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX);
        let size = self.pool.size();
        let g = ConstGauge::new(i64::from(idle));
        let mut e = encoder.encode_descriptor(
            "db_pool_connections",
            "Database connections in the pool, by state (idle or in_use).",
            None,
            g.metric_type(),
        )?;
        g.encode(e.encode_family(&[("state", "idle")])?)?;
        ConstGauge::new(i64::from(size.saturating_sub(idle)))
            .encode(e.encode_family(&[("state", "in_use")])?)?;
        let g = ConstGauge::new(i64::from(self.max_connections));
        let e = encoder.encode_descriptor(
            "db_pool_max_connections",
            "Most database connections the pool may open.",
            None,
            g.metric_type(),
        )?;
        g.encode(e)?;

        let g = ConstGauge::new(gauge(self.metrics.watch_subscribers()));
        let mut e = encoder.encode_descriptor(
            "watch_subscribers",
            "Open server streams: EdgeService.Watch (one per edge) and TunnelService.WatchTunnels.",
            None,
            g.metric_type(),
        )?;
        g.encode(e.encode_family(&[("stream", "Watch")])?)?;
        ConstGauge::new(gauge(self.metrics.tunnel_watch_subscribers()))
            .encode(e.encode_family(&[("stream", "WatchTunnels")])?)?;
        Ok(())
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The control plane's metrics: a Prometheus registry and the RPC layer's counters.
pub(crate) struct ControlMetrics {
    registry: Registry,
    rpc: Arc<Rpc>,
}

impl ControlMetrics {
    pub(crate) fn new(pool: PgPool, metrics: Metrics, max_connections: u32) -> Self {
        let other = MethodLabels {
            service: Arc::new(OTHER.to_owned()),
            method: Arc::new(OTHER.to_owned()),
        };
        let rpc = Arc::new(Rpc {
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            known: known_methods(&[
                burrow_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ]),
            other,
        });
        let mut r = Registry::with_prefix("burrow_control");
        r.register(
            "rpcs",
            "gRPC calls finished, by service, method and status code",
            rpc.calls.clone(),
        );
        r.register(
            "rpc_duration_seconds",
            "Time from a call's request to its response headers (for unary calls, the whole call; for server streams, the time to open the stream)",
            rpc.latency.clone(),
        );
        r.register_collector(Box::new(Sampled {
            pool,
            metrics,
            max_connections,
        }));
        Self { registry: r, rpc }
    }

    /// The tower layer that counts every call.
    pub(crate) fn layer(&self) -> RpcLayer {
        RpcLayer(Arc::clone(&self.rpc))
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            return String::new();
        }
        burrow_admin::to_text_format(&out)
    }
}

/// Counts calls and their latency around the gRPC services (see the module docs).
#[derive(Clone, Debug)]
pub(crate) struct RpcLayer(Arc<Rpc>);

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            rpc: Arc::clone(&self.0),
        }
    }
}

/// [`RpcLayer`]'s service.
#[derive(Clone, Debug)]
pub(crate) struct RpcService<S> {
    inner: S,
    rpc: Arc<Rpc>,
}

/// One call being counted: recorded exactly once, with `CANCELLED` if dropped unfinished.
struct Call {
    rpc: Arc<Rpc>,
    labels: MethodLabels,
    started: Instant,
    timed: bool,
    finished: bool,
}

impl Call {
    fn time(&mut self) {
        if !self.timed {
            self.timed = true;
            self.rpc
                .latency
                .get_or_create(&self.labels)
                .observe(self.started.elapsed().as_secs_f64());
        }
    }

    fn finish(&mut self, code: &'static str) {
        if self.finished {
            return;
        }
        self.time();
        self.finished = true;
        self.rpc
            .calls
            .get_or_create(&CallLabels {
                service: Arc::clone(&self.labels.service),
                method: Arc::clone(&self.labels.method),
                code,
            })
            .inc();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for RpcService<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body + Unpin,
{
    type Response = Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let mut call = Call {
            labels: self.rpc.labels(req.uri().path()),
            rpc: Arc::clone(&self.rpc),
            started: Instant::now(),
            timed: false,
            finished: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = match fut.await {
                Ok(r) => r,
                Err(e) => {
                    call.finish(UNKNOWN);
                    return Err(e);
                }
            };
            call.time();
            // Trailers-only: the status is in the headers and the body is empty.
            if let Some(code) = grpc_code(resp.headers()) {
                call.finish(code);
            }
            Ok(resp.map(|inner| CountedBody { inner, call }))
        })
    }
}

/// A response body that records its call's status from the trailers.
pub(crate) struct CountedBody<B> {
    inner: B,
    call: Call,
}

impl<B: http_body::Body + Unpin> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    self.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.call.finish(UNKNOWN),
            // The body ended without trailers: no status was ever sent.
            Poll::Ready(None) => self.call.finish(UNKNOWN),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What the admin endpoints need.
pub(crate) struct Admin {
    pub(crate) metrics: ControlMetrics,
    pub(crate) pool: PgPool,
    pub(crate) readiness_timeout: Duration,
    /// Cancelled when shutdown starts: `/readyz` answers 503 from then on.
    pub(crate) shutdown: CancellationToken,
}

impl Admin {
    /// `Err` says why the control plane should get no traffic.
    async fn readiness(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".to_owned());
        }
        let probe = sqlx::query("SELECT 1").execute(&self.pool);
        match tokio::time::timeout(self.readiness_timeout, probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(err = %e, "readiness probe failed");
                Err("the database is unreachable".to_owned())
            }
            Err(_) => Err(format!(
                "the database did not answer within {} ms",
                self.readiness_timeout.as_millis()
            )),
        }
    }
}

impl burrow_admin::Endpoints for Admin {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    async fn ready(&self) -> Result<(), String> {
        self.readiness().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_api_is_a_known_method_and_anything_else_is_other() {
        let known = known_methods(&[burrow_proto::FILE_DESCRIPTOR_SET]);
        let l = &known["/burrow.v1.AccountService/Login"];
        assert_eq!(
            (l.service.as_str(), l.method.as_str()),
            ("burrow.v1.AccountService", "Login")
        );
        assert!(known.contains_key("/burrow.v1.EdgeService/Watch"));
        assert!(!known.contains_key("/burrow.v1.AccountService/Nope"));
        let rpc = Rpc {
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            known,
            other: MethodLabels {
                service: Arc::new(OTHER.to_owned()),
                method: Arc::new(OTHER.to_owned()),
            },
        };
        let l = rpc.labels("/anything.a.visitor/Chooses");
        assert_eq!((l.service.as_str(), l.method.as_str()), ("other", "other"));
    }

    #[test]
    fn the_status_comes_from_grpc_status_by_name() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_code(&h), None);
        h.insert("grpc-status", "16".parse().unwrap());
        assert_eq!(grpc_code(&h), Some("UNAUTHENTICATED"));
        h.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(grpc_code(&h), Some("UNKNOWN"));
    }
}
