//! `TokenService`: API, agent and edge tokens. Secrets leave the server once, in the answer
//! to CreateToken or RotateToken; only argon2id hashes are stored.

use burrow_proto::v1::{self, token_service_server::TokenService};
use chrono::{DateTime, Utc};
use serde_json::json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::Caller;
use crate::domain::{parse_name, ScopePattern, MAX_SCOPES};
use crate::error::{ApiError, ApiResult};
use crate::store::{self, change};
use crate::token::{prefix, TokenKind, TokenText};
use crate::State;

/// Longest lifetime a token may be given (ten years); bounds date arithmetic.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// The `TokenService` implementation.
pub struct TokenApi {
    state: State,
}

/// The tonic service.
pub(crate) fn server(state: State) -> v1::token_service_server::TokenServiceServer<TokenApi> {
    v1::token_service_server::TokenServiceServer::new(TokenApi { state })
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: String,
    kind: String,
    name: String,
    team_id: Option<Uuid>,
    team: Option<String>,
    created_by: Option<Uuid>,
    creator_email: Option<String>,
    scopes: Vec<String>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

const TOKEN_SELECT: &str = "SELECT t.id, t.kind, t.name, t.team_id, tm.name AS team, t.created_by,
        a.email AS creator_email, t.scopes, t.created_at, t.expires_at, t.last_used_at,
        t.revoked_at
     FROM api_tokens t LEFT JOIN teams tm ON tm.id = t.team_id
     LEFT JOIN accounts a ON a.id = t.created_by";

impl TokenRow {
    fn to_proto(&self) -> v1::Token {
        let kind = TokenKind::parse(&self.kind).unwrap_or(TokenKind::Api);
        v1::Token {
            id: self.id.clone(),
            kind: kind.to_proto() as i32,
            name: self.name.clone(),
            team: self.team.clone().unwrap_or_default(),
            created_by: self.creator_email.clone().unwrap_or_default(),
            scopes: self.scopes.clone(),
            prefix: prefix(kind, &self.id),
            created_at: Some(store::ts(self.created_at)),
            expires_at: store::ts_opt(self.expires_at),
            last_used_at: store::ts_opt(self.last_used_at),
            revoked_at: store::ts_opt(self.revoked_at),
        }
    }
}

async fn load(conn: &mut sqlx::PgConnection, id: &str) -> ApiResult<Option<TokenRow>> {
    Ok(
        sqlx::query_as::<_, TokenRow>(&format!("{TOKEN_SELECT} WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Finds a token the caller may manage (its creator, an owner/admin of its team, or a platform
/// admin); NOT_FOUND otherwise, so other teams' token ids are not confirmed.
async fn manageable(
    conn: &mut sqlx::PgConnection,
    caller: &Caller,
    id: &str,
) -> ApiResult<TokenRow> {
    let me = caller.require_api()?;
    let id = id.trim();
    if id.is_empty() {
        return Err(ApiError::invalid("id", "a token id is required"));
    }
    let not_found = || ApiError::NotFound(format!("token {id:?} does not exist"));
    let row = load(conn, id).await?.ok_or_else(not_found)?;
    if caller.platform_admin || row.created_by == Some(me) {
        return Ok(row);
    }
    if let Some(team) = row.team_id {
        if let Some(role) = store::role_in(conn, team, me).await? {
            if role.can_manage() {
                return Ok(row);
            }
            return Err(ApiError::PermissionDenied(format!(
                "only the token's creator or an owner/admin of team {:?} may do this",
                row.team.clone().unwrap_or_default()
            )));
        }
    }
    Err(not_found())
}

impl TokenApi {
    async fn create(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> ApiResult<v1::CreateTokenResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let kind = TokenKind::from_proto(req.kind)
            .ok_or_else(|| ApiError::invalid("kind", "choose a token kind: agent, api or edge"))?;
        let name = parse_name(&req.name, "name", true)?;
        if req.expires_in_seconds > MAX_TOKEN_LIFETIME_SECS {
            return Err(ApiError::invalid(
                "expires_in_seconds",
                format!("a token may live at most {MAX_TOKEN_LIFETIME_SECS} seconds"),
            ));
        }
        if req.scopes.len() > MAX_SCOPES {
            return Err(ApiError::invalid(
                "scopes",
                format!("at most {MAX_SCOPES} scope patterns"),
            ));
        }
        let scopes = req
            .scopes
            .iter()
            .map(|s| ScopePattern::parse(s, "scopes").map(|p| p.as_str().to_owned()))
            .collect::<ApiResult<Vec<_>>>()?;
        if kind != TokenKind::Agent && !scopes.is_empty() {
            return Err(ApiError::invalid("scopes", "only agent tokens have scopes"));
        }
        let mut tx = self.state.pool.begin().await?;
        let team = match kind {
            TokenKind::Agent => {
                if req.team.trim().is_empty() {
                    return Err(ApiError::invalid(
                        "team",
                        "agent tokens belong to a team; name it",
                    ));
                }
                Some(
                    store::team_for(&mut tx, &caller, "team", &req.team, false)
                        .await?
                        .0,
                )
            }
            TokenKind::Api | TokenKind::Edge => {
                if !req.team.trim().is_empty() {
                    return Err(ApiError::invalid(
                        "team",
                        "only agent tokens belong to a team; leave it empty",
                    ));
                }
                if kind == TokenKind::Edge && !caller.platform_admin {
                    return Err(ApiError::PermissionDenied(
                        "only platform admins may create edge tokens".into(),
                    ));
                }
                None
            }
        };
        let token = TokenText::generate(kind);
        let hash = self.state.hasher.hash(token.secret().to_owned()).await?;
        let expires_at = (req.expires_in_seconds > 0)
            .then(|| Utc::now() + chrono::Duration::seconds(req.expires_in_seconds as i64));
        sqlx::query(
            "INSERT INTO api_tokens (id, kind, team_id, created_by, name, secret_hash, scopes,
                                     expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(token.id())
        .bind(kind.as_str())
        .bind(team.as_ref().map(|t| t.id))
        .bind(me)
        .bind(&name)
        .bind(hash)
        .bind(&scopes)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "token.create",
            &format!("token:{}", token.id()),
            json!({"kind": kind.as_str(), "name": name, "scopes": scopes}),
        )
        .await?;
        let row = load(&mut tx, token.id())
            .await?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("token vanished after insert")))?;
        tx.commit().await?;
        Ok(v1::CreateTokenResponse {
            token: Some(row.to_proto()),
            secret: token.expose(),
        })
    }

    async fn list(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> ApiResult<v1::ListTokensResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let mut conn = self.state.pool.acquire().await?;
        let active =
            "($2 OR (t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())))";
        let rows = if !req.team.trim().is_empty() {
            let (team, role) =
                store::team_for(&mut conn, &caller, "team", &req.team, false).await?;
            let all = caller.platform_admin || role.is_some_and(|r| r.can_manage());
            sqlx::query_as::<_, TokenRow>(&format!(
                "{TOKEN_SELECT} WHERE t.team_id = $1 AND {active} AND ($3 OR t.created_by = $4)
                 ORDER BY t.created_at"
            ))
            .bind(team.id)
            .bind(req.include_inactive)
            .bind(all)
            .bind(me)
            .fetch_all(&mut *conn)
            .await?
        } else if caller.platform_admin {
            sqlx::query_as::<_, TokenRow>(&format!(
                "{TOKEN_SELECT} WHERE $1::uuid IS NOT NULL AND {active} ORDER BY t.created_at"
            ))
            .bind(me)
            .bind(req.include_inactive)
            .fetch_all(&mut *conn)
            .await?
        } else {
            sqlx::query_as::<_, TokenRow>(&format!(
                "{TOKEN_SELECT} WHERE (t.created_by = $1 OR t.team_id IN (
                     SELECT team_id FROM memberships
                     WHERE account_id = $1 AND role IN ('owner', 'admin')))
                   AND {active}
                 ORDER BY t.created_at"
            ))
            .bind(me)
            .bind(req.include_inactive)
            .fetch_all(&mut *conn)
            .await?
        };
        Ok(v1::ListTokensResponse {
            tokens: rows.iter().map(TokenRow::to_proto).collect(),
        })
    }

    async fn revoke(&self, request: Request<v1::RevokeTokenRequest>) -> ApiResult<v1::Token> {
        let caller = super::caller(&self.state, &request).await?;
        let req = request.into_inner();
        let mut tx = self.state.pool.begin().await?;
        let row = manageable(&mut tx, &caller, &req.id).await?;
        if row.revoked_at.is_none() {
            sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1")
                .bind(&row.id)
                .execute(&mut *tx)
                .await?;
            store::audit(
                &mut tx,
                Some(&caller),
                "token.revoke",
                &format!("token:{}", row.id),
                json!({}),
            )
            .await?;
            store::record_change(&mut tx, change::TOKEN_REVOKED, json!({"token_id": row.id}))
                .await?;
        }
        let row = load(&mut tx, &row.id)
            .await?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("token vanished")))?;
        tx.commit().await?;
        self.state.auth.forget_token(&row.id);
        Ok(row.to_proto())
    }

    async fn rotate(
        &self,
        request: Request<v1::RotateTokenRequest>,
    ) -> ApiResult<v1::CreateTokenResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let req = request.into_inner();
        let max = self.state.config.max_rotation_overlap.as_secs();
        if req.overlap_seconds > max {
            return Err(ApiError::invalid(
                "overlap_seconds",
                format!("the old secret may keep working at most {max} seconds"),
            ));
        }
        let mut conn = self.state.pool.acquire().await?;
        let row = manageable(&mut conn, &caller, &req.id).await?;
        drop(conn);
        if row.revoked_at.is_some() {
            return Err(ApiError::FailedPrecondition(format!(
                "token {:?} is revoked; create a new one instead",
                row.id
            )));
        }
        let kind = TokenKind::parse(&row.kind)
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("unknown token kind in database")))?;
        let token = TokenText::with_new_secret(kind, &row.id);
        let hash = self.state.hasher.hash(token.secret().to_owned()).await?;
        let mut tx = self.state.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE api_tokens SET
                 previous_hash = CASE WHEN $3 > 0 THEN secret_hash END,
                 previous_expires_at = CASE WHEN $3 > 0
                     THEN now() + make_interval(secs => $3::double precision) END,
                 secret_hash = $2
             WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(&row.id)
        .bind(hash)
        .bind(req.overlap_seconds as i64)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "token {:?} was revoked meanwhile",
                row.id
            )));
        }
        store::audit(
            &mut tx,
            Some(&caller),
            "token.rotate",
            &format!("token:{}", row.id),
            json!({"overlap_seconds": req.overlap_seconds}),
        )
        .await?;
        store::record_change(&mut tx, change::TOKEN_ROTATED, json!({"token_id": row.id})).await?;
        let row = load(&mut tx, &row.id)
            .await?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("token vanished")))?;
        tx.commit().await?;
        self.state.auth.forget_token(&row.id);
        Ok(v1::CreateTokenResponse {
            token: Some(row.to_proto()),
            secret: token.expose(),
        })
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::Token>, Status> {
        Ok(Response::new(self.revoke(request).await?))
    }

    async fn rotate_token(
        &self,
        request: Request<v1::RotateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        Ok(Response::new(self.rotate(request).await?))
    }
}
