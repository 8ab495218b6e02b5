//! Connecting to the local server.
//!
//! Every WebSocket and every new HTTP connection opens a TCP connection to the tunnel's
//! target. Resolving the target's name for each of them would cost a trip through the
//! blocking thread pool and `getaddrinfo`, and when a name resolves to an address nobody
//! listens on (`::1` for a server on 127.0.0.1 only), a refused attempt every time. The
//! [`Dialer`] resolves a name once per [`RESOLVE_TTL`] and tries the address that last
//! answered first. `localhost` is not looked up at all: it is 127.0.0.1 and ::1, both tried,
//! so a local server is found whichever loopback family it listens on.
//!
//! For an `https://` target the dialer also does the TLS handshake ([`LocalTls`]), so the rest
//! of the agent sees one byte stream ([`LocalIo`]) either way.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a resolved local target name is reused before it is resolved again.
pub(crate) const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// Addresses of one name and port, the one that last accepted a connection first.
struct Resolved {
    host: String,
    port: u16,
    addrs: Arc<[SocketAddr]>,
    at: Instant,
}

/// Connects to local targets, remembering what each name resolved to. An agent has a handful
/// of targets, so the cache is a short list; a connect that finds its entry allocates nothing.
pub(crate) struct Dialer {
    cache: Mutex<Vec<Resolved>>,
    timeout: Duration,
    /// How to talk TLS to `https://` targets (none when the agent has no such target).
    tls: Option<LocalTls>,
}

impl Dialer {
    /// A dialer whose whole connect (every address tried, and the TLS handshake) takes at
    /// most `timeout`.
    pub(crate) fn new(timeout: Duration, tls: Option<LocalTls>) -> Self {
        Self {
            cache: Mutex::new(Vec::new()),
            timeout,
            tls,
        }
    }

    /// Connects to a local server: TCP, then TLS when `tls` (an `https://` target).
    pub(crate) async fn open(&self, host: &str, port: u16, tls: bool) -> io::Result<LocalIo> {
        if !tls {
            return self.connect(host, port).await.map(LocalIo::Plain);
        }
        let Some(config) = &self.tls else {
            return Err(io::Error::other("no TLS settings for an https:// target"));
        };
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a valid TLS server name"),
            )
        })?;
        let started = Instant::now();
        let tcp = self.connect(host, port).await?;
        let left = self.timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, config.connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(LocalIo::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(io::Error::new(e.kind(), tls_failure(&e, config.insecure))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the TLS handshake took longer than {} s",
                    self.timeout.as_secs()
                ),
            )),
        }
    }

    /// Opens a TCP connection to `host:port` (with `TCP_NODELAY`).
    pub(crate) async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        match tokio::time::timeout(self.timeout, self.connect_inner(host, port)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting took longer than {} s", self.timeout.as_secs()),
            )),
        }
    }

    async fn connect_inner(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            let s = TcpStream::connect(SocketAddr::new(ip, port)).await?;
            let _ = s.set_nodelay(true);
            return Ok(s);
        }
        let addrs = match self.cached(host, port) {
            Some(a) => a,
            // `localhost` is always the loopback (RFC 6761 §6.3), whatever /etc/hosts says:
            // try both families, so a server listening only on ::1 (as Node does for
            // "localhost" on some systems) or only on 127.0.0.1 is found either way.
            None if is_localhost(host) => Arc::from([
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            ]),
            None => {
                let a: Arc<[SocketAddr]> = tokio::net::lookup_host((host, port)).await?.collect();
                if a.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{host} resolves to no address"),
                    ));
                }
                a
            }
        };
        let mut first_error = None;
        for addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.remember(host, port, &addrs, *addr);
                    return Ok(s);
                }
                // The first address's error is the one to report (a refusal, typically).
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Nothing answered: resolve afresh next time.
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|r| !r.is(host, port));
        }
        Err(first_error.unwrap_or_else(|| io::Error::other("no address to connect to")))
    }

    fn cached(&self, host: &str, port: u16) -> Option<Arc<[SocketAddr]>> {
        let c = self.cache.lock().ok()?;
        c.iter()
            .find(|r| r.is(host, port) && r.at.elapsed() < RESOLVE_TTL)
            .map(|r| Arc::clone(&r.addrs))
    }

    /// Records that `good`, one of `addrs`, accepted a connection to `host:port`.
    fn remember(&self, host: &str, port: u16, addrs: &Arc<[SocketAddr]>, good: SocketAddr) {
        let Ok(mut c) = self.cache.lock() else {
            return;
        };
        let ordered: Arc<[SocketAddr]> = if addrs.first() == Some(&good) {
            Arc::clone(addrs)
        } else {
            std::iter::once(good)
                .chain(addrs.iter().copied().filter(|a| *a != good))
                .collect()
        };
        match c.iter_mut().find(|r| r.is(host, port)) {
            // Keep the time of the lookup, so the name is still resolved again after the TTL.
            Some(r) if r.at.elapsed() < RESOLVE_TTL => r.addrs = ordered,
            Some(r) => {
                r.addrs = ordered;
                r.at = Instant::now();
            }
            None => c.push(Resolved {
                host: host.to_owned(),
                port,
                addrs: ordered,
                at: Instant::now(),
            }),
        }
    }
}

