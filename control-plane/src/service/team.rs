//! `TeamService`: teams, their members, and the tunnel limits their tunnels run under.

use burrow_proto::v1::{self, team_service_server::TeamService};
use chrono::{DateTime, Utc};
use serde_json::json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{parse_name, Role, TeamName};
use crate::error::{unique_violation, ApiError, ApiResult};
use crate::limits::{self, Overrides};
use crate::store::{self, change, TeamRow, Tx};
use crate::State;

/// The `TeamService` implementation.
pub struct TeamApi {
    state: State,
}

/// The tonic service.
pub(crate) fn server(state: State) -> v1::team_service_server::TeamServiceServer<TeamApi> {
    v1::team_service_server::TeamServiceServer::new(TeamApi { state })
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    account_id: Uuid,
    email: String,
    display_name: String,
    role: String,
    joined_at: DateTime<Utc>,
}

impl MemberRow {
    fn to_proto(&self) -> v1::Member {
        v1::Member {
            account_id: self.account_id.to_string(),
            email: self.email.clone(),
            display_name: self.display_name.clone(),
            role: Role::from_db(&self.role).to_proto() as i32,
            joined_at: Some(store::ts(self.joined_at)),
        }
    }
}

const MEMBER_SELECT: &str = "SELECT m.account_id, a.email, a.display_name, m.role, m.joined_at
     FROM memberships m JOIN accounts a ON a.id = m.account_id";

fn team_proto(
    team: &TeamRow,
    role: Option<Role>,
    members: Vec<v1::Member>,
    tunnel_limits: v1::TunnelLimits,
) -> v1::Team {
    v1::Team {
        id: team.id.to_string(),
        name: team.name.clone(),
        display_name: team.display_name.clone(),
        created_at: Some(store::ts(team.created_at)),
        members,
        my_role: role.map_or(v1::Role::Unspecified, Role::to_proto) as i32,
        tunnel_limits: Some(tunnel_limits),
    }
}

async fn member(tx: &mut Tx<'_>, team: Uuid, account: Uuid) -> ApiResult<v1::Member> {
    let row = sqlx::query_as::<_, MemberRow>(&format!(
        "{MEMBER_SELECT} WHERE m.team_id = $1 AND m.account_id = $2"
    ))
    .bind(team)
    .bind(account)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.to_proto())
}

async fn owner_count(tx: &mut Tx<'_>, team: Uuid) -> ApiResult<i64> {
    // Lock the owners so two concurrent demotions cannot both see "another owner is left".
    let owners: Vec<Uuid> = sqlx::query_scalar(
        "SELECT account_id FROM memberships WHERE team_id = $1 AND role = 'owner' FOR UPDATE",
    )
    .bind(team)
    .fetch_all(&mut **tx)
    .await?;
    Ok(owners.len() as i64)
}

