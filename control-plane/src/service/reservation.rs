//! `ReservationService`: subdomains reserved for a team. Uniqueness is the database's unique
//! constraint; the losers of a race get ALREADY_EXISTS naming the subdomain.
//!
//! A reservation may carry a pinned [`v1::TunnelPolicy`] (see [`crate::policy`]). It belongs
//! to the reservation, not to the name: releasing or transferring the reservation drops it.

use burrow_proto::v1::{self, reservation_service_server::ReservationService};
use chrono::{DateTime, Utc};
use serde_json::json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::Caller;
use crate::domain::Subdomain;
use crate::error::{unique_violation, ApiError, ApiResult};
use crate::policy;
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
    /// Encoded pinned policy, NULL when none.
    policy: Option<Vec<u8>>,
}

const RESERVATION_SELECT: &str = "SELECT r.id, r.subdomain, r.team_id, t.name AS team,
        a.email AS created_by, r.created_at, r.policy
     FROM reservations r JOIN teams t ON t.id = r.team_id
     LEFT JOIN accounts a ON a.id = r.created_by";

impl ReservationRow {
    /// The public form: the pinned policy without its password hashes.
    fn to_proto(&self) -> ApiResult<v1::Reservation> {
        let policy = policy::decode(self.policy.as_deref())?;
        Ok(v1::Reservation {
            id: self.id.to_string(),
            subdomain: self.subdomain.clone(),
            team: self.team.clone(),
            created_by: self.created_by.clone().unwrap_or_default(),
            created_at: Some(store::ts(self.created_at)),
            policy: policy.as_ref().map(policy::public_view),
        })
    }
}

/// The reservation `id` as the API shows it, read inside `tx`.
async fn fetch(tx: &mut store::Tx<'_>, id: Uuid) -> ApiResult<v1::Reservation> {
    let row = sqlx::query_as::<_, ReservationRow>(&format!("{RESERVATION_SELECT} WHERE r.id = $1"))
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
    row.to_proto()
}

/// Writes a change-log row of `kind` for `subdomain`, now held by `team` (empty: released).
async fn record(
    tx: &mut store::Tx<'_>,
    kind: &str,
    subdomain: &Subdomain,
    team: &str,
) -> ApiResult<()> {
    store::record_change(
        tx,
        kind,
        json!({"subdomain": subdomain.as_str(), "team_id": team}),
    )
    .await
    .map(|_| ())
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
        record(
            &mut tx,
            change::RESERVATION_CHANGED,
            &subdomain,
            &team.id.to_string(),
        )
        .await?;
        let shown = fetch(&mut tx, id).await?;
        tx.commit().await?;
        Ok(shown)
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
            reservations: rows
                .iter()
                .map(ReservationRow::to_proto)
                .collect::<ApiResult<_>>()?,
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
        record(&mut tx, change::RESERVATION_CHANGED, &subdomain, "").await?;
        if row.policy.is_some() {
            // The policy went with the reservation; live tunnels stop applying it.
            record(
                &mut tx,
                change::RESERVATION_POLICY_CHANGED,
                &subdomain,
                &row.team_id.to_string(),
            )
            .await?;
        }
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
        // The pinned policy was the old team's decision; the new team pins its own.
        sqlx::query("UPDATE reservations SET team_id = $2, policy = NULL WHERE id = $1")
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
        record(
            &mut tx,
            change::RESERVATION_CHANGED,
            &subdomain,
            &to.id.to_string(),
        )
        .await?;
        if row.policy.is_some() {
            record(
                &mut tx,
                change::RESERVATION_POLICY_CHANGED,
                &subdomain,
                &to.id.to_string(),
            )
            .await?;
        }
        let shown = fetch(&mut tx, row.id).await?;
        tx.commit().await?;
        Ok(shown)
    }

    async fn set_policy(
        &self,
        request: Request<v1::SetReservationPolicyRequest>,
    ) -> ApiResult<v1::Reservation> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_api()?;
        let req = request.into_inner();
        let subdomain = Subdomain::parse(&req.subdomain, "subdomain", &self.state.config)?;
        let new = req.policy.filter(|p| !policy::is_empty(p));
        if let Some(p) = &new {
            policy::validate(p)?;
        }
        let mut tx = self.state.pool.begin().await?;
        let row = manageable(&mut tx, &caller, &subdomain).await?;
        sqlx::query("UPDATE reservations SET policy = $2 WHERE id = $1")
            .bind(row.id)
            .bind(new.as_ref().map(policy::encode))
            .execute(&mut *tx)
            .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            if new.is_some() {
                "reservation.policy.set"
            } else {
                "reservation.policy.clear"
            },
            &format!("subdomain:{subdomain}"),
            json!({
                "team_id": row.team_id.to_string(),
                "policy": new.as_ref().map(policy::audit_summary),
            }),
        )
        .await?;
        // Edges read the policy (with its hashes) from the reservation when they stream the
        // change, so the change log never keeps a copy of a hash after it is replaced.
        record(
            &mut tx,
            change::RESERVATION_POLICY_CHANGED,
            &subdomain,
            &row.team_id.to_string(),
        )
        .await?;
        let shown = fetch(&mut tx, row.id).await?;
        tx.commit().await?;
        Ok(shown)
    }
}

#[tonic::async_trait]
impl ReservationService for ReservationApi {
    async fn set_reservation_policy(
        &self,
        request: Request<v1::SetReservationPolicyRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        Ok(Response::new(self.set_policy(request).await?))
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
