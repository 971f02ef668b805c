//! Tokens already verified with a JWKS key, so that a client sending the same token again
//! does not cost another Ed25519, ECDSA or RSA verification (several times an HMAC, on
//! every request).
//!
//! - Keyed by the SHA-256 of the token, never the token itself.
//! - Filled only by a verification that succeeded: garbage cannot fill it.
//! - An entry lives until its token's `exp` (plus the skew allowance) at most, and the
//!   cache is bounded in memory (and so in entries).
//! - The time-dependent claims (`exp`, `nbf`) are checked again on every hit.
//! - An entry holds its key weakly: when a JWKS refetch drops the key that verified it,
//!   the key is freed and the entry stops counting at once.
//!
//! Shared-secret (HMAC) tokens are not cached: hashing a token costs about what checking
//! its HMAC does.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;
use sha2::{Digest, Sha256};

use super::LEEWAY_SECS;
use super::claims::Identity;
use super::jwks::PublicKey;

/// Memory the cache may hold (user ids and bookkeeping).
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;
/// What one entry costs besides its user id: the hash, the entry, the cache's own.
const ENTRY_OVERHEAD: u32 = 160;

type TokenHash = [u8; 32];

struct Entry {
    identity: Identity,
    key: Weak<PublicKey>,
}

pub struct VerifiedTokens {
    entries: Cache<TokenHash, Arc<Entry>>,
}

struct UntilExpiry;

impl moka::Expiry<TokenHash, Arc<Entry>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _: &TokenHash,
        entry: &Arc<Entry>,
        _: Instant,
    ) -> Option<Duration> {
        let last = entry.identity.expires + LEEWAY_SECS as f64;
        Some(Duration::from_secs_f64(
            (last - now()).clamp(0.0, 86_400.0 * 365.0),
        ))
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        Self::with_capacity(MAX_BYTES)
    }
}

impl VerifiedTokens {
    /// A cache of at most `bytes` of entries.
    pub fn with_capacity(bytes: u64) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, entry: &Arc<Entry>| {
                    let user = u32::try_from(entry.identity.user.len()).unwrap_or(u32::MAX);
                    user.saturating_add(ENTRY_OVERHEAD)
                })
                .expire_after(UntilExpiry)
                .build(),
        }
    }

    /// Who `token` speaks for, if it was verified before, its key is still published and
    /// it is still within its time claims.
    pub fn get(&self, token: &str) -> Option<Identity> {
        let key = hash(token);
        let entry = self.entries.get(&key)?;
        let now = now();
        let leeway = LEEWAY_SECS as f64;
        let current = entry.identity.expires + leeway >= now
            && entry
                .identity
                .not_before
                .is_none_or(|nbf| nbf <= now + leeway)
            && entry.key.strong_count() > 0;
        if current {
            Some(entry.identity.clone())
        } else {
            // Verified again from scratch, which gives the reason it is refused.
            self.entries.invalidate(&key);
            None
        }
    }

    /// Remembers a token that `key` has just verified.
    pub fn insert(&self, token: &str, identity: &Identity, key: &Arc<PublicKey>) {
        let entry = Entry {
            identity: identity.clone(),
            key: Arc::downgrade(key),
        };
        self.entries.insert(hash(token), Arc::new(entry));
    }

    /// Entries held and the memory they weigh (for tests of the bounds).
    pub fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public key of RFC 8037's example.
    fn key() -> Arc<PublicKey> {
        let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        Arc::new(super::super::jwks::parse_jwk(&jwk).unwrap().1)
    }

    fn identity(user: &str, expires_in: f64) -> Identity {
        Identity {
            user: user.into(),
            expires: now() + expires_in,
            not_before: None,
        }
    }

    #[test]
    fn memory_is_bounded_however_many_tokens_arrive() {
        let cache = VerifiedTokens::with_capacity(64 * 1024);
        let key = key();
        for i in 0..10_000 {
            let user = format!("{i:0>200}");
            cache.insert(&format!("token-{i}"), &identity(&user, 600.0), &key);
        }
        let (entries, bytes) = cache.size();
        assert!(bytes <= 64 * 1024, "{bytes}");
        assert!(entries > 0 && entries < 10_000, "{entries}");
    }

    #[test]
    fn a_hit_checks_the_time_claims_and_the_key() {
        let cache = VerifiedTokens::default();
        let key = key();
        cache.insert("fresh", &identity("a", 600.0), &key);
        assert_eq!(cache.get("fresh").unwrap().user, "a");
        assert!(cache.get("never seen").is_none());
        // Past exp plus the skew allowance: refused (and forgotten) even while held.
        cache.insert("stale", &identity("b", -(LEEWAY_SECS as f64) - 1.0), &key);
        assert!(cache.get("stale").is_none());
        // Not yet valid (a clock stepped back): refused.
        let mut early = identity("c", 600.0);
        early.not_before = Some(now() + LEEWAY_SECS as f64 + 30.0);
        cache.insert("early", &early, &key);
        assert!(cache.get("early").is_none());
        // Its key dropped (a JWKS refetch no longer publishes it): refused.
        drop(key);
        assert!(cache.get("fresh").is_none());
    }
}
