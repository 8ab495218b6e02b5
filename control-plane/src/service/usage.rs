//! `UsageService`: metered use of tunnels per team and UTC day, as `ReportTunnelStats` adds
//! it up (see `EdgeApi::report`).

use burrow_proto::v1::{self, usage_service_server::UsageService};
use chrono::{NaiveDate, Utc};
use tonic::{Request, Response, Status};

use crate::error::{ApiError, ApiResult};
use crate::store;
use crate::State;

/// Days shown when the request names no `from`: this many days before `to`, inclusive of both.
pub const DEFAULT_RANGE_DAYS: i64 = 30;

/// The `UsageService` implementation.
pub struct UsageApi {
    state: State,
}

/// The tonic service.
pub(crate) fn server(state: State) -> v1::usage_service_server::UsageServiceServer<UsageApi> {
    v1::usage_service_server::UsageServiceServer::new(UsageApi { state })
}

fn parse_day(field: &'static str, raw: &str) -> ApiResult<Option<NaiveDate>> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .map(Some)
        .map_err(|_| {
            ApiError::invalid(
                field,
                format!("{raw:?} is not a date; write YYYY-MM-DD, e.g. 2026-01-31"),
            )
        })
}

#[derive(sqlx::FromRow)]
struct UsageRow {
    team: String,
    day: NaiveDate,
    bytes_in: i64,
    bytes_out: i64,
    connections: i64,
    websocket_messages: i64,
}

impl UsageRow {
    fn to_proto(&self) -> v1::UsageDay {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        v1::UsageDay {
            team: self.team.clone(),
            day: self.day.format("%Y-%m-%d").to_string(),
            bytes_in: u(self.bytes_in),
            bytes_out: u(self.bytes_out),
            connections: u(self.connections),
            websocket_messages: u(self.websocket_messages),
        }
    }
}

const USAGE_SELECT: &str = "SELECT t.name AS team, u.day, u.bytes_in, u.bytes_out,
        u.connections, u.websocket_messages
     FROM usage_daily u JOIN teams t ON t.id = u.team_id";

impl UsageApi {
    async fn get(&self, request: Request<v1::GetUsageRequest>) -> ApiResult<v1::GetUsageResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let to = parse_day("to", &req.to)?.unwrap_or_else(|| Utc::now().date_naive());
        let from = match parse_day("from", &req.from)? {
            Some(from) => from,
            None => to - chrono::Duration::days(DEFAULT_RANGE_DAYS),
        };
        if from > to {
            return Err(ApiError::invalid(
                "from",
                format!("the range starts ({from}) after it ends ({to})"),
            ));
        }
        let max = self.state.config.max_usage_range_days;
        if (to - from).num_days() >= i64::from(max) {
            return Err(ApiError::invalid(
                "from",
                format!(
                    "the range {from} to {to} spans more than {max} days; ask for a shorter one"
                ),
            ));
        }
        let rows = if !req.team.trim().is_empty() {
            let mut conn = self.state.pool.acquire().await?;
            let (team, _) = store::team_for(&mut conn, &caller, "team", &req.team, false).await?;
            sqlx::query_as::<_, UsageRow>(&format!(
                "{USAGE_SELECT} WHERE u.team_id = $1 AND u.day BETWEEN $2 AND $3
                 ORDER BY u.day, t.name"
            ))
            .bind(team.id)
            .bind(from)
            .bind(to)
            .fetch_all(&mut *conn)
            .await?
        } else if caller.platform_admin {
            sqlx::query_as::<_, UsageRow>(&format!(
                "{USAGE_SELECT} WHERE u.day BETWEEN $1 AND $2 ORDER BY u.day, t.name"
            ))
            .bind(from)
            .bind(to)
            .fetch_all(&self.state.pool)
            .await?
        } else {
            sqlx::query_as::<_, UsageRow>(&format!(
                "{USAGE_SELECT} WHERE u.day BETWEEN $2 AND $3 AND u.team_id IN (
                     SELECT team_id FROM memberships WHERE account_id = $1)
                 ORDER BY u.day, t.name"
            ))
            .bind(me)
            .bind(from)
            .bind(to)
            .fetch_all(&self.state.pool)
            .await?
        };
        Ok(v1::GetUsageResponse {
            days: rows.iter().map(UsageRow::to_proto).collect(),
        })
    }
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn get_usage(
        &self,
        request: Request<v1::GetUsageRequest>,
    ) -> Result<Response<v1::GetUsageResponse>, Status> {
        Ok(Response::new(self.get(request).await?))
    }
}
