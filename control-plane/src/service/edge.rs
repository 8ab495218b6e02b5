//! `EdgeService`: the internal API edges call with an edge token — registration, heartbeats,
//! agent authorization, tunnel sessions and the change feed.

use std::collections::BTreeMap;
use std::pin::Pin;

use burrow_proto::v1::{self, edge_service_server::EdgeService};
use chrono::{DateTime, Utc};
use futures::Stream;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{scopes_allow, Subdomain};
use crate::error::{unique_violation, ApiError, ApiResult};
use crate::feed::{changes_after, current_revision, wait_for_changes, ChangeRow, PAGE};
use crate::limits::{self, Overrides};
use crate::policy;
use crate::service::tunnel::{end_session, load_session};
use crate::store::{self, change};
use crate::token::TokenKind;
use crate::State;

/// Most subdomains one `AuthorizeAgent` call may ask about.
pub const MAX_REQUESTED_SUBDOMAINS: usize = 64;
/// Most stats entries in one `ReportTunnelStats` call.
pub const MAX_STATS_PER_REPORT: usize = 10_000;
/// An edge whose last heartbeat is older than this many heartbeat intervals is presumed dead:
/// its live sessions no longer block other teams (after the reconnect grace).
pub const MISSED_HEARTBEATS: u32 = 3;

/// The `EdgeService` implementation.
pub struct EdgeApi {
    state: State,
}

