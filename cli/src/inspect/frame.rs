//! A streaming WebSocket frame-header parser (RFC 6455 §5.2): it sees the relayed bytes in
//! whatever chunks they arrive, reports each frame's opcode, size and close code, and keeps
//! at most a small preview of its payload, so payloads are never copied beyond the cap.

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// From the visitor to the local server.
    In,
    /// From the local server to the visitor.
    Out,
}

/// A frame's opcode (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
    Reserved(u8),
}

impl Opcode {
    fn from_bits(b: u8) -> Self {
        match b {
            0 => Self::Continuation,
            1 => Self::Text,
            2 => Self::Binary,
            8 => Self::Close,
            9 => Self::Ping,
            10 => Self::Pong,
            x => Self::Reserved(x),
        }
    }

    /// Control frames (close, ping, pong and reserved 0xB–0xF) are not messages.
    pub(crate) fn is_control(self) -> bool {
        match self {
            Self::Close | Self::Ping | Self::Pong => true,
            Self::Reserved(x) => x >= 8,
            _ => false,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Continuation => "continuation",
            Self::Text => "text",
            Self::Binary => "binary",
            Self::Close => "close",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Reserved(_) => "reserved",
        }
    }
}

/// A frame seen whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedFrame {
    pub(crate) fin: bool,
    pub(crate) opcode: Opcode,
    /// Payload length in bytes.
    pub(crate) size: u64,
    /// For close frames: the status code (RFC 6455 §7.4), when the frame has one.
    pub(crate) close_code: Option<u16>,
    pub(crate) close_reason: Option<String>,
    /// The first payload bytes of a data frame, when previews are on: text as is, binary as hex.
    pub(crate) preview: Option<String>,
}

/// Largest control-frame payload (RFC 6455 §5.5), kept whole for close codes.
const CONTROL_MAX: usize = 125;
/// Bytes of a binary frame's payload shown in hex in its preview.
const HEX_PREVIEW: usize = 64;

struct Current {
    fin: bool,
    opcode: Opcode,
    len: u64,
    mask: Option<[u8; 4]>,
    pos: u64,
    keep: Vec<u8>,
    keep_cap: usize,
}

/// Parser state for one direction of one connection.
pub(crate) struct FrameParser {
    head: [u8; 14],
    head_len: usize,
    current: Option<Current>,
    preview_cap: usize,
    /// Set when the stream stopped looking like WebSocket frames (e.g. another upgraded
    /// protocol): the parser then ignores everything.
    lost: bool,
}

impl FrameParser {
    /// `preview_cap`: bytes of each data frame to keep (0: none).
    pub(crate) fn new(preview_cap: usize) -> Self {
        Self {
            head: [0; 14],
            head_len: 0,
            current: None,
            preview_cap,
            lost: false,
        }
    }

    /// Header length once the first two bytes are known.
    fn header_len(&self) -> usize {
        let b1 = self.head[1];
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    /// Feeds relayed bytes; calls `out` for every frame completed by them.
    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut impl FnMut(ParsedFrame)) {
        while !data.is_empty() && !self.lost {
            let Some(cur) = &mut self.current else {
                let need = if self.head_len < 2 {
                    2
                } else {
                    self.header_len()
                };
                let take = (need - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&data[..take]);
                self.head_len += take;
                data = &data[take..];
                if self.head_len >= 2 && self.head_len == self.header_len() {
                    self.start_frame(out);
                }
                continue;
            };
            let left = cur.len - cur.pos;
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
            let room = cur.keep_cap.saturating_sub(cur.keep.len()).min(take);
            for (i, b) in data[..room].iter().enumerate() {
                let k = cur
                    .mask
                    .map_or(0, |m| m[((cur.pos + i as u64) % 4) as usize]);
                cur.keep.push(b ^ k);
            }
            cur.pos += take as u64;
            data = &data[take..];
            if cur.pos == cur.len {
                self.finish(out);
            }
        }
    }

