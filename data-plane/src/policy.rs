//! Tunnel policies: who may reach a tunnel and how its headers are rewritten, enforced at the
//! edge before anything reaches the agent.
//!
//! A tunnel carries up to two policies: the one its agent asked for and the one a team admin
//! pinned on the subdomain's reservation. A visitor must pass both. Each policy is compiled
//! once (CIDR blocks parsed, origins lower-cased, header names and values checked, argon2 PHC
//! strings parsed) when the tunnel is bound or the pinned policy changes.
//!
//! Checks run in this order, and the first refusal answers:
//! 1. IP deny/allow lists on the real peer address (IPv4-mapped IPv6 addresses count as IPv4;
//!    `X-Forwarded-For` is never read) → 403.
//! 2. Basic auth (RFC 7617) → 401 with `WWW-Authenticate`. The password is verified with
//!    argon2 once per visitor connection: a verified `Authorization` value is remembered for
//!    the rest of the connection, and per tunnel (by its SHA-256) for
//!    [`Limits::basic_auth_cache_ttl`], so a browser opening several connections pays argon2
//!    once. At most [`Limits::basic_auth_max_concurrent_verifications`] run at once.
//! 3. The `Origin` allow list, for upgrade requests (RFC 6455 §10.2) → 403.
//!
//! Then the request header rules are applied before the request is forwarded, and the
//! response header rules before the visitor sees the response.

use burrow_proto::policy as policy_rules;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHashString, PasswordVerifier as _};
use argon2::Argon2;
use base64::Engine as _;
use burrow_proto::v1 as pb;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::registry::{Route, UpBody};
use crate::{pages, State};

/// Verified `Authorization` values one visitor connection remembers (one per tunnel it
/// visits, normally one).
const VERIFIED_PER_CONNECTION: usize = 8;

/// Why a visitor was refused; the label of the refusal counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Missing or wrong basic-auth credentials.
    BasicAuth,
    /// The peer address is denied or not allowed.
    Ip,
    /// The upgrade's `Origin` is not allowed.
    Origin,
}

impl Reason {
    /// Every reason, for walking the counters.
    #[allow(dead_code)] // Walked by the metrics exporter.
    pub(crate) const ALL: [Reason; 3] = [Reason::BasicAuth, Reason::Ip, Reason::Origin];

    /// The metric label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::BasicAuth => "basic_auth",
            Self::Ip => "ip",
            Self::Origin => "origin",
        }
    }
}

/// Refusals of one tunnel, by reason, since it was bound.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    basic_auth: AtomicU64,
    ip: AtomicU64,
    origin: AtomicU64,
}

impl Refusals {
    fn counter(&self, reason: Reason) -> &AtomicU64 {
        match reason {
            Reason::BasicAuth => &self.basic_auth,
            Reason::Ip => &self.ip,
            Reason::Origin => &self.origin,
        }
    }

    pub(crate) fn count(&self, reason: Reason) {
        self.counter(reason).fetch_add(1, Ordering::Relaxed);
    }

    /// How many visitors were refused for `reason`.
    pub(crate) fn get(&self, reason: Reason) -> u64 {
        self.counter(reason).load(Ordering::Relaxed)
    }
}

/// One CIDR block, stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) as the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl Cidr {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let mut prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|p| *p <= max)?
            }
            Some(_) => return None,
            None => max,
        };
        let mut ip = ip;
        if let IpAddr::V6(v6) = ip {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                ip = IpAddr::V4(v4);
                prefix -= 96;
            }
        }
        Some(Self {
            net: mask(ip, prefix),
            prefix,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.net
            }
            _ => false,
        }
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & m).into())
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

/// A basic-auth user: SHA-256 of the name (compared in constant time, whatever its length)
/// and the parsed argon2 hash.
struct User {
    name_sha: [u8; 32],
    hash: PasswordHashString,
}

