//! Opaque, signed cursors: what a list page or the change feed hands a client to continue
//! from.
//!
//! A cursor is `base64url(payload ‖ tag)`, where the tag is HMAC-SHA-256 (truncated to
//! 128 bits) over the cursor's kind, the user it was issued to, the request it belongs
//! to (a list's filter, sort and `q`) and the payload. So a cursor cannot be forged or
//! edited, and one issued to another user or for another request does not open: all of
//! them are "malformed" to the caller. The key is made once per database and shared by
//! every instance through it (`service_secrets`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the truncated tag: 2^-128 forgery odds, short URLs.
const TAG_BYTES: usize = 16;
/// Bytes of a freshly made key.
pub const SECRET_BYTES: usize = 32;
/// The longest cursor accepted, before any decoding (a list cursor by title carries up
/// to 800 bytes of title).
const MAX_CURSOR_CHARS: usize = 2048;

/// What a cursor continues; part of what is signed, so one kind never opens as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A change feed position (also an event id).
    Feed = 1,
    /// A position in a list, for one filter, sort and `q`.
    List = 2,
    /// A ticket that opens one event stream.
    Ticket = 3,
}

/// The signing key.
#[derive(Clone)]
pub struct CursorKey {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(..)")
    }
}

impl CursorKey {
    pub fn new(secret: &[u8]) -> Self {
        // HMAC takes a key of any length.
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        Self { mac }
    }

    /// A fresh random key, for a database that has none yet.
    pub fn generate_secret() -> Result<Vec<u8>, getrandom::Error> {
        let mut secret = vec![0; SECRET_BYTES];
        getrandom::fill(&mut secret)?;
        Ok(secret)
    }

    /// The cursor for `payload`, bound to `kind`, `user` and `context`.
    pub fn seal(&self, kind: Kind, user: &str, context: &[&[u8]], payload: &[u8]) -> String {
        let tag = self.tag(kind, user, context, payload);
        let mut bytes = Vec::with_capacity(payload.len() + TAG_BYTES);
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&tag[..TAG_BYTES]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The payload of a cursor this key sealed for the same `kind`, `user` and
    /// `context`; `None` for anything else.
    pub fn open(&self, kind: Kind, user: &str, context: &[&[u8]], cursor: &str) -> Option<Vec<u8>> {
        if cursor.len() > MAX_CURSOR_CHARS {
            return None;
        }
        let mut bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        let split = bytes.len().checked_sub(TAG_BYTES)?;
        // Constant time: the tag's bytes do not leak through timing.
        self.mac_over(kind, user, context, &bytes[..split])
            .verify_truncated_left(&bytes[split..])
            .ok()?;
        bytes.truncate(split);
        Some(bytes)
    }

    /// A short public name derived from the key (16 hex digits): the same for every
    /// instance sharing the key, and revealing nothing about it.
    pub fn fingerprint(&self) -> String {
        let mut mac = self.mac.clone();
        mac.update(b"fingerprint");
        let digest = mac.finalize().into_bytes();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn tag(&self, kind: Kind, user: &str, context: &[&[u8]], payload: &[u8]) -> [u8; 32] {
        self.mac_over(kind, user, context, payload)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Every signed part is length-prefixed, so no two different inputs sign alike.
    fn mac_over(&self, kind: Kind, user: &str, context: &[&[u8]], payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(&[kind as u8]);
        for part in std::iter::once(user.as_bytes())
            .chain(context.iter().copied())
            .chain(std::iter::once(payload))
        {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }
}

/// Reads big-endian integers off the front of a cursor's payload.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    pub fn i64(&mut self) -> Option<i64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(i64::from_be_bytes(*head))
    }

    /// What is left.
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CursorKey {
        CursorKey::new(b"a test key of some length")
    }

    #[test]
    fn a_sealed_cursor_opens_only_for_its_kind_user_and_context() {
        let k = key();
        let c = k.seal(Kind::Feed, "alice", &[b"x"], b"payload");
        assert_eq!(
            k.open(Kind::Feed, "alice", &[b"x"], &c).as_deref(),
            Some(&b"payload"[..])
        );
        assert_eq!(k.open(Kind::List, "alice", &[b"x"], &c), None);
        assert_eq!(k.open(Kind::Feed, "bob", &[b"x"], &c), None);
        assert_eq!(k.open(Kind::Feed, "alice", &[b"y"], &c), None);
        assert_eq!(k.open(Kind::Feed, "alice", &[], &c), None);
        assert_eq!(
            CursorKey::new(b"another key").open(Kind::Feed, "alice", &[b"x"], &c),
            None
        );
    }

    #[test]
    fn parts_are_length_prefixed() {
        let k = key();
        let c = k.seal(Kind::List, "al", &[b"ice"], b"");
        assert_eq!(k.open(Kind::List, "alice", &[b""], &c), None);
        assert_eq!(
            k.open(Kind::List, "al", &[b"ice"], &c).as_deref(),
            Some(&b""[..])
        );
    }

    #[test]
    fn edited_truncated_or_garbage_cursors_do_not_open() {
        let k = key();
        let c = k.seal(Kind::Feed, "alice", &[], &[0, 1, 2, 3]);
        let mut edited = URL_SAFE_NO_PAD.decode(&c).unwrap();
        edited[0] ^= 1;
        let edited = URL_SAFE_NO_PAD.encode(edited);
        for bad in [
            "",
            "*",
            "AAAA",
            &c[..c.len() - 1],
            &edited,
            &format!("{c}A"),
            &"A".repeat(5000),
        ] {
            assert_eq!(k.open(Kind::Feed, "alice", &[], bad), None, "{bad:?}");
        }
    }

    #[test]
    fn generated_secrets_differ() {
        let (a, b) = (
            CursorKey::generate_secret().unwrap(),
            CursorKey::generate_secret().unwrap(),
        );
        assert_eq!(a.len(), SECRET_BYTES);
        assert_ne!(a, b);
    }
}
