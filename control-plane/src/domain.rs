//! Domain values as newtypes with `parse`: once a value exists it is valid, so the rest of the
//! code never re-checks a subdomain or an email.

use std::fmt;

use burrow_proto::v1;

use crate::config::Config;
use crate::error::ApiError;

/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest email address accepted (RFC 5321 §4.5.3.1.3 path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted; bounds the argon2 input.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest display name or token name.
pub const MAX_NAME_LEN: usize = 100;
/// Most scope patterns on one token.
pub const MAX_SCOPES: usize = 64;

fn check_label(field: &'static str, what: &str, raw: &str) -> Result<String, ApiError> {
    let name = raw.trim().to_ascii_lowercase();
    if name.is_empty() {
        return Err(ApiError::invalid(field, format!("a {what} is required")));
    }
    if name.len() > MAX_LABEL_LEN {
        return Err(ApiError::invalid(
            field,
            format!("{what} {name:?} is longer than {MAX_LABEL_LEN} characters"),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(ApiError::invalid(
            field,
            format!("{what} {name:?} contains {bad:?}; use only a-z, 0-9 and '-'"),
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(ApiError::invalid(
            field,
            format!("{what} {name:?} may not start or end with '-'"),
        ));
    }
    Ok(name)
}

// === impl Subdomain ===

/// One DNS label, case-folded, 1–63 of `a-z0-9-`, no leading or trailing hyphen, not reserved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subdomain(String);

impl Subdomain {
    /// Validates and case-folds `raw`; `field` names the request field in errors.
    pub fn parse(raw: &str, field: &'static str, config: &Config) -> Result<Self, ApiError> {
        let name = check_label(field, "subdomain", raw)?;
        if config.is_reserved(&name) {
            return Err(ApiError::invalid(
                field,
                format!("subdomain {name:?} is reserved for the platform; choose another name"),
            ));
        }
        Ok(Self(name))
    }

    /// The case-folded name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subdomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl TeamName ===

/// A team's slug: the same shape as a subdomain (a DNS label), so it can appear in URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamName(String);

impl TeamName {
    /// Validates and case-folds `raw`.
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, ApiError> {
        check_label(field, "team name", raw).map(Self)
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// === impl Email ===

/// A lower-cased email address: something@something, no spaces, at most 254 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Validates and lower-cases `raw`.
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, ApiError> {
        let email = raw.trim().to_lowercase();
        if email.is_empty() {
            return Err(ApiError::invalid(field, "an email address is required"));
        }
        if email.len() > MAX_EMAIL_LEN {
            return Err(ApiError::invalid(
                field,
                format!("the email address is longer than {MAX_EMAIL_LEN} characters"),
            ));
        }
        let valid = match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !email.chars().any(|c| c.is_whitespace() || c.is_control())
            }
            None => false,
        };
        if !valid {
            return Err(ApiError::invalid(
                field,
                format!("{email:?} is not an email address (expected name@domain)"),
            ));
        }
        Ok(Self(email))
    }

    /// The lower-cased address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a new password's length; returns it unchanged.
pub fn parse_password<'a>(raw: &'a str, field: &'static str) -> Result<&'a str, ApiError> {
    let len = raw.chars().count();
    if len < MIN_PASSWORD_LEN {
        return Err(ApiError::invalid(
            field,
            format!("the password must have at least {MIN_PASSWORD_LEN} characters"),
        ));
    }
    if raw.len() > MAX_PASSWORD_LEN {
        return Err(ApiError::invalid(
            field,
            format!("the password may have at most {MAX_PASSWORD_LEN} bytes"),
        ));
    }
    Ok(raw)
}

/// Checks a display or token name: at most 100 characters, no control characters.
pub fn parse_name(raw: &str, field: &'static str, required: bool) -> Result<String, ApiError> {
    let name = raw.trim();
    if required && name.is_empty() {
        return Err(ApiError::invalid(field, "a name is required"));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!("the name is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "the name contains control characters",
        ));
    }
    Ok(name.to_owned())
}

// === impl ScopePattern ===

/// A subdomain pattern an agent token may bind: a name (`chat`) or a prefix ending in `*`
/// (`pr-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopePattern(String);

impl ScopePattern {
    /// Validates `raw`: a DNS label, optionally ending in one `*`.
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, ApiError> {
        let pattern = raw.trim().to_ascii_lowercase();
        if pattern == "*" {
            return Ok(Self(pattern));
        }
        let (body, wildcard) = match pattern.strip_suffix('*') {
            Some(body) => (body, true),
            None => (pattern.as_str(), false),
        };
        if body.contains('*') {
            return Err(ApiError::invalid(
                field,
                format!("scope {pattern:?} may have '*' only at its end"),
            ));
        }
        let check = if wildcard {
            // A prefix may end with '-' (`pr-*`); validate it as if followed by a letter.
            format!("{body}x")
        } else {
            body.to_owned()
        };
        check_label(field, "scope", &check).map_err(|_| {
            ApiError::invalid(
                field,
                format!("scope {pattern:?} must be a subdomain or a prefix ending in '*' (pr-*)"),
            )
        })?;
        Ok(Self(pattern))
    }

    /// Whether `subdomain` matches this pattern.
    pub fn matches(&self, subdomain: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => subdomain.starts_with(prefix),
            None => self.0 == subdomain,
        }
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether any of `scopes` allows `subdomain`; an empty scope list allows everything.
pub fn scopes_allow(scopes: &[String], subdomain: &str) -> bool {
    scopes.is_empty()
        || scopes
            .iter()
            .any(|s| ScopePattern(s.clone()).matches(subdomain))
}

// === impl Role ===

/// What a member may do inside a team, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Sees the team; runs agents.
    Member,
    /// Also manages members (up to admin), tokens and reservations.
    Admin,
    /// Also manages owners.
    Owner,
}

impl Role {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// Reads the database spelling.
    pub fn from_db(raw: &str) -> Self {
        match raw {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }

    /// From the wire enum; `unspecified` is what an unset field means.
    pub fn from_proto(raw: i32, unspecified: Role) -> Result<Self, ApiError> {
        match v1::Role::try_from(raw) {
            Ok(v1::Role::Unspecified) => Ok(unspecified),
            Ok(v1::Role::Member) => Ok(Role::Member),
            Ok(v1::Role::Admin) => Ok(Role::Admin),
            Ok(v1::Role::Owner) => Ok(Role::Owner),
            Err(_) => Err(ApiError::invalid("role", format!("unknown role {raw}"))),
        }
    }

    /// To the wire enum.
    pub fn to_proto(self) -> v1::Role {
        match self {
            Role::Member => v1::Role::Member,
            Role::Admin => v1::Role::Admin,
            Role::Owner => v1::Role::Owner,
        }
    }

    /// Whether this role may manage members, tokens and reservations of the team.
    pub fn can_manage(self) -> bool {
        self >= Role::Admin
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_are_case_folded_and_checked() {
        let config = Config::default();
        assert_eq!(
            Subdomain::parse("Chat", "s", &config).unwrap().as_str(),
            "chat"
        );
        for bad in ["", "-a", "a-", "a_b", "a.b", "www", &"a".repeat(64)] {
            assert!(Subdomain::parse(bad, "s", &config).is_err(), "{bad}");
        }
        assert!(Subdomain::parse(&"a".repeat(63), "s", &config).is_ok());
    }

    #[test]
    fn scope_patterns_match_names_and_prefixes() {
        let p = ScopePattern::parse("pr-*", "scopes").unwrap();
        assert!(p.matches("pr-12"));
        assert!(!p.matches("chat"));
        assert!(ScopePattern::parse("a*b", "scopes").is_err());
        assert!(scopes_allow(&[], "anything"));
        assert!(scopes_allow(&["chat".into()], "chat"));
        assert!(!scopes_allow(&["chat".into()], "chat2"));
    }

    #[test]
    fn emails_need_an_at_sign() {
        assert_eq!(Email::parse(" A@B.c ", "email").unwrap().as_str(), "a@b.c");
        assert!(Email::parse("ab.c", "email").is_err());
        assert!(Email::parse("a b@c", "email").is_err());
    }
}
