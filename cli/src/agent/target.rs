//! What a tunnel forwards to: the local target and how the `Host` header is set.

use std::fmt;

/// Where a tunnel's traffic goes on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Host to connect to.
    pub(crate) host: String,
    /// Port to connect to.
    pub(crate) port: u16,
    /// Whether the local server speaks HTTPS (`https://host:port`): the agent then talks TLS
    /// to it (`--local-ca`, `--local-insecure`).
    pub(crate) tls: bool,
}

impl Target {
    /// Parses `3000`, `host:3000`, `http://host[:port]` or `https://host[:port]`.
    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        let (rest, scheme) = if let Some(r) = s.strip_prefix("http://") {
            (r, Some(false))
        } else if let Some(r) = s.strip_prefix("https://") {
            (r, Some(true))
        } else if s.contains("://") {
            anyhow::bail!("{s:?}: only http:// and https:// local targets are supported");
        } else {
            (s, None)
        };
        let tls = scheme == Some(true);
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            anyhow::bail!("{s:?}: give a port, host:port or http(s)://host:port without a path");
        }
        let bad_port = || anyhow::anyhow!("{s:?}: the port must be a number from 1 to 65535");
        let (host, port) = if rest.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() {
            (
                "localhost".to_owned(),
                rest.parse::<u16>().map_err(|_| bad_port())?,
            )
        } else if let Some((h, p)) = rest.rsplit_once(':') {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            anyhow::ensure!(!h.is_empty(), "{s:?}: the host is empty");
            (h.to_owned(), p.parse::<u16>().map_err(|_| bad_port())?)
        } else if !rest.is_empty() && scheme.is_some() {
            (rest.to_owned(), if tls { 443 } else { 80 })
        } else {
            anyhow::bail!("{s:?} is not a port, host:port or http(s)://host:port");
        };
        anyhow::ensure!(port != 0, bad_port());
        Ok(Self { host, port, tls })
    }

    /// `http` or `https`.
    pub(crate) fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// `host:port` as used in a URL authority (IPv6 in brackets).
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Target {
    /// `host:port`, or `https://host:port` for an HTTPS target.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            f.write_str("https://")?;
        }
        f.write_str(&self.authority())
    }
}

/// What the local server sees as `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostHeader {
    /// The local target's `host:port` (what most dev servers expect).
    Rewrite,
    /// The visitor's `Host` (`chat.example.com`).
    Preserve,
    /// A fixed value.
    Value(String),
}

impl HostHeader {
    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "rewrite" => Ok(Self::Rewrite),
            "preserve" => Ok(Self::Preserve),
            v if !v.is_empty() && http::HeaderValue::from_str(v).is_ok() => {
                Ok(Self::Value(v.to_owned()))
            }
            v => anyhow::bail!("--host-header {v:?}: use rewrite, preserve or a host name"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_means_localhost() {
        let t = Target::parse("3000").unwrap();
        assert_eq!(t.authority(), "localhost:3000");
    }

    #[test]
    fn host_port_and_urls_are_accepted() {
        assert_eq!(
            Target::parse("127.0.0.1:8080").unwrap().authority(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            Target::parse("http://app:9000/").unwrap().authority(),
            "app:9000"
        );
        assert_eq!(Target::parse("http://app").unwrap().port, 80);
        assert!(!Target::parse("http://app").unwrap().tls);
    }

    #[test]
    fn https_targets_speak_tls_and_default_to_port_443() {
        let t = Target::parse("https://localhost:8443/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("localhost", 8443, true));
        assert_eq!(t.to_string(), "https://localhost:8443");
        assert_eq!(t.scheme(), "https");
        let t = Target::parse("https://app.internal").unwrap();
        assert_eq!((t.port, t.tls), (443, true));
        assert!(!Target::parse("3000").unwrap().tls);
    }

    #[test]
    fn bad_targets_are_refused_with_a_reason() {
        for bad in [
            "",
            "70000",
            "host:",
            "https://",
            "https://x:0",
            "ftp://x",
            "x:1/path",
            "0",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
