//! `ReservationService`: subdomains reserved for a team. Uniqueness is the database's unique
//! constraint; the losers of a race get ALREADY_EXISTS naming the subdomain.

use burrow_proto::v1::{self, reservation_service_server::ReservationService};
use chrono::{DateTime, Utc};
use serde_json::json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::Caller;
use crate::domain::Subdomain;
use crate::error::{unique_violation, ApiError, ApiResult};
use crate::store::{self, change};
use crate::State;

/// The `ReservationService` implementation.
pub struct ReservationApi {
    state: State,
}

/// The tonic service.
pub(crate) fn server(
    state: State,
) -> v1::reservation_service_server::ReservationServiceServer<ReservationApi> {
    v1::reservation_service_server::ReservationServiceServer::new(ReservationApi { state })
}

#[derive(sqlx::FromRow)]
struct ReservationRow {
    id: Uuid,
    subdomain: String,
    team_id: Uuid,
    team: String,
    created_by: Option<String>,
    created_at: DateTime<Utc>,
}

const RESERVATION_SELECT: &str = "SELECT r.id, r.subdomain, r.team_id, t.name AS team,
        a.email AS created_by, r.created_at
     FROM reservations r JOIN teams t ON t.id = r.team_id
     LEFT JOIN accounts a ON a.id = r.created_by";

impl ReservationRow {
    fn to_proto(&self) -> v1::Reservation {
        v1::Reservation {
            id: self.id.to_string(),
            subdomain: self.subdomain.clone(),
            team: self.team.clone(),
            created_by: self.created_by.clone().unwrap_or_default(),
            created_at: Some(store::ts(self.created_at)),
            policy: None,
        }
    }
}

/// Finds a reservation the caller may manage (owner/admin of its team, or platform admin).
async fn manageable(
    conn: &mut sqlx::PgConnection,
    caller: &Caller,
    subdomain: &Subdomain,
) -> ApiResult<ReservationRow> {
    let me = caller.require_api()?;
    let not_found = || ApiError::NotFound(format!("no reservation of {subdomain:?} in your teams"));
    let row = sqlx::query_as::<_, ReservationRow>(&format!(
        "{RESERVATION_SELECT} WHERE r.subdomain = $1 FOR UPDATE OF r"
    ))
    .bind(subdomain.as_str())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(not_found)?;
    if caller.platform_admin {
        return Ok(row);
    }
    match store::role_in(conn, row.team_id, me).await? {
        Some(role) if role.can_manage() => Ok(row),
        Some(_) => Err(ApiError::PermissionDenied(format!(
            "only owners and admins of team {:?} may change its reservations",
            row.team
        ))),
        None => Err(not_found()),
    }
}

