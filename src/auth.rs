//! Bearer-token authentication (contract, "Authentication and authorization").
//!
//! A token is verified with the key its header's `alg` calls for: the shared secret for
//! HS256/HS384/HS512, a JWKS key (chosen by `kid`) for EdDSA, ES256, ES512, RS256 and
//! PS256 — and then the same claim rules apply to both ([`claims`]).
//!
//! The token is split and decoded here, with `jsonwebtoken` used for the signature
//! checks and JWK parsing, because that crate cannot parse an ES512 header at all.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use url::Url;

pub mod cache;
pub mod claims;
pub mod jwks;

use claims::ClaimRules;
pub use claims::Identity;

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Shared secret for HS256/HS384/HS512 (`JWT_SECRET`, alias `BETTER_AUTH_SECRET`).
    pub secret: Option<SecretString>,
    /// `BETTER_AUTH_URL` as written: the Better Auth server, and by default the `iss` and
    /// `aud` of its tokens.
    pub better_auth_url: Option<String>,
    /// The JWKS to fetch public keys from: `JWKS_URL`, else `<BETTER_AUTH_URL>/api/auth/jwks`.
    pub jwks_url: Option<Url>,
    /// Required `iss` (`JWT_ISSUER`).
    pub issuer: Option<String>,
    /// Accepted `aud` values (`JWT_AUDIENCE`, comma-separated); empty: `aud` not checked.
    pub audience: Vec<String>,
}

impl AuthConfig {
    /// No key of any kind: the service runs in development mode.
    pub fn has_key(&self) -> bool {
        self.secret.is_some() || self.jwks_url.is_some()
    }

    /// `iss`/`aud` rules for shared-secret tokens: only what is configured explicitly.
    pub fn secret_rules(&self) -> ClaimRules {
        ClaimRules {
            issuers: self.issuer.iter().cloned().collect(),
            audiences: self.audience.clone(),
        }
    }

    /// `iss`/`aud` rules for JWKS tokens: `JWT_ISSUER`/`JWT_AUDIENCE`, else Better Auth's
    /// defaults. Better Auth uses the origin of its base URL (`new URL(baseURL).origin`:
    /// scheme, lower-case host, port only when not the default); the URL as written, with
    /// or without a trailing slash, is accepted too.
    pub fn jwks_rules(&self) -> ClaimRules {
        let mut base: Vec<String> = Vec::new();
        if let Some(url) = &self.better_auth_url {
            let bare = url.trim_end_matches('/');
            let origin = Url::parse(url)
                .ok()
                .map(|u| u.origin().ascii_serialization());
            for accepted in origin
                .into_iter()
                .chain([bare.to_owned(), format!("{bare}/")])
            {
                if !base.contains(&accepted) {
                    base.push(accepted);
                }
            }
        }
        ClaimRules {
            issuers: match &self.issuer {
                Some(issuer) => vec![issuer.clone()],
                None => base.clone(),
            },
            audiences: if self.audience.is_empty() {
                base
            } else {
                self.audience.clone()
            },
        }
    }
}

use jwks::{ASYMMETRIC_ALGORITHMS, JwksCache, JwksSettings, KeyError};

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 60;
/// Tokens longer than this are refused before any decoding or cryptography.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

const HMAC_ALGORITHMS: [&str; 3] = ["HS256", "HS384", "HS512"];

/// Checks tokens against the configured keys.
pub struct Verifier {
    secret: Option<DecodingKey>,
    secret_rules: ClaimRules,
    jwks: Option<Arc<JwksCache>>,
    jwks_rules: ClaimRules,
    /// JWKS tokens already verified.
    verified: cache::VerifiedTokens,
}

/// The part of a JOSE header this service reads.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
    /// Extensions the verifier must understand (RFC 7515 §4.1.11); this one knows none.
    crit: Option<serde_json::Value>,
}

impl Verifier {
    pub fn new(config: &AuthConfig) -> Self {
        Self::with_jwks_settings(config, JwksSettings::default())
    }

