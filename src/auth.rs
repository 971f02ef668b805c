//! Bearer-token authentication (contract, "Authentication and authorization").
//!
//! Tokens are JWTs signed with the shared secret (HS256/HS384/HS512). The user is the
//! `user_id` claim, else `sub`; `exp` is required; `nbf` and `iat` are checked; 60 s of
//! clock skew is tolerated; `iss`/`aud` are required when configured. Public keys from a
//! JWKS slot in beside the secret in [`Verifier`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::error::ApiError;

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 60;
/// Tokens longer than this are refused before any decoding or cryptography.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

const HMAC_ALGORITHMS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// Checks tokens against the configured keys.
pub struct Verifier {
    secret: Option<DecodingKey>,
    validation: Validation,
}

/// The claims this service reads; the rest of a token's payload is ignored.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    user_id: Option<String>,
    iat: Option<f64>,
}

impl Verifier {
    pub fn new(config: &AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = HMAC_ALGORITHMS.to_vec();
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if config.audience.is_empty() {
            // Contract: with no audience configured, `aud` is not checked.
            validation.validate_aud = false;
        } else {
            validation.set_audience(&config.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Self {
            secret: config
                .secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes())),
            validation,
        }
    }

    /// Verifies a token and returns its user id.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ApiError::AuthInvalid("Token is too large"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::AuthInvalid("Token is malformed"))?;
        let key = match header.alg {
            alg if HMAC_ALGORITHMS.contains(&alg) => self.secret.as_ref(),
            _ => None,
        }
        .ok_or(ApiError::AuthInvalid("Token algorithm is not accepted"))?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| ApiError::AuthInvalid(describe(e.kind())))?
            .claims;
        if let Some(iat) = claims.iat {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            if iat > now + LEEWAY_SECS as f64 {
                return Err(ApiError::AuthInvalid("Token is issued in the future"));
            }
        }
        user_of(claims)
    }
}

fn user_of(claims: Claims) -> Result<String, ApiError> {
    let user = match (claims.user_id, claims.sub) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::AuthInvalid("Token user_id and sub claims differ"));
        }
        (Some(user), _) | (None, Some(user)) => user,
        (None, None) => String::new(),
    };
    if user.is_empty() {
        return Err(ApiError::AuthInvalid("Token has no user claim"));
    }
    Ok(user)
}

fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "Token has expired",
        ErrorKind::ImmatureSignature => "Token is not valid yet",
        ErrorKind::InvalidSignature => "Token signature is invalid",
        ErrorKind::InvalidAlgorithm => "Token algorithm is not accepted",
        ErrorKind::InvalidIssuer => "Token issuer is not accepted",
        ErrorKind::InvalidAudience => "Token audience is not accepted",
        ErrorKind::MissingRequiredClaim(_) => "Token is missing a required claim",
        _ => "Token is malformed",
    }
}

/// The token of an `Authorization: Bearer …` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::AuthMissing)?
        .as_bytes();
    let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(ApiError::AuthMissing);
    }
    let token = std::str::from_utf8(rest)
        .map_err(|_| ApiError::AuthInvalid("Token is malformed"))?
        .trim();
    if token.is_empty() {
        // The scheme without credentials: no token was sent.
        return Err(ApiError::AuthMissing);
    }
    Ok(token)
}

