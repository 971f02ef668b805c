//! Public keys from a JWKS (Better Auth's `/api/auth/jwks`), cached by `kid`.
//!
//! - A token whose `kid` is cached never waits on the network, whatever state the JWKS
//!   server is in.
//! - An unknown `kid` triggers one refetch, at most once per [`JwksSettings::min_refetch_interval`]
//!   (so a flood of made-up kids costs a couple of fetches a minute, not one per request);
//!   concurrent requests wait for that one fetch instead of starting their own.
//! - A successful fetch replaces the whole set (a removed key stops working); a failed one
//!   (down, slow, error status, garbage) keeps the last good set.
//! - A background task fetches at start-up, retries with backoff until it succeeds, then
//!   refreshes periodically.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use p521::ecdsa::signature::Verifier as _;
use serde_json::Value;
use url::Url;

use crate::metrics::{FetchCounter, OutcomeLabels};

/// Timing of fetches.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// Least time between two refetches caused by unknown `kid`s.
    pub min_refetch_interval: Duration,
    /// Periodic refresh, which also drops removed keys.
    pub refresh_every: Duration,
    /// Whole-request limit of one fetch.
    pub timeout: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        Self {
            min_refetch_interval: Duration::from_secs(30),
            refresh_every: Duration::from_secs(300),
            timeout: Duration::from_secs(3),
        }
    }
}

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Why no key was found for a token.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The set is loaded and has no such key.
    Unknown,
    /// No set has ever been loaded: the JWKS server has not answered yet.
    Unavailable,
}

/// One public key, fixed to the one algorithm its JWK names.
pub struct PublicKey {
    alg: &'static str,
    verifier: KeyVerifier,
}

enum KeyVerifier {
    /// EdDSA, ES256/384, RS*/PS*: verified by `jsonwebtoken`.
    Jwt(DecodingKey, Algorithm),
    /// ES512 (P-521), which `jsonwebtoken` does not support: verified with RustCrypto.
    Es512(p521::ecdsa::VerifyingKey),
}

impl PublicKey {
    pub fn alg(&self) -> &'static str {
        self.alg
    }

    /// Checks a JWS signature (base64url) over `message` (`header.payload`).
    pub fn verify(&self, message: &[u8], signature: &str) -> bool {
        match &self.verifier {
            KeyVerifier::Jwt(key, alg) => {
                jsonwebtoken::crypto::verify(signature, message, key, *alg).unwrap_or(false)
            }
            KeyVerifier::Es512(key) => URL_SAFE_NO_PAD
                .decode(signature)
                .ok()
                .and_then(|bytes| p521::ecdsa::Signature::from_slice(&bytes).ok())
                .is_some_and(|sig| key.verify(message, &sig).is_ok()),
        }
    }
}

/// Algorithms a JWKS key may be used with. HMAC and `none` are never among them.
pub const ASYMMETRIC_ALGORITHMS: [&str; 10] = [
    "EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
];

/// Parses one JWK into a key and its `kid`.
pub fn parse_jwk(jwk: &Value) -> Result<(Option<String>, PublicKey), &'static str> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if field("use").is_some_and(|u| u != "sig") {
        return Err("not a signing key");
    }
    let (kty, crv) = (field("kty").unwrap_or(""), field("crv").unwrap_or(""));
    // The key type a JWK must have for each algorithm; `alg` absent: the only fit.
    let alg = match (field("alg"), kty, crv) {
        (Some(alg), _, _) => alg,
        (None, "OKP", "Ed25519") => "EdDSA",
        (None, "EC", "P-256") => "ES256",
        (None, "EC", "P-384") => "ES384",
        (None, "EC", "P-521") => "ES512",
        (None, "RSA", _) => "RS256",
        _ => return Err("no usable alg"),
    };
    let alg = ASYMMETRIC_ALGORITHMS
        .into_iter()
        .find(|a| *a == alg)
        .ok_or("algorithm not accepted for public keys")?;
    let fits = match alg {
        "EdDSA" => (kty, crv) == ("OKP", "Ed25519"),
        "ES256" => (kty, crv) == ("EC", "P-256"),
        "ES384" => (kty, crv) == ("EC", "P-384"),
        "ES512" => (kty, crv) == ("EC", "P-521"),
        _ => kty == "RSA",
    };
    if !fits {
        return Err("key type does not fit its alg");
    }
    // `jsonwebtoken` does not check the lengths of key material (a short Ed25519 `x`
    // makes its verifier panic), so every fixed-size coordinate is checked here.
    let coordinate = |name, len| {
        field(name)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .filter(|bytes: &Vec<u8>| bytes.len() == len)
            .ok_or("key coordinate of the wrong size")
    };
    match alg {
        "EdDSA" => drop(coordinate("x", 32)?),
        "ES256" => drop((coordinate("x", 32)?, coordinate("y", 32)?)),
        "ES384" => drop((coordinate("x", 48)?, coordinate("y", 48)?)),
        _ => {}
    }
    let verifier = if alg == "ES512" {
        let coordinate = |name| coordinate(name, 66);
        let mut point = vec![0x04];
        point.extend(coordinate("x")?);
        point.extend(coordinate("y")?);
        KeyVerifier::Es512(
            p521::ecdsa::VerifyingKey::from_sec1_bytes(&point).map_err(|_| "bad P-521 key")?,
        )
    } else {
        let parsed: Jwk = serde_json::from_value(jwk.clone()).map_err(|_| "malformed JWK")?;
        let key = DecodingKey::from_jwk(&parsed).map_err(|_| "unusable JWK")?;
        let algorithm = Algorithm::from_str(alg).map_err(|_| "algorithm not supported")?;
        KeyVerifier::Jwt(key, algorithm)
    };
    Ok((field("kid").map(str::to_owned), PublicKey { alg, verifier }))
}