impl TeamApi {
    async fn create(&self, request: Request<v1::CreateTeamRequest>) -> ApiResult<v1::Team> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let name = TeamName::parse(&req.name, "name")?;
        let display_name = parse_name(&req.display_name, "display_name", false)?;
        let mut tx = self.state.pool.begin().await?;
        let team = sqlx::query_as::<_, TeamRow>(
            "INSERT INTO teams (name, display_name) VALUES ($1, $2)
             RETURNING id, name, display_name, created_at",
        )
        .bind(name.as_str())
        .bind(&display_name)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => {
                ApiError::AlreadyExists(format!("a team named {:?} already exists", name.as_str()))
            }
            None => e.into(),
        })?;
        sqlx::query("INSERT INTO memberships (team_id, account_id, role) VALUES ($1, $2, 'owner')")
            .bind(team.id)
            .bind(me)
            .execute(&mut *tx)
            .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "team.create",
            &format!("team:{}", team.id),
            json!({"name": team.name}),
        )
        .await?;
        let owner = member(&mut tx, team.id, me).await?;
        tx.commit().await?;
        let limits = Overrides::default().effective(&self.state.config.tunnel_limits);
        Ok(team_proto(&team, Some(Role::Owner), vec![owner], limits))
    }

    async fn get(&self, request: Request<v1::GetTeamRequest>) -> ApiResult<v1::Team> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_api()?;
        let req = request.into_inner();
        let mut conn = self.state.pool.acquire().await?;
        let (team, role) = store::team_for(&mut conn, &caller, "team", &req.team, false).await?;
        let members = sqlx::query_as::<_, MemberRow>(&format!(
            "{MEMBER_SELECT} WHERE m.team_id = $1 ORDER BY a.email"
        ))
        .bind(team.id)
        .fetch_all(&mut *conn)
        .await?;
        let limits = limits::overrides(&mut conn, team.id)
            .await?
            .effective(&self.state.config.tunnel_limits);
        Ok(team_proto(
            &team,
            role,
            members.iter().map(MemberRow::to_proto).collect(),
            limits,
        ))
    }

    async fn list(
        &self,
        request: Request<v1::ListTeamsRequest>,
    ) -> ApiResult<v1::ListTeamsResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        if req.all && !caller.platform_admin {
            return Err(ApiError::PermissionDenied(
                "only platform admins may list every team".into(),
            ));
        }
        #[derive(sqlx::FromRow)]
        struct Row {
            id: Uuid,
            name: String,
            display_name: String,
            created_at: DateTime<Utc>,
            role: Option<String>,
            #[sqlx(flatten)]
            limits: Overrides,
        }
        let join = if req.all { "LEFT JOIN" } else { "JOIN" };
        let sql = format!(
            "SELECT t.id, t.name, t.display_name, t.created_at, m.role, {}
             FROM teams t {join} memberships m ON m.team_id = t.id AND m.account_id = $1
             ORDER BY t.name",
            limits::COLUMNS
        );
        let defaults = &self.state.config.tunnel_limits;
        let rows = sqlx::query_as::<_, Row>(&sql)
            .bind(me)
            .fetch_all(&self.state.pool)
            .await?;
        Ok(v1::ListTeamsResponse {
            teams: rows
                .into_iter()
                .map(|r| {
                    let team = TeamRow {
                        id: r.id,
                        name: r.name,
                        display_name: r.display_name,
                        created_at: r.created_at,
                    };
                    team_proto(
                        &team,
                        r.role.as_deref().map(Role::from_db),
                        Vec::new(),
                        r.limits.effective(defaults),
                    )
                })
                .collect(),
        })
    }

    async fn add(&self, request: Request<v1::AddMemberRequest>) -> ApiResult<v1::Member> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_api()?;
        let req = request.into_inner();
        let role = Role::from_proto(req.role, Role::Member)?;
        let mut tx = self.state.pool.begin().await?;
        let (team, my_role) = store::team_for(&mut tx, &caller, "team", &req.team, true).await?;
        if role == Role::Owner && !caller.platform_admin && my_role != Some(Role::Owner) {
            return Err(ApiError::PermissionDenied(
                "only owners may add owners".into(),
            ));
        }
        let account = store::find_account(&mut tx, "account", &req.account).await?;
        sqlx::query("INSERT INTO memberships (team_id, account_id, role) VALUES ($1, $2, $3)")
            .bind(team.id)
            .bind(account.id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| match unique_violation(&e) {
                Some(_) => ApiError::AlreadyExists(format!(
                    "{} is already a member of team {:?}",
                    account.email, team.name
                )),
                None => e.into(),
            })?;
        store::audit(
            &mut tx,
            Some(&caller),
            "team.add_member",
            &format!("team:{}", team.id),
            json!({"account_id": account.id.to_string(), "role": role.as_str()}),
        )
        .await?;
        let added = member(&mut tx, team.id, account.id).await?;
        tx.commit().await?;
        Ok(added)
    }

    async fn remove(
        &self,
        request: Request<v1::RemoveMemberRequest>,
    ) -> ApiResult<v1::RemoveMemberResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let mut tx = self.state.pool.begin().await?;
        let (team, my_role) = store::team_for(&mut tx, &caller, "team", &req.team, false).await?;
        let account = store::find_account(&mut tx, "account", &req.account).await?;
        let their_role = store::role_in(&mut tx, team.id, account.id)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "{} is not a member of team {:?}",
                    account.email, team.name
                ))
            })?;
        let leaving_self = account.id == me;
        if !caller.platform_admin && !leaving_self {
            match my_role {
                Some(r) if r.can_manage() => {}
                _ => {
                    return Err(ApiError::PermissionDenied(format!(
                        "only owners and admins of team {:?} may remove members",
                        team.name
                    )))
                }
            }
            if their_role == Role::Owner && my_role != Some(Role::Owner) {
                return Err(ApiError::PermissionDenied(
                    "admins may not remove owners".into(),
                ));
            }
        }
        if their_role == Role::Owner && owner_count(&mut tx, team.id).await? <= 1 {
            return Err(ApiError::FailedPrecondition(format!(
                "{} is the last owner of team {:?}; make someone else owner first",
                account.email, team.name
            )));
        }
        sqlx::query("DELETE FROM memberships WHERE team_id = $1 AND account_id = $2")
            .bind(team.id)
            .bind(account.id)
            .execute(&mut *tx)
            .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "team.remove_member",
            &format!("team:{}", team.id),
            json!({"account_id": account.id.to_string()}),
        )
        .await?;
        tx.commit().await?;
        Ok(v1::RemoveMemberResponse {})
    }

    async fn set_role_inner(&self, request: Request<v1::SetRoleRequest>) -> ApiResult<v1::Member> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_api()?;
        let req = request.into_inner();
        if req.role == v1::Role::Unspecified as i32 {
            return Err(ApiError::invalid(
                "role",
                "a role is required (member, admin or owner)",
            ));
        }
        let role = Role::from_proto(req.role, Role::Member)?;
        let mut tx = self.state.pool.begin().await?;
        let (team, my_role) = store::team_for(&mut tx, &caller, "team", &req.team, true).await?;
        let account = store::find_account(&mut tx, "account", &req.account).await?;
        let their_role = store::role_in(&mut tx, team.id, account.id)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "{} is not a member of team {:?}",
                    account.email, team.name
                ))
            })?;
        let touches_owner = role == Role::Owner || their_role == Role::Owner;
        if touches_owner && !caller.platform_admin && my_role != Some(Role::Owner) {
            return Err(ApiError::PermissionDenied(
                "only owners may grant or take away the owner role".into(),
            ));
        }
        if their_role == Role::Owner
            && role != Role::Owner
            && owner_count(&mut tx, team.id).await? <= 1
        {
            return Err(ApiError::FailedPrecondition(format!(
                "{} is the last owner of team {:?}; make someone else owner first",
                account.email, team.name
            )));
        }
        sqlx::query("UPDATE memberships SET role = $3 WHERE team_id = $1 AND account_id = $2")
            .bind(team.id)
            .bind(account.id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "team.set_role",
            &format!("team:{}", team.id),
            json!({"account_id": account.id.to_string(), "role": role.as_str()}),
        )
        .await?;
        let updated = member(&mut tx, team.id, account.id).await?;
        tx.commit().await?;
        Ok(updated)
    }
}

