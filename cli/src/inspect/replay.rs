//! Replay: re-sending a captured request to the local server it went to, optionally edited.
//! The replayed exchange is recorded like any other, marked with the id it replays.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::agent::dial::{Dialer, LocalConnector, LocalTls};

use super::record::Recorder;
use super::server::ApiError;

/// How long a replayed request may take, response body included.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to the local server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP client replays go through.
pub(crate) struct Replayer {
    client: Client<LocalConnector, Full<Bytes>>,
}

impl Replayer {
    /// Connects as the agent does (`localhost` on either loopback family; TLS to `https://`
    /// targets as `local_tls` says).
    pub(crate) fn new(local_tls: Option<LocalTls>) -> Self {
        let dialer = Arc::new(Dialer::new(CONNECT_TIMEOUT, local_tls));
        Self {
            client: Client::builder(TokioExecutor::new()).build(LocalConnector(dialer)),
        }
    }
}

/// Changes to make before replaying; what is left out is sent as captured.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayEdits {
    pub(crate) method: Option<String>,
    /// Path and query, starting with `/`.
    pub(crate) path: Option<String>,
    /// Replaces every header when given.
    pub(crate) headers: Option<Vec<(String, String)>>,
    /// Replaces the body (as UTF-8 text) when given.
    pub(crate) body: Option<String>,
}

/// What `POST /api/exchanges/{id}/replay` answers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReplayOutcome {
    /// Id of the new exchange the replay recorded.
    pub(crate) id: u64,
    pub(crate) replay_of: u64,
    pub(crate) status: u16,
    pub(crate) duration_ms: f64,
}

/// Replays exchange `id` with `edits`.
pub(crate) async fn replay(
    rec: &Recorder,
    replayer: &Replayer,
    id: u64,
    edits: ReplayEdits,
) -> Result<ReplayOutcome, ApiError> {
    let source = rec
        .get(id, |e| {
            (
                e.ws,
                e.target.clone(),
                e.method.clone(),
                e.path.clone(),
                e.req_headers.clone(),
                e.req_body.data.clone(),
                (e.req_body.data.len() as u64) < e.req_body.size,
            )
        })
        .ok_or(ApiError::NotFound)?;
    let (ws, target, method, path, headers, body, truncated) = source;
    if ws {
        return Err(ApiError::Conflict(
            "WebSocket sessions cannot be replayed; replay an HTTP request".into(),
        ));
    }
    if truncated && edits.body.is_none() {
        return Err(ApiError::Conflict(format!(
            "only the first {} bytes of this request's body were kept; give a body to replay it",
            body.len()
        )));
    }
    let method = edits.method.unwrap_or(method);
    let method = Method::from_bytes(method.trim().as_bytes())
        .map_err(|_| ApiError::BadRequest(format!("{method:?} is not an HTTP method")))?;
    let path = edits.path.unwrap_or(path);
    if !path.starts_with('/') {
        return Err(ApiError::BadRequest("the path must start with /".into()));
    }
    // `host:port`, or `https://host:port` for an HTTPS target.
    let base = if target.contains("://") {
        target.clone()
    } else {
        format!("http://{target}")
    };
    let uri: http::Uri = format!("{base}{path}")
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{path:?} is not a valid path")))?;
    let mut map = HeaderMap::new();
    for (k, v) in edits.headers.unwrap_or(headers) {
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| ApiError::BadRequest(format!("{k:?} is not a header name")))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|_| ApiError::BadRequest(format!("the value of {k} is not valid")))?;
        map.append(name, value);
    }
    // The body is sent whole, so its length is known again.
    map.remove(header::CONTENT_LENGTH);
    map.remove(header::TRANSFER_ENCODING);
    let body = edits
        .body
        .map(Bytes::from)
        .unwrap_or_else(|| Bytes::from(body));
    let path_for_record = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let tap = rec.http_started_replay(&target, &method, &path_for_record, &map, Some(id));
    let new_id = tap.id();
    let started = std::time::Instant::now();
    let mut req = Request::new(Full::new(body.clone()));
    super::record::Captured::record(rec, new_id, false, &body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = map;
    let work = async {
        let resp = replayer
            .client
            .request(req)
            .await
            .map_err(|e| ApiError::Upstream(format!("cannot reach {target}: {e}")))?;
        let (parts, body) = resp.into_parts();
        tap.response(parts.status, &parts.headers);
        let status = parts.status.as_u16();
        tap.response_body(body)
            .collect()
            .await
            .map_err(|e| ApiError::Upstream(format!("{target} failed mid-response: {e}")))?;
        Ok::<_, ApiError>(status)
    };
    let status = match tokio::time::timeout(REPLAY_TIMEOUT, work).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tap.failed(502, &e.to_string());
            return Err(e);
        }
        Err(_) => {
            let e = ApiError::Upstream(format!(
                "{target} did not answer within {} s",
                REPLAY_TIMEOUT.as_secs()
            ));
            tap.failed(504, &e.to_string());
            return Err(e);
        }
    };
    Ok(ReplayOutcome {
        id: new_id,
        replay_of: id,
        status,
        duration_ms: (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0,
    })
}

// === burrow replay ===

/// `burrow replay ID`: asks a running agent's inspector to replay an exchange.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Exchange id, as shown on the inspector page and in `GET /api/exchanges`.
    id: u64,
    /// The running agent's inspector address.
    #[arg(long, value_name = "ADDR", default_value = super::DEFAULT_ADDR)]
    inspect: String,
    /// Replace the method.
    #[arg(long, short = 'X')]
    method: Option<String>,
    /// Replace the path (and query).
    #[arg(long)]
    path: Option<String>,
    /// Add or replace a header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Replace the body with this text.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Replace the body with this file's contents (UTF-8 text).
    #[arg(long)]
    body_file: Option<std::path::PathBuf>,
}

/// Runs `burrow replay`.
pub(crate) async fn run_replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let addr = super::parse_addr(&args.inspect)?;
    let body = match (&args.body, &args.body_file) {
        (Some(b), _) => Some(b.clone()),
        (_, Some(f)) => Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        ),
        _ => None,
    };
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let base = format!("http://{addr}/api/exchanges/{}", args.id);
    let headers = if args.headers.is_empty() {
        None
    } else {
        let get = Request::get(&base)
            .header(header::HOST, "localhost")
            .body(Full::new(Bytes::new()))?;
        let resp = client
            .request(get)
            .await
            .with_context(|| format!("no inspector answers at {addr}; is the agent running?"))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "{}", api_error(&bytes, status));
        let detail: serde_json::Value = serde_json::from_slice(&bytes)?;
        let mut list: Vec<(String, String)> =
            serde_json::from_value(detail["request"]["headers"].clone()).unwrap_or_default();
        for h in &args.headers {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("--header {h:?}: give it as 'Name: value'"))?;
            list.retain(|(n, _)| !n.eq_ignore_ascii_case(k.trim()));
            list.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Some(list)
    };
    let edits = ReplayEdits {
        method: args.method,
        path: args.path,
        headers,
        body,
    };
    let req = Request::post(format!("{base}/replay"))
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&edits)?)))?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("no inspector answers at {addr}; is the agent running?"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "{}", api_error(&bytes, status));
    let out: ReplayOutcome = serde_json::from_slice(&bytes).context("unexpected answer")?;
    println!(
        "replayed #{} as #{}: {} in {} ms",
        out.replay_of, out.id, out.status, out.duration_ms
    );
    Ok(ExitCode::SUCCESS)
}

fn api_error(body: &[u8], status: http::StatusCode) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("the inspector answered {status}"))
}