/// A fetched set of keys.
#[derive(Default)]
pub struct KeySet {
    /// Each key with the JWK it was read from.
    by_kid: HashMap<String, (String, Arc<PublicKey>)>,
    /// Keys published without a `kid`.
    unnamed: Vec<(String, Arc<PublicKey>)>,
}

impl KeySet {
    /// Parses a JWKS document; keys that cannot be used are skipped with a warning.
    pub fn parse(document: &[u8]) -> Result<Self, &'static str> {
        let document: Value = serde_json::from_slice(document).map_err(|_| "not JSON")?;
        let keys = document
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("no \"keys\" list")?;
        let mut set = Self::default();
        for jwk in keys {
            match parse_jwk(jwk) {
                Ok((Some(kid), key)) => {
                    set.by_kid.insert(kid, (jwk.to_string(), Arc::new(key)));
                }
                Ok((None, key)) => set.unnamed.push((jwk.to_string(), Arc::new(key))),
                Err(why) => {
                    let kid = jwk.get("kid").and_then(Value::as_str).unwrap_or("-");
                    tracing::warn!(kid, why, "JWKS: skipping a key");
                }
            }
        }
        Ok(set)
    }

    /// The key for a token's `kid`; a token without one may use the set's only key.
    fn find(&self, kid: Option<&str>) -> Option<Arc<PublicKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).map(|(_, key)| key.clone()),
            None if self.by_kid.len() + self.unnamed.len() == 1 => self
                .unnamed
                .first()
                .or_else(|| self.by_kid.values().next())
                .map(|(_, key)| key.clone()),
            None => None,
        }
    }

    /// Keeps `previous`'s key objects for the keys published unchanged (same JWK): the
    /// tokens they verified stay verified, while a key no longer published is freed, and
    /// with it every cached verification it made (see `super::cache`).
    fn keeping_unchanged(mut self, previous: &KeySet) -> Self {
        for (kid, (source, key)) in &mut self.by_kid {
            if let Some((old_source, old_key)) = previous.by_kid.get(kid)
                && old_source == source
            {
                *key = old_key.clone();
            }
        }
        for (source, key) in &mut self.unnamed {
            if let Some((_, old_key)) = previous.unnamed.iter().find(|(s, _)| s == source) {
                *key = old_key.clone();
            }
        }
        self
    }

    fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }
}

pub struct JwksCache {
    url: Url,
    client: reqwest::Client,
    settings: JwksSettings,
    /// `None` until a fetch has succeeded.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching, so that one fetch serves everyone waiting; holds the time of
    /// the last refetch an unknown `kid` caused.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches by outcome, for the metrics.
    fetches: FetchCounter,
}

impl JwksCache {
    pub fn new(url: Url, settings: JwksSettings) -> Self {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            // Building a client with these options only fails if TLS cannot initialise.
            .unwrap_or_default();
        Self {
            url,
            client,
            settings,
            keys: RwLock::new(None),
            refetch: tokio::sync::Mutex::new(None),
            fetches: FetchCounter::default(),
        }
    }

