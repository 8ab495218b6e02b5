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
    /// The first way the frames broke RFC 6455, as the close code a peer fails the
    /// connection with: 1002 for framing no extension can explain (§5.2, §5.4, §5.5: RSV2 or
    /// RSV3 set, a reserved opcode, a fragmented or over-long control frame, a continuation
    /// with no message under way, a new message inside a fragmented one, a close payload of
    /// one byte or with a code no endpoint may send), 1007 for invalid UTF-8 in a masked
    /// (client-to-server), uncompressed text message or in a close reason (§8.1).
    pub violation: Option<u16>,
}

/// Close code for a framing error (RFC 6455 §7.4.1).
const PROTOCOL_ERROR: u16 = 1002;
/// Close code for invalid data in a message, here UTF-8 (RFC 6455 §7.4.1).
const INVALID_PAYLOAD: u16 = 1007;

/// Follows UTF-8 across chunks: the bytes of a sequence cut at a chunk's end wait in `carry`.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Check {
    carry: [u8; 4],
    carry_len: u8,
}

impl Utf8Check {
    /// Takes the next bytes; false once they cannot be UTF-8 whatever follows.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        while self.carry_len > 0 && !data.is_empty() {
            self.carry[usize::from(self.carry_len)] = data[0];
            self.carry_len += 1;
            data = &data[1..];
            match std::str::from_utf8(&self.carry[..usize::from(self.carry_len)]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_some() => return false,
                Err(_) if self.carry_len == 4 => return false,
                Err(_) => {}
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => {
                let rest = &data[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.carry_len = rest.len() as u8;
                true
            }
        }
    }

    /// The text ended: true when no sequence was left half-way.
    fn finish(&mut self) -> bool {
        let complete = self.carry_len == 0;
        *self = Self::default();
        complete
    }
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
    /// A fragmented data message is under way (its first frame had FIN clear).
    in_message: bool,
    /// The data message under way is masked, uncompressed text: its UTF-8 is checked.
    checking_text: bool,
    /// UTF-8 state of the text message under way.
    text: Utf8Check,
    /// UTF-8 state of the current close frame's reason.
    reason: Utf8Check,
    /// The handshake agreed an extension: the RSV bits are its business, never a violation.
    extensions_agreed: bool,
    stats: FrameStats,
}

/// Length of a frame header whose second byte is `second`: 2, plus the extended payload
/// length (2 or 8 bytes), plus the masking key (4 bytes) when the mask bit is set.
fn header_len_of(second: u8) -> usize {
    let ext = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if second & 0x80 != 0 { 4 } else { 0 }
}

