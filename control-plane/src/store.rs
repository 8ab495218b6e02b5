//! Shared database helpers: audit rows, change-log rows, and the team/account lookups every
//! service needs. Each takes an executor or a transaction.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::auth::Caller;
use crate::domain::Role;
use crate::error::{ApiError, ApiResult};

/// A transaction on the control-plane database.
pub(crate) type Tx<'a> = Transaction<'a, Postgres>;

/// Key of the transaction-scoped advisory lock every change-log writer takes, so revisions
/// become visible in order and a tailer never skips one committed late.
const CHANGE_LOG_LOCK: i64 = 0x6275_7272_6f77;

/// Kinds of change-log rows.
pub(crate) mod change {
    /// A token was revoked: `{token_id}`.
    pub(crate) const TOKEN_REVOKED: &str = "token_revoked";
    /// A token got a new secret: `{token_id}` (replicas drop cached verifications).
    pub(crate) const TOKEN_ROTATED: &str = "token_rotated";
    /// A reservation was made, released or moved: `{subdomain, team_id}`.
    pub(crate) const RESERVATION_CHANGED: &str = "reservation_changed";
    /// A tunnel must end at once: `{session_id, subdomain}`.
    pub(crate) const TUNNEL_KILLED: &str = "tunnel_killed";
    /// An account was disabled: `{account_id}`.
    pub(crate) const ACCOUNT_DISABLED: &str = "account_disabled";
    /// A tunnel session started: `{session_id, team_id}`.
    pub(crate) const TUNNEL_STARTED: &str = "tunnel_started";
    /// A tunnel session ended: `{session_id, team_id}`.
    pub(crate) const TUNNEL_ENDED: &str = "tunnel_ended";
    /// A reservation's pinned policy was set, cleared, or dropped with the reservation:
    /// `{subdomain, team_id}`. The policy itself is read from `reservations` when streamed.
    pub(crate) const RESERVATION_POLICY_CHANGED: &str = "reservation_policy_changed";
    /// A team's tunnel-limit overrides changed: `{team_id, max_websocket_connections, …}`
    /// (each override a number or null).
    pub(crate) const TEAM_LIMITS_CHANGED: &str = "team_limits_changed";
}

/// Appends a change-log row in the caller's transaction; returns its revision.
pub(crate) async fn record_change(
    conn: &mut PgConnection,
    kind: &str,
    payload: serde_json::Value,
) -> ApiResult<i64> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CHANGE_LOG_LOCK)
        .execute(&mut *conn)
        .await?;
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO change_log (kind, payload) VALUES ($1, $2::jsonb) RETURNING revision",
    )
    .bind(kind)
    .bind(payload.to_string())
    .fetch_one(&mut *conn)
    .await?;
    Ok(revision)
}

/// Appends an audit row in the caller's transaction.
pub(crate) async fn audit(
    conn: &mut PgConnection,
    caller: Option<&Caller>,
    action: &str,
    target: &str,
    details: serde_json::Value,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (actor_account, actor_token, action, target, details)
         VALUES ($1, $2, $3, $4, $5::jsonb)",
    )
    .bind(caller.and_then(|c| c.account_id))
    .bind(caller.map(|c| c.token_id.clone()))
    .bind(action)
    .bind(target)
    .bind(details.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A team as the services use it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct TeamRow {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) display_name: String,
    pub(crate) created_at: DateTime<Utc>,
}

/// Looks a team up by slug or id; NOT_FOUND naming it otherwise.
pub(crate) async fn find_team(
    conn: &mut PgConnection,
    field: &'static str,
    raw: &str,
) -> ApiResult<TeamRow> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(ApiError::invalid(field, "a team name or id is required"));
    }
    let row = match Uuid::parse_str(raw) {
        Ok(id) => {
            sqlx::query_as::<_, TeamRow>(
                "SELECT id, name, display_name, created_at FROM teams WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
        }
        Err(_) => {
            sqlx::query_as::<_, TeamRow>(
                "SELECT id, name, display_name, created_at FROM teams WHERE name = $1",
            )
            .bind(raw.to_ascii_lowercase())
            .fetch_optional(&mut *conn)
            .await?
        }
    };
    row.ok_or_else(|| ApiError::NotFound(format!("team {raw:?} does not exist")))
}

/// The caller's role in a team, if a member.
pub(crate) async fn role_in(
    conn: &mut PgConnection,
    team_id: Uuid,
    account_id: Uuid,
) -> ApiResult<Option<Role>> {
    let role: Option<String> =
        sqlx::query_scalar("SELECT role FROM memberships WHERE team_id = $1 AND account_id = $2")
            .bind(team_id)
            .bind(account_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(role.as_deref().map(Role::from_db))
}

/// Finds a team and checks the caller's standing in it: a member at all (`need_manage =
/// false`) or an owner/admin (`true`). Platform admins always pass, with role `None`.
pub(crate) async fn team_for(
    conn: &mut PgConnection,
    caller: &Caller,
    field: &'static str,
    raw: &str,
    need_manage: bool,
) -> ApiResult<(TeamRow, Option<Role>)> {
    let team = find_team(conn, field, raw).await?;
    let role = match caller.account_id {
        Some(account) => role_in(conn, team.id, account).await?,
        None => None,
    };
    if caller.platform_admin {
        return Ok((team, role));
    }
    match role {
        None => Err(ApiError::PermissionDenied(format!(
            "you are not a member of team {:?}",
            team.name
        ))),
        Some(r) if need_manage && !r.can_manage() => Err(ApiError::PermissionDenied(format!(
            "only owners and admins of team {:?} may do this",
            team.name
        ))),
        Some(r) => Ok((team, Some(r))),
    }
}

/// An account as the services use it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct AccountRow {
    pub(crate) id: Uuid,
    pub(crate) email: String,
    pub(crate) display_name: String,
    pub(crate) platform_admin: bool,
    pub(crate) disabled_at: Option<DateTime<Utc>>,
    pub(crate) has_password: bool,
    pub(crate) created_at: DateTime<Utc>,
}

/// Columns of [`AccountRow`].
pub(crate) const ACCOUNT_COLUMNS: &str = "id, email, display_name, platform_admin, disabled_at, \
     password_hash IS NOT NULL AS has_password, created_at";

/// Looks an account up by id or email; NOT_FOUND naming it otherwise.
pub(crate) async fn find_account(
    conn: &mut PgConnection,
    field: &'static str,
    raw: &str,
) -> ApiResult<AccountRow> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(ApiError::invalid(
            field,
            "an account id or email is required",
        ));
    }
    let row = match Uuid::parse_str(raw) {
        Ok(id) => {
            sqlx::query_as::<_, AccountRow>(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
        }
        Err(_) => {
            sqlx::query_as::<_, AccountRow>(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE lower(email) = lower($1)"
            ))
            .bind(raw)
            .fetch_optional(&mut *conn)
            .await?
        }
    };
    row.ok_or_else(|| ApiError::NotFound(format!("account {raw:?} does not exist")))
}

/// Whether two accounts share a team.
pub(crate) async fn share_a_team(conn: &mut PgConnection, a: Uuid, b: Uuid) -> ApiResult<bool> {
    let shared: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM memberships x JOIN memberships y ON x.team_id = y.team_id
                        WHERE x.account_id = $1 AND y.account_id = $2)",
    )
    .bind(a)
    .bind(b)
    .fetch_one(&mut *conn)
    .await?;
    Ok(shared)
}

/// A wire timestamp.
pub(crate) fn ts(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// An optional wire timestamp.
pub(crate) fn ts_opt(at: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    at.map(ts)
}
