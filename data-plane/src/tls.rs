//! TLS identities for the edge's listeners: from PEM files or generated (`--self-signed`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain and its private key, in PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// PEM certificate chain, leaf first.
    pub cert_pem: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: secrecy::SecretString,
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
        })
    }

    /// Generates a self-signed certificate for `names` (e.g. `localhost`, `*.localhost`), for
    /// local use. Agents must be given its PEM (`burrow http --edge-ca FILE`).
    pub fn self_signed(names: &[String]) -> anyhow::Result<Self> {
        let ck = rcgen::generate_simple_self_signed(names.to_vec())
            .context("cannot generate a self-signed certificate")?;
        Ok(Self {
            cert_pem: ck.cert.pem(),
            key_pem: ck.key_pair.serialize_pem().into(),
        })
    }

    /// A rustls server configuration presenting this identity and offering `alpn`.
    pub(crate) fn server_config(
        &self,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        use secrecy::ExposeSecret as _;
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
        let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the certificate and key do not match or are unsupported")?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
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
