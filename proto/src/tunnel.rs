//! The agent↔edge tunnel protocol, apart from its protobuf messages (see `agent.proto`).
//!
//! A connection starts with a handshake: the agent writes one length-prefixed [`AgentHello`],
//! the edge answers with one length-prefixed [`EdgeHello`]. After a successful handshake the
//! connection carries HTTP/2 with reversed roles (the agent serves, the edge is the client).
//!
//! [`AgentHello`]: crate::v1::AgentHello
//! [`EdgeHello`]: crate::v1::EdgeHello

use http::HeaderName;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of the tunnel protocol this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest handshake message either side accepts, in bytes. Bounds what an unauthenticated
/// peer can make the other side allocate.
pub const MAX_HANDSHAKE_LEN: usize = 64 * 1024;

/// How long either side waits for the other's handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN protocol id the agent offers on its TLS connection to the edge.
pub const ALPN: &[u8] = b"burrow/1";

/// Request header (edge → agent) naming the tunnel `key` the stream belongs to.
pub const HEADER_TUNNEL: HeaderName = HeaderName::from_static("burrow-tunnel");
/// Request header (edge → agent) carrying the visitor's address (`ip:port`).
pub const HEADER_PEER: HeaderName = HeaderName::from_static("burrow-peer");
/// Request header (edge → agent) carrying the original request's `Connection`/`Upgrade`
/// header values on a WebSocket stream, since HTTP/2 may not carry connection-specific headers
/// (RFC 9113 §8.2.2).
pub const HEADER_UPGRADE: HeaderName = HeaderName::from_static("burrow-upgrade");
/// Response header (agent → edge) carrying the local server's status when it is one HTTP/2
/// cannot express (101 Switching Protocols travels as 200 plus this header). A 2xx answer to
/// a WebSocket upgrade travels as 502 plus this header, since a 2xx on the extended CONNECT
/// stream (RFC 8441 §5) would mean the tunnel opened and could carry no body.
pub const HEADER_STATUS: HeaderName = HeaderName::from_static("burrow-status");
/// Response header (agent → edge) set when the agent itself produced the response (e.g. the
/// local server refused the connection) rather than the local server.
pub const HEADER_AGENT_ERROR: HeaderName = HeaderName::from_static("burrow-agent-error");

/// Request header (edge → agent) marking a stream as a control message rather than a visitor
/// request; its value is one of the `CONTROL_*` constants. The agent answers 204 and never
/// forwards such a stream to a local server.
pub const HEADER_CONTROL: HeaderName = HeaderName::from_static("burrow-control");
/// Request header (edge → agent) on a [`CONTROL_CLOSED`] message: a sentence saying why.
pub const HEADER_REASON: HeaderName = HeaderName::from_static("burrow-reason");
/// [`HEADER_CONTROL`] value the edge sends once the agent's tunnels are routable: the agent
/// prints the public URLs when it receives it, so a printed URL always works.
pub const CONTROL_READY: &str = "ready";
/// [`HEADER_CONTROL`] value telling the agent that the tunnel named by [`HEADER_TUNNEL`] was
/// ended by the platform (killed, token revoked) and must not be bound again.
pub const CONTROL_CLOSED: &str = "closed";
/// [`HEADER_CONTROL`] value asking whether the agent is alive: it answers 204 and does
/// nothing else. The edge sends it before letting another agent of the same team take over a
/// name this agent holds. (Agents answer 204 to every control kind, so older ones pass too.)
pub const CONTROL_PROBE: &str = "probe";
/// [`HEADER_CONTROL`] value of the edge's keepalive, sent on every agent connection once per
/// keepalive interval: the agent answers 204. An edge that gets no answer and no other byte
/// from the agent for an interval drops the connection; an agent that gets no keepalive for
/// twice the announced interval (plus a second) drops it too and reconnects. (An application
/// message, not an HTTP/2 PING, because hyper's PING support costs a lock and a timer update
/// per message on the data path; see BENCHMARKS.md, "Instructions per round trip".)
pub const CONTROL_KEEPALIVE: &str = "keepalive";
/// Request header on a [`CONTROL_KEEPALIVE`] message: the edge's keepalive interval in
/// milliseconds, so the agent knows when the next one is due at the latest.
pub const HEADER_KEEPALIVE_MS: HeaderName = HeaderName::from_static("burrow-keepalive-ms");

/// Why a handshake message could not be read.
#[derive(Debug)]
pub enum HandshakeError {
    /// The socket failed or closed early.
    Io(std::io::Error),
    /// The peer announced a message longer than [`MAX_HANDSHAKE_LEN`].
    TooLong(usize),
    /// The bytes were not a valid message.
    Decode(prost::DecodeError),
    /// The peer said nothing within [`HANDSHAKE_TIMEOUT`].
    Timeout,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connection failed during handshake: {e}"),
            Self::TooLong(n) => write!(
                f,
                "handshake message of {n} bytes exceeds the {MAX_HANDSHAKE_LEN}-byte limit"
            ),
            Self::Decode(e) => write!(f, "malformed handshake message: {e}"),
            Self::Timeout => write!(
                f,
                "no handshake message within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            Self::Decode(e) => Some(e),
            Self::TooLong(_) | Self::Timeout => None,
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Writes one length-prefixed handshake message.
pub async fn write_message<M, W>(io: &mut W, msg: &M) -> Result<(), HandshakeError>
where
    M: Message,
    W: AsyncWrite + Unpin,
{
    let body = msg.encode_to_vec();
    if body.len() > MAX_HANDSHAKE_LEN {
        return Err(HandshakeError::TooLong(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| HandshakeError::TooLong(body.len()))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    io.write_all(&buf).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one length-prefixed handshake message, refusing anything longer than
/// [`MAX_HANDSHAKE_LEN`] and giving up after [`HANDSHAKE_TIMEOUT`].
pub async fn read_message<M, R>(io: &mut R) -> Result<M, HandshakeError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let read = async {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_HANDSHAKE_LEN {
            return Err(HandshakeError::TooLong(len));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await?;
        M::decode(body.as_slice()).map_err(HandshakeError::Decode)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{AgentHello, TunnelRequest};

    #[tokio::test]
    async fn a_handshake_message_survives_the_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let hello = AgentHello {
            protocol_version: PROTOCOL_VERSION,
            token: "brw_agent_x".into(),
            tunnels: vec![TunnelRequest {
                subdomain: "chat".into(),
                local_addr: "localhost:3000".into(),
                key: "0".into(),
                policy: None,
            }],
            agent_instance: "i".into(),
            agent_version: "v".into(),
            lane_key: "7.secret".into(),
        };
        write_message(&mut a, &hello).await.unwrap();
        let got: AgentHello = read_message(&mut b).await.unwrap();
        assert_eq!(got, hello);
    }

    #[tokio::test]
    async fn a_very_long_handshake_frame_is_refused_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_message::<AgentHello, _>(&mut b).await.unwrap_err();
        assert!(matches!(err, HandshakeError::TooLong(_)), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (_a, mut b) = tokio::io::duplex(1024);
        let err = read_message::<AgentHello, _>(&mut b).await.unwrap_err();
        assert!(matches!(err, HandshakeError::Timeout), "{err}");
    }
}
