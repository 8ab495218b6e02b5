//! Per-team tunnel limits: a team's own overrides (NULL columns on `teams`) over the platform
//! defaults ([`crate::Config::tunnel_limits`]). Edges are always handed the effective values.

use burrow_proto::v1;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::config::TunnelLimits;
use crate::error::{ApiError, ApiResult};

/// A team's overrides; `None` means "the platform default".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Overrides {
    pub(crate) max_websocket_connections: Option<i32>,
    pub(crate) max_new_connections_per_second: Option<i32>,
    pub(crate) max_bytes_per_second_per_connection: Option<i64>,
    pub(crate) max_tunnels_per_session: Option<i32>,
}

/// Columns of [`Overrides`] on `teams`.
pub(crate) const COLUMNS: &str = "max_websocket_connections, max_new_connections_per_second, \
     max_bytes_per_second_per_connection, max_tunnels_per_session";

fn nonzero_i32(field: &'static str, v: u32) -> ApiResult<Option<i32>> {
    if v == 0 {
        return Ok(None);
    }
    i32::try_from(v)
        .map(Some)
        .map_err(|_| ApiError::invalid(field, format!("at most {} is accepted", i32::MAX)))
}

impl Overrides {
    /// Overrides from a request: zero fields mean "platform default".
    pub(crate) fn from_request(limits: &v1::TunnelLimits) -> ApiResult<Self> {
        Ok(Self {
            max_websocket_connections: nonzero_i32(
                "limits.max_websocket_connections",
                limits.max_websocket_connections,
            )?,
            max_new_connections_per_second: nonzero_i32(
                "limits.max_new_connections_per_second",
                limits.max_new_connections_per_second,
            )?,
            max_bytes_per_second_per_connection: match limits.max_bytes_per_second_per_connection {
                0 => None,
                v => Some(i64::try_from(v).map_err(|_| {
                    ApiError::invalid(
                        "limits.max_bytes_per_second_per_connection",
                        format!("at most {} is accepted", i64::MAX),
                    )
                })?),
            },
            max_tunnels_per_session: nonzero_i32(
                "limits.max_tunnels_per_session",
                limits.max_tunnels_per_session,
            )?,
        })
    }

    /// The overrides as a change-log payload fragment.
    pub(crate) fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "max_websocket_connections": self.max_websocket_connections,
            "max_new_connections_per_second": self.max_new_connections_per_second,
            "max_bytes_per_second_per_connection": self.max_bytes_per_second_per_connection,
            "max_tunnels_per_session": self.max_tunnels_per_session,
        })
    }

    /// The overrides from a change-log payload (missing or null fields are "default").
    pub(crate) fn from_json(payload: &serde_json::Value) -> Self {
        let int = |name: &str| {
            payload
                .get(name)
                .and_then(serde_json::Value::as_i64)
                .filter(|v| *v > 0)
        };
        Self {
            max_websocket_connections: int("max_websocket_connections")
                .and_then(|v| i32::try_from(v).ok()),
            max_new_connections_per_second: int("max_new_connections_per_second")
                .and_then(|v| i32::try_from(v).ok()),
            max_bytes_per_second_per_connection: int("max_bytes_per_second_per_connection"),
            max_tunnels_per_session: int("max_tunnels_per_session")
                .and_then(|v| i32::try_from(v).ok()),
        }
    }

    /// The limits a team's tunnels run under: its overrides where set, else `defaults`.
    pub(crate) fn effective(self, defaults: &TunnelLimits) -> v1::TunnelLimits {
        let u32_or = |v: Option<i32>, d: u32| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(d);
        v1::TunnelLimits {
            max_websocket_connections: u32_or(
                self.max_websocket_connections,
                defaults.max_websocket_connections,
            ),
            max_new_connections_per_second: u32_or(
                self.max_new_connections_per_second,
                defaults.max_new_connections_per_second,
            ),
            max_bytes_per_second_per_connection: self
                .max_bytes_per_second_per_connection
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(defaults.max_bytes_per_second_per_connection),
            max_tunnels_per_session: u32_or(
                self.max_tunnels_per_session,
                defaults.max_tunnels_per_session,
            ),
        }
    }
}

/// A team's overrides (all `None` when the team does not exist).
pub(crate) async fn overrides(conn: &mut PgConnection, team_id: Uuid) -> ApiResult<Overrides> {
    Ok(
        sqlx::query_as::<_, Overrides>(&format!("SELECT {COLUMNS} FROM teams WHERE id = $1"))
            .bind(team_id)
            .fetch_optional(&mut *conn)
            .await?
            .unwrap_or_default(),
    )
}