impl FrameObserver {
    /// A fresh observer, positioned at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// An observer for a connection whose handshake agreed an extension (such as
    /// permessage-deflate, which sets RSV1) when `agreed`; without one, any RSV bit set is a
    /// violation (RFC 6455 §5.2).
    pub fn with_extensions(agreed: bool) -> Self {
        Self {
            extensions_agreed: agreed,
            ..Self::default()
        }
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
                self.check_utf8(&bytes[..take]);
                self.payload_seen += take as u64;
                self.remaining -= take as u64;
                bytes = &bytes[take..];
                if self.remaining == 0 {
                    self.finish_frame();
                }
                continue;
            }
            // A whole header at the start of `bytes` (the usual case: a read that begins at a
            // frame boundary) is taken in one step.
            if self.header_len == 0 && bytes.len() >= 2 {
                let need = header_len_of(bytes[1]);
                if bytes.len() >= need {
                    self.header[..need].copy_from_slice(&bytes[..need]);
                    self.header_len = need;
                    if bytes[0] & 0x0f >= FIRST_CONTROL_OPCODE {
                        self.stats.control_bytes += need as u64;
                    }
                    bytes = &bytes[need..];
                    if let Some(len) = self.header_complete() {
                        self.start_payload(len);
                    }
                    continue;
                }
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
        if self.header_len < header_len_of(self.header[1]) {
            return None;
        }
        let len = match self.header[1] & 0x7f {
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
        if self.breaks_protocol(len) {
            self.violate(PROTOCOL_ERROR);
        }
        if matches!(self.opcode, 0x1 | 0x2) {
            const RSV1: u8 = 0x40;
            self.checking_text =
                self.opcode == 0x1 && self.mask.is_some() && self.header[0] & RSV1 == 0;
            self.text = Utf8Check::default();
        }
        if self.opcode < FIRST_CONTROL_OPCODE {
            self.in_message = !self.fin;
        }
        if self.opcode == OPCODE_CLOSE {
            self.reason = Utf8Check::default();
        }
        if len == 0 {
            self.finish_frame();
        }
    }

    /// Whether the frame just started (its header in `header`, `fin` and `opcode` set) breaks
    /// the framing rules. RSV bits count only when no extension was agreed.
    fn breaks_protocol(&self, len: u64) -> bool {
        const RSV: u8 = 0x70;
        let reserved_opcode = matches!(self.opcode, 0x3..=0x7 | 0xB..=0xF);
        let control = self.opcode >= FIRST_CONTROL_OPCODE;
        (self.header[0] & RSV != 0 && !self.extensions_agreed)
            || reserved_opcode
            || (control && (!self.fin || len > 125))
            || (self.opcode == 0 && !self.in_message)
            || (matches!(self.opcode, 0x1 | 0x2) && self.in_message)
    }

    /// Records the first violation only.
    fn violate(&mut self, code: u16) {
        self.stats.violation.get_or_insert(code);
    }

    /// Checks the UTF-8 of `masked` payload bytes of the current frame (a text message's, or
    /// a close frame's reason), unmasking a copy in pieces small enough for the stack.
    fn check_utf8(&mut self, masked: &[u8]) {
        let text = self.opcode < FIRST_CONTROL_OPCODE && self.checking_text;
        let close_reason = self.opcode == OPCODE_CLOSE;
        if !(text || close_reason) || self.stats.violation.is_some() {
            return;
        }
        let mut piece = [0u8; 512];
        let mut pos = self.payload_seen;
        for chunk in masked.chunks(piece.len()) {
            let out = &mut piece[..chunk.len()];
            match self.mask {
                Some(m) => {
                    // The mask rotated to this position, so the loop below has no modulo and
                    // compiles to wide XORs.
                    let at = (pos % 4) as usize;
                    let m = [m[at], m[(at + 1) % 4], m[(at + 2) % 4], m[(at + 3) % 4]];
                    for (i, (o, b)) in out.iter_mut().zip(chunk).enumerate() {
                        *o = b ^ m[i & 3];
                    }
                }
                None => out.copy_from_slice(chunk),
            }
            // A close frame's first two bytes are its code, not reason text.
            let skip = if close_reason && pos < 2 {
                usize::try_from(2 - pos).unwrap_or(2).min(out.len())
            } else {
                0
            };
            pos += chunk.len() as u64;
            let check = if text {
                &mut self.text
            } else {
                &mut self.reason
            };
            if !check.feed(&out[skip..]) {
                self.violate(INVALID_PAYLOAD);
                return;
            }
        }
    }

    fn finish_frame(&mut self) {
        if self.opcode < FIRST_CONTROL_OPCODE
            && self.fin
            && self.checking_text
            && !self.text.finish()
        {
            self.violate(INVALID_PAYLOAD);
        }
        if self.opcode == OPCODE_CLOSE {
            let code = u16::from_be_bytes(self.close_code);
            // RFC 6455 §7.4: codes an endpoint may send; 1004-1006 and 1015 never go on the
            // wire, 1012-1014 are registered since.
            let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if self.payload_seen == 1 || (self.payload_seen >= 2 && !sendable) {
                self.violate(PROTOCOL_ERROR);
            } else if !self.reason.finish() {
                self.violate(INVALID_PAYLOAD);
            }
        }
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

    /// The violation an observer with no extension agreed finds in `bytes`, fed one at a time.
    fn violation(bytes: &[u8]) -> Option<u16> {
        let mut o = FrameObserver::new();
        for b in bytes {
            o.observe(std::slice::from_ref(b));
        }
        o.stats().violation
    }

    #[test]
    fn invalid_utf8_in_masked_text_or_a_close_reason_is_flagged_1007() {
        let m = Some([9, 8, 7, 6]);
        // Valid: multi-byte characters split across fragments and reads.
        let text = "κόσμε €𝄞".as_bytes();
        let mut good = frame(false, 0x1, m, &text[..3]);
        good.extend(frame(true, 0x9, m, b"ping"));
        good.extend(frame(false, 0x0, m, &text[3..9]));
        good.extend(frame(true, 0x0, m, &text[9..]));
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice("adiós".as_bytes());
        good.extend(frame(true, 0x8, m, &close));
        assert_eq!(violation(&good), None);
        // A server's (unmasked) text is left to the client.
        assert_eq!(violation(&frame(true, 0x1, None, &[0xff])), None);
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xce, 0xba, 0xe1]);
        for (bad, code) in [
            (frame(true, 0x1, m, &[0xce, 0xba, 0xff]), 1007),
            (frame(true, 0x1, m, &[0xed, 0xa0, 0x80]), 1007), // a surrogate
            (frame(true, 0x1, m, &[0xf0, 0x9d]), 1007),       // cut at the message end
            (frame(true, 0x8, m, &bad_reason), 1007),
            (frame(true, 0x8, m, &[0x03]), 1002), // a one-byte close payload
            (frame(true, 0x8, m, &1005u16.to_be_bytes()), 1002),
            (frame(true, 0x8, m, &999u16.to_be_bytes()), 1002),
        ] {
            assert_eq!(violation(&bad), Some(code), "{bad:02x?}");
        }
    }

