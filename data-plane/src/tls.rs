//! TLS identities for the edge's listeners: from PEM files or generated (`--self-signed`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};

/// Most host names a generated identity issues certificates for before it forgets them all
/// (each is re-issued on its next handshake). Bounds memory against visitors sending many
/// made-up names; a local edge sees a handful.
const MAX_ISSUED_NAMES: usize = 4096;

/// A certificate chain and its private key, in PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// PEM certificate chain, leaf first. For a generated identity ([`Self::self_signed`]):
    /// the certificate of the authority that signs what the edge presents, which is what
    /// clients trust (`--self-signed-out`, `burrow http --edge-ca`).
    pub cert_pem: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: secrecy::SecretString,
    /// For a generated identity: signs a certificate per host name.
    issuer: Option<Arc<Issuer>>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Reads a certificate chain and key from PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let cert_pem = std::fs::read_to_string(cert)
            .with_context(|| format!("cannot read certificate file {}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .with_context(|| format!("cannot read key file {}", key.display()))?;
        Ok(Self {
            cert_pem,
            key_pem: key_pem.into(),
            issuer: None,
        })
    }

    /// Generates, for local use, a certificate authority that lives only in this process and a
    /// certificate it signs for `names` (e.g. `localhost`, `127.0.0.1`, `*.localhost`). A
    /// client giving a name that a `*.` pattern of `names` covers gets a certificate for that
    /// exact name instead, since OpenSSL-based clients (Python, curl, Node) refuse a wildcard
    /// over a one-label domain such as `*.localhost`. Clients trust [`Self::cert_pem`].
    pub fn self_signed(names: &[String]) -> anyhow::Result<Self> {
        let issuer =
            Issuer::generate(names).context("cannot generate a self-signed certificate")?;
        Ok(Self {
            cert_pem: issuer.ca.pem(),
            key_pem: issuer.ca_key.serialize_pem().into(),
            issuer: Some(Arc::new(issuer)),
        })
    }

    /// A rustls server configuration presenting this identity and offering `alpn`.
    pub(crate) fn server_config(
        &self,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        use secrecy::ExposeSecret as _;
        let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?
            .with_no_client_auth();
        let mut config = if let Some(issuer) = &self.issuer {
            builder.with_cert_resolver(Arc::clone(issuer) as Arc<dyn ResolvesServerCert>)
        } else {
            let certs: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .context("the certificate is not valid PEM")?;
            anyhow::ensure!(
                !certs.is_empty(),
                "the certificate file holds no certificate"
            );
            let key: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut self.key_pem.expose_secret().as_bytes())
                    .context("the key is not valid PEM")?
                    .context("the key file holds no private key")?;
            builder
                .with_single_cert(certs, key)
                .context("the certificate and key do not match or are unsupported")?
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// The in-process authority of a generated identity, and what it issued.
struct Issuer {
    ca: rcgen::Certificate,
    /// The authority's key, also the key of every certificate it issues: one public key for
    /// the whole chain, so a client that pins it (Chromium's
    /// `--ignore-certificate-errors-spki-list`) accepts any issued name.
    ca_key: rcgen::KeyPair,
    signing_key: Arc<dyn SigningKey>,
    /// `X` for each `*.X` the identity was made for.
    wildcard_parents: Vec<String>,
    /// Presented when the client names no host, or one no pattern covers.
    fallback: Arc<CertifiedKey>,
    issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("wildcard_parents", &self.wildcard_parents)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    fn generate(names: &[String]) -> anyhow::Result<Self> {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Burrow edge local authority");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(ca_key.serialize_der().into()))
            .map_err(|e| anyhow::anyhow!("cannot load the generated key: {e}"))?;
        let fallback = issue(&ca, &ca_key, &signing_key, names)?;
        Ok(Self {
            ca,
            ca_key,
            signing_key,
            wildcard_parents: names
                .iter()
                .filter_map(|n| n.strip_prefix("*."))
                .map(str::to_ascii_lowercase)
                .collect(),
            fallback,
            issued: Mutex::default(),
        })
    }

    /// Whether `host` is one label under a `*.` pattern of the identity.
    fn covers(&self, host: &str) -> bool {
        host.split_once('.').is_some_and(|(label, parent)| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && self.wildcard_parents.iter().any(|p| p == parent)
        })
    }
}

/// A certificate for `names` signed by `ca`, with its chain.
fn issue(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    signing_key: &Arc<dyn SigningKey>,
    names: &[String],
) -> anyhow::Result<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().map_or("", |n| n.as_str()),
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = params.signed_by(ca_key, ca, ca_key)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![leaf.der().clone(), ca.der().clone()],
        Arc::clone(signing_key),
    )))
}