impl ReservationApi {
    async fn reserve_inner(
        &self,
        request: Request<v1::ReserveRequest>,
    ) -> ApiResult<v1::Reservation> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let subdomain = Subdomain::parse(&req.subdomain, "subdomain", &self.state.config)?;
        let mut tx = self.state.pool.begin().await?;
        let (team, _) = store::team_for(&mut tx, &caller, "team", &req.team, true).await?;
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO reservations (subdomain, team_id, created_by) VALUES ($1, $2, $3)
             RETURNING id",
        )
        .bind(subdomain.as_str())
        .bind(team.id)
        .bind(me)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => ApiError::AlreadyExists(format!(
                "subdomain {:?} is already reserved",
                subdomain.as_str()
            )),
            None => e.into(),
        })?;
        store::audit(
            &mut tx,
            Some(&caller),
            "reservation.reserve",
            &format!("subdomain:{subdomain}"),
            json!({"team_id": team.id.to_string()}),
        )
        .await?;
        store::record_change(
            &mut tx,
            change::RESERVATION_CHANGED,
            json!({"subdomain": subdomain.as_str(), "team_id": team.id.to_string()}),
        )
        .await?;
        let row =
            sqlx::query_as::<_, ReservationRow>(&format!("{RESERVATION_SELECT} WHERE r.id = $1"))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(row.to_proto())
    }

    async fn list(
        &self,
        request: Request<v1::ListReservationsRequest>,
    ) -> ApiResult<v1::ListReservationsResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let rows = if !req.team.trim().is_empty() {
            let mut conn = self.state.pool.acquire().await?;
            let (team, _) = store::team_for(&mut conn, &caller, "team", &req.team, false).await?;
            sqlx::query_as::<_, ReservationRow>(&format!(
                "{RESERVATION_SELECT} WHERE r.team_id = $1 ORDER BY r.subdomain"
            ))
            .bind(team.id)
            .fetch_all(&mut *conn)
            .await?
        } else if caller.platform_admin {
            sqlx::query_as::<_, ReservationRow>(&format!(
                "{RESERVATION_SELECT} ORDER BY r.subdomain"
            ))
            .fetch_all(&self.state.pool)
            .await?
        } else {
            sqlx::query_as::<_, ReservationRow>(&format!(
                "{RESERVATION_SELECT} WHERE r.team_id IN (
                     SELECT team_id FROM memberships WHERE account_id = $1)
                 ORDER BY r.subdomain"
            ))
            .bind(me)
            .fetch_all(&self.state.pool)
            .await?
        };
        Ok(v1::ListReservationsResponse {
            reservations: rows.iter().map(ReservationRow::to_proto).collect(),
        })
    }

    async fn release_inner(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> ApiResult<v1::ReleaseResponse> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_api()?;
        let req = request.into_inner();
        let subdomain = Subdomain::parse(&req.subdomain, "subdomain", &self.state.config)?;
        let mut tx = self.state.pool.begin().await?;
        let row = manageable(&mut tx, &caller, &subdomain).await?;
        sqlx::query("DELETE FROM reservations WHERE id = $1")
            .bind(row.id)
            .execute(&mut *tx)
            .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "reservation.release",
            &format!("subdomain:{subdomain}"),
            json!({"team_id": row.team_id.to_string()}),
        )
        .await?;
        store::record_change(
            &mut tx,
            change::RESERVATION_CHANGED,
            json!({"subdomain": subdomain.as_str(), "team_id": ""}),
        )
        .await?;
        tx.commit().await?;
        Ok(v1::ReleaseResponse {})
    }

    async fn transfer_inner(
        &self,
        request: Request<v1::TransferRequest>,
    ) -> ApiResult<v1::Reservation> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_api()?;
        let req = request.into_inner();
        let subdomain = Subdomain::parse(&req.subdomain, "subdomain", &self.state.config)?;
        let mut tx = self.state.pool.begin().await?;
        let row = manageable(&mut tx, &caller, &subdomain).await?;
        let (to, _) = store::team_for(&mut tx, &caller, "to_team", &req.to_team, true).await?;
        sqlx::query("UPDATE reservations SET team_id = $2 WHERE id = $1")
            .bind(row.id)
            .bind(to.id)
            .execute(&mut *tx)
            .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "reservation.transfer",
            &format!("subdomain:{subdomain}"),
            json!({"from_team_id": row.team_id.to_string(), "to_team_id": to.id.to_string()}),
        )
        .await?;
        store::record_change(
            &mut tx,
            change::RESERVATION_CHANGED,
            json!({"subdomain": subdomain.as_str(), "team_id": to.id.to_string()}),
        )
        .await?;
        let row =
            sqlx::query_as::<_, ReservationRow>(&format!("{RESERVATION_SELECT} WHERE r.id = $1"))
                .bind(row.id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(row.to_proto())
    }
}

#[tonic::async_trait]
impl ReservationService for ReservationApi {
    async fn set_reservation_policy(
        &self,
        _request: Request<v1::SetReservationPolicyRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        Err(Status::unimplemented(
            "reservation policies are not available yet",
        ))
    }

    async fn reserve(
        &self,
        request: Request<v1::ReserveRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        Ok(Response::new(self.reserve_inner(request).await?))
    }

    async fn list_reservations(
        &self,
        request: Request<v1::ListReservationsRequest>,
    ) -> Result<Response<v1::ListReservationsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn release(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        Ok(Response::new(self.release_inner(request).await?))
    }

    async fn transfer(
        &self,
        request: Request<v1::TransferRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        Ok(Response::new(self.transfer_inner(request).await?))
    }
}
