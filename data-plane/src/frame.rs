//! A WebSocket frame *observer*: follows the frame headers of one direction of a relayed
//! WebSocket (RFC 6455 §5.2) without copying or changing payloads.
//!
//! The relay forwards bytes unchanged; the observer is fed the same bytes and keeps just
//! enough state to know where frames start and end. That gives per-connection counters
//! (frames, messages, bytes, the close code) and, more importantly, *frame boundaries*: the
//! only places where the edge may inject a frame of its own (a keepalive ping, or a close frame
//! when the other side vanished) without corrupting the stream.

/// Opcode of a close frame (RFC 6455 §5.5.1).
const OPCODE_CLOSE: u8 = 0x8;
/// Opcodes below this carry data (continuation, text, binary, reserved data opcodes 3–7).
const FIRST_CONTROL_OPCODE: u8 = 0x8;
/// Opcode of a pong frame (RFC 6455 §5.5.3).
const OPCODE_PONG: u8 = 0xA;

/// Counters for one direction of a WebSocket connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Bytes seen, headers included.
    pub bytes: u64,
    /// Complete frames seen.
    pub frames: u64,
    /// Complete data messages (a final text/binary/continuation frame ends one).
    pub messages: u64,
    /// Whether a close frame went by.
    pub closed: bool,
    /// Status code of the close frame, when it carried one.
    pub close_code: Option<u16>,
    /// Complete control frames seen (close, ping, pong).
    pub control_frames: u64,
    /// Bytes of control frames, headers included (the rest of `bytes` is data frames).
    pub control_bytes: u64,
    /// Complete pong frames with an empty payload: answers to the edge's keepalive pings.
    pub empty_pongs: u64,
}

/// Follows frame headers in a byte stream. Feed it every byte, in order, with
/// [`FrameObserver::observe`].
#[derive(Debug, Default)]
pub struct FrameObserver {
    /// Header bytes of the frame being parsed (at most 14: 2 + 8 length + 4 mask).
    header: [u8; 14],
    /// How many header bytes are in `header`; 0 at a frame boundary.
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Payload bytes of the current frame already seen.
    payload_seen: u64,
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// First two (unmasked) payload bytes of a close frame: its status code.
    close_code: [u8; 2],
    stats: FrameStats,
}

impl FrameObserver {
    /// A fresh observer, positioned at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters so far.
    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    /// True when the bytes seen so far end exactly at the end of a frame, so a new frame may be
    /// written to the same destination without corrupting the stream.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// How many more bytes may be read without passing the next frame boundary: the rest of
    /// the current payload, 1 inside a header (its length is not known yet), 0 at a boundary.
    pub fn bytes_to_boundary(&self) -> usize {
        if self.remaining > 0 {
            usize::try_from(self.remaining).unwrap_or(usize::MAX)
        } else {
            usize::from(self.header_len > 0)
        }
    }

    /// Follows `bytes`, the next bytes of the stream.
    pub fn observe(&mut self, mut bytes: &[u8]) {
        self.stats.bytes += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                if self.opcode == OPCODE_CLOSE && self.payload_seen < 2 {
                    for (i, b) in bytes[..take].iter().enumerate() {
                        let pos = self.payload_seen + i as u64;
                        if pos >= 2 {
                            break;
                        }
                        let unmasked = match self.mask {
                            Some(m) => b ^ m[(pos % 4) as usize],
                            None => *b,
                        };
                        self.close_code[pos as usize] = unmasked;
                    }
                }
                if self.opcode >= FIRST_CONTROL_OPCODE {
                    self.stats.control_bytes += take as u64;
                }
                self.payload_seen += take as u64;
                self.remaining -= take as u64;
                bytes = &bytes[take..];
                if self.remaining == 0 {
                    self.finish_frame();
                }
                continue;
            }
            // In a header: take one byte at a time (headers are at most 14 bytes).
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            // The first header byte holds the opcode, so every byte is classified as it goes.
            if self.header[0] & 0x0f >= FIRST_CONTROL_OPCODE {
                self.stats.control_bytes += 1;
            }
            bytes = &bytes[1..];
            if let Some(len) = self.header_complete() {
                self.start_payload(len);
            }
        }
    }

    /// The header length implied by the bytes so far, if all of it has arrived; returns the
    /// payload length.
    fn header_complete(&self) -> Option<u64> {
        if self.header_len < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let len7 = self.header[1] & 0x7f;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let need = 2 + ext + if masked { 4 } else { 0 };
        if self.header_len < need {
            return None;
        }
        let len = match len7 {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        Some(len)
    }

    fn start_payload(&mut self, len: u64) {
        let masked = self.header[1] & 0x80 != 0;
        self.fin = self.header[0] & 0x80 != 0;
        self.opcode = self.header[0] & 0x0f;
        self.mask = if masked {
            let at = self.header_len - 4;
            let mut m = [0u8; 4];
            m.copy_from_slice(&self.header[at..at + 4]);
            Some(m)
        } else {
            None
        };
        self.payload_seen = 0;
        self.remaining = len;
        self.header_len = 0;
        if len == 0 {
            self.finish_frame();
        }
    }

    fn finish_frame(&mut self) {
        self.stats.frames += 1;
        if self.opcode < FIRST_CONTROL_OPCODE && self.fin {
            self.stats.messages += 1;
        }
        if self.opcode >= FIRST_CONTROL_OPCODE {
            self.stats.control_frames += 1;
            if self.opcode == OPCODE_PONG && self.payload_seen == 0 {
                self.stats.empty_pongs += 1;
            }
        }
        if self.opcode == OPCODE_CLOSE {
            self.stats.closed = true;
            if self.payload_seen >= 2 {
                self.stats.close_code = Some(u16::from_be_bytes(self.close_code));
            }
        }
    }
}