impl ResolvesServerCert for Issuer {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(host) = hello.server_name().map(str::to_ascii_lowercase) else {
            return Some(Arc::clone(&self.fallback));
        };
        if !self.covers(&host) {
            return Some(Arc::clone(&self.fallback));
        }
        let mut issued = self.issued.lock().ok()?;
        if let Some(c) = issued.get(&host) {
            return Some(Arc::clone(c));
        }
        let names = std::slice::from_ref(&host);
        match issue(&self.ca, &self.ca_key, &self.signing_key, names) {
            Ok(c) => {
                if issued.len() >= MAX_ISSUED_NAMES {
                    issued.clear();
                }
                issued.insert(host, Arc::clone(&c));
                Some(c)
            }
            Err(e) => {
                tracing::warn!(%host, err = %e, "cannot issue a certificate; presenting the wildcard one");
                Some(Arc::clone(&self.fallback))
            }
        }
    }
}

/// Read buffer under TLS on the agent connection, in bytes. rustls asks the socket for at most
/// one record (16 KiB) per read; with this buffer in between, one `recvfrom` takes what the
/// kernel has queued (up to this much) and rustls is served from memory (BENCHMARKS.md).
pub const AGENT_LINK_READ_BUFFER: usize = 64 * 1024;

/// `stream` with [`AGENT_LINK_READ_BUFFER`] of read buffering, to put under TLS.
pub fn buffered<S: tokio::io::AsyncRead>(stream: S) -> tokio::io::BufReader<S> {
    tokio::io::BufReader::with_capacity(AGENT_LINK_READ_BUFFER, stream)
}

/// The names a `--self-signed` edge for `domain` makes its certificate for: loopback by name
/// and address (so agents may dial `127.0.0.1:PORT` with `--edge-ca`), the domain and every
/// one-label name under it.
pub fn self_signed_names(domain: &str) -> Vec<String> {
    vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        domain.to_owned(),
        format!("*.{domain}"),
    ]
}

/// The TLS crypto of the edge (visitor and agent listeners) and of the agent: ring's suites,
/// with AES-128-GCM ahead of AES-256-GCM. Both are AEADs without known weakness; AES-128 does
/// 10 rounds instead of 14, and the agent connection encrypts and decrypts every tunnelled
/// byte on both ends, so this is the cheaper choice for bulk traffic (BENCHMARKS.md). The
/// server follows the client's order, so browsers keep their own preference.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        x if x == suite::TLS13_AES_128_GCM_SHA256.suite() => 0,
        x if x == suite::TLS13_AES_256_GCM_SHA384.suite() => 1,
        x if x == suite::TLS13_CHACHA20_POLY1305_SHA256.suite() => 2,
        _ => 3,
    };
    provider.cipher_suites.sort_by_key(rank);
    Arc::new(provider)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Runs `openssl s_client` against a TLS server presenting `id`, naming `host` in SNI and
    /// verifying the certificate for it against `id`'s authority; `None` without openssl.
    async fn openssl_verifies(id: &TlsIdentity, host: &str) -> Option<(bool, String)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config(&[]).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        use tokio::io::AsyncWriteExt as _;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &id.cert_pem).unwrap();
        let host = host.to_owned();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-servername",
                    &host,
                ])
                .args(["-verify_hostname", &host, "-verify_return_error", "-CAfile"])
                .arg(&ca)
                .stdin(std::process::Stdio::null())
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            Some((
                out.status.success() && text.contains("Verify return code: 0"),
                text,
            ))
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn openssl_accepts_a_generated_certificate_for_each_name_under_a_one_label_domain() {
        let id = TlsIdentity::self_signed(&self_signed_names("localhost")).unwrap();
        for host in ["chat.localhost", "Other-1.LOCALHOST", "localhost"] {
            let Some((ok, text)) = openssl_verifies(&id, host).await else {
                eprintln!("skipped: no openssl command");
                return;
            };
            assert!(ok, "{host}: {text}");
        }
        // A name the patterns do not cover gets the fallback certificate, which fails.
        let (ok, _) = openssl_verifies(&id, "a.b.localhost").await.unwrap();
        assert!(!ok);
    }
}