    pub fn with_jwks_settings(config: &AuthConfig, settings: JwksSettings) -> Self {
        Self {
            secret: config
                .secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes())),
            secret_rules: config.secret_rules(),
            jwks: config
                .jwks_url
                .clone()
                .map(|url| Arc::new(JwksCache::new(url, settings))),
            jwks_rules: config.jwks_rules(),
            verified: cache::VerifiedTokens::default(),
        }
    }

    /// The cache of verified JWKS tokens (entries, bytes), for tests of its bounds.
    pub fn cached_tokens(&self) -> (u64, u64) {
        self.verified.size()
    }

    /// JWKS fetches by outcome, when a JWKS is configured.
    pub fn jwks_fetches(&self) -> Option<crate::metrics::FetchCounter> {
        self.jwks.as_ref().map(|jwks| jwks.fetch_counter())
    }

    /// Starts fetching the JWKS in the background (at once, then periodically).
    pub fn spawn_jwks_refresh(&self) {
        if let Some(jwks) = &self.jwks {
            jwks.spawn_refresh();
        }
    }

    /// Verifies a token and returns its user id.
    pub async fn verify(&self, token: &str) -> Result<String, ApiError> {
        self.identify(token).await.map(|identity| identity.user)
    }

    /// Verifies a token and returns who it speaks for, and until when.
    pub async fn identify(&self, token: &str) -> Result<Identity, ApiError> {
        const MALFORMED: ApiError = ApiError::AuthInvalid("Token is malformed");
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ApiError::AuthInvalid("Token is too large"));
        }
        if self.jwks.is_some()
            && let Some(identity) = self.verified.get(token)
        {
            return Ok(identity);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MALFORMED);
        };
        let header: JoseHeader = URL_SAFE_NO_PAD
            .decode(header_b64)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(MALFORMED)?;
        if header.crit.is_some() {
            return Err(ApiError::AuthInvalid("Token uses unsupported extensions"));
        }
        let message = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
        let not_accepted = ApiError::AuthInvalid("Token algorithm is not accepted");

        let claims = |rules: &ClaimRules| {
            let payload = URL_SAFE_NO_PAD.decode(payload_b64).map_err(|_| MALFORMED)?;
            rules.identity_of(&payload).map_err(ApiError::AuthInvalid)
        };

        if HMAC_ALGORITHMS.contains(&header.alg.as_str()) {
            let key = self.secret.as_ref().ok_or(not_accepted)?;
            let alg = Algorithm::from_str(&header.alg).map_err(|_| MALFORMED)?;
            if !jsonwebtoken::crypto::verify(signature, message, key, alg).unwrap_or(false) {
                return Err(ApiError::AuthInvalid("Token signature is invalid"));
            }
            return claims(&self.secret_rules);
        }
        if !ASYMMETRIC_ALGORITHMS.contains(&header.alg.as_str()) {
            return Err(not_accepted);
        }
        let jwks = self.jwks.as_ref().ok_or(not_accepted)?;
        let key = jwks.key(header.kid.as_deref()).await.map_err(|e| match e {
            KeyError::Unknown => ApiError::AuthInvalid("Token signing key is not known"),
            KeyError::Unavailable => {
                ApiError::Unavailable("Signing keys are not available yet; try again")
            }
        })?;
        // A key's `alg` fixes the one algorithm it accepts.
        if key.alg() != header.alg {
            return Err(ApiError::AuthInvalid(
                "Token algorithm does not match its key",
            ));
        }
        if !key.verify(message, signature) {
            return Err(ApiError::AuthInvalid("Token signature is invalid"));
        }
        let identity = claims(&self.jwks_rules)?;
        self.verified.insert(token, &identity, &key);
        Ok(identity)
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

    async fn reason(verifier: &Verifier, token: &str) -> &'static str {
        match verifier.verify(token).await {
            Err(ApiError::AuthInvalid(why)) => why,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn all_three_hmac_algorithms_verify() {
        let v = Verifier::new(&config(None, &[]));
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let claims = json!({"sub": "a", "exp": now() + 60});
            let t = sign(alg, "test-secret-test-secret-test-secret", &claims);
            assert_eq!(v.verify(&t).await.unwrap(), "a", "{alg:?}");
        }
    }

    #[tokio::test]
    async fn hostile_tokens_are_rejected() {
        let v = Verifier::new(&config(None, &[]));
        let claims = json!({"sub": "a", "exp": now() + 60});
        let other = sign(Algorithm::HS256, "another-secret", &claims);
        assert_eq!(reason(&v, &other).await, "Token signature is invalid");
        let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims));
        assert_eq!(reason(&v, &none).await, "Token algorithm is not accepted");
        let rs = format!("{}.{}.sig", b64(&json!({"alg": "RS256"})), b64(&claims));
        assert_eq!(reason(&v, &rs).await, "Token algorithm is not accepted");
        let crit = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "HS256", "crit": ["exp"]})),
            b64(&claims)
        );
        assert_eq!(reason(&v, &crit).await, "Token uses unsupported extensions");
        let alg_number = format!("{}.{}.sig", b64(&json!({"alg": 5})), b64(&claims));
        assert_eq!(reason(&v, &alg_number).await, "Token is malformed");
        // A valid signature over a payload that is not base64 JSON.
        let good = sign(
            Algorithm::HS256,
            "test-secret-test-secret-test-secret",
            &claims,
        );
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[1] = "!!!";
        assert!(v.verify(&parts.join(".")).await.is_err());
        for garbage in [
            "",
            "a.b.c",
            "...",
            "not-a-token",
            "e30.e30.e30",
            "a.b.c.d",
            "\u{0}.x.y",
        ] {
            assert_eq!(reason(&v, garbage).await, "Token is malformed", "{garbage}");
        }
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(reason(&v, &huge).await, "Token is too large");
    }

    #[tokio::test]
    async fn claim_rules_apply_to_secret_tokens() {
        let v = Verifier::new(&config(Some("iss"), &["aud"]));
        let ok = json!({"sub": "a", "exp": now() + 60, "iss": "iss", "aud": "aud"});
        let t = sign(Algorithm::HS256, "test-secret-test-secret-test-secret", &ok);
        assert_eq!(v.verify(&t).await.unwrap(), "a");
        let no_iss = json!({"sub": "a", "exp": now() + 60, "aud": "aud"});
        let t = sign(
            Algorithm::HS256,
            "test-secret-test-secret-test-secret",
            &no_iss,
        );
        assert_eq!(reason(&v, &t).await, "Token issuer is not accepted");
    }

    #[tokio::test]
    async fn no_secret_means_no_hmac_token_verifies() {
        let mut c = config(None, &[]);
        let token = mint(c.secret.as_ref().unwrap(), &c, "a", Duration::from_secs(60)).unwrap();
        c.secret = None;
        assert_eq!(
            reason(&Verifier::new(&c), &token).await,
            "Token algorithm is not accepted"
        );
    }

    #[tokio::test]
    async fn minted_tokens_verify_with_the_configuration() {
        let c = config(Some("iss"), &["aud"]);
        let token = mint(
            c.secret.as_ref().unwrap(),
            &c,
            "alice",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(Verifier::new(&c).verify(&token).await.unwrap(), "alice");
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