impl TeamApi {
    async fn set_limits(
        &self,
        request: Request<v1::SetTunnelLimitsRequest>,
    ) -> ApiResult<v1::Team> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_platform_admin()?;
        let req = request.into_inner();
        let overrides = Overrides::from_request(&req.limits.unwrap_or_default())?;
        let mut tx = self.state.pool.begin().await?;
        let team = store::find_team(&mut tx, "team", &req.team).await?;
        sqlx::query(
            "UPDATE teams SET max_websocket_connections = $2, max_new_connections_per_second = $3,
                 max_bytes_per_second_per_connection = $4, max_tunnels_per_session = $5
             WHERE id = $1",
        )
        .bind(team.id)
        .bind(overrides.max_websocket_connections)
        .bind(overrides.max_new_connections_per_second)
        .bind(overrides.max_bytes_per_second_per_connection)
        .bind(overrides.max_tunnels_per_session)
        .execute(&mut *tx)
        .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "team.limits.set",
            &format!("team:{}", team.id),
            overrides.to_json(),
        )
        .await?;
        // The overrides, not the effective values: each replica streams them merged with the
        // defaults it runs with.
        let mut payload = overrides.to_json();
        payload["team_id"] = team.id.to_string().into();
        store::record_change(&mut tx, change::TEAM_LIMITS_CHANGED, payload).await?;
        let role = match caller.account_id {
            Some(account) => store::role_in(&mut tx, team.id, account).await?,
            None => None,
        };
        let members = sqlx::query_as::<_, MemberRow>(&format!(
            "{MEMBER_SELECT} WHERE m.team_id = $1 ORDER BY a.email"
        ))
        .bind(team.id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(team_proto(
            &team,
            role,
            members.iter().map(MemberRow::to_proto).collect(),
            overrides.effective(&self.state.config.tunnel_limits),
        ))
    }
}

#[tonic::async_trait]
impl TeamService for TeamApi {
    async fn set_tunnel_limits(
        &self,
        request: Request<v1::SetTunnelLimitsRequest>,
    ) -> Result<Response<v1::Team>, Status> {
        Ok(Response::new(self.set_limits(request).await?))
    }

    async fn create_team(
        &self,
        request: Request<v1::CreateTeamRequest>,
    ) -> Result<Response<v1::Team>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_team(
        &self,
        request: Request<v1::GetTeamRequest>,
    ) -> Result<Response<v1::Team>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn list_teams(
        &self,
        request: Request<v1::ListTeamsRequest>,
    ) -> Result<Response<v1::ListTeamsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn add_member(
        &self,
        request: Request<v1::AddMemberRequest>,
    ) -> Result<Response<v1::Member>, Status> {
        Ok(Response::new(self.add(request).await?))
    }

    async fn remove_member(
        &self,
        request: Request<v1::RemoveMemberRequest>,
    ) -> Result<Response<v1::RemoveMemberResponse>, Status> {
        Ok(Response::new(self.remove(request).await?))
    }

    async fn set_role(
        &self,
        request: Request<v1::SetRoleRequest>,
    ) -> Result<Response<v1::Member>, Status> {
        Ok(Response::new(self.set_role_inner(request).await?))
    }
}