impl Resolved {
    fn is(&self, host: &str, port: u16) -> bool {
        self.port == port && self.host.eq_ignore_ascii_case(host)
    }
}

/// `localhost` or a name under it.
fn is_localhost(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || host
            .len()
            .checked_sub(".localhost".len())
            .and_then(|i| host.get(i..))
            .is_some_and(|tail| tail.eq_ignore_ascii_case(".localhost"))
}

/// The HTTP client's connector: plain TCP through a shared [`Dialer`].
#[derive(Clone)]
pub(crate) struct LocalConnector(pub(crate) Arc<Dialer>);

/// A pooled HTTP connection to a local server, which the agent can reach from outside the
/// pool ([`LocalConn`]).
pub(crate) struct LocalStream {
    io: LocalIo,
    /// A second handle on the same socket, for [`LocalConn::reset`]; it lives as long as this
    /// stream.
    handle: Arc<socket2::Socket>,
    answered: Arc<std::sync::atomic::AtomicBool>,
}

impl LocalStream {
    fn new(io: LocalIo) -> io::Result<Self> {
        use std::os::fd::AsFd as _;
        let handle = socket2::Socket::from(io.tcp().as_fd().try_clone_to_owned()?);
        Ok(Self {
            io,
            handle: Arc::new(handle),
            answered: Arc::default(),
        })
    }
}

/// A handle on one pooled local connection, found through the request's captured connection
/// ([`Self::of`]): it can reset the connection, and tell whether it is a reused one.
///
/// hyper only shuts a connection down after flushing what it holds, so when the agent gives up
/// on a request whose local server stopped reading, dropping the request would leave the
/// connection (and the unsent body) open for as long as the server reads nothing;
/// [`Self::reset`] ends it at once, and the server sees the reset.
#[derive(Clone)]
pub(crate) struct LocalConn {
    socket: std::sync::Weak<socket2::Socket>,
    /// Whether the local server has sent anything on the connection (set by its reads).
    answered: Arc<std::sync::atomic::AtomicBool>,
}

impl LocalConn {
    /// The connection a request was sent on, if it has one yet.
    pub(crate) fn of(
        captured: &hyper_util::client::legacy::connect::CaptureConnection,
    ) -> Option<Self> {
        let meta = captured.connection_metadata();
        let mut ext = http::Extensions::new();
        meta.as_ref()?.get_extras(&mut ext);
        ext.remove::<LocalConn>()
    }

