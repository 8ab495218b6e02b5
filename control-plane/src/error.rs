//! The one error type of the API and the one place gRPC status codes are chosen.

use tonic::{Code, Status};

/// Everything an RPC can fail with. Messages are for the person who made the call, so they
/// say what was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is malformed; the message names the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Name of the offending request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The named thing does not exist (or the caller may not know it does).
    #[error("{0}")]
    NotFound(String),
    /// A uniqueness rule refused the change.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// No, a malformed, an unknown, a revoked or an expired credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// The system is not in a state that allows this (e.g. removing the last owner).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Too many failed attempts; try later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The database (or another dependency) cannot be reached right now.
    #[error("the control plane's database is unavailable; try again shortly")]
    Unavailable(#[source] sqlx::Error),
    /// A bug or an unexpected failure; logged, never echoed to the caller.
    #[error("internal error: {0}")]
    Internal(#[source] anyhow::Error),
}

/// Shorthand for RPC handler results.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An `InvalidArgument` naming `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Wraps any unexpected failure.
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        Self::Internal(err.into())
    }
}

/// Name of the unique constraint or index a database error violated, if it is one.
pub(crate) fn unique_violation(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            Some(db.constraint().unwrap_or_default().to_owned())
        }
        _ => None,
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Self::Unavailable(err),
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) =>
            {
                // Class 08 (connection exception) and 57P (admin shutdown, cannot connect now).
                Self::Unavailable(err)
            }
            _ => Self::Internal(err.into()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let code = match &err {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(source) => {
                tracing::warn!(err = %source, "database unavailable");
                Code::Unavailable
            }
            ApiError::Internal(source) => {
                tracing::error!(err = ?source, "internal error");
                return Status::internal("internal error");
            }
        };
        Status::new(code, err.to_string())
    }
}
