//! Tokens signed with JWKS keys: the five algorithms Better Auth can use, rotation,
//! removal, a JWKS server that is down, slow or broken, and floods of unknown `kid`s.
//! Keys are generated here, at test time; the JWKS server is a local one the test controls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::OsRng;
use serde_json::{Value, json};
use task_api::auth::Verifier;
use task_api::auth::jwks::JwksSettings;
use task_api::config::{AuthConfig, CorsOrigins};
use tokio::net::TcpListener;

use crate::support::{Reply, SECRET, TestApp, auth_config};

pub const ALGORITHMS: [&str; 5] = ["EdDSA", "ES256", "ES512", "RS256", "PS256"];

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A private key made for the test, and its public JWK.
pub struct TestKey {
    alg: &'static str,
    kid: String,
    signer: Signer,
}

enum Signer {
    Ed(ed25519_dalek::SigningKey),
    Es256(p256::ecdsa::SigningKey),
    Es512(p521::ecdsa::SigningKey),
    Rs256(rsa::RsaPrivateKey),
    Ps256(rsa::RsaPrivateKey),
}

impl TestKey {
    pub fn generate(alg: &'static str, kid: &str) -> Self {
        let rsa = || rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let signer = match alg {
            "EdDSA" => Signer::Ed(ed25519_dalek::SigningKey::generate(&mut OsRng)),
            "ES256" => Signer::Es256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            "ES512" => Signer::Es512(p521::ecdsa::SigningKey::random(&mut OsRng)),
            "RS256" => Signer::Rs256(rsa()),
            "PS256" => Signer::Ps256(rsa()),
            other => panic!("no test key for {other}"),
        };
        Self {
            alg,
            kid: kid.to_owned(),
            signer,
        }
    }

    /// The public half, as a JWKS lists it.
    pub fn jwk(&self) -> Value {
        use rsa::traits::PublicKeyParts;
        let enc = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut jwk = match &self.signer {
            Signer::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": enc(k.verifying_key().as_bytes())})
            }
            Signer::Es256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "x": enc(p.x().unwrap()), "y": enc(p.y().unwrap())})
            }
            Signer::Es512(k) => {
                let p = p521::ecdsa::VerifyingKey::from(k).to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-521", "x": enc(p.x().unwrap()), "y": enc(p.y().unwrap())})
            }
            Signer::Rs256(k) | Signer::Ps256(k) => {
                json!({"kty": "RSA", "n": enc(&k.n().to_bytes_be()), "e": enc(&k.e().to_bytes_be())})
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.alg);
        jwk
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": self.alg, "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }

    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let message = format!("{}.{}", b64(header), b64(claims));
        let m = message.as_bytes();
        let signature: Vec<u8> = match &self.signer {
            Signer::Ed(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(m).to_bytes().to_vec()
            }
            Signer::Es256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let s: p256::ecdsa::Signature = k.sign(m);
                s.to_bytes().to_vec()
            }
            Signer::Es512(k) => {
                use p521::ecdsa::signature::Signer as _;
                let s: p521::ecdsa::Signature = k.sign(m);
                s.to_bytes().to_vec()
            }
            Signer::Rs256(k) => {
                use rsa::signature::{SignatureEncoding, Signer as _};
                rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(k.clone())
                    .sign(m)
                    .to_vec()
            }
            Signer::Ps256(k) => {
                use rsa::signature::{RandomizedSigner, SignatureEncoding};
                rsa::pss::BlindedSigningKey::<sha2::Sha256>::new(k.clone())
                    .sign_with_rng(&mut OsRng, m)
                    .to_vec()
            }
        };
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// How the test JWKS server answers.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Serve,
    Unavailable,
    Garbage,
    Slow,
    Huge,
    /// Answers after 300 ms.
    Delayed,
}

