//! The claim rules of the contract, applied to every token whatever key signed it.
//!
//! Written here rather than left to `jsonwebtoken`'s `Validation` because ES512 tokens
//! (which that crate cannot parse) must obey exactly the same rules.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::LEEWAY_SECS;

/// Which `iss` and `aud` a token must carry; empty lists are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimRules {
    /// Accepted issuers: `iss` must be one of them.
    pub issuers: Vec<String>,
    /// Accepted audiences: `aud` (a string or a list) must contain one of them.
    pub audiences: Vec<String>,
}

/// The claims this service reads; the rest of a token's payload is ignored.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    user_id: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    iss: Option<String>,
    aud: Option<Audience>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains_any(&self, accepted: &[String]) -> bool {
        match self {
            Self::One(aud) => accepted.contains(aud),
            Self::Many(auds) => auds.iter().any(|aud| accepted.contains(aud)),
        }
    }
}

/// Who a verified token speaks for, and until when.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user: String,
    /// The token's `exp` (seconds since the Unix epoch); it is accepted until
    /// [`LEEWAY_SECS`] after that.
    pub expires: f64,
    /// The token's `nbf`, if it has one.
    pub not_before: Option<f64>,
}

impl Identity {
    /// The last instant the token is accepted: `exp` plus the skew allowance.
    pub fn valid_until(&self) -> chrono::DateTime<chrono::Utc> {
        let micros = (self.expires + LEEWAY_SECS as f64) * 1e6;
        chrono::DateTime::from_timestamp_micros(micros as i64)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
    }
}

impl ClaimRules {
    /// Checks a token's decoded payload and returns its user id.
    pub fn user_of(&self, payload: &[u8]) -> Result<String, &'static str> {
        self.identity_of(payload).map(|identity| identity.user)
    }

    /// Checks a token's decoded payload and returns who it speaks for, until when.
    pub fn identity_of(&self, payload: &[u8]) -> Result<Identity, &'static str> {
        let claims: Claims =
            serde_json::from_slice(payload).map_err(|_| "Token claims are malformed")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = LEEWAY_SECS as f64;
        let exp = claims.exp.ok_or("Token has no expiry (exp)")?;
        if exp + leeway < now {
            return Err("Token has expired");
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + leeway) {
            return Err("Token is not valid yet");
        }
        if claims.iat.is_some_and(|iat| iat > now + leeway) {
            return Err("Token is issued in the future");
        }
        if !self.issuers.is_empty()
            && !claims
                .iss
                .as_ref()
                .is_some_and(|iss| self.issuers.contains(iss))
        {
            return Err("Token issuer is not accepted");
        }
        if !self.audiences.is_empty()
            && !claims
                .aud
                .as_ref()
                .is_some_and(|aud| aud.contains_any(&self.audiences))
        {
            return Err("Token audience is not accepted");
        }
        let user = match (claims.user_id, claims.sub) {
            (Some(a), Some(b)) if a != b => return Err("Token user_id and sub claims differ"),
            (Some(user), _) | (None, Some(user)) => user,
            (None, None) => String::new(),
        };
        if user.is_empty() {
            return Err("Token has no user claim");
        }
        Ok(Identity {
            user,
            expires: exp,
            not_before: claims.nbf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn check(rules: &ClaimRules, claims: Value) -> Result<String, &'static str> {
        rules.user_of(claims.to_string().as_bytes())
    }

    #[test]
    fn time_claims_with_sixty_seconds_of_skew() {
        let r = ClaimRules::default();
        let n = now();
        assert_eq!(
            check(&r, json!({"sub": "a"})),
            Err("Token has no expiry (exp)")
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n - 61})),
            Err("Token has expired")
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n - 30})),
            Ok("a".into())
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n + 1, "nbf": n + 90})),
            Err("Token is not valid yet")
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n + 1, "nbf": n + 30})),
            Ok("a".into())
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n + 1, "iat": n + 90})),
            Err("Token is issued in the future")
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n + 1, "iat": n + 30})),
            Ok("a".into())
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": (n + 60) as f64 + 0.5})),
            Ok("a".into())
        );
    }

    #[test]
    fn wrong_types_are_malformed() {
        let r = ClaimRules::default();
        let n = now();
        for claims in [
            json!({"sub": 7, "exp": n + 60}),
            json!({"sub": "a", "exp": "tomorrow"}),
            json!({"sub": "a", "exp": n + 60, "aud": 5}),
            json!({"sub": "a", "exp": n + 60, "iss": ["x"]}),
            json!({"sub": "a", "exp": n + 60, "user_id": {"id": "a"}}),
            json!(["not", "an", "object"]),
        ] {
            assert_eq!(
                check(&r, claims.clone()),
                Err("Token claims are malformed"),
                "{claims}"
            );
        }
        assert_eq!(r.user_of(b"not json"), Err("Token claims are malformed"));
    }

    #[test]
    fn the_user_is_user_id_else_sub() {
        let r = ClaimRules::default();
        let n = now();
        assert_eq!(
            check(&r, json!({"user_id": "u", "exp": n + 60})),
            Ok("u".into())
        );
        assert_eq!(
            check(&r, json!({"user_id": "u", "sub": "u", "exp": n + 60})),
            Ok("u".into())
        );
        assert_eq!(
            check(&r, json!({"user_id": "u", "sub": "v", "exp": n + 60})),
            Err("Token user_id and sub claims differ")
        );
        assert_eq!(
            check(&r, json!({"exp": n + 60})),
            Err("Token has no user claim")
        );
        assert_eq!(
            check(&r, json!({"sub": "", "exp": n + 60})),
            Err("Token has no user claim")
        );
        assert_eq!(
            check(&r, json!({"sub": null, "user_id": "u", "exp": n + 60})),
            Ok("u".into())
        );
    }

    #[test]
    fn issuer_and_audience() {
        let r = ClaimRules {
            issuers: vec!["https://auth.example".into()],
            audiences: vec!["api".into()],
        };
        let n = now();
        let iss = "https://auth.example";
        assert_eq!(
            check(
                &r,
                json!({"sub": "a", "exp": n + 60, "iss": iss, "aud": "api"})
            ),
            Ok("a".into())
        );
        assert_eq!(
            check(
                &r,
                json!({"sub": "a", "exp": n + 60, "iss": iss, "aud": ["web", "api"]})
            ),
            Ok("a".into())
        );
        assert_eq!(
            check(
                &r,
                json!({"sub": "a", "exp": n + 60, "iss": iss, "aud": []})
            ),
            Err("Token audience is not accepted")
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n + 60, "iss": iss})),
            Err("Token audience is not accepted")
        );
        assert_eq!(
            check(&r, json!({"sub": "a", "exp": n + 60, "aud": "api"})),
            Err("Token issuer is not accepted")
        );
        assert_eq!(
            check(
                &r,
                json!({"sub": "a", "exp": n + 60, "iss": "https://evil", "aud": "api"})
            ),
            Err("Token issuer is not accepted")
        );
        // With no audience configured, any `aud` (or none) is accepted.
        let open = ClaimRules::default();
        assert_eq!(
            check(&open, json!({"sub": "a", "exp": n + 60, "aud": "x"})),
            Ok("a".into())
        );
    }
}
