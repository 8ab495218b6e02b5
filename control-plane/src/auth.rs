//! Who is calling: bearer-token verification with a verified-token cache, and rate limiting of
//! failed attempts.
//!
//! A token text is parsed (shape and checksum) before any database work. On a cache miss the
//! token row is read and the secret verified with argon2id; the answer is cached under the
//! SHA-256 of the whole text for [`crate::Config::token_cache_ttl`]. Revocation, rotation and
//! account disablement drop entries at once (on other replicas via the change log), and a
//! generation counter keeps a verification that raced with such a drop from re-inserting a
//! stale entry. Concurrent misses for one token wait for one verification.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::Request;
use uuid::Uuid;

use crate::config::Config;
use crate::error::{ApiError, ApiResult};
use crate::hashing::{Hasher, Metrics};
use crate::token::{TokenKind, TokenText};

/// The authenticated caller of an RPC.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The account the token acts for; `None` for edge tokens made outside the API.
    pub account_id: Option<Uuid>,
    /// Whether that account is a platform admin.
    pub platform_admin: bool,
    /// Public id of the token used.
    pub token_id: String,
    /// Kind of the token used.
    pub kind: TokenKind,
    /// The team of an agent token.
    pub team_id: Option<Uuid>,
    /// Scope patterns of an agent token.
    pub scopes: Vec<String>,
    /// When the token stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Caller {
    /// Refuses agent and edge tokens on the public API.
    pub(crate) fn require_api(&self) -> ApiResult<Uuid> {
        match (self.kind, self.account_id) {
            (TokenKind::Api, Some(account)) => Ok(account),
            (TokenKind::Agent, _) => Err(ApiError::PermissionDenied(
                "agent tokens may only run agents; call the API with an API token \
                 (`burrow login`)"
                    .into(),
            )),
            _ => Err(ApiError::PermissionDenied(
                "edge tokens may only call the internal EdgeService".into(),
            )),
        }
    }

    /// Refuses everything but edge tokens.
    pub(crate) fn require_edge(&self) -> ApiResult<()> {
        if self.kind == TokenKind::Edge {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(
                "EdgeService needs an edge token (`burrow-control edge-token create`)".into(),
            ))
        }
    }

    /// Refuses callers that are not platform admins.
    pub(crate) fn require_platform_admin(&self) -> ApiResult<Uuid> {
        let account = self.require_api()?;
        if self.platform_admin {
            Ok(account)
        } else {
            Err(ApiError::PermissionDenied(
                "only platform admins may do this".into(),
            ))
        }
    }
}

type CacheKey = [u8; 32];

struct CacheEntry {
    caller: Caller,
    valid_until: Instant,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<CacheKey, CacheEntry>,
    /// Bumped by every invalidation; a verification that started under an older generation
    /// does not cache its answer.
    generation: u64,
}

/// Verifies bearer tokens; shared by every service.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<AuthInner>,
}

struct AuthInner {
    pool: PgPool,
    hasher: Hasher,
    metrics: Metrics,
    ttl: Duration,
    capacity: usize,
    cache: Mutex<Cache>,
    in_flight: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    failures: FailureLimiter,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    kind: String,
    team_id: Option<Uuid>,
    created_by: Option<Uuid>,
    secret_hash: String,
    previous_hash: Option<String>,
    previous_expires_at: Option<DateTime<Utc>>,
    scopes: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    platform_admin: Option<bool>,
    disabled_at: Option<DateTime<Utc>>,
}

const INVALID_TOKEN: &str = "the token is not valid; check that it was copied whole";

impl Authenticator {
    /// An authenticator reading tokens from `pool`.
    pub(crate) fn new(pool: PgPool, hasher: Hasher, config: &Config) -> Self {
        Self {
            inner: Arc::new(AuthInner {
                pool,
                hasher,
                metrics: config.metrics.clone(),
                ttl: config.token_cache_ttl,
                capacity: config.token_cache_capacity,
                cache: Mutex::new(Cache::default()),
                in_flight: Mutex::new(HashMap::new()),
                failures: FailureLimiter::new(
                    config.max_failed_auth_per_peer,
                    config.failed_auth_window,
                ),
            }),
        }
    }

    /// The per-peer failure limiter, shared with `Login`.
    pub(crate) fn peer_failures(&self) -> &FailureLimiter {
        &self.inner.failures
    }

