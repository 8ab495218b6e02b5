//! `AccountService`: people and robots who sign in.

use burrow_proto::v1::{self, account_service_server::AccountService};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::domain::{parse_name, parse_password, Email};
use crate::error::{unique_violation, ApiError, ApiResult};
use crate::store::{self, change, AccountRow, ACCOUNT_COLUMNS};
use crate::token::{TokenKind, TokenText};
use crate::State;

/// The `AccountService` implementation.
pub struct AccountApi {
    state: State,
}

/// The tonic service.
pub(crate) fn server(state: State) -> v1::account_service_server::AccountServiceServer<AccountApi> {
    v1::account_service_server::AccountServiceServer::new(AccountApi { state })
}

pub(crate) fn to_proto(row: &AccountRow) -> v1::Account {
    v1::Account {
        id: row.id.to_string(),
        email: row.email.clone(),
        display_name: row.display_name.clone(),
        platform_admin: row.platform_admin,
        disabled: row.disabled_at.is_some(),
        has_password: row.has_password,
        created_at: Some(store::ts(row.created_at)),
    }
}

impl AccountApi {
    async fn create(&self, request: Request<v1::CreateAccountRequest>) -> ApiResult<v1::Account> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_platform_admin()?;
        let req = request.into_inner();
        let email = Email::parse(&req.email, "email")?;
        let display_name = parse_name(&req.display_name, "display_name", false)?;
        let hash = if req.password.is_empty() {
            None
        } else {
            let password = parse_password(&req.password, "password")?;
            Some(self.state.hasher.hash(password.to_owned()).await?)
        };
        let mut tx = self.state.pool.begin().await?;
        let row = sqlx::query_as::<_, AccountRow>(&format!(
            "INSERT INTO accounts (email, display_name, password_hash, platform_admin)
             VALUES ($1, $2, $3, $4) RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(email.as_str())
        .bind(&display_name)
        .bind(hash)
        .bind(req.platform_admin)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => ApiError::AlreadyExists(format!(
                "an account with email {:?} already exists",
                email.as_str()
            )),
            None => e.into(),
        })?;
        store::audit(
            &mut tx,
            Some(&caller),
            "account.create",
            &format!("account:{}", row.id),
            json!({"email": row.email, "platform_admin": row.platform_admin}),
        )
        .await?;
        tx.commit().await?;
        Ok(to_proto(&row))
    }

    async fn get(&self, request: Request<v1::GetAccountRequest>) -> ApiResult<v1::Account> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let mut conn = self.state.pool.acquire().await?;
        let target = if req.account.trim().is_empty() {
            me.to_string()
        } else {
            req.account
        };
        let row = store::find_account(&mut conn, "account", &target).await?;
        if row.id != me
            && !caller.platform_admin
            && !store::share_a_team(&mut conn, me, row.id).await?
        {
            return Err(ApiError::NotFound(format!(
                "account {target:?} does not exist"
            )));
        }
        Ok(to_proto(&row))
    }

    async fn list(
        &self,
        request: Request<v1::ListAccountsRequest>,
    ) -> ApiResult<v1::ListAccountsResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let rows = if caller.platform_admin {
            sqlx::query_as::<_, AccountRow>(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY email"
            ))
            .fetch_all(&self.state.pool)
            .await?
        } else {
            sqlx::query_as::<_, AccountRow>(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 OR id IN (
                    SELECT y.account_id FROM memberships x JOIN memberships y
                    ON x.team_id = y.team_id WHERE x.account_id = $1)
                 ORDER BY email"
            ))
            .bind(me)
            .fetch_all(&self.state.pool)
            .await?
        };
        Ok(v1::ListAccountsResponse {
            accounts: rows.iter().map(to_proto).collect(),
        })
    }

    async fn disable(&self, request: Request<v1::DisableAccountRequest>) -> ApiResult<v1::Account> {
        let caller = super::caller(&self.state, &request).await?;
        caller.require_platform_admin()?;
        let req = request.into_inner();
        let mut tx = self.state.pool.begin().await?;
        let target = store::find_account(&mut tx, "account", &req.account).await?;
        let row = sqlx::query_as::<_, AccountRow>(&format!(
            "UPDATE accounts SET disabled_at = COALESCE(disabled_at, now()) WHERE id = $1
             RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(target.id)
        .fetch_one(&mut *tx)
        .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "account.disable",
            &format!("account:{}", row.id),
            json!({}),
        )
        .await?;
        store::record_change(
            &mut tx,
            change::ACCOUNT_DISABLED,
            json!({"account_id": row.id.to_string()}),
        )
        .await?;
        // Edges know agents by token, not by account: name every token that stops working.
        let tokens: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM api_tokens WHERE created_by = $1 AND revoked_at IS NULL",
        )
        .bind(row.id)
        .fetch_all(&mut *tx)
        .await?;
        for token in tokens {
            store::record_change(&mut tx, change::TOKEN_REVOKED, json!({"token_id": token}))
                .await?;
        }
        tx.commit().await?;
        self.state.auth.forget_account(row.id);
        Ok(to_proto(&row))
    }

    async fn set_own_password(
        &self,
        request: Request<v1::SetPasswordRequest>,
    ) -> ApiResult<v1::SetPasswordResponse> {
        let caller = super::caller(&self.state, &request).await?;
        let me = caller.require_api()?;
        let req = request.into_inner();
        let password = parse_password(&req.password, "password")?.to_owned();
        let mut conn = self.state.pool.acquire().await?;
        let target = if req.account.trim().is_empty() {
            me
        } else {
            store::find_account(&mut conn, "account", &req.account)
                .await?
                .id
        };
        drop(conn);
        if target != me && !caller.platform_admin {
            return Err(ApiError::PermissionDenied(
                "you may only set your own password".into(),
            ));
        }
        let hash = self.state.hasher.hash(password).await?;
        let mut tx = self.state.pool.begin().await?;
        sqlx::query("UPDATE accounts SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(target)
            .execute(&mut *tx)
            .await?;
        store::audit(
            &mut tx,
            Some(&caller),
            "account.set_password",
            &format!("account:{target}"),
            json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(v1::SetPasswordResponse {})
    }

    async fn login_with_password(
        &self,
        request: Request<v1::LoginRequest>,
    ) -> ApiResult<v1::LoginResponse> {
        let peer = request
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let req = request.into_inner();
        let email = Email::parse(&req.email, "email")?;
        let token_name = if req.token_name.trim().is_empty() {
            "login".to_owned()
        } else {
            parse_name(&req.token_name, "token_name", true)?
        };
        let too_many = ApiError::ResourceExhausted(
            "too many failed logins; wait a minute and try again".into(),
        );
        let peer_limit = self.state.auth.peer_failures();
        if peer_limit.is_blocked(&peer) || self.state.email_failures.is_blocked(email.as_str()) {
            return Err(too_many);
        }
        if req.password.is_empty() || req.password.len() > crate::domain::MAX_PASSWORD_LEN {
            return Err(ApiError::invalid("password", "a password is required"));
        }
        #[derive(sqlx::FromRow)]
        struct LoginRow {
            password_hash: Option<String>,
            disabled_at: Option<chrono::DateTime<chrono::Utc>>,
        }
        let row = sqlx::query_as::<_, LoginRow>(
            "SELECT password_hash, disabled_at FROM accounts WHERE lower(email) = $1",
        )
        .bind(email.as_str())
        .fetch_optional(&self.state.pool)
        .await?;
        let hashes = row
            .as_ref()
            .and_then(|r| r.password_hash.clone())
            .into_iter()
            .collect();
        let ok = self
            .state
            .hasher
            .verify_any(req.password.clone(), hashes)
            .await?;
        let bad = ApiError::Unauthenticated("wrong email or password".into());
        match row {
            Some(r) if ok => {
                if r.disabled_at.is_some() {
                    return Err(ApiError::Unauthenticated("this account is disabled".into()));
                }
            }
            _ => {
                peer_limit.record(&peer);
                self.state.email_failures.record(email.as_str());
                return Err(bad);
            }
        }
        let token = TokenText::generate(TokenKind::Api);
        let hash = self.state.hasher.hash(token.secret().to_owned()).await?;
        let mut tx = self.state.pool.begin().await?;
        let account = sqlx::query_as::<_, AccountRow>(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE lower(email) = $1"
        ))
        .bind(email.as_str())
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, kind, created_by, name, secret_hash)
             VALUES ($1, 'api', $2, $3, $4)",
        )
        .bind(token.id())
        .bind(account.id)
        .bind(&token_name)
        .bind(hash)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO audit_log (actor_account, action, target, details)
             VALUES ($1, 'account.login', $2, '{}'::jsonb)",
        )
        .bind(account.id)
        .bind(format!("token:{}", token.id()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(v1::LoginResponse {
            account: Some(to_proto(&account)),
            token: token.expose(),
            token_id: token.id().to_owned(),
        })
    }
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn create_account(
        &self,
        request: Request<v1::CreateAccountRequest>,
    ) -> Result<Response<v1::Account>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_account(
        &self,
        request: Request<v1::GetAccountRequest>,
    ) -> Result<Response<v1::Account>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn list_accounts(
        &self,
        request: Request<v1::ListAccountsRequest>,
    ) -> Result<Response<v1::ListAccountsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn disable_account(
        &self,
        request: Request<v1::DisableAccountRequest>,
    ) -> Result<Response<v1::Account>, Status> {
        Ok(Response::new(self.disable(request).await?))
    }

    async fn set_password(
        &self,
        request: Request<v1::SetPasswordRequest>,
    ) -> Result<Response<v1::SetPasswordResponse>, Status> {
        Ok(Response::new(self.set_own_password(request).await?))
    }

    async fn login(
        &self,
        request: Request<v1::LoginRequest>,
    ) -> Result<Response<v1::LoginResponse>, Status> {
        Ok(Response::new(self.login_with_password(request).await?))
    }
}