    pub(crate) fn reset(&self) {
        if let Some(s) = self.socket.upgrade() {
            // Closing with a zero linger sends RST and drops what is queued; the shutdown
            // wakes hyper's task on the connection, which then fails and closes it.
            let _ = s.set_linger(Some(Duration::ZERO));
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether the local server had sent anything on the connection before: then it is a
    /// kept-alive one that answered a request, which the server may close when it likes.
    pub(crate) fn was_reused(&self) -> bool {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl hyper_util::client::legacy::connect::Connection for LocalStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.tcp().connected().extra(LocalConn {
            socket: Arc::downgrade(&self.handle),
            answered: Arc::clone(&self.answered),
        })
    }
}

impl tokio::io::AsyncRead for LocalStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before && !self.answered.load(std::sync::atomic::Ordering::Relaxed)
        {
            self.answered
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for LocalStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tower_service::Service<Uri> for LocalConnector {
    type Response = TokioIo<LocalStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = Arc::clone(&self.0);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in URI"))?;
            let tls = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let io = dialer.open(host, port, tls).await?;
            LocalStream::new(io).map(TokioIo::new)
        })
    }
}

/// The byte stream to a local server: TCP, or TLS over TCP for an `https://` target.
pub(crate) enum LocalIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl LocalIo {
    /// The TCP connection underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(t) => t,
            Self::Tls(t) => t.get_ref().0,
        }
    }
}

impl tokio::io::AsyncRead for LocalIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for LocalIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(t) => t.is_write_vectored(),
            Self::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_flush(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How the agent talks TLS to its `https://` targets: HTTP/1.1 (ALPN), certificates checked
/// against the system's CAs and `--local-ca`, or not at all with `--local-insecure`.
#[derive(Clone)]
pub(crate) struct LocalTls {
    connector: tokio_rustls::TlsConnector,
    insecure: bool,
}

impl std::fmt::Debug for LocalTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTls")
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

impl LocalTls {
    /// Trusts the system's CA certificates and those in `ca` (PEM), or, when `insecure`, any
    /// certificate (the handshake's signatures are still checked).
    pub(crate) fn new(ca: Option<&std::path::Path>, insecure: bool) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let provider = burrow_edge::tls::crypto_provider();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?;
        let mut config = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(super::session::AnyCertificate(
                    provider,
                )))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if let Some(path) = ca {
                add_pem_certs(&mut roots, path, "--local-ca")?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "no trusted CA certificates found on this system for the https:// target; \
                 give --local-ca FILE (or --local-insecure)"
            );
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            insecure,
        })
    }
}