    #[test]
    fn long_masked_text_is_checked_across_uneven_reads() {
        let text = "ζ€𝄞a".repeat(300); // 1,200+ bytes, sequences of 2, 3 and 4 bytes
        let m = Some([0x12, 0x34, 0x56, 0x78]);
        let run = |payload: &[u8], step: usize| {
            let bytes = frame(true, 0x1, m, payload);
            let mut o = FrameObserver::new();
            for piece in bytes.chunks(step) {
                o.observe(piece);
            }
            o.stats().violation
        };
        for step in [1, 7, 513, 4096] {
            assert_eq!(run(text.as_bytes(), step), None, "step {step}");
            let mut broken = text.as_bytes().to_vec();
            broken[1001] = 0xff;
            assert_eq!(run(&broken, step), Some(1007), "step {step}");
        }
    }

    #[test]
    fn frames_no_extension_can_explain_are_flagged_and_good_ones_are_not() {
        let seen = |bytes: &[u8]| violation(bytes) == Some(1002);
        let m = Some([1, 2, 3, 4]);
        // Good: a fragmented text message with a ping inside, then a close.
        let mut good = frame(false, 0x1, m, b"ab");
        good.extend(frame(true, 0x9, m, b"p"));
        good.extend(frame(true, 0x0, m, b"cd"));
        good.extend(frame(true, 0x8, m, &1000u16.to_be_bytes()));
        assert!(!seen(&good));
        // RSV1 (what permessage-deflate sets) is fine once an extension was agreed, and a
        // violation without one.
        let mut rsv1 = frame(true, 0x2, m, b"z");
        rsv1[0] |= 0x40;
        let mut deflate = FrameObserver::with_extensions(true);
        deflate.observe(&rsv1);
        assert_eq!(deflate.stats().violation, None);
        assert!(seen(&rsv1));
        let mut rsv2 = frame(true, 0x2, m, b"z");
        rsv2[0] |= 0x20;
        let mut new_inside = frame(false, 0x1, None, b"a");
        new_inside.extend(frame(true, 0x1, None, b"b"));
        for bad in [
            rsv2,
            frame(true, 0x3, m, b""),
            frame(true, 0xB, None, b"x"),
            frame(false, 0x9, m, b""),
            frame(true, 0xA, None, &[0u8; 126]),
            frame(true, 0x0, m, b"lost"),
            new_inside,
        ] {
            assert!(seen(&bad), "{bad:02x?}");
        }
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
