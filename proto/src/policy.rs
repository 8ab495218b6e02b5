//! Tunnel policies: the rules every component applies before accepting one.
//!
//! The agent and the admin CLI check a policy before sending it, the control plane before
//! storing a pinned one, and the edge before enforcing one (edges enforce what they are given:
//! a CIDR that does not parse, or a hash with an extravagant argon2 cost, would otherwise fail
//! or cost at the edge, visitor after visitor). One copy of the rules keeps them in step.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use argon2::password_hash::PasswordHash;
use argon2::Params;

use crate::v1::{self, TunnelPolicy};

/// Why a policy was refused: a sentence saying what to change (it never quotes a password or
/// a hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyError {}

/// Whether the policy has no rule at all.
pub fn is_empty(policy: &TunnelPolicy) -> bool {
    policy.basic_auth.is_empty()
        && policy.allow_ips.is_empty()
        && policy.deny_ips.is_empty()
        && policy.allow_origins.is_empty()
        && policy.request_headers_add.is_empty()
        && policy.request_headers_remove.is_empty()
        && policy.response_headers_add.is_empty()
        && policy.response_headers_remove.is_empty()
}

/// Most basic-auth users in one policy.
pub const MAX_BASIC_AUTH_USERS: usize = 32;
/// Most entries in each of the IP allow and deny lists.
pub const MAX_IP_RULES: usize = 256;
/// Most entries in the Origin allow list.
pub const MAX_ORIGINS: usize = 64;
/// Most entries in each header add/remove list.
pub const MAX_HEADER_RULES: usize = 32;
/// Longest basic-auth username, in bytes.
pub const MAX_USERNAME_BYTES: usize = 128;
/// Longest password hash string, in bytes.
pub const MAX_PASSWORD_HASH_BYTES: usize = 512;
/// Longest origin, in bytes.
pub const MAX_ORIGIN_BYTES: usize = 512;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Longest added header value, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
/// Largest argon2 memory cost accepted in a password hash (KiB). Edges verify the hash once
/// per visitor connection, so an extravagant cost would be a denial of service on them.
pub const MAX_ARGON2_M_COST_KIB: u32 = 65_536;
/// Most argon2 passes accepted in a password hash.
pub const MAX_ARGON2_T_COST: u32 = 8;
/// Most argon2 lanes accepted in a password hash.
pub const MAX_ARGON2_P_COST: u32 = 4;

/// Headers a policy may neither add nor remove, since the edge and the agent own them: those
/// describing one hop of a connection (RFC 9110 §7.6.1) or its framing, `Host`, and the
/// forwarding headers the edge sets itself. Names starting with [`RESERVED_HEADER_PREFIXES`]
/// are refused too.
pub const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Prefixes of header names a policy may neither add nor remove: the WebSocket handshake
/// (RFC 6455 §11.3) and the agent↔edge protocol's own headers.
pub const RESERVED_HEADER_PREFIXES: &[&str] = &["sec-websocket-", "burrow-"];

/// Checks every rule: list lengths, CIDRs, origins, header names and values, basic-auth
/// usernames and argon2id hashes. The error is a sentence saying what to change.
pub fn validate(policy: &TunnelPolicy) -> Result<(), PolicyError> {
    check_len(
        "basic-auth users",
        policy.basic_auth.len(),
        MAX_BASIC_AUTH_USERS,
    )?;
    let mut seen = HashSet::new();
    for user in &policy.basic_auth {
        check_username(&user.username)?;
        if !seen.insert(user.username.as_str()) {
            return Err(PolicyError(format!(
                "basic-auth user {:?} is listed twice",
                user.username
            )));
        }
        check_password_hash(user)?;
    }
    check_len("allow_ips entries", policy.allow_ips.len(), MAX_IP_RULES)?;
    check_len("deny_ips entries", policy.deny_ips.len(), MAX_IP_RULES)?;
    for cidr in policy.allow_ips.iter().chain(&policy.deny_ips) {
        check_cidr(cidr)?;
    }
    check_len(
        "allow_origins entries",
        policy.allow_origins.len(),
        MAX_ORIGINS,
    )?;
    for origin in &policy.allow_origins {
        check_origin(origin)?;
    }
    for (what, list) in [
        ("request_headers_add", &policy.request_headers_add),
        ("response_headers_add", &policy.response_headers_add),
    ] {
        check_len(what, list.len(), MAX_HEADER_RULES)?;
        for header in list {
            check_header(header)?;
        }
    }
    for (what, list) in [
        ("request_headers_remove", &policy.request_headers_remove),
        ("response_headers_remove", &policy.response_headers_remove),
    ] {
        check_len(what, list.len(), MAX_HEADER_RULES)?;
        for name in list {
            check_header_name(name)?;
        }
    }
    Ok(())
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), PolicyError> {
    if len > max {
        return Err(PolicyError(format!(
            "{len} {what} given; a policy holds at most {max}"
        )));
    }
    Ok(())
}

