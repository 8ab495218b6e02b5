//! argon2id hashing of token secrets and passwords, off the async threads and bounded.
//!
//! Each computation takes ~19 MiB and a core for tens of milliseconds, so they run in
//! `spawn_blocking` behind a semaphore ([`crate::Config::max_concurrent_hashes`]): a flood of
//! bad tokens queues instead of exhausting memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// OWASP's argon2id parameters: 19 MiB of memory, 2 passes, 1 lane.
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

fn argon2() -> Argon2<'static> {
    // The parameters are constants that `Params::new` accepts.
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Counters the server keeps, readable by tests and the benchmark. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct Metrics(Arc<MetricsInner>);

#[derive(Debug, Default)]
struct MetricsInner {
    argon2_verifications: AtomicU64,
    argon2_hashes: AtomicU64,
    token_cache_hits: AtomicU64,
    /// Open `EdgeService.Watch` streams.
    watch_subscribers: AtomicU64,
    /// Open `TunnelService.WatchTunnels` streams.
    tunnel_watch_subscribers: AtomicU64,
}

/// Which server stream a [`Subscription`] counts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stream {
    /// `EdgeService.Watch`.
    Watch,
    /// `TunnelService.WatchTunnels`.
    WatchTunnels,
}

/// One open server stream, counted until dropped.
#[derive(Debug)]
pub(crate) struct Subscription {
    metrics: Metrics,
    stream: Stream,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.metrics
            .subscribers(self.stream)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// argon2 verifications performed (token secrets and passwords, dummy ones included).
    pub fn argon2_verifications(&self) -> u64 {
        self.0.argon2_verifications.load(Ordering::Relaxed)
    }

    /// argon2 hashes computed (new tokens, rotations, passwords).
    pub fn argon2_hashes(&self) -> u64 {
        self.0.argon2_hashes.load(Ordering::Relaxed)
    }

    /// Authentications answered from the verified-token cache.
    pub fn token_cache_hits(&self) -> u64 {
        self.0.token_cache_hits.load(Ordering::Relaxed)
    }

    /// Open `EdgeService.Watch` streams.
    pub fn watch_subscribers(&self) -> u64 {
        self.0.watch_subscribers.load(Ordering::Relaxed)
    }

    /// Open `TunnelService.WatchTunnels` streams.
    pub fn tunnel_watch_subscribers(&self) -> u64 {
        self.0.tunnel_watch_subscribers.load(Ordering::Relaxed)
    }

    fn subscribers(&self, stream: Stream) -> &AtomicU64 {
        match stream {
            Stream::Watch => &self.0.watch_subscribers,
            Stream::WatchTunnels => &self.0.tunnel_watch_subscribers,
        }
    }

    /// Counts an open `stream` until the returned guard is dropped.
    pub(crate) fn subscribe(&self, stream: Stream) -> Subscription {
        self.subscribers(stream).fetch_add(1, Ordering::Relaxed);
        Subscription {
            metrics: self.clone(),
            stream,
        }
    }

    pub(crate) fn count_cache_hit(&self) {
        self.0.token_cache_hits.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs argon2id with bounded concurrency.
#[derive(Clone, Debug)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    metrics: Metrics,
    /// A hash of a random secret, verified against when an id is unknown so that unknown and
    /// known ids take the same time.
    dummy_hash: Arc<str>,
}

impl Hasher {
    /// A hasher allowing `max_concurrent` computations at once.
    pub fn new(max_concurrent: usize, metrics: Metrics) -> anyhow::Result<Self> {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let dummy = argon2()
            .hash_password(b"burrow-dummy-secret-never-issued", &salt)
            .map_err(|e| anyhow::anyhow!("computing the dummy hash: {e}"))?
            .to_string();
        Ok(Self {
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            metrics,
            dummy_hash: dummy.into(),
        })
    }

    /// Hashes `secret` into an argon2id PHC string with a fresh salt.
    pub async fn hash(&self, secret: String) -> Result<String, ApiError> {
        let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
        self.metrics.0.argon2_hashes.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            argon2()
                .hash_password(secret.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ApiError::internal(anyhow::anyhow!("argon2 hash failed: {e}")))
        })
        .await
        .map_err(ApiError::internal)?
    }

    /// Whether `secret` matches one of `hashes` (PHC strings); with no hashes it verifies
    /// against the dummy hash and answers `false`, taking the same time.
    pub async fn verify_any(&self, secret: String, hashes: Vec<String>) -> Result<bool, ApiError> {
        let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
        let (hashes, real) = if hashes.is_empty() {
            (vec![self.dummy_hash.to_string()], false)
        } else {
            (hashes, true)
        };
        let metrics = self.metrics.clone();
        let matched = tokio::task::spawn_blocking(move || {
            let argon2 = argon2();
            // Current secret first, then the previous one during a rotation overlap.
            hashes.iter().any(|phc| {
                metrics
                    .0
                    .argon2_verifications
                    .fetch_add(1, Ordering::Relaxed);
                PasswordHash::new(phc)
                    .map(|parsed| argon2.verify_password(secret.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
        })
        .await
        .map_err(ApiError::internal)?;
        Ok(real && matched)
    }
}