/// Claims of a token this service mints (`token` command, development mode, tests).
#[derive(Debug, Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Mints an HS256 token for `user` that this service's configuration accepts.
pub fn mint(
    secret: &SecretString,
    config: &AuthConfig,
    user: &str,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = MintedClaims {
        sub: user,
        iat: now,
        exp: now + ttl.as_secs(),
        iss: config.issuer.as_deref(),
        aud: config.audience.first().map(String::as_str),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
}

/// A random secret for a development run with no key configured.
pub fn random_secret() -> SecretString {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    // The OS random source failing at start-up is unrecoverable.
    getrandom::fill(&mut bytes).expect("the operating system's random source is unavailable");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(bytes)
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::{Value, json};

    fn config(issuer: Option<&str>, audience: &[&str]) -> AuthConfig {
        AuthConfig {
            secret: Some("test-secret-test-secret-test-secret".to_owned().into()),
            better_auth_url: None,
            jwks_url: None,
            issuer: issuer.map(str::to_owned),
            audience: audience.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn verify(config: &AuthConfig, claims: Value) -> Result<String, &'static str> {
        let token = sign(
            Algorithm::HS256,
            "test-secret-test-secret-test-secret",
            &claims,
        );
        Verifier::new(config).verify(&token).map_err(|e| match e {
            ApiError::AuthInvalid(why) => why,
            other => panic!("unexpected {other:?}"),
        })
    }

    #[test]
    fn all_three_hmac_algorithms_verify() {
        let c = config(None, &[]);
        for alg in HMAC_ALGORITHMS {
            let t = sign(
                alg,
                "test-secret-test-secret-test-secret",
                &json!({"sub": "a", "exp": now() + 60}),
            );
            assert_eq!(Verifier::new(&c).verify(&t).unwrap(), "a", "{alg:?}");
        }
    }

    #[test]
    fn claim_rules() {
        let c = config(None, &[]);
        let n = now();
        assert_eq!(
            verify(&c, json!({"sub": "a"})),
            Err("Token is missing a required claim")
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n - 61})),
            Err("Token has expired")
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n - 30})),
            Ok("a".into())
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n + 600, "nbf": n + 120})),
            Err("Token is not valid yet")
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n + 600, "nbf": n + 30})),
            Ok("a".into())
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n + 600, "iat": n + 120})),
            Err("Token is issued in the future")
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n + 600, "iat": n + 30})),
            Ok("a".into())
        );
        assert_eq!(
            verify(&c, json!({"exp": n + 60})),
            Err("Token has no user claim")
        );
        assert_eq!(
            verify(&c, json!({"sub": "", "exp": n + 60})),
            Err("Token has no user claim")
        );
        assert_eq!(
            verify(&c, json!({"user_id": "u", "exp": n + 60})),
            Ok("u".into())
        );
        assert_eq!(
            verify(&c, json!({"user_id": "u", "sub": "u", "exp": n + 60})),
            Ok("u".into())
        );
        assert_eq!(
            verify(&c, json!({"user_id": "u", "sub": "v", "exp": n + 60})),
            Err("Token user_id and sub claims differ")
        );
        assert_eq!(
            verify(&c, json!({"sub": 42, "exp": n + 60})),
            Err("Token is malformed")
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": "soon"})),
            Err("Token is missing a required claim")
        );
        // With no audience configured, a token carrying one is still accepted.
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n + 60, "aud": "x"})),
            Ok("a".into())
        );
    }

    #[test]
    fn issuer_and_audience_are_required_when_configured() {
        let c = config(Some("https://auth.example"), &["api"]);
        let n = now();
        let good = json!({"sub": "a", "exp": n + 60, "iss": "https://auth.example", "aud": "api"});
        assert_eq!(verify(&c, good), Ok("a".into()));
        let list = json!({"sub": "a", "exp": n + 60, "iss": "https://auth.example", "aud": ["web", "api"]});
        assert_eq!(verify(&c, list), Ok("a".into()));
        assert_eq!(
            verify(
                &c,
                json!({"sub": "a", "exp": n + 60, "iss": "https://evil", "aud": "api"})
            ),
            Err("Token issuer is not accepted")
        );
        assert_eq!(
            verify(&c, json!({"sub": "a", "exp": n + 60, "aud": "api"})),
            Err("Token is missing a required claim")
        );
        assert_eq!(
            verify(
                &c,
                json!({"sub": "a", "exp": n + 60, "iss": "https://auth.example", "aud": "web"})
            ),
            Err("Token audience is not accepted")
        );
        assert_eq!(
            verify(
                &c,
                json!({"sub": "a", "exp": n + 60, "iss": "https://auth.example"})
            ),
            Err("Token is missing a required claim")
        );
    }

    #[test]
    fn wrong_secret_none_and_garbage_are_rejected() {
        let c = config(None, &[]);
        let v = Verifier::new(&c);
        let other = sign(
            Algorithm::HS256,
            "another-secret",
            &json!({"sub": "a", "exp": now() + 60}),
        );
        assert!(matches!(
            v.verify(&other),
            Err(ApiError::AuthInvalid("Token signature is invalid"))
        ));
        // alg "none", unsigned.
        use base64::Engine;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none"})),
            b64(&json!({"sub": "a", "exp": now() + 60}))
        );
        assert!(v.verify(&none).is_err());
        let rs = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "RS256"})),
            b64(&json!({"sub": "a", "exp": now() + 60}))
        );
        assert!(matches!(
            v.verify(&rs),
            Err(ApiError::AuthInvalid("Token algorithm is not accepted"))
        ));
        for garbage in ["", "a.b.c", "...", "not-a-token", "e30.e30.e30"] {
            assert!(v.verify(garbage).is_err(), "{garbage}");
        }
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(
            v.verify(&huge),
            Err(ApiError::AuthInvalid("Token is too large"))
        ));
    }

    #[test]
    fn no_secret_means_no_hmac_token_verifies() {
        let mut c = config(None, &[]);
        let token = mint(c.secret.as_ref().unwrap(), &c, "a", Duration::from_secs(60)).unwrap();
        c.secret = None;
        assert!(Verifier::new(&c).verify(&token).is_err());
    }

    #[test]
    fn minted_tokens_verify_with_the_configuration() {
        let c = config(Some("iss"), &["aud"]);
        let token = mint(
            c.secret.as_ref().unwrap(),
            &c,
            "alice",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(Verifier::new(&c).verify(&token).unwrap(), "alice");
    }

    #[test]
    fn bearer_header_parsing() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(matches!(
            bearer_token(&HeaderMap::new()),
            Err(ApiError::AuthMissing)
        ));
        assert!(matches!(
            bearer_token(&h("Basic abc")),
            Err(ApiError::AuthMissing)
        ));
        assert!(matches!(
            bearer_token(&h("Bearertoken")),
            Err(ApiError::AuthMissing)
        ));
        assert!(matches!(
            bearer_token(&h("Bearer ")),
            Err(ApiError::AuthMissing)
        ));
        assert_eq!(bearer_token(&h("bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(&h("BEARER  abc ")).unwrap(), "abc");
    }

    #[test]
    fn random_secrets_differ() {
        assert_ne!(
            random_secret().expose_secret(),
            random_secret().expose_secret()
        );
    }
}
