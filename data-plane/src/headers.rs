//! Header rules both the edge and the agent apply to traffic they forward.

use http::header::{self, HeaderMap, HeaderName};

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those the `Connection` header names, plus
/// `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding` and `Upgrade`.
///
/// A `Content-Length` beside a `Transfer-Encoding` goes too: the transfer coding framed the
/// message, and the length is to be ignored and removed (RFC 9112 §6.3). Left behind, it
/// would frame the next hop by a length the body does not have.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
}

/// Removes every `burrow-*` header: only the edge and agent may set those.
pub fn strip_internal(headers: &mut HeaderMap) {
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("burrow-"))
        .cloned()
        .collect();
    for k in internal {
        headers.remove(k);
    }
}