/// Header names no rule may add or remove: the framing, the connection and the upgrade
/// handshake belong to the edge and the agent.
fn reserved_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    policy_rules::RESERVED_HEADERS.contains(&n)
        || policy_rules::RESERVED_HEADER_PREFIXES
            .iter()
            .any(|p| n.starts_with(p))
}

fn header_name(kind: &str, s: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(s.trim().as_bytes())
        .map_err(|_| format!("{kind} {s:?} is not a valid header name"))?;
    if reserved_header(&name) {
        return Err(format!(
            "{kind} {s:?} names a header the tunnel itself manages (framing, connection, upgrade, X-Forwarded-*, Burrow-*); choose another"
        ));
    }
    Ok(name)
}

fn header_rule(kind: &str, h: &pb::Header) -> Result<(HeaderName, HeaderValue), String> {
    let name = header_name(kind, &h.name)?;
    let value = HeaderValue::from_str(&h.value).map_err(|_| {
        format!(
            "{kind} {:?}: the value has characters a header cannot carry",
            h.name
        )
    })?;
    Ok((name, value))
}

/// Normalises an origin for comparison: `HTTPS://App.Example.com/` → `https://app.example.com`.
fn normalize_origin(s: &str) -> String {
    s.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// One compiled policy.
pub(crate) struct Policy {
    /// Unique per compiled policy, so a credential verified against an older version is not
    /// trusted by a newer one.
    id: u64,
    users: Vec<User>,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    origins: Vec<String>,
    request_add: Vec<(HeaderName, HeaderValue)>,
    request_remove: Vec<HeaderName>,
    response_add: Vec<(HeaderName, HeaderValue)>,
    response_remove: Vec<HeaderName>,
    /// SHA-256 of recently verified `Authorization` values, with when to forget them.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    cache_ttl: Duration,
    cache_entries: usize,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("users", &self.users.len())
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .field("origins", &self.origins)
            .finish_non_exhaustive()
    }
}

static NEXT_POLICY_ID: AtomicU64 = AtomicU64::new(1);