    /// Authenticates an RPC from its `authorization: Bearer` metadata.
    pub(crate) async fn caller<T>(&self, request: &Request<T>) -> ApiResult<Caller> {
        let peer = request.remote_addr().map(|a| a.ip());
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "this call needs a token: send `authorization: Bearer <token>`".into(),
                )
            })?
            .to_str()
            .map_err(|_| ApiError::Unauthenticated(INVALID_TOKEN.into()))?;
        let text = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "the authorization header must be `Bearer <token>`".into(),
                )
            })?
            .trim();
        self.verify(text, peer.map(|p| p.to_string())).await
    }

    /// Verifies a token text. `peer` keys the failed-attempt limit; `None` skips it (an edge
    /// relaying many agents' tokens must not lock itself out).
    pub(crate) async fn verify(&self, text: &str, peer: Option<String>) -> ApiResult<Caller> {
        let inner = &self.inner;
        if let Some(peer) = &peer {
            if inner.failures.is_blocked(peer) {
                return Err(ApiError::ResourceExhausted(
                    "too many failed attempts from your address; wait a minute and try again"
                        .into(),
                ));
            }
        }
        let result = self.verify_inner(text).await;
        if let (Err(ApiError::Unauthenticated(_)), Some(peer)) = (&result, &peer) {
            inner.failures.record(peer);
        }
        result
    }

    async fn verify_inner(&self, text: &str) -> ApiResult<Caller> {
        let token = TokenText::parse(text).map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        let key: CacheKey = Sha256::digest(text.as_bytes()).into();
        if let Some(caller) = self.cached(&key) {
            return Ok(caller);
        }
        // One verification per token at a time; the others wait and then hit the cache.
        let gate = {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            in_flight.entry(key).or_default().clone()
        };
        let result = {
            let _turn = gate.lock().await;
            match self.cached(&key) {
                Some(caller) => Ok(caller),
                None => self.verify_uncached(&token, key).await,
            }
        };
        {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if Arc::strong_count(&gate) <= 2 {
                in_flight.remove(&key);
            }
        }
        result
    }

    fn cached(&self, key: &CacheKey) -> Option<Caller> {
        let cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.entries.get(key)?;
        if entry.valid_until <= Instant::now() {
            return None;
        }
        self.inner.metrics.count_cache_hit();
        Some(entry.caller.clone())
    }

    async fn verify_uncached(&self, token: &TokenText, key: CacheKey) -> ApiResult<Caller> {
        let generation = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation;
        let row = sqlx::query_as::<_, TokenRow>(
            "SELECT t.kind, t.team_id, t.created_by, t.secret_hash, t.previous_hash,
                    t.previous_expires_at, t.scopes, t.expires_at, t.revoked_at,
                    a.platform_admin, a.disabled_at
             FROM api_tokens t LEFT JOIN accounts a ON a.id = t.created_by
             WHERE t.id = $1",
        )
        .bind(token.id())
        .fetch_optional(&self.inner.pool)
        .await?;
        let now = Utc::now();
        let mut hashes = Vec::new();
        if let Some(row) = &row {
            if row.kind == token.kind().as_str() {
                hashes.push(row.secret_hash.clone());
                if let (Some(prev), Some(until)) = (&row.previous_hash, row.previous_expires_at) {
                    if until > now {
                        hashes.push(prev.clone());
                    }
                }
            }
        }
        let matched = self
            .inner
            .hasher
            .verify_any(token.secret().to_owned(), hashes)
            .await?;
        let row = match row {
            Some(row) if matched => row,
            _ => return Err(ApiError::Unauthenticated(INVALID_TOKEN.into())),
        };
        if row.revoked_at.is_some() {
            return Err(ApiError::Unauthenticated("the token was revoked".into()));
        }
        if row.expires_at.is_some_and(|at| at <= now) {
            return Err(ApiError::Unauthenticated(
                "the token has expired; create a new one".into(),
            ));
        }
        if row.disabled_at.is_some() {
            return Err(ApiError::Unauthenticated(
                "the account this token belongs to is disabled".into(),
            ));
        }
        sqlx::query("UPDATE api_tokens SET last_used_at = now() WHERE id = $1")
            .bind(token.id())
            .execute(&self.inner.pool)
            .await?;
        let caller = Caller {
            account_id: row.created_by,
            platform_admin: row.platform_admin.unwrap_or(false),
            token_id: token.id().to_owned(),
            kind: token.kind(),
            team_id: row.team_id,
            scopes: row.scopes,
            expires_at: row.expires_at,
        };
        // Cache no longer than the token (or a rotated-away secret) stays valid.
        let mut valid_for = self.inner.ttl;
        for limit in [row.expires_at, row.previous_expires_at]
            .into_iter()
            .flatten()
        {
            let left = (limit - now).to_std().unwrap_or(Duration::ZERO);
            valid_for = valid_for.min(left);
        }
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.generation == generation && !valid_for.is_zero() {
            if cache.entries.len() >= self.inner.capacity {
                let now = Instant::now();
                cache.entries.retain(|_, e| e.valid_until > now);
                if cache.entries.len() >= self.inner.capacity {
                    cache.entries.clear();
                }
            }
            cache.entries.insert(
                key,
                CacheEntry {
                    caller: caller.clone(),
                    valid_until: Instant::now() + valid_for,
                },
            );
        }
        Ok(caller)
    }

    /// Drops every cached verification of token `id`.
    pub(crate) fn forget_token(&self, id: &str) {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.generation += 1;
        cache.entries.retain(|_, e| e.caller.token_id != id);
    }

    /// Drops every cached verification of tokens acting for `account`.
    pub(crate) fn forget_account(&self, account: Uuid) {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.generation += 1;
        cache
            .entries
            .retain(|_, e| e.caller.account_id != Some(account));
    }
}

// === impl FailureLimiter ===

/// Counts failed attempts per key (peer address or email) in fixed windows.
pub(crate) struct FailureLimiter {
    max: u32,
    window: Duration,
    counts: Mutex<HashMap<String, (Instant, u32)>>,
}

/// Most keys tracked before stale windows are swept; bounds memory under address spraying.
const MAX_TRACKED_KEYS: usize = 100_000;

impl FailureLimiter {
    /// Allows `max` failures per `window` per key.
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` used up its failures in the current window.
    pub(crate) fn is_blocked(&self, key: &str) -> bool {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(key)
            .is_some_and(|(start, n)| start.elapsed() < self.window && *n >= self.max)
    }

    /// Counts one failure for `key`.
    pub(crate) fn record(&self, key: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= MAX_TRACKED_KEYS {
            let window = self.window;
            counts.retain(|_, (start, _)| start.elapsed() < window);
            if counts.len() >= MAX_TRACKED_KEYS {
                counts.clear();
            }
        }
        let entry = counts.entry(key.to_owned()).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}