    pub fn fetch_counter(&self) -> FetchCounter {
        self.fetches.clone()
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The key for a token's `kid`, refetching the set (rate-limited) when it is unknown.
    pub async fn key(self: &Arc<Self>, kid: Option<&str>) -> Result<Arc<PublicKey>, KeyError> {
        if let Some(key) = self.current().and_then(|set| set.find(kid)) {
            return Ok(key);
        }
        let mut last_refetch = self.refetch.lock().await;
        // Another request may have fetched while this one waited.
        let loaded = self.current();
        if let Some(key) = loaded.as_ref().and_then(|set| set.find(kid)) {
            return Ok(key);
        }
        let allowed =
            last_refetch.is_none_or(|at| at.elapsed() >= self.settings.min_refetch_interval);
        if allowed {
            *last_refetch = Some(Instant::now());
            // In a task of its own: a client that goes away mid-request must not cancel
            // the fetch it started and so use up the refetch window for nothing.
            let cache = Arc::clone(self);
            let _ = tokio::spawn(async move { cache.fetch_and_store().await }).await;
        }
        drop(last_refetch);
        match self.current() {
            Some(set) => set.find(kid).ok_or(KeyError::Unknown),
            None => Err(KeyError::Unavailable),
        }
    }

    /// Fetches the set now; on success it replaces the cached one.
    pub async fn refresh(&self) -> bool {
        let _guard = self.refetch.lock().await;
        self.fetch_and_store().await
    }

    async fn fetch_and_store(&self) -> bool {
        let result = self.fetch().await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.fetches.get_or_create(&OutcomeLabels { outcome }).inc();
        match result {
            Ok(set) => {
                tracing::info!(url = %self.url, keys = set.len(), "JWKS: fetched");
                let mut keys = self
                    .keys
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let set = match keys.as_deref() {
                    Some(previous) => set.keeping_unchanged(previous),
                    None => set,
                };
                *keys = Some(Arc::new(set));
                true
            }
            Err(error) => {
                tracing::warn!(url = %self.url, %error, "JWKS: fetch failed; keeping the last good keys");
                false
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err("document too large".into());
            }
        }
        KeySet::parse(&body).map_err(str::to_owned)
    }

    /// Fetches now, retries with backoff until a fetch succeeds, then refreshes every
    /// [`JwksSettings::refresh_every`]. Stops when the cache is dropped.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let Some(strong) = cache.upgrade() else {
                    return;
                };
                let wait = if strong.refresh().await {
                    backoff = Duration::from_secs(1);
                    strong.settings.refresh_every
                } else {
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait
                };
                drop(strong);
                tokio::time::sleep(wait).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn alg_must_fit_the_key_type() {
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(parse_jwk(&ed).unwrap().1.alg(), "EdDSA");
        let mut short = ed.clone();
        short["x"] = json!("AAAA");
        assert_eq!(
            parse_jwk(&short).err(),
            Some("key coordinate of the wrong size")
        );
        let p256_short = json!({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"});
        assert_eq!(
            parse_jwk(&p256_short).err(),
            Some("key coordinate of the wrong size")
        );
        let mut as_rsa = ed.clone();
        as_rsa["alg"] = json!("RS256");
        assert_eq!(
            parse_jwk(&as_rsa).err(),
            Some("key type does not fit its alg")
        );
        for alg in ["HS256", "none", "XYZ"] {
            let mut k = ed.clone();
            k["alg"] = json!(alg);
            assert_eq!(
                parse_jwk(&k).err(),
                Some("algorithm not accepted for public keys")
            );
        }
        let mut enc = ed.clone();
        enc["use"] = json!("enc");
        assert_eq!(parse_jwk(&enc).err(), Some("not a signing key"));
        assert!(parse_jwk(&json!({"kty": "oct", "k": "c2VjcmV0"})).is_err());
    }

    #[test]
    fn bad_documents_are_refused_and_bad_keys_skipped() {
        assert!(KeySet::parse(b"garbage").is_err());
        assert!(KeySet::parse(b"{\"nokeys\": []}").is_err());
        let set = KeySet::parse(
            json!({"keys": [
                {"kty": "OKP", "crv": "Ed25519", "kid": "good", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty": "EC", "crv": "P-521", "kid": "short", "alg": "ES512", "x": "AA", "y": "AA"},
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                "not an object"
            ]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.find(Some("good")).is_some());
        // A token without a kid may use the only key.
        assert!(set.find(None).is_some());
        assert!(set.find(Some("short")).is_none());
    }
}