/// Adds the certificates of the PEM file at `path` (given by `flag`) to `roots`; a file that
/// cannot be read, is not PEM or holds no certificate is an error that names it.
pub(crate) fn add_pem_certs(
    roots: &mut rustls::RootCertStore,
    path: &std::path::Path,
    flag: &str,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read {flag} file {}", path.display()))?;
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.with_context(|| format!("{} is not valid PEM", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{} holds an unusable certificate", path.display()))?;
        added += 1;
    }
    anyhow::ensure!(added > 0, "{} holds no certificate", path.display());
    Ok(())
}

/// A failed TLS handshake with a local server, in words, with what to do about it.
fn tls_failure(e: &io::Error, insecure: bool) -> String {
    let cause = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    use rustls::CertificateError as Cert;
    let hint = match cause {
        Some(rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        )) => {
            " (the certificate is for another name: give the target by a name it holds, such \
             as https://localhost:PORT, or skip the check with --local-insecure)"
        }
        Some(rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. })) => {
            " (the certificate has expired: renew it, or skip the check with --local-insecure)"
        }
        Some(rustls::Error::InvalidCertificate(_)) if !insecure => {
            " (a self-signed or private certificate? give its CA with --local-ca FILE, or \
             skip the check with --local-insecure)"
        }
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)) => {
            " (it speaks only HTTP/2 over TLS; tunnels speak HTTP/1.1 to local servers)"
        }
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            " (does it speak HTTPS on this port? for plain HTTP use http://)"
        }
        _ if e.kind() == io::ErrorKind::UnexpectedEof => {
            " (it closed the connection: does it speak HTTPS on this port?)"
        }
        _ => "",
    };
    format!("the TLS handshake failed: {e}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_local_tls_handshake_names_the_fix_that_fits_its_cause() {
        use rustls::{AlertDescription, CertificateError as Cert, Error, InvalidMessage};
        let io_error = |e: Error| io::Error::new(io::ErrorKind::InvalidData, e);
        // (handshake error, --local-insecure, what the message must say, what it must not)
        let cases = [
            (
                io_error(Error::InvalidCertificate(Cert::UnknownIssuer)),
                false,
                "--local-ca FILE",
                "another name",
            ),
            (
                io_error(Error::InvalidCertificate(Cert::UnknownIssuer)),
                true,
                "UnknownIssuer",
                "--local-ca",
            ),
            (
                io_error(Error::InvalidCertificate(Cert::NotValidForName)),
                false,
                "another name",
                "--local-ca",
            ),
            (
                io_error(Error::InvalidCertificate(Cert::Expired)),
                false,
                "expired",
                "--local-ca",
            ),
            (
                io_error(Error::InvalidMessage(InvalidMessage::InvalidContentType)),
                true,
                "for plain HTTP use http://",
                "--local-ca",
            ),
            (
                io_error(Error::AlertReceived(
                    AlertDescription::NoApplicationProtocol,
                )),
                false,
                "only HTTP/2",
                "--local-ca",
            ),
            (
                io::Error::from(io::ErrorKind::UnexpectedEof),
                false,
                "does it speak HTTPS",
                "--local-ca",
            ),
        ];
        for (e, insecure, says, not) in cases {
            let message = tls_failure(&e, insecure);
            assert!(
                message.starts_with("the TLS handshake failed: "),
                "{message}"
            );
            assert!(message.contains(says), "{message}");
            assert!(!message.contains(not), "{message}");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_a_refusing_address_first_still_connects_and_is_remembered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dialer = Dialer::new(Duration::from_secs(5), None);
        // Seed the cache as `localhost` often resolves: ::1 (nothing listening) first.
        let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        dialer.cache.lock().unwrap().push(Resolved {
            host: "localhost".to_owned(),
            port,
            addrs: vec![v6, v4].into(),
            at: Instant::now(),
        });
        dialer.connect("LocalHost", port).await.unwrap();
        assert_eq!(&*dialer.cached("localhost", port).unwrap(), &[v4, v6]);
        drop(listener);
        // Nothing listens any more: the error is the refusal, and the entry is dropped.
        let e = dialer.connect("localhost", port).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(dialer.cached("localhost", port).is_none());
    }

    #[tokio::test]
    async fn localhost_finds_a_server_listening_on_either_loopback_family() {
        let dialer = Dialer::new(Duration::from_secs(5), None);
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        dialer.connect("localhost", port).await.unwrap();
        // This machine may have no IPv6 loopback; then only the IPv4 half can be checked.
        if let Ok(v6) = tokio::net::TcpListener::bind("[::1]:0").await {
            let port = v6.local_addr().unwrap().port();
            let s = dialer.connect("LOCALHOST", port).await.unwrap();
            assert!(s.peer_addr().unwrap().is_ipv6());
            // The address that answered is tried first from now on.
            assert!(dialer.cached("localhost", port).unwrap()[0].is_ipv6());
        }
        assert!(is_localhost("app.localhost"));
        assert!(is_localhost("localhost."));
        assert!(!is_localhost("notlocalhost"));
        assert!(!is_localhost("localhost.example.com"));
    }

    #[tokio::test]
    async fn ip_literals_connect_without_a_lookup() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dialer = Dialer::new(Duration::from_secs(5), None);
        dialer.connect("127.0.0.1", port).await.unwrap();
        assert!(dialer.cache.lock().unwrap().is_empty());
    }
}
