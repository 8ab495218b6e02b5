//! One module per gRPC service. Each handler authenticates the caller, checks what the caller
//! may do, and runs its writes in one transaction together with the audit row.

pub mod account;
pub mod edge;
pub mod reservation;
pub mod team;
pub mod token;
pub mod tunnel;
pub mod usage;

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::State;

/// Authenticates `request` against the shared state.
pub(crate) async fn caller<T>(state: &State, request: &tonic::Request<T>) -> ApiResult<Caller> {
    state.auth.caller(request).await
}