impl Policy {
    /// Compiles `p`; `None` when it has no rule at all. The error is a sentence for whoever
    /// wrote the policy.
    pub(crate) fn compile(p: &pb::TunnelPolicy, limits: &Limits) -> Result<Option<Self>, String> {
        let max = limits.policy_max_rules;
        let lists = [
            (p.basic_auth.len(), "basic-auth users"),
            (p.allow_ips.len(), "allowed addresses"),
            (p.deny_ips.len(), "denied addresses"),
            (p.allow_origins.len(), "allowed origins"),
            (p.request_headers_add.len(), "request headers to add"),
            (p.request_headers_remove.len(), "request headers to remove"),
            (p.response_headers_add.len(), "response headers to add"),
            (
                p.response_headers_remove.len(),
                "response headers to remove",
            ),
        ];
        if lists.iter().all(|(n, _)| *n == 0) {
            return Ok(None);
        }
        for (n, what) in lists {
            if n > max {
                return Err(format!("a policy may list at most {max} {what}, not {n}"));
            }
        }
        // The rules every component shares; what follows only adds this edge's own limits.
        policy_rules::validate(p).map_err(|e| e.0)?;
        let cidrs = |list: &[String], kind: &str| {
            list.iter()
                .map(|s| {
                    Cidr::parse(s).ok_or_else(|| {
                        format!("{kind} {s:?} is not an IP address or CIDR block (10.0.0.0/8, 2001:db8::/32, 192.0.2.7)")
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let allow = cidrs(&p.allow_ips, "allow-ip")?;
        let deny = cidrs(&p.deny_ips, "deny-ip")?;
        let mut users = Vec::with_capacity(p.basic_auth.len());
        for u in &p.basic_auth {
            users.push(user(u, limits)?);
        }
        let origins = p
            .allow_origins
            .iter()
            .map(|o| normalize_origin(o))
            .collect::<Vec<_>>();
        let adds = |list: &[pb::Header], kind: &str| {
            list.iter()
                .map(|h| header_rule(kind, h))
                .collect::<Result<Vec<_>, _>>()
        };
        let removes = |list: &[String], kind: &str| {
            list.iter()
                .map(|n| header_name(kind, n))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Some(Self {
            id: NEXT_POLICY_ID.fetch_add(1, Ordering::Relaxed),
            users,
            allow,
            deny,
            origins,
            request_add: adds(&p.request_headers_add, "request-header-add")?,
            request_remove: removes(&p.request_headers_remove, "request-header-remove")?,
            response_add: adds(&p.response_headers_add, "response-header-add")?,
            response_remove: removes(&p.response_headers_remove, "response-header-remove")?,
            verified: Mutex::new(HashMap::new()),
            cache_ttl: limits.basic_auth_cache_ttl,
            cache_entries: limits.basic_auth_cache_entries,
        }))
    }

    /// A policy that refuses every address: what the edge enforces when a pinned policy it
    /// was sent cannot be applied, so a mistake never opens a tunnel.
    pub(crate) fn refuse_all(limits: &Limits) -> Self {
        let p = pb::TunnelPolicy {
            deny_ips: vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()],
            ..Default::default()
        };
        match Self::compile(&p, limits) {
            Ok(Some(p)) => p,
            // Unreachable with the literal above; build it by hand all the same.
            _ => Self {
                id: NEXT_POLICY_ID.fetch_add(1, Ordering::Relaxed),
                users: Vec::new(),
                allow: Vec::new(),
                deny: vec![
                    Cidr {
                        net: IpAddr::V4(0.into()),
                        prefix: 0,
                    },
                    Cidr {
                        net: IpAddr::V6(0.into()),
                        prefix: 0,
                    },
                ],
                origins: Vec::new(),
                request_add: Vec::new(),
                request_remove: Vec::new(),
                response_add: Vec::new(),
                response_remove: Vec::new(),
                verified: Mutex::new(HashMap::new()),
                cache_ttl: limits.basic_auth_cache_ttl,
                cache_entries: limits.basic_auth_cache_entries,
            },
        }
    }

    /// Whether `ip` may visit.
    fn admits_ip(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|c| c.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }

    /// Whether an upgrade with this `Origin` may proceed.
    fn admits_origin(&self, origin: Option<&HeaderValue>) -> bool {
        if self.origins.is_empty() {
            return true;
        }
        let Some(origin) = origin.and_then(|o| o.to_str().ok()) else {
            return false;
        };
        let origin = normalize_origin(origin);
        self.origins.contains(&origin)
    }

    fn cached(&self, key: &[u8; 32]) -> bool {
        self.verified
            .lock()
            .ok()
            .and_then(|c| c.get(key).copied())
            .is_some_and(|until| until > Instant::now())
    }

    fn remember(&self, key: [u8; 32]) {
        if self.cache_entries == 0 || self.cache_ttl.is_zero() {
            return;
        }
        let Ok(mut c) = self.verified.lock() else {
            return;
        };
        let now = Instant::now();
        if c.len() >= self.cache_entries {
            c.retain(|_, until| *until > now);
        }
        if c.len() >= self.cache_entries {
            if let Some(oldest) = c.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                c.remove(&oldest);
            }
        }
        c.insert(key, now + self.cache_ttl);
    }

    fn rewrite_request(&self, h: &mut HeaderMap) {
        for n in &self.request_remove {
            h.remove(n);
        }
        for (n, v) in &self.request_add {
            h.insert(n.clone(), v.clone());
        }
    }

    fn rewrite_response(&self, h: &mut HeaderMap) {
        for n in &self.response_remove {
            h.remove(n);
        }
        for (n, v) in &self.response_add {
            h.insert(n.clone(), v.clone());
        }
    }
}

fn user(u: &pb::BasicAuthUser, limits: &Limits) -> Result<User, String> {
    if u.username.is_empty() || u.username.contains(':') {
        return Err(format!(
            "basic-auth user {:?}: a user name must be non-empty and cannot contain ':'",
            u.username
        ));
    }
    let bad = |why: &str| format!("basic-auth user {:?}: {why}", u.username);
    let hash = PasswordHashString::new(&u.password_hash)
        .map_err(|_| bad("the password hash is not an argon2id PHC string ($argon2id$v=19$…)"))?;
    if hash.algorithm().as_str() != "argon2id" {
        return Err(bad("the password hash must be argon2id"));
    }
    let params = argon2::Params::try_from(&hash.password_hash())
        .map_err(|_| bad("the password hash has invalid argon2 parameters"))?;
    if params.m_cost() > limits.basic_auth_max_hash_memory_kib {
        return Err(bad(&format!(
            "the password hash asks for {} KiB of memory; this edge allows at most {} KiB",
            params.m_cost(),
            limits.basic_auth_max_hash_memory_kib
        )));
    }
    if params.t_cost() > limits.basic_auth_max_hash_passes {
        return Err(bad(&format!(
            "the password hash asks for {} passes; this edge allows at most {}",
            params.t_cost(),
            limits.basic_auth_max_hash_passes
        )));
    }
    Ok(User {
        name_sha: Sha256::digest(u.username.as_bytes()).into(),
        hash,
    })
}

/// The policies of one tunnel: the agent's, fixed for the tunnel's life, and the pinned one,
/// replaced live when a team admin changes it.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    agent: Option<Arc<Policy>>,
    pinned: RwLock<Option<Arc<Policy>>>,
}

impl Policies {
    pub(crate) fn new(agent: Option<Arc<Policy>>, pinned: Option<Arc<Policy>>) -> Self {
        Self {
            agent,
            pinned: RwLock::new(pinned),
        }
    }

    /// Replaces the pinned policy (`None` clears it).
    pub(crate) fn set_pinned(&self, pinned: Option<Arc<Policy>>) {
        if let Ok(mut p) = self.pinned.write() {
            *p = pinned;
        }
    }

    /// The policies in force now, the agent's first.
    fn snapshot(&self) -> Vec<Arc<Policy>> {
        let pinned = self.pinned.read().ok().and_then(|p| p.clone());
        self.agent.iter().cloned().chain(pinned).collect()
    }
}

/// Edge-wide state of basic-auth verification.
#[derive(Debug)]
pub(crate) struct Verifier {
    /// Bounds argon2 verifications in flight (each holds its hash's memory).
    permits: Arc<Semaphore>,
    /// argon2 verifications run so far.
    runs: AtomicU64,
}

impl Verifier {
    pub(crate) fn new(limits: &Limits) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(
                limits.basic_auth_max_concurrent_verifications.max(1),
            )),
            runs: AtomicU64::new(0),
        }
    }

    /// How many argon2 verifications ran (cache hits excluded).
    #[allow(dead_code)] // Read by tests and the metrics exporter.
    pub(crate) fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Checks `password` against `hash` on the blocking pool, waiting for a permit first.
    async fn verify(&self, hash: PasswordHashString, password: Vec<u8>) -> bool {
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            return false;
        };
        self.runs.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            Argon2::default()
                .verify_password(&password, &hash.password_hash())
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