/// A close frame as a server sends it (unmasked), with `code` and no reason.
pub fn server_close_frame(code: u16) -> [u8; 4] {
    let c = code.to_be_bytes();
    [0x80 | OPCODE_CLOSE, 2, c[0], c[1]]
}

/// A close frame as a client sends it (masked with `mask`, RFC 6455 §5.3), with `code`.
pub fn client_close_frame(code: u16, mask: [u8; 4]) -> [u8; 8] {
    let c = code.to_be_bytes();
    [
        0x80 | OPCODE_CLOSE,
        0x80 | 2,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        c[0] ^ mask[0],
        c[1] ^ mask[1],
    ]
}

/// Longest close reason RFC 6455 §5.5 allows (125-byte control payload minus the code).
pub const MAX_CLOSE_REASON: usize = 123;

/// A close frame with `code` and `reason` (cut to [`MAX_CLOSE_REASON`] bytes at a character
/// boundary), masked with `mask` when it goes toward a server.
pub fn close_frame_with_reason(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    let mut out = vec![0x80 | OPCODE_CLOSE];
    match mask {
        None => {
            out.push(payload.len() as u8);
            out.extend_from_slice(&payload);
        }
        Some(m) => {
            out.push(0x80 | payload.len() as u8);
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
    }
    out
}

/// An empty ping frame as a server sends it, for keepalives toward a visitor.
pub const SERVER_PING_FRAME: [u8; 2] = [0x89, 0x00];

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mbit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mbit | n as u8),
            n if n <= 0xffff => {
                out.push(mbit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mbit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(m) = mask {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    #[test]
    fn frames_split_at_every_byte_are_counted_once_each() {
        let mut bytes = frame(true, 1, None, b"hello");
        bytes.extend(frame(false, 2, Some([1, 2, 3, 4]), &[7u8; 200]));
        bytes.extend(frame(true, 9, Some([9, 9, 9, 9]), b"p"));
        bytes.extend(frame(true, 0, Some([1, 2, 3, 4]), &[0u8; 70_000]));
        bytes.extend(frame(
            true,
            8,
            Some([5, 6, 7, 8]),
            &[0x03, 0xe8, b'b', b'y'],
        ));
        let mut obs = FrameObserver::new();
        for b in &bytes {
            obs.observe(std::slice::from_ref(b));
        }
        let s = obs.stats();
        assert_eq!(s.frames, 5);
        assert_eq!(s.messages, 2);
        assert_eq!(s.bytes, bytes.len() as u64);
        assert!(s.closed);
        assert_eq!(s.close_code, Some(1000));
        assert!(obs.at_boundary());
        assert_eq!(s.control_frames, 2);
        // ping: 2 + 4 mask + 1; close: 2 + 4 mask + 4.
        assert_eq!(s.control_bytes, 7 + 10);
    }

    #[test]
    fn empty_pongs_are_counted_apart_from_pongs_with_a_payload() {
        let mut bytes = frame(true, 0xA, Some([1, 2, 3, 4]), b"");
        bytes.extend(frame(true, 0xA, Some([1, 2, 3, 4]), b"x"));
        bytes.extend(frame(true, 0xA, None, b""));
        let mut obs = FrameObserver::new();
        for b in &bytes {
            obs.observe(std::slice::from_ref(b));
        }
        let s = obs.stats();
        assert_eq!(s.empty_pongs, 2);
        assert_eq!(s.control_frames, 3);
        assert_eq!(s.control_bytes, bytes.len() as u64);
        assert_eq!(s.messages, 0);
    }

    #[test]
    fn the_observer_is_not_at_a_boundary_inside_a_frame() {
        let bytes = frame(true, 2, None, &[1u8; 300]);
        let mut obs = FrameObserver::new();
        obs.observe(&bytes[..1]);
        assert!(!obs.at_boundary());
        obs.observe(&bytes[1..100]);
        assert!(!obs.at_boundary());
        obs.observe(&bytes[100..]);
        assert!(obs.at_boundary());
        assert_eq!(obs.stats().messages, 1);
    }

    #[test]
    fn a_close_frame_with_a_reason_parses_with_its_code_and_a_cut_reason() {
        for mask in [None, Some([1, 2, 3, 4])] {
            let long = "é".repeat(100);
            let bytes = close_frame_with_reason(1008, &long, mask);
            let mut o = FrameObserver::new();
            o.observe(&bytes);
            assert!(o.at_boundary());
            assert_eq!(o.stats().close_code, Some(1008));
            assert!(bytes.len() <= 2 + 4 + 125);
            let unmasked: Vec<u8> = match mask {
                None => bytes[4..].to_vec(),
                Some(m) => bytes[8..]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ m[(i + 2) % 4])
                    .collect(),
            };
            assert!(std::str::from_utf8(&unmasked).is_ok());
        }
    }

    #[test]
    fn the_injected_close_frames_parse_as_close_frames_with_their_code() {
        let mut obs = FrameObserver::new();
        obs.observe(&client_close_frame(1001, [0xaa, 0xbb, 0xcc, 0xdd]));
        assert_eq!(obs.stats().close_code, Some(1001));
        let mut obs = FrameObserver::new();
        obs.observe(&server_close_frame(1011));
        assert_eq!(obs.stats().close_code, Some(1011));
        assert!(obs.at_boundary());
    }
}
