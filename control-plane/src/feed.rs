//! Tailing the change log: one task per process follows `change_log` (short poll plus a
//! `LISTEN` nudge), drops cached token verifications that a change invalidates (so replicas
//! learn of revocations), and publishes the newest revision so server streams wake up.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::error::ApiResult;
use crate::store::change;

/// Channel the change-log trigger notifies.
pub(crate) const NOTIFY_CHANNEL: &str = "burrow_change_log";
/// Most rows read per query.
pub(crate) const PAGE: i64 = 500;

/// One change-log row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct ChangeRow {
    pub(crate) revision: i64,
    pub(crate) kind: String,
    pub(crate) payload: String,
}

impl ChangeRow {
    /// A string field of the payload, or "".
    pub(crate) fn field(&self, name: &str) -> String {
        serde_json::from_str::<serde_json::Value>(&self.payload)
            .ok()
            .and_then(|v| v.get(name).and_then(|f| f.as_str()).map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Rows after `after`, oldest first, at most [`PAGE`].
pub(crate) async fn changes_after(pool: &PgPool, after: i64) -> ApiResult<Vec<ChangeRow>> {
    Ok(sqlx::query_as::<_, ChangeRow>(
        "SELECT revision, kind, payload::text AS payload FROM change_log
         WHERE revision > $1 ORDER BY revision LIMIT $2",
    )
    .bind(after)
    .bind(PAGE)
    .fetch_all(pool)
    .await?)
}

/// Waits until the change log may have grown past what a server stream has sent: a new
/// revision was published, or the poll interval passed (NOTIFY alone can be missed during a
/// reconnect). Returns false when the stream should end: the client left or the server is
/// shutting down.
pub(crate) async fn wait_for_changes<T>(
    shutdown: &CancellationToken,
    poll_interval: Duration,
    client: &tokio::sync::mpsc::Sender<T>,
    latest: &mut watch::Receiver<i64>,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = client.closed() => false,
        changed = latest.changed() => changed.is_ok(),
        () = tokio::time::sleep(poll_interval) => true,
    }
}

/// The newest revision (0 when the log is empty).
pub(crate) async fn current_revision(pool: &PgPool) -> ApiResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(revision), 0)::bigint FROM change_log")
            .fetch_one(pool)
            .await?,
    )
}

/// Follows the change log until `shutdown`; publishes each new revision on `latest`.
pub(crate) async fn tail(
    pool: PgPool,
    auth: Authenticator,
    latest: watch::Sender<i64>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let mut cursor = None;
    let mut listener: Option<PgListener> = None;
    loop {
        if listener.is_none() {
            listener = match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(NOTIFY_CHANNEL).await {
                    Ok(()) => Some(l),
                    Err(_) => None,
                },
                Err(_) => None,
            };
        }
        if cursor.is_none() {
            cursor = current_revision(&pool).await.ok();
            if let Some(rev) = cursor {
                latest.send_replace(rev);
            }
        }
        if let Some(after) = cursor {
            match changes_after(&pool, after).await {
                Ok(rows) => {
                    let full = rows.len() as i64 >= PAGE;
                    for row in &rows {
                        apply(&auth, row);
                        cursor = Some(row.revision);
                    }
                    if let Some(rev) = cursor {
                        if rev > *latest.borrow() {
                            latest.send_replace(rev);
                        }
                    }
                    if full {
                        continue;
                    }
                }
                Err(err) => tracing::debug!(%err, "change-log poll failed"),
            }
        }
        let nudged = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ok = nudged => if !ok { listener = None; },
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Drops cached verifications a change makes stale.
fn apply(auth: &Authenticator, row: &ChangeRow) {
    match row.kind.as_str() {
        change::TOKEN_REVOKED | change::TOKEN_ROTATED => auth.forget_token(&row.field("token_id")),
        change::ACCOUNT_DISABLED => {
            if let Ok(id) = uuid::Uuid::parse_str(&row.field("account_id")) {
                auth.forget_account(id);
            }
        }
        _ => {}
    }
}
