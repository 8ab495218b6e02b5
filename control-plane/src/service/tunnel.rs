//! `TunnelService`: live tunnels of the caller's teams, their start/end events, and ending
//! one (the edge that holds it learns through the change log).

use std::collections::HashSet;
use std::pin::Pin;

use burrow_proto::v1::{self, tunnel_service_server::TunnelService};
use chrono::{DateTime, Utc};
use futures::Stream;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::Subdomain;
use crate::error::{ApiError, ApiResult};
use crate::feed::{changes_after, current_revision, wait_for_changes, PAGE};
use crate::store::{self, change};
use crate::State;

/// The `TunnelService` implementation.
pub struct TunnelApi {
    state: State,
}

/// The tonic service.
pub(crate) fn server(state: State) -> v1::tunnel_service_server::TunnelServiceServer<TunnelApi> {
    v1::tunnel_service_server::TunnelServiceServer::new(TunnelApi { state })
}

/// A tunnel session joined with its team's and edge's names.
#[derive(sqlx::FromRow)]
pub(crate) struct SessionRow {
    pub(crate) id: Uuid,
    pub(crate) subdomain: String,
    pub(crate) team_id: Uuid,
    pub(crate) team: String,
    pub(crate) edge_id: Uuid,
    pub(crate) edge_name: String,
    pub(crate) token_id: String,
    pub(crate) agent_instance: String,
    pub(crate) agent_version: String,
    pub(crate) agent_addr: String,
    pub(crate) local_addr: String,
    pub(crate) public_url: String,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) ended_at: Option<DateTime<Utc>>,
    pub(crate) connections_total: i64,
    pub(crate) connections_open: i64,
    pub(crate) bytes_in: i64,
    pub(crate) bytes_out: i64,
    pub(crate) lanes: i32,
}

/// Selects [`SessionRow`]s; append a `WHERE` clause on `s.`.
pub(crate) const SESSION_SELECT: &str = "SELECT s.id, s.subdomain, s.team_id, t.name AS team,
        s.edge_id, e.name AS edge_name, s.token_id, s.agent_instance, s.agent_version,
        s.agent_addr, s.local_addr, s.public_url, s.started_at, s.ended_at,
        s.connections_total, s.connections_open, s.bytes_in, s.bytes_out, s.lanes
     FROM tunnel_sessions s JOIN teams t ON t.id = s.team_id JOIN edges e ON e.id = s.edge_id";

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SessionRow {
    /// The wire form.
    pub(crate) fn to_proto(&self) -> v1::TunnelSession {
        v1::TunnelSession {
            id: self.id.to_string(),
            subdomain: self.subdomain.clone(),
            team: self.team.clone(),
            edge_id: self.edge_id.to_string(),
            edge_name: self.edge_name.clone(),
            token_id: self.token_id.clone(),
            agent_instance: self.agent_instance.clone(),
            agent_version: self.agent_version.clone(),
            agent_addr: self.agent_addr.clone(),
            local_addr: self.local_addr.clone(),
            public_url: self.public_url.clone(),
            started_at: Some(store::ts(self.started_at)),
            ended_at: store::ts_opt(self.ended_at),
            connections_total: unsigned(self.connections_total),
            connections_open: unsigned(self.connections_open),
            bytes_in: unsigned(self.bytes_in),
            bytes_out: unsigned(self.bytes_out),
            lanes: if self.ended_at.is_some() {
                0
            } else {
                u32::try_from(self.lanes).unwrap_or(0)
            },
        }
    }
}

