//! Tunnel policies as the command line and the agent's TOML file spell them.
//!
//! Both `burrow http … --basic-auth …` (the agent's own policy) and
//! `burrow reservation policy set …` (a policy pinned on a reservation) take the same flags,
//! parsed by [`PolicyArgs`] and turned into a [`TunnelPolicy`] by [`PolicyArgs::to_proto`].
//! Basic-auth passwords are hashed here with argon2id, so the clear password never leaves this
//! machine. [`validate_policy`] applies the same rules the control plane applies, so mistakes
//! are reported before anything is sent.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use burrow_proto::policy::MAX_BASIC_AUTH_USERS;
use burrow_proto::v1::{BasicAuthUser, Header, TunnelPolicy};
use clap::Args;
use serde::Deserialize;

/// Largest `--basic-auth-file`, in bytes.
const MAX_BASIC_AUTH_FILE_BYTES: u64 = 64 * 1024;

/// OWASP's argon2id parameters: 19 MiB of memory, 2 passes, 1 lane.
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

/// The policy flags, shared by `burrow http` and `burrow reservation policy set`, and the
/// same keys in the agent's TOML file (`basic_auth = ["user:pass"]`, `allow_ip = […]`, …).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct PolicyArgs {
    /// Require HTTP basic auth (RFC 7617) with this user; repeat for more users. The password
    /// is hashed (argon2id) on this machine and only the hash is sent. Note that a password on
    /// the command line is visible to other users of this machine (`ps`); prefer
    /// --basic-auth-file.
    #[arg(long = "basic-auth", value_name = "USER:PASS")]
    pub(crate) basic_auth: Vec<String>,
    /// Read basic-auth users from a file, one `user:password` per line (blank lines and lines
    /// starting with `#` are skipped). Keeps passwords out of the process list.
    #[arg(long = "basic-auth-file", value_name = "FILE")]
    pub(crate) basic_auth_file: Vec<PathBuf>,
    /// Only let visitors from this network in (CIDR such as 10.0.0.0/8 or 2001:db8::/32, or a
    /// bare address); repeat for more. The real peer address is checked, never
    /// X-Forwarded-For.
    #[arg(long = "allow-ip", value_name = "CIDR")]
    pub(crate) allow_ip: Vec<String>,
    /// Refuse visitors from this network, even when an --allow-ip matches; repeat for more.
    #[arg(long = "deny-ip", value_name = "CIDR")]
    pub(crate) deny_ip: Vec<String>,
    /// Only accept WebSocket upgrades whose Origin is this (scheme://host[:port], http or
    /// https); repeat for more.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub(crate) allow_origin: Vec<String>,
    /// Set this header on every request before it reaches the local server; repeat for more.
    #[arg(long = "request-header-add", value_name = "NAME:VALUE")]
    pub(crate) request_header_add: Vec<String>,
    /// Remove this header from every request; repeat for more.
    #[arg(long = "request-header-remove", value_name = "NAME")]
    pub(crate) request_header_remove: Vec<String>,
    /// Set this header on every response before it reaches the visitor; repeat for more.
    #[arg(long = "response-header-add", value_name = "NAME:VALUE")]
    pub(crate) response_header_add: Vec<String>,
    /// Remove this header from every response; repeat for more.
    #[arg(long = "response-header-remove", value_name = "NAME")]
    pub(crate) response_header_remove: Vec<String>,
}

impl PolicyArgs {
    /// Whether no policy flag was given.
    pub(crate) fn is_empty(&self) -> bool {
        self.basic_auth.is_empty()
            && self.basic_auth_file.is_empty()
            && self.allow_ip.is_empty()
            && self.deny_ip.is_empty()
            && self.allow_origin.is_empty()
            && self.request_header_add.is_empty()
            && self.request_header_remove.is_empty()
            && self.response_header_add.is_empty()
            && self.response_header_remove.is_empty()
    }