/// What one visitor connection remembers: the `Authorization` values already verified, per
/// policy, so keep-alive requests and the upgrade do not verify again.
#[derive(Debug, Default)]
pub(crate) struct Visitor {
    verified: Mutex<Vec<(u64, [u8; 32])>>,
}

impl Visitor {
    fn has(&self, policy: u64, key: &[u8; 32]) -> bool {
        self.verified
            .lock()
            .map(|v| v.iter().any(|(p, k)| *p == policy && k == key))
            .unwrap_or(false)
    }

    fn remember(&self, policy: u64, key: [u8; 32]) {
        if let Ok(mut v) = self.verified.lock() {
            v.retain(|(p, _)| *p != policy);
            if v.len() >= VERIFIED_PER_CONNECTION {
                v.remove(0);
            }
            v.push((policy, key));
        }
    }
}

/// Splits an RFC 7617 `Authorization` value into user and password: the `Basic` scheme
/// (any case), base64, split at the first ':'.
fn basic_credentials(value: &HeaderValue) -> Option<(Vec<u8>, Vec<u8>)> {
    let v = value.as_bytes();
    let v = std::str::from_utf8(v).ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let password = decoded[colon + 1..].to_vec();
    let mut user = decoded;
    user.truncate(colon);
    Some((user, password))
}