/// Loads one session by id.
pub(crate) async fn load_session(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
) -> ApiResult<Option<SessionRow>> {
    Ok(
        sqlx::query_as::<_, SessionRow>(&format!("{SESSION_SELECT} WHERE s.id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Ends session `id` now (freeing the name at once), telling its edge to drop it.
pub(crate) async fn end_session(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    team: Uuid,
    subdomain: &str,
) -> ApiResult<()> {
    sqlx::query("UPDATE tunnel_sessions SET ended_at = now(), grace_until = NULL WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    store::record_change(
        conn,
        change::TUNNEL_KILLED,
        json!({"session_id": id.to_string(), "subdomain": subdomain}),
    )
    .await?;
    store::record_change(
        conn,
        change::TUNNEL_ENDED,
        json!({"session_id": id.to_string(), "team_id": team.to_string()}),
    )
    .await?;
    Ok(())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::TunnelEvent, Status>> + Send>>;

impl TunnelApi {
    /// Team ids the caller's request covers; `None` means every team (platform admin).
    async fn teams(
        &self,
        caller: &crate::auth::Caller,
        team: &str,
    ) -> ApiResult<Option<HashSet<Uuid>>> {
        let me = caller.require_api()?;
        let mut conn = self.state.pool.acquire().await?;
        if !team.trim().is_empty() {
            let (team, _) = store::team_for(&mut conn, caller, "team", team, false).await?;
            return Ok(Some(HashSet::from([team.id])));
        }
        if caller.platform_admin {
            return Ok(None);
        }
        let ids: Vec<Uuid> =
            sqlx::query_scalar("SELECT team_id FROM memberships WHERE account_id = $1")
                .bind(me)
                .fetch_all(&mut *conn)
                .await?;
        Ok(Some(ids.into_iter().collect()))
    }

    async fn list(
        &self,
        request: Request<v1::ListTunnelsRequest>,
    ) -> ApiResult<v1::ListTunnelsResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let teams = self.teams(&caller, &request.get_ref().team).await?;
        let rows = match teams {
            None => {
                sqlx::query_as::<_, SessionRow>(&format!(
                    "{SESSION_SELECT} WHERE s.ended_at IS NULL ORDER BY s.subdomain"
                ))
                .fetch_all(&self.state.pool)
                .await?
            }
            Some(teams) => {
                let teams: Vec<Uuid> = teams.into_iter().collect();
                sqlx::query_as::<_, SessionRow>(&format!(
                    "{SESSION_SELECT} WHERE s.ended_at IS NULL AND s.team_id = ANY($1)
                     ORDER BY s.subdomain"
                ))
                .bind(teams)
                .fetch_all(&self.state.pool)
                .await?
            }
        };
        Ok(v1::ListTunnelsResponse {
            tunnels: rows.iter().map(SessionRow::to_proto).collect(),
        })
    }

    async fn watch(&self, request: Request<v1::WatchTunnelsRequest>) -> ApiResult<EventStream> {
        let caller = super::caller(&self.state, &request).await?;
        let teams = self.teams(&caller, &request.get_ref().team).await?;
        let start = current_revision(&self.state.pool).await?;
        let (tx, rx) = mpsc::channel(self.state.config.stream_buffer);
        let state = self.state.clone();
        tokio::spawn(async move {
            let _subscriber = state
                .config
                .metrics
                .subscribe(crate::hashing::Stream::WatchTunnels);
            if let Err(status) = watch_tunnels(state, start, teams, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn kill(
        &self,
        request: Request<v1::KillTunnelRequest>,
    ) -> ApiResult<v1::KillTunnelResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let subdomain = Subdomain::parse(
            &request.get_ref().subdomain,
            "subdomain",
            &self.state.config,
        )?;
        let mut tx = self.state.pool.begin().await?;
        let not_found =
            || ApiError::NotFound(format!("no live tunnel on {subdomain:?} in your teams"));
        let row = sqlx::query_as::<_, SessionRow>(&format!(
            "{SESSION_SELECT} WHERE s.subdomain = $1 AND s.ended_at IS NULL FOR UPDATE OF s"
        ))
        .bind(subdomain.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(not_found)?;
        if !caller.platform_admin {
            let role = store::role_in(&mut tx, row.team_id, me)
                .await?
                .ok_or_else(not_found)?;
            let creator: Option<Uuid> =
                sqlx::query_scalar("SELECT created_by FROM api_tokens WHERE id = $1")
                    .bind(&row.token_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .flatten();
            if !role.can_manage() && creator != Some(me) {
                return Err(ApiError::PermissionDenied(format!(
                    "only owners/admins of team {:?} or the agent token's creator may end \
                     this tunnel",
                    row.team
                )));
            }
        }
        end_session(&mut tx, row.id, row.team_id, &row.subdomain).await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "tunnel.kill",
            &format!("subdomain:{subdomain}"),
            json!({"session_id": row.id.to_string()}),
        )
        .await?;
        tx.commit().await?;
        Ok(v1::KillTunnelResponse {})
    }
}

/// Sends tunnel start/end events of `teams` after revision `cursor` until the client leaves or
/// the server shuts down.
async fn watch_tunnels(
    state: State,
    mut cursor: i64,
    teams: Option<HashSet<Uuid>>,
    tx: &mpsc::Sender<Result<v1::TunnelEvent, Status>>,
) -> Result<(), Status> {
    let mut latest = state.latest_revision.clone();
    loop {
        let rows = changes_after(&state.pool, cursor).await?;
        let full = rows.len() as i64 >= PAGE;
        for row in rows {
            cursor = row.revision;
            let kind = match row.kind.as_str() {
                change::TUNNEL_STARTED => v1::tunnel_event::Kind::Started,
                change::TUNNEL_ENDED => v1::tunnel_event::Kind::Ended,
                _ => continue,
            };
            let team = Uuid::parse_str(&row.field("team_id")).ok();
            let wanted = match (&teams, team) {
                (None, _) => true,
                (Some(set), Some(team)) => set.contains(&team),
                (Some(_), None) => false,
            };
            let Ok(session) = Uuid::parse_str(&row.field("session_id")) else {
                continue;
            };
            if !wanted {
                continue;
            }
            let mut conn = state.pool.acquire().await.map_err(ApiError::from)?;
            if let Some(session) = load_session(&mut conn, session).await? {
                let event = v1::TunnelEvent {
                    kind: kind as i32,
                    tunnel: Some(session.to_proto()),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if full {
            continue;
        }
        if !wait_for_changes(
            &state.shutdown,
            state.config.change_poll_interval,
            tx,
            &mut latest,
        )
        .await
        {
            return Ok(());
        }
    }
}

#[tonic::async_trait]
impl TunnelService for TunnelApi {
    async fn list_tunnels(
        &self,
        request: Request<v1::ListTunnelsRequest>,
    ) -> Result<Response<v1::ListTunnelsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    type WatchTunnelsStream = EventStream;

    async fn watch_tunnels(
        &self,
        request: Request<v1::WatchTunnelsRequest>,
    ) -> Result<Response<Self::WatchTunnelsStream>, Status> {
        Ok(Response::new(self.watch(request).await?))
    }

    async fn kill_tunnel(
        &self,
        request: Request<v1::KillTunnelRequest>,
    ) -> Result<Response<v1::KillTunnelResponse>, Status> {
        Ok(Response::new(self.kill(request).await?))
    }
}