    /// The policy these flags describe, with passwords hashed and every rule validated.
    ///
    /// Hashing takes ~20 ms of CPU and 19 MiB per user; call it before starting tunnels or
    /// from `spawn_blocking`.
    pub(crate) fn to_proto(&self) -> anyhow::Result<TunnelPolicy> {
        let mut users = Vec::new();
        for (i, spec) in self.basic_auth.iter().enumerate() {
            let (user, pass) = split_credentials(spec)
                .with_context(|| format!("--basic-auth #{}: expected USER:PASSWORD", i + 1))?;
            users.push((user.to_owned(), pass.to_owned()));
        }
        for path in &self.basic_auth_file {
            users.extend(read_basic_auth_file(path)?);
        }
        if users.len() > MAX_BASIC_AUTH_USERS {
            anyhow::bail!(
                "{} basic-auth users given; a policy holds at most {MAX_BASIC_AUTH_USERS}",
                users.len()
            );
        }
        let mut basic_auth = Vec::with_capacity(users.len());
        for (username, password) in users {
            // Refuse a bad name before spending ~20 ms hashing its password.
            burrow_proto::policy::check_username(&username).map_err(|e| anyhow::anyhow!(e.0))?;
            let password_hash = hash_password(&password)?;
            basic_auth.push(BasicAuthUser {
                username,
                password_hash,
            });
        }
        let policy = TunnelPolicy {
            basic_auth,
            allow_ips: self.allow_ip.clone(),
            deny_ips: self.deny_ip.clone(),
            allow_origins: self.allow_origin.clone(),
            request_headers_add: parse_headers("--request-header-add", &self.request_header_add)?,
            request_headers_remove: self.request_header_remove.clone(),
            response_headers_add: parse_headers(
                "--response-header-add",
                &self.response_header_add,
            )?,
            response_headers_remove: self.response_header_remove.clone(),
        };
        validate_policy(&policy)?;
        Ok(policy)
    }
}

/// Hash a basic-auth password with argon2id (OWASP parameters) into a PHC string.
pub(crate) fn hash_password(password: &str) -> anyhow::Result<String> {
    if password.is_empty() {
        anyhow::bail!("a basic-auth password cannot be empty");
    }
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None)
        .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let hash = argon2
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing a basic-auth password: {e}"))?;
    Ok(hash.to_string())
}

/// `user:password` split at the first colon (usernames cannot contain one, RFC 7617 §2).
fn split_credentials(spec: &str) -> anyhow::Result<(&str, &str)> {
    match spec.split_once(':') {
        Some((user, pass)) if !user.is_empty() && !pass.is_empty() => Ok((user, pass)),
        _ => anyhow::bail!("the user and the password must both be non-empty"),
    }
}

