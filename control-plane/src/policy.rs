//! Tunnel policies pinned on reservations: validation, storage form and the public view.
//!
//! A policy is stored as the encoded `burrow.v1.TunnelPolicy` (protobuf bytes in
//! `reservations.policy`), so fields added to the message later need no migration. Every rule
//! is checked here before it is stored, because edges enforce what they are given: a CIDR that
//! does not parse or a hash with an extravagant argon2 cost would otherwise fail (or cost) at
//! the edge, visitor after visitor.

use burrow_proto::v1::TunnelPolicy;
use prost::Message as _;

use crate::error::{ApiError, ApiResult};

/// The request field every policy error names.
const FIELD: &str = "policy";

fn invalid(reason: String) -> ApiError {
    ApiError::invalid(FIELD, reason)
}

pub use burrow_proto::policy::is_empty;

/// The stored form.
pub(crate) fn encode(policy: &TunnelPolicy) -> Vec<u8> {
    policy.encode_to_vec()
}

/// The policy a stored value holds; `None` for NULL. A value that no longer decodes is an
/// internal error (it was validated when stored).
pub(crate) fn decode(stored: Option<&[u8]>) -> ApiResult<Option<TunnelPolicy>> {
    match stored {
        None => Ok(None),
        Some(bytes) => TunnelPolicy::decode(bytes)
            .map(Some)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("stored policy: {e}"))),
    }
}

/// What the public API shows: everything but the password hashes.
pub fn public_view(policy: &TunnelPolicy) -> TunnelPolicy {
    let mut shown = policy.clone();
    for user in &mut shown.basic_auth {
        user.password_hash.clear();
    }
    shown
}

/// A short description for the audit log: rule counts and user names, never hashes.
pub(crate) fn audit_summary(policy: &TunnelPolicy) -> serde_json::Value {
    serde_json::json!({
        "basic_auth_users": policy.basic_auth.iter().map(|u| u.username.as_str()).collect::<Vec<_>>(),
        "allow_ips": policy.allow_ips,
        "deny_ips": policy.deny_ips,
        "allow_origins": policy.allow_origins,
        "request_headers_add": policy.request_headers_add.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
        "request_headers_remove": policy.request_headers_remove,
        "response_headers_add": policy.response_headers_add.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
        "response_headers_remove": policy.response_headers_remove,
    })
}

/// Checks every rule (see [`burrow_proto::policy`]); the error names the field and says what
/// to change.
pub fn validate(policy: &TunnelPolicy) -> ApiResult<()> {
    burrow_proto::policy::validate(policy).map_err(|e| invalid(e.0))
}