/// A basic-auth username: non-empty, bounded, no `:` (RFC 7617 §2), no control characters.
pub fn check_username(username: &str) -> Result<(), PolicyError> {
    if username.is_empty() {
        return Err(PolicyError("a basic-auth username cannot be empty".into()));
    }
    if username.len() > MAX_USERNAME_BYTES {
        return Err(PolicyError(format!(
            "a basic-auth username is longer than {MAX_USERNAME_BYTES} bytes"
        )));
    }
    if username.contains(':') {
        return Err(PolicyError(format!(
            "basic-auth username {username:?} contains ':', which RFC 7617 forbids"
        )));
    }
    if username.chars().any(char::is_control) {
        return Err(PolicyError(format!(
            "basic-auth username {username:?} contains a control character"
        )));
    }
    Ok(())
}

fn check_password_hash(user: &v1::BasicAuthUser) -> Result<(), PolicyError> {
    let hash = &user.password_hash;
    let bad = || {
        PolicyError(format!(
            "the password hash of basic-auth user {:?} is not an argon2id PHC string \
             ($argon2id$v=19$m=…,t=…,p=…$salt$hash); send a hash, never the password \
             (`burrow` hashes passwords for you)",
            user.username
        ))
    };
    if hash.len() > MAX_PASSWORD_HASH_BYTES || !hash.starts_with("$argon2id$") {
        return Err(bad());
    }
    let parsed = PasswordHash::new(hash).map_err(|_| bad())?;
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err(bad());
    }
    let params = Params::try_from(&parsed).map_err(|_| bad())?;
    if params.m_cost() > MAX_ARGON2_M_COST_KIB
        || params.t_cost() > MAX_ARGON2_T_COST
        || params.p_cost() > MAX_ARGON2_P_COST
    {
        return Err(PolicyError(format!(
            "the password hash of basic-auth user {:?} asks for more than \
             m={MAX_ARGON2_M_COST_KIB},t={MAX_ARGON2_T_COST},p={MAX_ARGON2_P_COST}; hash it \
             with lower argon2 parameters",
            user.username
        )));
    }
    Ok(())
}

/// A CIDR block (`10.0.0.0/8`, `2001:db8::/32`) or a bare address.
pub fn check_cidr(cidr: &str) -> Result<(), PolicyError> {
    let (addr, prefix) = match cidr.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (cidr, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return Err(PolicyError(format!(
            "{cidr:?} is not an IP network; write a CIDR block such as 10.0.0.0/8 or \
             2001:db8::/32, or a bare address"
        )));
    };
    if let Some(prefix) = prefix {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let ok = prefix.bytes().all(|b| b.is_ascii_digit())
            && prefix.parse::<u8>().is_ok_and(|p| p <= max);
        if !ok {
            return Err(PolicyError(format!(
                "{cidr:?}: the prefix length after '/' must be a number from 0 to {max}"
            )));
        }
    }
    Ok(())
}