/// Whether the request passes `policy`'s basic auth.
async fn passes_basic_auth(
    policy: &Policy,
    headers: &HeaderMap,
    visitor: &Visitor,
    verifier: &Verifier,
) -> bool {
    if policy.users.is_empty() {
        return true;
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
    if visitor.has(policy.id, &key) {
        return true;
    }
    if policy.cached(&key) {
        visitor.remember(policy.id, key);
        return true;
    }
    let Some((name, password)) = basic_credentials(value) else {
        return false;
    };
    let name_sha: [u8; 32] = Sha256::digest(&name).into();
    // Look at every user so the time taken does not say which names exist.
    let mut found: Option<&User> = None;
    for u in &policy.users {
        if bool::from(u.name_sha.ct_eq(&name_sha)) && found.is_none() {
            found = Some(u);
        }
    }
    // An unknown name still costs one verification (against the first user's hash, whose
    // answer is then ignored).
    let Some(hash) = found.or(policy.users.first()).map(|u| u.hash.clone()) else {
        return false;
    };
    let ok = verifier.verify(hash, password).await && found.is_some();
    if ok {
        policy.remember(key);
        visitor.remember(policy.id, key);
    }
    ok
}

/// Whether the request asks for a protocol upgrade (RFC 9110 §7.8).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && headers.contains_key(header::UPGRADE)
}

/// The live route a request is for, found the way the proxy finds it.
fn route_of<B>(req: &Request<B>, state: &State) -> Option<(String, Arc<Route>)> {
    let host = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    let sub = crate::proxy::subdomain_of(host, &state.config.domain)?;
    let route = state.registry.route(&sub)?;
    Some((sub, route))
}

/// The 401 page, with the challenge naming the tunnel as the realm.
fn unauthorized(sub: &str) -> Response<UpBody> {
    let mut r = pages::page(
        StatusCode::UNAUTHORIZED,
        "Authentication required",
        &format!("The tunnel {sub:?} needs a user name and password."),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{sub}\", charset=\"UTF-8\"")) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Checks every policy of the request's tunnel, then calls `inner` with the request (its