/// The tonic service.
pub(crate) fn server(state: State) -> v1::edge_service_server::EdgeServiceServer<EdgeApi> {
    v1::edge_service_server::EdgeServiceServer::new(EdgeApi { state })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

fn parse_uuid(field: &'static str, raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw.trim())
        .map_err(|_| ApiError::invalid(field, format!("{raw:?} is not an id")))
}

fn secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl EdgeApi {
    async fn register(
        &self,
        request: Request<v1::RegisterEdgeRequest>,
    ) -> ApiResult<v1::RegisterEdgeResponse> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_edge()?;
        let req = request.into_inner();
        let name = crate::domain::parse_name(&req.name, "name", true)?;
        // An edge token is made for one edge name (`edge-token create --name`); it registers
        // that edge only, so one edge's token cannot take over another's name or sessions.
        let token_name: Option<String> =
            sqlx::query_scalar("SELECT name FROM api_tokens WHERE id = $1")
                .bind(&caller.token_id)
                .fetch_optional(&self.state.pool)
                .await?;
        if token_name.as_deref() != Some(name.as_str()) {
            return Err(ApiError::PermissionDenied(format!(
                "this edge token was made for edge {:?}, not {name:?}: start the edge with \
                 --name {} or create a token for {name:?} (`burrow-control edge-token create \
                 --name {name}`)",
                token_name.as_deref().unwrap_or(""),
                token_name.as_deref().unwrap_or("NAME"),
            )));
        }
        if req.domain.trim().is_empty() {
            return Err(ApiError::invalid(
                "domain",
                "the domain the edge serves is required",
            ));
        }
        let mut tx = self.state.pool.begin().await?;
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO edges (name, domain, public_url_template, agent_addr, internal_addr,
                                version, token_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name) DO UPDATE SET domain = EXCLUDED.domain,
                 public_url_template = EXCLUDED.public_url_template,
                 agent_addr = EXCLUDED.agent_addr, internal_addr = EXCLUDED.internal_addr,
                 version = EXCLUDED.version, token_id = EXCLUDED.token_id,
                 registered_at = now(), last_heartbeat_at = now()
             RETURNING id",
        )
        .bind(&name)
        .bind(req.domain.trim().to_ascii_lowercase())
        .bind(&req.public_url_template)
        .bind(&req.agent_addr)
        .bind(&req.internal_addr)
        .bind(&req.version)
        .bind(&caller.token_id)
        .fetch_one(&mut *tx)
        .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "edge.register",
            &format!("edge:{id}"),
            json!({"name": name, "domain": req.domain}),
        )
        .await?;
        tx.commit().await?;
        Ok(v1::RegisterEdgeResponse {
            edge_id: id.to_string(),
            heartbeat_interval_seconds: secs(self.state.config.heartbeat_interval).max(1),
            reconnect_grace_seconds: secs(self.state.config.reconnect_grace),
        })
    }

    /// Checks that the edge `edge_id` was registered with the caller's edge token: an edge
    /// acts only for itself.
    async fn own_edge(&self, caller: &crate::auth::Caller, edge_id: Uuid) -> ApiResult<()> {
        let token: Option<Option<String>> =
            sqlx::query_scalar("SELECT token_id FROM edges WHERE id = $1")
                .bind(edge_id)
                .fetch_optional(&self.state.pool)
                .await?;
        match token {
            None => Err(ApiError::NotFound(format!(
                "edge {edge_id} is not registered; call RegisterEdge first"
            ))),
            Some(t) if t.as_deref() == Some(caller.token_id.as_str()) => Ok(()),
            Some(_) => Err(ApiError::PermissionDenied(format!(
                "edge {edge_id} is registered with another edge token; an edge may act only \
                 for itself"
            ))),
        }
    }

    async fn heartbeat_inner(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> ApiResult<v1::HeartbeatResponse> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_edge()?;
        let req = request.into_inner();
        let id = parse_uuid("edge_id", &req.edge_id)?;
        self.own_edge(&caller, id).await?;
        let updated = sqlx::query(
            "UPDATE edges SET last_heartbeat_at = now(), agent_sessions = $2, tunnels = $3,
                 visitor_connections = $4
             WHERE id = $1",
        )
        .bind(id)
        .bind(i64::from(req.agent_sessions))
        .bind(i64::from(req.tunnels))
        .bind(clamp_i64(req.visitor_connections))
        .execute(&self.state.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(ApiError::NotFound(format!(
                "edge {id} is not registered; call RegisterEdge first"
            )));
        }
        Ok(v1::HeartbeatResponse {})
    }

    async fn authorize(
        &self,
        request: Request<v1::AuthorizeAgentRequest>,
    ) -> ApiResult<v1::AuthorizeAgentResponse> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_edge()?;
        let req = request.into_inner();
        if req.requested_subdomains.len() > MAX_REQUESTED_SUBDOMAINS {
            return Err(ApiError::invalid(
                "requested_subdomains",
                format!("at most {MAX_REQUESTED_SUBDOMAINS} subdomains per agent"),
            ));
        }
        let subdomains = req
            .requested_subdomains
            .iter()
            .map(|s| Subdomain::parse(s, "requested_subdomains", &self.state.config))
            .collect::<ApiResult<Vec<_>>>()?;
        // Not rate-limited per peer: the peer is the edge, relaying many agents.
        let agent = self.state.auth.verify(req.agent_token.trim(), None).await?;
        if agent.kind != TokenKind::Agent {
            return Err(ApiError::Unauthenticated(
                "this is not an agent token; create one with `burrow token create --kind agent`"
                    .into(),
            ));
        }
        let team_id = agent
            .team_id
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("agent token without team")))?;
        let mut conn = self.state.pool.acquire().await?;
        let team_name: String = sqlx::query_scalar("SELECT name FROM teams WHERE id = $1")
            .bind(team_id)
            .fetch_one(&mut *conn)
            .await?;
        let names: Vec<String> = subdomains.iter().map(|s| s.as_str().to_owned()).collect();
        let reserved: Vec<(String, Uuid, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT subdomain, team_id, policy FROM reservations WHERE subdomain = ANY($1)",
        )
        .bind(&names)
        .fetch_all(&mut *conn)
        .await?;
        let mut allowed = Vec::with_capacity(subdomains.len());
        for name in &subdomains {
            if !scopes_allow(&agent.scopes, name.as_str()) {
                return Err(ApiError::PermissionDenied(format!(
                    "this agent token may not bind {:?}; its scope allows only {}",
                    name.as_str(),
                    agent.scopes.join(", ")
                )));
            }
            let holder = reserved.iter().find(|(s, _, _)| s == name.as_str());
            match holder {
                Some((_, t, _)) if *t != team_id => {
                    return Err(ApiError::PermissionDenied(format!(
                        "subdomain {:?} is reserved by another team",
                        name.as_str()
                    )))
                }
                holder => allowed.push(v1::AllowedSubdomain {
                    subdomain: name.as_str().to_owned(),
                    reserved: holder.is_some(),
                    // With the hashes: the edge verifies visitors against them.
                    pinned_policy: match holder {
                        Some((_, _, stored)) => policy::decode(stored.as_deref())?,
                        None => None,
                    },
                }),
            }
        }
        let mut expires = Utc::now()
            + chrono::Duration::from_std(self.state.config.authorization_ttl)
                .unwrap_or(chrono::Duration::minutes(10));
        if let Some(token_expiry) = agent.expires_at {
            expires = expires.min(token_expiry);
        }
        let limits = limits::overrides(&mut conn, team_id)
            .await?
            .effective(&self.state.config.tunnel_limits);
        Ok(v1::AuthorizeAgentResponse {
            token_id: agent.token_id,
            team_id: team_id.to_string(),
            team_name,
            allowed,
            limits: Some(limits),
            expires_at: Some(store::ts(expires)),
            scopes: agent.scopes,
        })
    }

    async fn open(
        &self,
        request: Request<v1::OpenTunnelSessionRequest>,
    ) -> ApiResult<v1::TunnelSession> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_edge()?;
        let req = request.into_inner();
        let edge_id = parse_uuid("edge_id", &req.edge_id)?;
        self.own_edge(&caller, edge_id).await?;
        let team_id = parse_uuid("team_id", &req.team_id)?;
        let subdomain = Subdomain::parse(&req.subdomain, "subdomain", &self.state.config)?;
        let mut tx = self.state.pool.begin().await?;
        let template: Option<String> =
            sqlx::query_scalar("SELECT public_url_template FROM edges WHERE id = $1")
                .bind(edge_id)
                .fetch_optional(&mut *tx)
                .await?;
        let template = template.ok_or_else(|| {
            ApiError::NotFound(format!(
                "edge {edge_id} is not registered; call RegisterEdge"
            ))
        })?;
        #[derive(sqlx::FromRow)]
        struct TokenCheck {
            team_id: Option<Uuid>,
            scopes: Vec<String>,
            revoked_at: Option<DateTime<Utc>>,
            expires_at: Option<DateTime<Utc>>,
        }
        let token = sqlx::query_as::<_, TokenCheck>(
            "SELECT team_id, scopes, revoked_at, expires_at FROM api_tokens
             WHERE id = $1 AND kind = 'agent'",
        )
        .bind(req.token_id.trim())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ApiError::invalid("token_id", "no agent token has this id"))?;
        if token.revoked_at.is_some() || token.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(ApiError::Unauthenticated(
                "the agent token was revoked or has expired".into(),
            ));
        }
        if token.team_id != Some(team_id) {
            return Err(ApiError::invalid(
                "team_id",
                "the agent token belongs to another team",
            ));
        }
        if !scopes_allow(&token.scopes, subdomain.as_str()) {
            return Err(ApiError::PermissionDenied(format!(
                "this agent token may not bind {:?}; its scope allows only {}",
                subdomain.as_str(),
                token.scopes.join(", ")
            )));
        }
        // Serialize claims of one name.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tunnel:' || $1)::bigint)")
            .bind(subdomain.as_str())
            .execute(&mut *tx)
            .await?;
        let holder: Option<Uuid> =
            sqlx::query_scalar("SELECT team_id FROM reservations WHERE subdomain = $1")
                .bind(subdomain.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        if holder.is_some_and(|t| t != team_id) {
            return Err(ApiError::PermissionDenied(format!(
                "subdomain {:?} is reserved by another team",
                subdomain.as_str()
            )));
        }
        #[derive(sqlx::FromRow)]
        struct Live {
            id: Uuid,
            team_id: Uuid,
            last_heartbeat_at: DateTime<Utc>,
        }
        let live = sqlx::query_as::<_, Live>(
            "SELECT s.id, s.team_id, e.last_heartbeat_at FROM tunnel_sessions s
             JOIN edges e ON e.id = s.edge_id
             WHERE s.subdomain = $1 AND s.ended_at IS NULL",
        )
        .bind(subdomain.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let in_use = || {
            ApiError::AlreadyExists(format!(
                "subdomain {:?} is in use by another team's tunnel",
                subdomain.as_str()
            ))
        };
        if let Some(live) = live {
            if live.team_id == team_id {
                // Same team: take over at once; the edge holding the old session drops it.
                end_session(&mut tx, live.id, live.team_id, subdomain.as_str()).await?;
            } else {
                let silence = self.state.config.heartbeat_interval * MISSED_HEARTBEATS;
                let dead_since = live.last_heartbeat_at
                    + chrono::Duration::from_std(silence).unwrap_or(chrono::Duration::seconds(30));
                if dead_since > Utc::now() {
                    return Err(in_use());
                }
                // Its edge went silent: end it as an unclean close at the edge's last sign.
                sqlx::query(
                    "UPDATE tunnel_sessions SET ended_at = $2,
                         grace_until = $2 + make_interval(secs => $3::double precision)
                     WHERE id = $1",
                )
                .bind(live.id)
                .bind(dead_since)
                .bind(self.state.config.reconnect_grace.as_secs_f64())
                .execute(&mut *tx)
                .await?;
                store::record_change(
                    &mut tx,
                    change::TUNNEL_ENDED,
                    json!({"session_id": live.id.to_string(), "team_id": live.team_id.to_string()}),
                )
                .await?;
            }
        }
        let held_until: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT max(grace_until) FROM tunnel_sessions
             WHERE subdomain = $1 AND team_id <> $2 AND grace_until > now()",
        )
        .bind(subdomain.as_str())
        .bind(team_id)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(until) = held_until {
            let left = (until - Utc::now()).num_seconds().max(1);
            return Err(ApiError::AlreadyExists(format!(
                "subdomain {:?} is held for another team's agent that just disconnected; it \
                 frees up in {left} s",
                subdomain.as_str()
            )));
        }
        sqlx::query(
            "UPDATE tunnel_sessions SET grace_until = NULL
             WHERE subdomain = $1 AND grace_until IS NOT NULL",
        )
        .bind(subdomain.as_str())
        .execute(&mut *tx)
        .await?;
        let public_url = template.replace("{sub}", subdomain.as_str());
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO tunnel_sessions (subdomain, team_id, edge_id, token_id, agent_instance,
                 agent_version, agent_addr, local_addr, public_url)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        )
        .bind(subdomain.as_str())
        .bind(team_id)
        .bind(edge_id)
        .bind(req.token_id.trim())
        .bind(&req.agent_instance)
        .bind(&req.agent_version)
        .bind(&req.agent_addr)
        .bind(&req.local_addr)
        .bind(&public_url)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => in_use(),
            None => e.into(),
        })?;
        store::record_change(
            &mut tx,
            change::TUNNEL_STARTED,
            json!({"session_id": id.to_string(), "team_id": team_id.to_string()}),
        )
        .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "tunnel.open",
            &format!("subdomain:{subdomain}"),
            json!({"session_id": id.to_string(), "team_id": team_id.to_string(),
                   "edge_id": edge_id.to_string()}),
        )
        .await?;
        let session = load_session(&mut tx, id)
            .await?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("session vanished after insert")))?;
        tx.commit().await?;
        Ok(session.to_proto())
    }

    async fn close(
        &self,
        request: Request<v1::CloseTunnelSessionRequest>,
    ) -> ApiResult<v1::CloseTunnelSessionResponse> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_edge()?;
        let req = request.into_inner();
        let id = parse_uuid("session_id", &req.session_id)?;
        let grace = if req.clean {
            0.0
        } else {
            self.state.config.reconnect_grace.as_secs_f64()
        };
        let mut tx = self.state.pool.begin().await?;
        let ended: Option<(Uuid, String)> = sqlx::query_as(
            "UPDATE tunnel_sessions SET ended_at = now(),
                 grace_until = CASE WHEN $2 THEN NULL
                     ELSE now() + make_interval(secs => $3::double precision) END
             WHERE id = $1 AND ended_at IS NULL
                 AND edge_id IN (SELECT id FROM edges WHERE token_id = $4)
             RETURNING team_id, subdomain",
        )
        .bind(id)
        .bind(req.clean)
        .bind(grace)
        .bind(&caller.token_id)
        .fetch_optional(&mut *tx)
        .await?;
        match ended {
            Some((team, subdomain)) => {
                store::record_change(
                    &mut tx,
                    change::TUNNEL_ENDED,
                    json!({"session_id": id.to_string(), "team_id": team.to_string()}),
                )
                .await?;
                store::audit(
                    &mut tx,
                    Some(&caller),
                    "tunnel.close",
                    &format!("subdomain:{subdomain}"),
                    json!({"session_id": id.to_string(), "clean": req.clean}),
                )
                .await?;
            }
            None => {
                let owner: Option<Option<String>> = sqlx::query_scalar(
                    "SELECT e.token_id FROM tunnel_sessions s
                     LEFT JOIN edges e ON e.id = s.edge_id WHERE s.id = $1",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                match owner {
                    None => {
                        return Err(ApiError::NotFound(format!(
                            "tunnel session {id} does not exist"
                        )))
                    }
                    Some(t) if t.as_deref() != Some(caller.token_id.as_str()) => {
                        return Err(ApiError::PermissionDenied(format!(
                            "tunnel session {id} belongs to another edge"
                        )))
                    }
                    Some(_) => {}
                }
                // Already ended (killed or taken over): closing again is fine.
            }
        }
        tx.commit().await?;
        Ok(v1::CloseTunnelSessionResponse {})
    }

    async fn report(
        &self,
        request: Request<v1::ReportTunnelStatsRequest>,
    ) -> ApiResult<v1::ReportTunnelStatsResponse> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_edge()?;
        let req = request.into_inner();
        if req.stats.len() > MAX_STATS_PER_REPORT {
            return Err(ApiError::invalid(
                "stats",
                format!("at most {MAX_STATS_PER_REPORT} entries per report"),
            ));
        }
        let edge_id = parse_uuid("edge_id", &req.edge_id)?;
        self.own_edge(&caller, edge_id).await?;
        // The last entry wins when a session appears twice in one report.
        // Per session: counters, connections open and lanes now.
        let mut reported: BTreeMap<Uuid, (Counters, i64, i32)> = BTreeMap::new();
        for s in &req.stats {
            let id = parse_uuid("stats.session_id", &s.session_id)?;
            reported.insert(
                id,
                (
                    Counters::from_report(s),
                    clamp_i64(s.connections_open),
                    i32::try_from(s.lanes).unwrap_or(i32::MAX),
                ),
            );
        }
        if reported.is_empty() {
            return Ok(v1::ReportTunnelStatsResponse {});
        }
        let ids: Vec<Uuid> = reported.keys().copied().collect();
        let mut tx = self.state.pool.begin().await?;
        // Lock the sessions (in id order, so concurrent reports cannot deadlock) and read the
        // counters stored by the previous report: usage grows by the difference.
        let previous: Vec<(Uuid, Uuid, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, team_id, connections_total, bytes_in, bytes_out, websocket_messages
             FROM tunnel_sessions WHERE id = ANY($1) AND edge_id = $2
             ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .bind(edge_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut growth: BTreeMap<Uuid, Counters> = BTreeMap::new();
        // Sessions of this edge that exist: (id, counters now, connections open and lanes now).
        let mut known = Vec::with_capacity(previous.len());
        for (id, team, connections, bytes_in, bytes_out, ws) in previous {
            let Some(&(now, open, lanes)) = reported.get(&id) else {
                continue;
            };
            known.push((id, now, open, lanes));
            let before = Counters {
                connections,
                bytes_in,
                bytes_out,
                websocket_messages: ws,
            };
            growth
                .entry(team)
                .or_default()
                .add(now.growth_since(&before));
        }
        let column =
            |f: fn(&Counters) -> i64| known.iter().map(|(_, c, _, _)| f(c)).collect::<Vec<_>>();
        let open: Vec<i64> = known.iter().map(|(_, _, open, _)| *open).collect();
        // An edge older than the lanes field reports 0: keep what the row holds then.
        let lanes: Vec<i32> = known.iter().map(|(_, _, _, lanes)| *lanes).collect();
        sqlx::query(
            "UPDATE tunnel_sessions s SET connections_total = u.total,
                 connections_open = u.open, bytes_in = u.bin, bytes_out = u.bout,
                 websocket_messages = u.ws,
                 lanes = CASE WHEN u.lanes > 0 THEN u.lanes ELSE s.lanes END
             FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::bigint[], $7::integer[]) AS u(id, total, open, bin, bout, ws, lanes)
             WHERE s.id = u.id",
        )
        .bind(known.iter().map(|(id, _, _, _)| *id).collect::<Vec<_>>())
        .bind(column(|c| c.connections))
        .bind(&open)
        .bind(column(|c| c.bytes_in))
        .bind(column(|c| c.bytes_out))
        .bind(column(|c| c.websocket_messages))
        .bind(&lanes)
        .execute(&mut *tx)
        .await?;
        growth.retain(|_, g| !g.is_zero());
        if !growth.is_empty() {
            let teams: Vec<Uuid> = growth.keys().copied().collect();
            let sum = |f: fn(&Counters) -> i64| growth.values().map(f).collect::<Vec<_>>();
            // One row per team (already summed), in team order; the day is the database's
            // UTC date, so replicas agree on where midnight is.
            sqlx::query(
                "INSERT INTO usage_daily AS d (team_id, day, bytes_in, bytes_out, connections,
                                               websocket_messages)
                 SELECT u.team, (now() AT TIME ZONE 'UTC')::date, u.bin, u.bout, u.conns, u.ws
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
                      AS u(team, bin, bout, conns, ws)
                 ON CONFLICT (team_id, day) DO UPDATE SET
                     bytes_in = d.bytes_in + EXCLUDED.bytes_in,
                     bytes_out = d.bytes_out + EXCLUDED.bytes_out,
                     connections = d.connections + EXCLUDED.connections,
                     websocket_messages = d.websocket_messages + EXCLUDED.websocket_messages",
            )
            .bind(&teams)
            .bind(sum(|c| c.bytes_in))
            .bind(sum(|c| c.bytes_out))
            .bind(sum(|c| c.connections))
            .bind(sum(|c| c.websocket_messages))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(v1::ReportTunnelStatsResponse {})
    }

    async fn watch_inner(&self, request: Request<v1::WatchRequest>) -> ApiResult<WatchStream> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_edge()?;
        let req = request.into_inner();
        if req.after_revision < 0 {
            return Err(ApiError::invalid("after_revision", "must not be negative"));
        }
        let current = current_revision(&self.state.pool).await?;
        let cursor = if req.after_revision > 0 {
            req.after_revision
        } else {
            current
        };
        let (tx, rx) = mpsc::channel(self.state.config.stream_buffer);
        let state = self.state.clone();
        tokio::spawn(async move {
            let _subscriber = state
                .config
                .metrics
                .subscribe(crate::hashing::Stream::Watch);
            let hello = v1::WatchEvent {
                revision: 0,
                event: Some(v1::watch_event::Event::Hello(v1::WatchHello {
                    current_revision: current,
                })),
            };
            if tx.send(Ok(hello)).await.is_err() {
                return;
            }
            if let Err(status) = watch_changes(state, cursor, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// The cumulative counters of one session, as stored and as reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    connections: i64,
    bytes_in: i64,
    bytes_out: i64,
    websocket_messages: i64,
}

impl Counters {
    fn from_report(s: &v1::TunnelStats) -> Self {
        Self {
            connections: clamp_i64(s.connections_total),
            bytes_in: clamp_i64(s.bytes_in),
            bytes_out: clamp_i64(s.bytes_out),
            websocket_messages: clamp_i64(s.websocket_messages),
        }
    }

    /// How far each counter grew since `before`. A counter that went backwards (the edge
    /// restarted its count) adds nothing: usage never shrinks, and the new, lower value is
    /// the base for the next report.
    fn growth_since(&self, before: &Self) -> Self {
        let grew = |now: i64, then: i64| now.saturating_sub(then).max(0);
        Self {
            connections: grew(self.connections, before.connections),
            bytes_in: grew(self.bytes_in, before.bytes_in),
            bytes_out: grew(self.bytes_out, before.bytes_out),
            websocket_messages: grew(self.websocket_messages, before.websocket_messages),
        }
    }

    fn add(&mut self, other: Self) {
        self.connections = self.connections.saturating_add(other.connections);
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
        self.websocket_messages = self
            .websocket_messages
            .saturating_add(other.websocket_messages);
    }

    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// The edge-facing form of a change-log row, if edges care about its kind.
fn watch_event(row: &ChangeRow) -> Option<v1::WatchEvent> {
    use v1::watch_event::Event;
    let event = match row.kind.as_str() {
        change::TOKEN_REVOKED => Event::TokenRevoked(v1::TokenRevoked {
            token_id: row.field("token_id"),
        }),
        change::RESERVATION_CHANGED => Event::ReservationChanged(v1::ReservationChanged {
            subdomain: row.field("subdomain"),
            team_id: row.field("team_id"),
        }),
        change::TUNNEL_KILLED => Event::TunnelKilled(v1::TunnelKilled {
            session_id: row.field("session_id"),
            subdomain: row.field("subdomain"),
        }),
        change::ACCOUNT_DISABLED => Event::AccountDisabled(v1::AccountDisabled {
            account_id: row.field("account_id"),
        }),
        _ => return None,
    };
    Some(v1::WatchEvent {
        revision: row.revision,
        event: Some(event),
    })
}

/// A `ReservationPolicyChanged` carrying the reservation's policy as it is now (with hashes).
/// Reading it now rather than copying it into the change log means a replaced or cleared
/// policy leaves no hash behind, and an edge replaying old rows ends at the current policy.
/// Absent when the reservation no longer exists for that team (released or transferred).
async fn policy_event(state: &State, row: &ChangeRow) -> ApiResult<v1::WatchEvent> {
    let subdomain = row.field("subdomain");
    let team_id = row.field("team_id");
    let stored: Option<Option<Vec<u8>>> = match Uuid::parse_str(&team_id) {
        Ok(team) => {
            sqlx::query_scalar(
                "SELECT policy FROM reservations WHERE subdomain = $1 AND team_id = $2",
            )
            .bind(&subdomain)
            .bind(team)
            .fetch_optional(&state.pool)
            .await?
        }
        Err(_) => None,
    };
    Ok(v1::WatchEvent {
        revision: row.revision,
        event: Some(v1::watch_event::Event::ReservationPolicyChanged(
            v1::ReservationPolicyChanged {
                subdomain,
                team_id,
                policy: policy::decode(stored.flatten().as_deref())?,
            },
        )),
    })
}

/// A `TeamLimitsChanged` with the team's effective limits under this replica's defaults.
fn limits_event(state: &State, row: &ChangeRow) -> v1::WatchEvent {
    let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap_or_default();
    let limits = Overrides::from_json(&payload).effective(&state.config.tunnel_limits);
    v1::WatchEvent {
        revision: row.revision,
        event: Some(v1::watch_event::Event::TeamLimitsChanged(
            v1::TeamLimitsChanged {
                team_id: row.field("team_id"),
                limits: Some(limits),
            },
        )),
    }
}

/// Streams change-log rows after `cursor` until the edge leaves or the server shuts down.
async fn watch_changes(
    state: State,
    mut cursor: i64,
    tx: &mpsc::Sender<Result<v1::WatchEvent, Status>>,
) -> Result<(), Status> {
    let mut latest = state.latest_revision.clone();
    loop {
        let rows = changes_after(&state.pool, cursor).await?;
        let full = rows.len() as i64 >= PAGE;
        for row in &rows {
            cursor = row.revision;
            let event = match row.kind.as_str() {
                change::RESERVATION_POLICY_CHANGED => Some(policy_event(&state, row).await?),
                change::TEAM_LIMITS_CHANGED => Some(limits_event(&state, row)),
                _ => watch_event(row),
            };
            if let Some(event) = event {
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
impl EdgeService for EdgeApi {
    async fn register_edge(
        &self,
        request: Request<v1::RegisterEdgeRequest>,
    ) -> Result<Response<v1::RegisterEdgeResponse>, Status> {
        Ok(Response::new(self.register(request).await?))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        Ok(Response::new(self.heartbeat_inner(request).await?))
    }

    async fn authorize_agent(
        &self,
        request: Request<v1::AuthorizeAgentRequest>,
    ) -> Result<Response<v1::AuthorizeAgentResponse>, Status> {
        Ok(Response::new(self.authorize(request).await?))
    }

    async fn open_tunnel_session(
        &self,
        request: Request<v1::OpenTunnelSessionRequest>,
    ) -> Result<Response<v1::TunnelSession>, Status> {
        Ok(Response::new(self.open(request).await?))
    }

    async fn close_tunnel_session(
        &self,
        request: Request<v1::CloseTunnelSessionRequest>,
    ) -> Result<Response<v1::CloseTunnelSessionResponse>, Status> {
        Ok(Response::new(self.close(request).await?))
    }

    async fn report_tunnel_stats(
        &self,
        request: Request<v1::ReportTunnelStatsRequest>,
    ) -> Result<Response<v1::ReportTunnelStatsResponse>, Status> {
        Ok(Response::new(self.report(request).await?))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(self.watch_inner(request).await?))
    }
}