/// An origin as browsers send it (RFC 6454 §6.1): `http(s)://host[:port]`, nothing after.
pub fn check_origin(origin: &str) -> Result<(), PolicyError> {
    let bad = |why: &str| {
        PolicyError(format!(
            "{origin:?} is not an origin: {why}; write scheme://host[:port] such as \
             https://app.example.com"
        ))
    };
    if origin.len() > MAX_ORIGIN_BYTES {
        return Err(bad("too long"));
    }
    let lower = origin.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .ok_or_else(|| bad("the scheme must be http:// or https://"))?;
    if rest.is_empty() {
        return Err(bad("the host is missing"));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(bad("an origin has no path, query or fragment"));
    }
    if rest.contains('@') {
        return Err(bad("an origin has no user name"));
    }
    let authority: http::uri::Authority = rest.parse().map_err(|_| bad("the host is invalid"))?;
    let host = authority.host();
    if host.is_empty() {
        return Err(bad("the host is missing"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').unwrap_or(inner);
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(bad("the IPv6 address is invalid"));
        }
    } else if !host
        .split('.')
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(bad("the host is invalid"));
    }
    if let Some(port) = rest.get(host.len()..).filter(|p| !p.is_empty()) {
        match port.strip_prefix(':').map(str::parse::<u16>) {
            Some(Ok(p)) if p != 0 => {}
            _ => return Err(bad("the port must be a number from 1 to 65535")),
        }
    }
    Ok(())
}

pub fn check_header_name(name: &str) -> Result<(), PolicyError> {
    if name.len() > MAX_HEADER_NAME_BYTES {
        return Err(PolicyError(format!(
            "a header name is longer than {MAX_HEADER_NAME_BYTES} bytes"
        )));
    }
    let Ok(parsed) = http::HeaderName::from_bytes(name.as_bytes()) else {
        return Err(PolicyError(format!(
            "{name:?} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
        )));
    };
    if RESERVED_HEADERS.contains(&parsed.as_str())
        || RESERVED_HEADER_PREFIXES
            .iter()
            .any(|p| parsed.as_str().starts_with(p))
    {
        return Err(PolicyError(format!(
            "header {name} belongs to the connection or to the tunnel itself (framing, upgrade, \
             X-Forwarded-*, Burrow-*); a policy cannot add or remove it"
        )));
    }
    Ok(())
}

fn check_header(header: &v1::Header) -> Result<(), PolicyError> {
    check_header_name(&header.name)?;
    if header.value.len() > MAX_HEADER_VALUE_BYTES {
        return Err(PolicyError(format!(
            "the value of header {} is longer than {MAX_HEADER_VALUE_BYTES} bytes",
            header.name
        )));
    }
    if http::HeaderValue::from_str(&header.value).is_err() {
        return Err(PolicyError(format!(
            "the value of header {} is not a valid HTTP header value (visible ASCII, spaces \
             and tabs only)",
            header.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn with(f: impl FnOnce(&mut TunnelPolicy)) -> Result<(), PolicyError> {
        let mut p = TunnelPolicy::default();
        f(&mut p);
        validate(&p)
    }

    #[test]
    fn cidrs_origins_and_headers_are_checked() {
        assert!(with(|p| p.allow_ips = vec![
            "10.0.0.0/8".into(),
            "2001:db8::/32".into(),
            "192.0.2.1".into(),
            "::1/128".into()
        ])
        .is_ok());
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "::/129",
            "host.example",
            "10.0.0.0/",
        ] {
            assert!(with(|p| p.deny_ips = vec![bad.into()]).is_err(), "{bad}");
        }
        for good in [
            "https://a.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
        ] {
            assert!(
                with(|p| p.allow_origins = vec![good.into()]).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "ftp://a.com",
            "https://a.com/",
            "https://u@a.com",
            "https://a.com:0",
            "https://a.com:x",
            "https://",
            "a.com",
        ] {
            assert!(
                with(|p| p.allow_origins = vec![bad.into()]).is_err(),
                "{bad}"
            );
        }
        for bad in [
            "Host",
            "Connection",
            "transfer-encoding",
            "X-Forwarded-For",
            "Sec-WebSocket-Key",
            "Burrow-Session",
            "bad name",
            "",
        ] {
            assert!(
                with(|p| p.request_headers_remove = vec![bad.into()]).is_err(),
                "{bad}"
            );
        }
        assert!(with(|p| p.response_headers_add = vec![v1::Header {
            name: "X-A".into(),
            value: "line\r\nInjected: 1".into()
        }])
        .is_err());
    }
}
