//! Token text: `brw_<kind>_<id>_<secret><checksum>`.
//!
//! - `kind` is `agent`, `api` or `edge`, so secret scanners can tell what leaked.
//! - `id` is 12 characters of `[a-z0-9]`, public, the database key.
//! - `secret` is 40 characters of `[A-Za-z0-9]` (≈ 238 bits); only its argon2id hash is stored.
//! - `checksum` is the first 6 hex characters of SHA-256 over everything before it, so a typo
//!   or a truncated paste is refused without touching the database.

use std::fmt;

use burrow_proto::v1;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "brw_";
/// Length of the public id.
pub const ID_LEN: usize = 12;
/// Length of the secret part.
pub const SECRET_LEN: usize = 40;
/// Length of the checksum.
pub const CHECKSUM_LEN: usize = 6;
/// Longest token text looked at; anything longer is malformed without further parsing.
pub const MAX_TOKEN_LEN: usize = 128;

const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Runs agents for one team.
    Agent,
    /// Calls the public API as its creator.
    Api,
    /// Identifies an edge to `EdgeService`.
    Edge,
}

impl TokenKind {
    /// The spelling in token text and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Agent => "agent",
            TokenKind::Api => "api",
            TokenKind::Edge => "edge",
        }
    }

    /// Reads the spelling in token text and in the database.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "agent" => Some(TokenKind::Agent),
            "api" => Some(TokenKind::Api),
            "edge" => Some(TokenKind::Edge),
            _ => None,
        }
    }

    /// From the wire enum; `None` for unspecified or unknown values.
    pub fn from_proto(raw: i32) -> Option<Self> {
        match v1::TokenKind::try_from(raw).ok()? {
            v1::TokenKind::Agent => Some(TokenKind::Agent),
            v1::TokenKind::Api => Some(TokenKind::Api),
            v1::TokenKind::Edge => Some(TokenKind::Edge),
            v1::TokenKind::Unspecified => None,
        }
    }

    /// To the wire enum.
    pub fn to_proto(self) -> v1::TokenKind {
        match self {
            TokenKind::Agent => v1::TokenKind::Agent,
            TokenKind::Api => v1::TokenKind::Api,
            TokenKind::Edge => v1::TokenKind::Edge,
        }
    }
}

/// Why a token text was refused before any database work.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedToken {
    /// Not shaped like a Burrow token at all.
    #[error("the token is malformed (expected brw_<kind>_<id>_<secret>)")]
    Shape,
    /// Shaped right, but the checksum does not match: a typo or a truncated paste.
    #[error("the token's checksum does not match; it was probably mistyped or cut short")]
    Checksum,
}

/// A token text that passed the shape and checksum checks. Its `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenText {
    kind: TokenKind,
    id: String,
    secret: String,
}

impl fmt::Debug for TokenText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenText")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn checksum(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    hex::encode(&digest[..CHECKSUM_LEN / 2])
}

fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| char::from(alphabet[rng.gen_range(0..alphabet.len())]))
        .collect()
}

impl TokenText {
    /// A fresh token with a new id and secret.
    pub fn generate(kind: TokenKind) -> Self {
        Self {
            kind,
            id: random_string(ID_ALPHABET, ID_LEN),
            secret: random_string(SECRET_ALPHABET, SECRET_LEN),
        }
    }

    /// A fresh secret for an existing id (rotation).
    pub fn with_new_secret(kind: TokenKind, id: &str) -> Self {
        Self {
            kind,
            id: id.to_owned(),
            secret: random_string(SECRET_ALPHABET, SECRET_LEN),
        }
    }

    /// Checks shape and checksum.
    pub fn parse(raw: &str) -> Result<Self, MalformedToken> {
        if raw.len() > MAX_TOKEN_LEN || !raw.is_ascii() {
            return Err(MalformedToken::Shape);
        }
        let rest = raw
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(MalformedToken::Shape)?;
        let (kind, rest) = rest.split_once('_').ok_or(MalformedToken::Shape)?;
        let kind = TokenKind::parse(kind).ok_or(MalformedToken::Shape)?;
        let (id, tail) = rest.split_once('_').ok_or(MalformedToken::Shape)?;
        if id.len() != ID_LEN || !id.bytes().all(|b| ID_ALPHABET.contains(&b)) {
            return Err(MalformedToken::Shape);
        }
        if tail.len() != SECRET_LEN + CHECKSUM_LEN {
            return Err(MalformedToken::Shape);
        }
        let (secret, sum) = tail.split_at(SECRET_LEN);
        if !secret.bytes().all(|b| SECRET_ALPHABET.contains(&b)) {
            return Err(MalformedToken::Shape);
        }
        let body = &raw[..raw.len() - CHECKSUM_LEN];
        let expected = checksum(body);
        if !bool::from(expected.as_bytes().ct_eq(sum.as_bytes())) {
            return Err(MalformedToken::Checksum);
        }
        Ok(Self {
            kind,
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The token's kind.
    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    /// The public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part, the only thing hashed.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The public start of the text, `brw_<kind>_<id>_`.
    pub fn prefix(&self) -> String {
        prefix(self.kind, &self.id)
    }

    /// The whole token text, to hand to its owner once.
    pub fn expose(&self) -> String {
        let body = format!("{}{}", self.prefix(), self.secret);
        let sum = checksum(&body);
        format!("{body}{sum}")
    }
}

/// The public start of a token's text.
pub fn prefix(kind: TokenKind, id: &str) -> String {
    format!("{TOKEN_PREFIX}{}_{id}_", kind.as_str())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_back() {
        for kind in [TokenKind::Agent, TokenKind::Api, TokenKind::Edge] {
            let token = TokenText::generate(kind);
            let text = token.expose();
            assert!(text.starts_with(&format!("brw_{}_", kind.as_str())));
            assert_eq!(TokenText::parse(&text).unwrap(), token);
        }
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let text = TokenText::generate(TokenKind::Api).expose();
        let mut bytes = text.into_bytes();
        let i = bytes.len() - 10;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(TokenText::parse(&text), Err(MalformedToken::Checksum));
    }

    #[test]
    fn odd_shapes_are_malformed() {
        for bad in [
            "",
            "brw_",
            "brw_api_x_y",
            "Bearer x",
            "brw_root_aaaaaaaaaaaa_x",
        ] {
            assert_eq!(TokenText::parse(bad), Err(MalformedToken::Shape), "{bad}");
        }
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let token = TokenText::generate(TokenKind::Agent);
        assert!(!format!("{token:?}").contains(token.secret()));
    }
}