/// headers rewritten) and rewrites the response headers. Requests for no live tunnel, and
/// tunnels without policies, go straight to `inner`.
pub(crate) async fn guard<B, F, Fut>(
    mut req: Request<B>,
    peer: SocketAddr,
    state: &State,
    visitor: &Visitor,
    inner: F,
) -> Response<UpBody>
where
    F: FnOnce(Request<B>) -> Fut,
    Fut: Future<Output = Response<UpBody>>,
{
    let Some((sub, route)) = route_of(&req, state) else {
        return inner(req).await;
    };
    let policies = route.policies.snapshot();
    if policies.is_empty() {
        return inner(req).await;
    }
    let ip = canonical(peer.ip());
    let upgrade = is_upgrade(req.headers());
    let mut refusal = None;
    if !policies.iter().all(|p| p.admits_ip(ip)) {
        refusal = Some(Reason::Ip);
    }
    if refusal.is_none() {
        for p in &policies {
            if !passes_basic_auth(p, req.headers(), visitor, &state.registry.verifier).await {
                refusal = Some(Reason::BasicAuth);
                break;
            }
        }
    }
    if refusal.is_none()
        && upgrade
        && !policies
            .iter()
            .all(|p| p.admits_origin(req.headers().get(header::ORIGIN)))
    {
        refusal = Some(Reason::Origin);
    }
    if let Some(reason) = refusal {
        route.refusals.count(reason);
        route.metrics.refused(reason.as_str());
        tracing::info!(
            subdomain = %sub,
            %peer,
            reason = reason.as_str(),
            refused = route.refusals.get(reason),
            "visitor refused by the tunnel policy"
        );
        return match reason {
            Reason::Ip => pages::page(
                StatusCode::FORBIDDEN,
                "Address not allowed",
                &format!("Your address {ip} is not allowed to visit the tunnel {sub:?}."),
            ),
            Reason::BasicAuth => unauthorized(&sub),
            Reason::Origin => {
                let origin = req
                    .headers()
                    .get(header::ORIGIN)
                    .and_then(|o| o.to_str().ok())
                    .unwrap_or("(none)");
                pages::page(
                    StatusCode::FORBIDDEN,
                    "Origin not allowed",
                    &format!(
                        "WebSocket connections to the tunnel {sub:?} from the origin {origin:?} are not allowed."
                    ),
                )
            }
        };
    }
    for p in &policies {
        p.rewrite_request(req.headers_mut());
    }
    let mut resp = inner(req).await;
    for p in &policies {
        p.rewrite_response(resp.headers_mut());
    }
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_blocks_match_their_addresses_in_both_families() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains(ip("2001:db8:1::5")));
        assert!(!c.contains(ip("2001:db9::1")));
        let c = Cidr::parse("192.0.2.7").unwrap();
        assert!(c.contains(ip("192.0.2.7")));
        assert!(!c.contains(ip("192.0.2.8")));
        let c = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(c.contains(ip("203.0.113.9")));
        // Host bits are cleared; mapped blocks become IPv4 ones.
        assert_eq!(Cidr::parse("10.9.9.9/8"), Cidr::parse("10.0.0.0/8"));
        assert_eq!(
            Cidr::parse("::ffff:10.0.0.0/104"),
            Cidr::parse("10.0.0.0/8")
        );
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "x",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_mapped_ipv6_peer_counts_as_ipv4() {
        assert_eq!(canonical(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(canonical(ip("::1")), ip("::1"));
    }

    #[test]
    fn basic_credentials_are_split_at_the_first_colon_whatever_the_scheme_case() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        // "ann:pa:ss"
        assert_eq!(
            basic_credentials(&v("bAsIc YW5uOnBhOnNz")),
            Some((b"ann".to_vec(), b"pa:ss".to_vec()))
        );
        assert_eq!(basic_credentials(&v("Bearer YW5uOnBhOnNz")), None);
        assert_eq!(basic_credentials(&v("Basic !!!")), None);
        // "annpass": no colon.
        assert_eq!(basic_credentials(&v("Basic YW5ucGFzcw==")), None);
    }

    #[test]
    fn each_bad_rule_is_refused_with_a_sentence_naming_it() {
        let limits = Limits::default();
        let cases: Vec<(pb::TunnelPolicy, &str)> = vec![
            (
                pb::TunnelPolicy {
                    allow_ips: vec!["10.0.0.0/33".into()],
                    ..Default::default()
                },
                "10.0.0.0/33",
            ),
            (
                pb::TunnelPolicy {
                    allow_origins: vec!["app.example.com".into()],
                    ..Default::default()
                },
                "scheme://host",
            ),
            (
                pb::TunnelPolicy {
                    request_headers_remove: vec!["Connection".into()],
                    ..Default::default()
                },
                "Connection",
            ),
            (
                pb::TunnelPolicy {
                    response_headers_add: vec![pb::Header {
                        name: "x-ok".into(),
                        value: "a\nb".into(),
                    }],
                    ..Default::default()
                },
                "x-ok",
            ),
            (
                pb::TunnelPolicy {
                    basic_auth: vec![pb::BasicAuthUser {
                        username: "ann".into(),
                        password_hash: "plain".into(),
                    }],
                    ..Default::default()
                },
                "argon2id",
            ),
            (
                pb::TunnelPolicy {
                    basic_auth: vec![pb::BasicAuthUser {
                        username: "ann".into(),
                        password_hash: "$argon2id$v=19$m=1048576,t=2,p=1$c29tZXNhbHQ$MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI".into(),
                    }],
                    ..Default::default()
                },
                "lower argon2",
            ),
        ];
        for (p, needle) in cases {
            let err = Policy::compile(&p, &limits).unwrap_err();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
        assert!(Policy::compile(&pb::TunnelPolicy::default(), &limits)
            .unwrap()
            .is_none());
        // Within the shared rules but over this edge's own, stricter, limit.
        let strict = Limits {
            basic_auth_max_hash_memory_kib: 8 * 1024,
            ..Limits::default()
        };
        let p = pb::TunnelPolicy {
            basic_auth: vec![pb::BasicAuthUser {
                username: "ann".into(),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI".into(),
            }],
            ..Default::default()
        };
        let err = Policy::compile(&p, &strict).unwrap_err();
        assert!(err.contains("8192 KiB"), "{err}");
    }

    fn hashed(user: &str, password: &str) -> pb::BasicAuthUser {
        use argon2::password_hash::{PasswordHasher as _, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        pb::BasicAuthUser {
            username: user.into(),
            password_hash: Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .unwrap()
                .to_string(),
        }
    }

    fn auth(user_pass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(user_pass);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {v}")).unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn a_password_is_verified_once_per_connection_and_once_per_tunnel_within_the_ttl() {
        let mut limits = Limits::default();
        let p = pb::TunnelPolicy {
            basic_auth: vec![hashed("ann", "pw"), hashed("bob", "other")],
            ..Default::default()
        };
        let policy = Policy::compile(&p, &limits).unwrap().unwrap();
        let verifier = Verifier::new(&limits);
        let conn = Visitor::default();
        for _ in 0..3 {
            assert!(passes_basic_auth(&policy, &auth("ann:pw"), &conn, &verifier).await);
        }
        assert_eq!(
            verifier.runs(),
            1,
            "keep-alive requests reuse the verification"
        );
        // Another connection with the same header: the tunnel's cache answers.
        assert!(passes_basic_auth(&policy, &auth("ann:pw"), &Visitor::default(), &verifier).await);
        assert_eq!(verifier.runs(), 1);
        // Wrong passwords and unknown users each cost one verification and are never cached.
        for wrong in ["ann:nope", "ann:nope", "eve:pw", "bob:pw"] {
            assert!(!passes_basic_auth(&policy, &auth(wrong), &conn, &verifier).await);
        }
        assert_eq!(verifier.runs(), 5);
        assert!(!passes_basic_auth(&policy, &HeaderMap::new(), &conn, &verifier).await);
        assert_eq!(verifier.runs(), 5);

        // Without the tunnel cache, each new connection verifies once.
        limits.basic_auth_cache_ttl = Duration::ZERO;
        let policy = Policy::compile(&p, &limits).unwrap().unwrap();
        for _ in 0..2 {
            let conn = Visitor::default();
            assert!(passes_basic_auth(&policy, &auth("bob:other"), &conn, &verifier).await);
            assert!(passes_basic_auth(&policy, &auth("bob:other"), &conn, &verifier).await);
        }
        assert_eq!(verifier.runs(), 7);
    }

    #[test]
    fn deny_wins_over_allow_and_origins_compare_case_insensitively() {
        let p = Policy::compile(
            &pb::TunnelPolicy {
                allow_ips: vec!["10.0.0.0/8".into()],
                deny_ips: vec!["10.6.6.0/24".into()],
                allow_origins: vec!["HTTPS://App.Example.com".into()],
                ..Default::default()
            },
            &Limits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(p.admits_ip(ip("10.1.1.1")));
        assert!(!p.admits_ip(ip("10.6.6.6")));
        assert!(!p.admits_ip(ip("192.168.1.1")));
        let o = HeaderValue::from_static("https://app.example.COM");
        assert!(p.admits_origin(Some(&o)));
        let o = HeaderValue::from_static("https://evil.example.com");
        assert!(!p.admits_origin(Some(&o)));
        assert!(!p.admits_origin(None));
        let all = Policy::refuse_all(&Limits::default());
        assert!(!all.admits_ip(ip("::1")));
        assert!(!all.admits_ip(ip("127.0.0.1")));
    }
}