    fn start_frame(&mut self, out: &mut impl FnMut(ParsedFrame)) {
        let h = &self.head;
        let fin = h[0] & 0x80 != 0;
        let opcode = Opcode::from_bits(h[0] & 0x0f);
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = (h[1] & 0x80 != 0).then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        if matches!(opcode, Opcode::Reserved(_))
            || (opcode.is_control() && len > CONTROL_MAX as u64)
        {
            self.lost = true;
            return;
        }
        let keep_cap = if opcode.is_control() {
            if opcode == Opcode::Close {
                CONTROL_MAX
            } else {
                0
            }
        } else if opcode == Opcode::Binary {
            self.preview_cap.min(HEX_PREVIEW)
        } else {
            self.preview_cap
        };
        self.head_len = 0;
        self.current = Some(Current {
            fin,
            opcode,
            len,
            mask,
            pos: 0,
            keep: Vec::new(),
            keep_cap,
        });
        if len == 0 {
            self.finish(out);
        }
    }

    fn finish(&mut self, out: &mut impl FnMut(ParsedFrame)) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let (mut close_code, mut close_reason, mut preview) = (None, None, None);
        if cur.opcode == Opcode::Close && cur.keep.len() >= 2 {
            close_code = Some(u16::from_be_bytes([cur.keep[0], cur.keep[1]]));
            close_reason = Some(String::from_utf8_lossy(&cur.keep[2..]).into_owned());
        } else if cur.keep_cap > 0 && !cur.opcode.is_control() {
            preview = Some(match cur.opcode {
                Opcode::Binary => cur
                    .keep
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::from_utf8_lossy(&cur.keep).into_owned(),
            });
        }
        out(ParsedFrame {
            fin: cur.fin,
            opcode: cur.opcode,
            size: cur.len,
            close_code,
            close_reason,
            preview,
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut v = vec![(u8::from(fin) << 7) | op];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => v.push(m | n as u8),
            n if n < 65536 => {
                v.push(m | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(m | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                v.extend_from_slice(&k);
                v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => v.extend_from_slice(payload),
        }
        v
    }

    fn parse_in_chunks(bytes: &[u8], chunk: usize, cap: usize) -> Vec<ParsedFrame> {
        let mut p = FrameParser::new(cap);
        let mut got = Vec::new();
        for c in bytes.chunks(chunk) {
            p.feed(c, &mut |f| got.push(f));
        }
        got
    }

    #[test]
    fn frames_split_at_every_byte_are_parsed_with_masked_previews_and_close_codes() {
        let mut wire = frame(true, 1, b"hello", Some([1, 2, 3, 4]));
        wire.extend(frame(false, 2, &[7u8; 300], None));
        wire.extend(frame(true, 0, &[8u8; 70_000], Some([9, 9, 9, 9])));
        wire.extend(frame(true, 9, b"", None));
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        wire.extend(frame(true, 8, &close, Some([5, 6, 7, 8])));
        for chunk in [1, 3, 1000, wire.len()] {
            let got = parse_in_chunks(&wire, chunk, 1024);
            assert_eq!(got.len(), 5, "chunk {chunk}");
            assert_eq!(got[0].preview.as_deref(), Some("hello"));
            assert_eq!(got[1].size, 300);
            assert!(!got[1].fin);
            assert_eq!(got[2].opcode, Opcode::Continuation);
            assert_eq!(got[2].size, 70_000);
            assert_eq!(got[3].opcode, Opcode::Ping);
            assert_eq!(got[4].close_code, Some(1000));
            assert_eq!(got[4].close_reason.as_deref(), Some("bye"));
        }
    }

    #[test]
    fn without_previews_no_payload_is_kept() {
        let got = parse_in_chunks(&frame(true, 1, b"secret", None), 2, 0);
        assert_eq!(got[0].preview, None);
        assert_eq!(got[0].size, 6);
    }

    #[test]
    fn previews_stop_at_the_cap() {
        let got = parse_in_chunks(&frame(true, 1, &[b'a'; 5000], None), 777, 1024);
        assert_eq!(got[0].preview.as_ref().map(String::len), Some(1024));
        assert_eq!(got[0].size, 5000);
    }

    #[test]
    fn a_stream_that_is_not_websocket_is_ignored_without_panicking() {
        let got = parse_in_chunks(b"\xff\xff\xff garbage that is not a frame", 4, 1024);
        assert!(got.len() <= 1);
    }
}