/// A JWKS server the test controls, counting the fetches it answers.
pub struct JwksServer {
    pub base_url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    mode: Arc<Mutex<Mode>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    pub async fn start(keys: Vec<Value>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let server = Self {
            base_url,
            keys: Arc::new(Mutex::new(keys)),
            mode: Arc::new(Mutex::new(Mode::Serve)),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let (keys, mode, fetches) = (
            server.keys.clone(),
            server.mode.clone(),
            server.fetches.clone(),
        );
        let app = Router::new().route(
            "/api/auth/jwks",
            get(move || {
                let (keys, mode, fetches) = (keys.clone(), mode.clone(), fetches.clone());
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let current = *mode.lock().unwrap();
                    match current {
                        Mode::Serve => (
                            StatusCode::OK,
                            json!({"keys": *keys.lock().unwrap()}).to_string(),
                        ),
                        Mode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "down".into()),
                        Mode::Garbage => (StatusCode::OK, "{\"keys\": [tru".into()),
                        Mode::Delayed => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            (
                                StatusCode::OK,
                                json!({"keys": *keys.lock().unwrap()}).to_string(),
                            )
                        }
                        Mode::Huge => (
                            StatusCode::OK,
                            format!("{{\"keys\": [], \"pad\": \"{}\"}}", "x".repeat(300_000)),
                        ),
                        Mode::Slow => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            (
                                StatusCode::OK,
                                json!({"keys": *keys.lock().unwrap()}).to_string(),
                            )
                        }
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        server
    }

    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.keys.lock().unwrap() = keys;
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Settings that keep the tests short: refetches 300 ms apart, 1 s fetch timeout.
fn fast() -> JwksSettings {
    JwksSettings {
        min_refetch_interval: Duration::from_millis(300),
        refresh_every: Duration::from_secs(300),
        timeout: Duration::from_secs(1),
    }
}

fn better_auth(base_url: &str, secret: bool) -> AuthConfig {
    let mut auth = auth_config();
    if !secret {
        auth.secret = None;
    }
    auth.better_auth_url = Some(base_url.to_owned());
    auth.jwks_url = Some(format!("{base_url}/api/auth/jwks").parse().unwrap());
    auth
}

async fn app_for(auth: AuthConfig, settings: JwksSettings) -> TestApp {
    let verifier = Verifier::with_jwks_settings(&auth, settings);
    TestApp::sqlite_with_verifier(auth, verifier, CorsOrigins::None).await
}

/// Claims as Better Auth issues them: `sub`, `iss` = `aud` = its base URL, user fields.
fn claims(server: &JwksServer, user: &str) -> Value {
    json!({"sub": user, "iss": server.base_url, "aud": server.base_url,
           "iat": now(), "exp": now() + 900, "email": "a@example.com", "name": "A"})
}

async fn list(app: &TestApp, user: &str, token: &str) -> Reply {
    app.call_with_token(
        Method::GET,
        &format!("/api/{user}/tasks"),
        Some(token),
        None,
    )
    .await
}

#[tokio::test]
async fn all_five_algorithms_verify_and_each_key_fixes_its_algorithm() {
    let keys: Vec<TestKey> = ALGORITHMS
        .iter()
        .map(|alg| TestKey::generate(alg, alg))
        .collect();
    let server = JwksServer::start(keys.iter().map(TestKey::jwk).collect()).await;
    let app = app_for(better_auth(&server.base_url, false), fast()).await;

    for key in &keys {
        let token = key.sign(&claims(&server, "alice"));
        let reply = list(&app, "alice", &token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}: {}", key.alg, reply.json);
        let created = app
            .call_with_token(
                Method::POST,
                "/api/alice/tasks",
                Some(&token),
                Some(json!({"title": key.alg})),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
        list(&app, "bob", &token)
            .await
            .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    }
    let all = list(&app, "alice", &keys[0].sign(&claims(&server, "alice"))).await;
    assert_eq!(all.json["count"], 5);
    assert_eq!(server.fetches(), 1, "one fetch serves every key");

    // A header naming another algorithm than the key's is refused, whatever the signature.
    let ed = &keys[0];
    for alg in ["ES256", "RS256", "HS256", "none"] {
        let forged = ed.sign_with_header(
            &json!({"alg": alg, "kid": ed.kid}),
            &claims(&server, "alice"),
        );
        list(&app, "alice", &forged)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    }
    // A kid that points at a key of another type.
    let es = &keys[1];
    let confused = es.sign_with_header(
        &json!({"alg": "ES256", "kid": "RS256"}),
        &claims(&server, "alice"),
    );
    let reply = list(&app, "alice", &confused).await;
    reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    assert_eq!(
        reply.json["detail"],
        "Token algorithm does not match its key"
    );
    // An HS256 token "signed" with a public key as its secret (algorithm confusion).
    let public_as_secret = keys[3].jwk()["n"].as_str().unwrap().to_owned();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("RS256".into()),
            ..Default::default()
        },
        &claims(&server, "alice"),
        &jsonwebtoken::EncodingKey::from_secret(public_as_secret.as_bytes()),
    )
    .unwrap();
    list(&app, "alice", &hs)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
}

#[tokio::test]
async fn issuer_and_audience_default_to_better_auth_url() {
    let key = TestKey::generate("EdDSA", "k1");
    let server = JwksServer::start(vec![key.jwk()]).await;
    let app = app_for(better_auth(&server.base_url, false), fast()).await;
    let mut c = claims(&server, "alice");
    assert_eq!(
        list(&app, "alice", &key.sign(&c)).await.status,
        StatusCode::OK
    );
    c["aud"] = json!(["https://other.example", server.base_url]);
    assert_eq!(
        list(&app, "alice", &key.sign(&c)).await.status,
        StatusCode::OK
    );
    for (claim, value) in [
        ("iss", json!("https://evil.example")),
        ("aud", json!("https://evil.example")),
    ] {
        let mut bad = claims(&server, "alice");
        bad[claim] = value;
        list(&app, "alice", &key.sign(&bad))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    }
    for claim in ["iss", "aud", "exp"] {
        let mut missing = claims(&server, "alice");
        missing.as_object_mut().unwrap().remove(claim);
        list(&app, "alice", &key.sign(&missing))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    }
    let mut expired = claims(&server, "alice");
    expired["exp"] = json!(now() - 120);
    list(&app, "alice", &key.sign(&expired))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    // Better Auth signs with the origin of its base URL, even when that has a path.
    let mut with_path = better_auth(&server.base_url, false);
    with_path.better_auth_url = Some(format!(
        "{}/api/auth/",
        server.base_url.to_uppercase().replace("HTTP://", "http://")
    ));
    let app = app_for(with_path, fast()).await;
    assert_eq!(
        list(&app, "alice", &key.sign(&claims(&server, "alice")))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn secret_and_jwks_together_each_check_their_own_tokens() {
    let key = TestKey::generate("ES256", "k1");
    let server = JwksServer::start(vec![key.jwk()]).await;
    let app = app_for(better_auth(&server.base_url, true), fast()).await;
    // Shared-secret tokens are not held to Better Auth's iss/aud.
    assert_eq!(
        list(&app, "alice", &app.token("alice")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        list(&app, "alice", &key.sign(&claims(&server, "alice")))
            .await
            .status,
        StatusCode::OK
    );
    // A token signed with the secret but claiming a JWKS key id is still an HMAC token.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("k1".into()),
            ..Default::default()
        },
        &json!({"sub": "alice", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(list(&app, "alice", &hs).await.status, StatusCode::OK);
}

#[tokio::test]
async fn rotation_adds_keys_and_a_refetch_drops_removed_ones() {
    let (a, b, c) = (
        TestKey::generate("EdDSA", "a"),
        TestKey::generate("EdDSA", "b"),
        TestKey::generate("EdDSA", "c"),
    );
    let server = JwksServer::start(vec![a.jwk()]).await;
    let app = app_for(better_auth(&server.base_url, false), fast()).await;
    assert_eq!(
        list(&app, "u", &a.sign(&claims(&server, "u"))).await.status,
        StatusCode::OK
    );
    assert_eq!(server.fetches(), 1);

    // Rotation: a new kid triggers a refetch and is accepted — once the refetch interval
    // since the last one has passed (within it, no fetch is made).
    server.set_keys(vec![a.jwk(), b.jwk()]);
    list(&app, "u", &b.sign(&claims(&server, "u")))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    assert_eq!(server.fetches(), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        list(&app, "u", &b.sign(&claims(&server, "u"))).await.status,
        StatusCode::OK
    );
    assert_eq!(server.fetches(), 2);
    // Cached keys need no fetch.
    assert_eq!(
        list(&app, "u", &a.sign(&claims(&server, "u"))).await.status,
        StatusCode::OK
    );
    assert_eq!(server.fetches(), 2);

    // Removal: once a refetch happens, the removed key stops working.
    server.set_keys(vec![b.jwk(), c.jwk()]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        list(&app, "u", &c.sign(&claims(&server, "u"))).await.status,
        StatusCode::OK
    );
    assert_eq!(server.fetches(), 3);
    let reply = list(&app, "u", &a.sign(&claims(&server, "u"))).await;
    reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    assert_eq!(reply.json["detail"], "Token signing key is not known");
}

#[tokio::test]
async fn an_outage_never_fails_tokens_whose_key_is_cached() {
    let key = TestKey::generate("ES512", "k");
    let server = JwksServer::start(vec![key.jwk()]).await;
    let app = app_for(better_auth(&server.base_url, false), fast()).await;
    let token = key.sign(&claims(&server, "u"));
    assert_eq!(list(&app, "u", &token).await.status, StatusCode::OK);

    let stranger = TestKey::generate("EdDSA", "unknown");
    for mode in [Mode::Unavailable, Mode::Garbage] {
        server.set_mode(mode);
        tokio::time::sleep(Duration::from_millis(350)).await;
        let before = server.fetches();
        // An unknown kid makes one (failing) refetch; the last good keys are kept.
        list(&app, "u", &stranger.sign(&claims(&server, "u")))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
        assert_eq!(server.fetches(), before + 1);
        assert_eq!(list(&app, "u", &token).await.status, StatusCode::OK);
    }

    // Slow: while a refetch hangs, requests with a cached key are answered at once.
    server.set_mode(Mode::Slow);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let app = Arc::new(app);
    let waiting = {
        let (app, stranger) = (app.clone(), stranger.sign(&claims(&server, "u")));
        tokio::spawn(async move { list(&app, "u", &stranger).await.status })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(list(&app, "u", &token).await.status, StatusCode::OK);
    assert!(
        !waiting.is_finished(),
        "the cached key did not wait for the slow fetch"
    );
    // The slow fetch gives up after its timeout; the unknown kid is refused.
    assert_eq!(waiting.await.unwrap(), StatusCode::UNAUTHORIZED);
    assert_eq!(list(&app, "u", &token).await.status, StatusCode::OK);
}

#[tokio::test]
async fn unreachable_jwks_at_start_up_gives_503_until_keys_arrive() {
    // A port with nothing listening: connections are refused.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let key = TestKey::generate("RS256", "k");
    let mut auth = better_auth(&refused_url, true);
    let app = app_for(auth.clone(), fast()).await;
    let health = app
        .call_with_token(Method::GET, "/health", None, None)
        .await;
    assert_eq!(health.status, StatusCode::OK);
    let c = json!({"sub": "u", "iss": refused_url, "aud": refused_url, "exp": now() + 60});
    let reply = list(&app, "u", &key.sign(&c)).await;
    reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
    assert!(reply.header("retry-after").is_some());
    // Shared-secret tokens are unaffected.
    assert_eq!(
        list(&app, "u", &app.token("u")).await.status,
        StatusCode::OK
    );

    // A server that is down at first and then comes back.
    let server = JwksServer::start(vec![key.jwk()]).await;
    server.set_mode(Mode::Unavailable);
    auth = better_auth(&server.base_url, false);
    let app = app_for(auth, fast()).await;
    let token = key.sign(&claims(&server, "u"));
    list(&app, "u", &token)
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
    server.set_mode(Mode::Serve);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(list(&app, "u", &token).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_at_most_a_couple_of_fetches() {
    let key = TestKey::generate("EdDSA", "real");
    let server = JwksServer::start(vec![key.jwk()]).await;
    // The production interval: at most one refetch per 30 s.
    let app = Arc::new(
        app_for(
            better_auth(&server.base_url, false),
            JwksSettings::default(),
        )
        .await,
    );
    let forger = TestKey::generate("EdDSA", "x");
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let app = app.clone();
            let header = json!({"alg": "EdDSA", "kid": format!("random-{i}")});
            let token = forger.sign_with_header(&header, &claims(&server, "u"));
            tokio::spawn(async move { list(&app, "u", &token).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::UNAUTHORIZED);
    }
    assert!(server.fetches() <= 2, "{} fetches", server.fetches());
    // Real tokens keep working meanwhile.
    assert_eq!(
        list(&app, "u", &key.sign(&claims(&server, "u")))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn hostile_tokens_never_reach_the_network_or_a_5xx() {
    let key = TestKey::generate("EdDSA", "k");
    // A malformed key beside the good one: skipped, never used (it would panic a verifier).
    let short =
        json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "short", "x": "AAAA"});
    let server = JwksServer::start(vec![key.jwk(), short]).await;
    let app = app_for(better_auth(&server.base_url, false), fast()).await;
    let c = claims(&server, "u");
    let valid = key.sign(&c);
    assert_eq!(list(&app, "u", &valid).await.status, StatusCode::OK);
    let parts: Vec<&str> = valid.split('.').collect();
    let hostile = [
        "x".repeat(9000),
        format!("{}.{}", parts[0], parts[1]),
        format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], parts[2]),
        format!("!!!.{}.{}", parts[1], parts[2]),
        format!("{}.{}.{}", b64(&json!("just a string")), parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            b64(&json!({"alg": "EdDSA", "kid": 5})),
            parts[1],
            parts[2]
        ),
        format!("{}.{}.{}", b64(&json!({"alg": "none"})), parts[1], ""),
        format!(
            "{}.{}.{}",
            b64(&json!({"alg": "HS256", "kid": "k"})),
            parts[1],
            parts[2]
        ),
        format!(
            "{}.{}.{}",
            b64(&json!({"alg": "RSA-OAEP", "kid": "k"})),
            parts[1],
            parts[2]
        ),
        format!("{}.{}.{}", parts[0], "e30", parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], "AAAA"),
        format!("{}.{}.{}", parts[0], parts[1], "not base64 !"),
    ];
    for token in &hostile {
        let reply = list(&app, "u", token).await;
        reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    }
    assert_eq!(server.fetches(), 1, "no hostile token caused a fetch");
    let on_short = key.sign_with_header(&json!({"alg": "EdDSA", "kid": "short"}), &c);
    let reply = list(&app, "u", &on_short).await;
    reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    // Valid signature, claims of the wrong types.
    for bad in [
        json!({"sub": 1, "exp": now() + 60}),
        json!({"sub": "u", "exp": "soon"}),
        json!([1, 2]),
    ] {
        list(&app, "u", &key.sign(&bad))
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    }
}

#[tokio::test]
async fn background_refresh_fetches_at_start_up_and_retries_until_it_succeeds() {
    let key = TestKey::generate("PS256", "k");
    let server = JwksServer::start(vec![key.jwk()]).await;
    server.set_mode(Mode::Unavailable);
    let auth = better_auth(&server.base_url, false);
    let verifier = Verifier::with_jwks_settings(&auth, fast());
    verifier.spawn_jwks_refresh();
    let app = TestApp::sqlite_with_verifier(auth, verifier, CorsOrigins::None).await;

    let wait_for_fetches = async |n: usize| {
        for _ in 0..100 {
            if server.fetches() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("only {} fetches", server.fetches());
    };
    // The first attempt happens with no request at all, and fails.
    wait_for_fetches(1).await;
    server.set_mode(Mode::Serve);
    // The retry (after 1 s) succeeds; the keys are there before any token needs them.
    wait_for_fetches(2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fetched = server.fetches();
    assert_eq!(
        list(&app, "u", &key.sign(&claims(&server, "u")))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        server.fetches(),
        fetched,
        "the token used the prefetched key"
    );
}

#[tokio::test]
async fn an_oversized_jwks_is_refused() {
    let key = TestKey::generate("EdDSA", "k");
    let server = JwksServer::start(vec![key.jwk()]).await;
    server.set_mode(Mode::Huge);
    let app = app_for(better_auth(&server.base_url, false), fast()).await;
    list(&app, "u", &key.sign(&claims(&server, "u")))
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn a_client_that_goes_away_does_not_cancel_the_refetch_it_started() {
    let key = TestKey::generate("EdDSA", "new");
    let server = JwksServer::start(vec![key.jwk()]).await;
    server.set_mode(Mode::Delayed);
    // The production interval: a wasted refetch would lock the key out for 30 s.
    let app = Arc::new(
        app_for(
            better_auth(&server.base_url, false),
            JwksSettings::default(),
        )
        .await,
    );
    let token = key.sign(&claims(&server, "u"));
    let gone = {
        let (app, token) = (app.clone(), token.clone());
        tokio::spawn(async move { list(&app, "u", &token).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    gone.abort();
    // The fetch finishes regardless, and the key is there for the next request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(list(&app, "u", &token).await.status, StatusCode::OK);
    assert_eq!(server.fetches(), 1);
}

/// Verified JWKS tokens are remembered (by hash), only after a successful verification,
/// with `exp` checked again on every hit, and forgotten with their key once a refetch no
/// longer publishes it — while tokens of a key published unchanged stay remembered.
#[tokio::test]
async fn verified_tokens_are_remembered_until_their_expiry_or_their_key_goes() {
    let (a, b, c) = (
        TestKey::generate("EdDSA", "a"),
        TestKey::generate("RS256", "b"),
        TestKey::generate("EdDSA", "c"),
    );
    let server = JwksServer::start(vec![a.jwk(), b.jwk()]).await;
    let auth = better_auth(&server.base_url, true);
    let verifier = Verifier::with_jwks_settings(&auth, fast());
    let (token_a, token_b) = (a.sign(&claims(&server, "u")), b.sign(&claims(&server, "v")));
    for _ in 0..3 {
        assert_eq!(verifier.identify(&token_a).await.unwrap().user, "u");
    }
    assert_eq!(verifier.identify(&token_b).await.unwrap().user, "v");
    assert_eq!(verifier.cached_tokens().0, 2);

    // Garbage cannot fill it: forged signatures, unknown keys, expired tokens; nor do
    // shared-secret tokens go in (checking their HMAC costs what hashing them would).
    for i in 0..100 {
        let (head, _) = token_a.rsplit_once('.').unwrap();
        let forged = format!("{head}.{}", b64(&json!(i)));
        assert!(verifier.identify(&forged).await.is_err());
    }
    let mut expired = claims(&server, "u");
    expired["exp"] = json!(now() - 3600);
    assert!(verifier.identify(&a.sign(&expired)).await.is_err());
    assert!(
        verifier
            .identify(&c.sign(&claims(&server, "w")))
            .await
            .is_err()
    );
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "h", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(verifier.identify(&hs).await.unwrap().user, "h");
    assert_eq!(verifier.cached_tokens().0, 2);

    // A hit still checks `exp`: a token a second from the end of its skew allowance is
    // accepted (and remembered), then refused once it has passed.
    let mut ending = claims(&server, "u");
    ending["exp"] = json!(now() - 59);
    let ending = a.sign(&ending);
    assert!(verifier.identify(&ending).await.is_ok());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let refused = verifier.identify(&ending).await.unwrap_err();
    assert!(refused.to_string().contains("expired"), "{refused}");

    // Key a goes, b stays: the next refetch (a token of the new key c asks for it)
    // ends a's remembered tokens at once; b's still verify.
    server.set_keys(vec![b.jwk(), c.jwk()]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        verifier
            .identify(&c.sign(&claims(&server, "w")))
            .await
            .unwrap()
            .user,
        "w"
    );
    let refused = verifier.identify(&token_a).await.unwrap_err();
    assert!(refused.to_string().contains("not known"), "{refused}");
    assert_eq!(verifier.identify(&token_b).await.unwrap().user, "v");
}