fn read_basic_auth_file(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading basic-auth file {}", path.display()))?;
    if meta.len() > MAX_BASIC_AUTH_FILE_BYTES {
        anyhow::bail!(
            "basic-auth file {} is larger than {MAX_BASIC_AUTH_FILE_BYTES} bytes",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading basic-auth file {}", path.display()))?;
    let mut users = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        // The message names the line, never its content: it holds a password.
        let (user, pass) = split_credentials(line).with_context(|| {
            format!("{} line {}: expected user:password", path.display(), n + 1)
        })?;
        users.push((user.to_owned(), pass.to_owned()));
    }
    Ok(users)
}

fn parse_headers(flag: &str, specs: &[String]) -> anyhow::Result<Vec<Header>> {
    specs
        .iter()
        .map(|spec| match spec.split_once(':') {
            Some((name, value)) if !name.trim().is_empty() => Ok(Header {
                name: name.trim().to_owned(),
                value: value.trim().to_owned(),
            }),
            _ => anyhow::bail!("{flag} {spec:?}: expected NAME:VALUE"),
        })
        .collect()
}

/// Checks every rule the way the control plane and the edge do ([`burrow_proto::policy`]), so
/// mistakes are reported before anything is sent.
pub(crate) fn validate_policy(policy: &TunnelPolicy) -> anyhow::Result<()> {
    burrow_proto::policy::validate(policy).map_err(|e| anyhow::anyhow!(e.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(basic: &[&str]) -> PolicyArgs {
        PolicyArgs {
            basic_auth: basic.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn basic_auth_passwords_are_sent_only_as_argon2id_hashes() {
        let policy = args(&["alice:s3cret"]).to_proto().unwrap();
        assert_eq!(policy.basic_auth.len(), 1);
        let hash = &policy.basic_auth[0].password_hash;
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(!hash.contains("s3cret"));
    }

    #[test]
    fn basic_auth_file_lines_are_read_and_errors_do_not_echo_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(
            &path,
            "# team\nbob:pw1\r\n\ncarol:pw:with:colons\nbroken-hunter2\n",
        )
        .unwrap();
        let a = PolicyArgs {
            basic_auth_file: vec![path.clone()],
            ..Default::default()
        };
        let err = format!("{:#}", a.to_proto().unwrap_err());
        assert!(err.contains("line 5"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        std::fs::write(&path, "bob:pw1\ncarol:pw:with:colons\n").unwrap();
        let p = a.to_proto().unwrap();
        let names: Vec<_> = p.basic_auth.iter().map(|u| u.username.as_str()).collect();
        assert_eq!(names, ["bob", "carol"]);
    }

    #[test]
    fn malformed_rules_are_refused_with_a_reason() {
        let cases: &[(PolicyArgs, &str)] = &[
            (args(&["nopassword"]), "USER:PASSWORD"),
            (args(&["a:x", "a:y"]), "twice"),
            (
                PolicyArgs {
                    allow_ip: vec!["10.0.0.0/33".into()],
                    ..Default::default()
                },
                "0 to 32",
            ),
            (
                PolicyArgs {
                    deny_ip: vec!["example.com".into()],
                    ..Default::default()
                },
                "not an IP network",
            ),
            (
                PolicyArgs {
                    allow_origin: vec!["ftp://x.com".into()],
                    ..Default::default()
                },
                "scheme",
            ),
            (
                PolicyArgs {
                    allow_origin: vec!["https://x.com/".into()],
                    ..Default::default()
                },
                "path",
            ),
            (
                PolicyArgs {
                    request_header_add: vec!["Host:evil".into()],
                    ..Default::default()
                },
                "connection",
            ),
            (
                PolicyArgs {
                    response_header_remove: vec!["bad header".into()],
                    ..Default::default()
                },
                "header name",
            ),
            (
                PolicyArgs {
                    request_header_add: vec!["X-A".into()],
                    ..Default::default()
                },
                "NAME:VALUE",
            ),
        ];
        for (a, want) in cases {
            let err = format!("{:#}", a.to_proto().unwrap_err());
            assert!(err.contains(want), "{a:?}: {err}");
        }
    }

    #[test]
    fn well_formed_rules_pass() {
        let a = PolicyArgs {
            allow_ip: vec![
                "10.0.0.0/8".into(),
                "2001:db8::/32".into(),
                "192.0.2.7".into(),
                "::1".into(),
            ],
            deny_ip: vec!["10.1.0.0/16".into()],
            allow_origin: vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into(),
                "http://[::1]:8080".into(),
            ],
            request_header_add: vec!["X-From: burrow".into()],
            request_header_remove: vec!["Cookie".into()],
            response_header_add: vec!["X-Frame-Options:DENY".into()],
            response_header_remove: vec!["Server".into()],
            ..Default::default()
        };
        let p = a.to_proto().unwrap();
        assert_eq!(p.request_headers_add[0].name, "X-From");
        assert_eq!(p.request_headers_add[0].value, "burrow");
    }

    #[test]
    fn costly_or_foreign_hashes_are_refused() {
        let mut p = TunnelPolicy {
            basic_auth: vec![BasicAuthUser {
                username: "a".into(),
                password_hash: "$2b$12$abcdefghijklmnopqrstuv".into(),
            }],
            ..Default::default()
        };
        assert!(validate_policy(&p).is_err());
        p.basic_auth[0].password_hash =
            "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into();
        let err = format!("{:#}", validate_policy(&p).unwrap_err());
        assert!(err.contains("lower argon2"), "{err}");
    }
}
