//! Header rules both the edge and the agent apply to traffic they forward.

use http::header::{self, HeaderMap, HeaderName};

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those the `Connection` header names, plus
/// `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding` and `Upgrade`.
///
/// A `Content-Length` beside a `Transfer-Encoding` goes too: the transfer coding framed the
/// message, and the length is to be ignored and removed (RFC 9112 §6.3). Left behind, it
/// would frame the next hop by a length the body does not have.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present decides what goes: removing a name that is absent
    // still hashes it, and most requests carry none of these.
    let mut gone: Vec<HeaderName> = Vec::new();
    let (mut listed, mut coded, mut length) = (false, false, false);
    for k in headers.keys() {
        listed |= k == header::CONNECTION;
        coded |= k == header::TRANSFER_ENCODING;
        length |= k == header::CONTENT_LENGTH;
        if is_hop_by_hop(k) {
            gone.push(k.clone());
        }
    }
    if coded && length {
        gone.push(header::CONTENT_LENGTH);
    }
    if listed {
        let named = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok());
        gone.extend(named);
    }
    for n in gone {
        headers.remove(n);
    }
}

/// Whether `name` is hop-by-hop whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "proxy-connection"
        || name.as_str() == "keep-alive"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go_and_the_rest_stay() {
        let mut h = map(&[
            ("Connection", "keep-alive, X-Private"),
            ("Connection", "Upgrade"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "k"),
            ("X-End-To-End", "kept"),
            ("Content-Length", "0"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(
            names(&h),
            ["content-length", "sec-websocket-key", "x-end-to-end"]
        );
    }

    #[test]
    fn a_content_length_beside_a_transfer_encoding_goes_with_it() {
        let mut h = map(&[
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "5"),
            ("Host", "a"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host"]);
        let mut h = map(&[("Host", "a")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host"]);
    }

    #[test]
    fn only_burrow_headers_are_internal() {
        let mut h = map(&[("Burrow-Peer", "1.2.3.4:5"), ("X-Burrow", "kept")]);
        strip_internal(&mut h);
        assert_eq!(names(&h), ["x-burrow"]);
    }
}
