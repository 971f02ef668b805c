//! Authentication and authorization, and the order in which checks answer.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use task_api::config::CorsOrigins;

use crate::support::{SECRET, TestApp, auth_config};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(alg: Algorithm, secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn b64(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

async fn missing_or_other_scheme_is_auth_missing(app: TestApp) {
    for authorization in [
        None,
        Some("Basic YWxpY2U6cHc="),
        Some("Token abc"),
        Some("Bearer"),
        Some("Bearer   "),
    ] {
        let mut request = Request::builder().uri("/api/alice/tasks");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        app.send(request.body(Body::empty()).unwrap())
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    }
}

async fn bearer_scheme_is_case_insensitive(app: TestApp) {
    let token = app.token("alice");
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let request = Request::builder()
            .uri("/api/alice/tasks")
            .header(header::AUTHORIZATION, format!("{scheme} {token}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.send(request).await.status, StatusCode::OK, "{scheme}");
    }
}

async fn bad_tokens_are_auth_invalid(app: TestApp) {
    let n = now();
    let good = json!({"sub": "alice", "exp": n + 600});
    let with = |extra: Value| {
        let mut claims = good.clone();
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        sign(Algorithm::HS256, SECRET, claims)
    };
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    let tokens = [
        (
            "wrong secret",
            sign(Algorithm::HS256, "some-other-secret", good.clone()),
        ),
        ("expired", with(json!({"exp": n - 120}))),
        (
            "no exp",
            sign(Algorithm::HS256, SECRET, json!({"sub": "alice"})),
        ),
        ("nbf in the future", with(json!({"nbf": n + 300}))),
        ("iat in the future", with(json!({"iat": n + 300}))),
        (
            "no user",
            sign(Algorithm::HS256, SECRET, json!({"exp": n + 600})),
        ),
        (
            "sub and user_id differ",
            with(json!({"user_id": "mallory"})),
        ),
        ("sub not a string", with(json!({"sub": 7}))),
        ("alg none", unsigned),
        (
            "RS256 header",
            format!("{}.{}.c2ln", b64(&json!({"alg": "RS256"})), b64(&good)),
        ),
        ("garbage", "not.a.token".into()),
        ("bad base64", "@@@.###.$$$".into()),
        ("huge", "a".repeat(20_000)),
    ];
    for (why, token) in tokens {
        let reply = app
            .call_with_token(Method::GET, "/api/alice/tasks", Some(&token), None)
            .await;
        reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
        assert!(
            !String::from_utf8_lossy(&reply.raw).contains(&token),
            "{why}: token echoed"
        );
    }
    // Within the 60 s skew, and HS384/HS512 with the same secret, are accepted.
    for token in [
        with(json!({"exp": n - 30})),
        with(json!({"nbf": n + 30, "iat": n + 30})),
        with(json!({"user_id": "alice"})),
        sign(Algorithm::HS384, SECRET, good.clone()),
        sign(Algorithm::HS512, SECRET, good.clone()),
        sign(
            Algorithm::HS256,
            SECRET,
            json!({"user_id": "alice", "exp": n + 600, "aud": "anything"}),
        ),
    ] {
        let reply = app
            .call_with_token(Method::GET, "/api/alice/tasks", Some(&token), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    }
}

async fn checks_answer_in_contract_order(app: TestApp) {
    let bad_token = Some("x.y.z");
    let bobs = app.create("bob", "b").await["id"].as_i64().unwrap();
    // token (401) before path owner (403)
    app.call_with_token(
        Method::POST,
        "/api/bob/tasks",
        bad_token,
        Some(json!({"title": ""})),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    // path owner (403) before body (422) and task id (422)
    app.call(
        Method::POST,
        "/api/bob/tasks",
        "alice",
        Some(json!({"title": ""})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    app.call(
        Method::PATCH,
        "/api/bob/tasks/abc",
        "alice",
        Some(json!({})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    // body (422) before existence (404)
    app.call(
        Method::PUT,
        "/api/alice/tasks/999999",
        "alice",
        Some(json!({"title": ""})),
    )
    .await
    .assert_invalid(&[
        (&["body", "title"], "string_too_short"),
        (&["body", "complete"], "missing"),
    ]);
    // body (400) before existence (404) and task owner (403)
    app.call(
        Method::PATCH,
        &format!("/api/alice/tasks/{bobs}"),
        "alice",
        Some(json!({})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    // existence (404), then task owner (403)
    app.call(
        Method::PATCH,
        "/api/alice/tasks/999999",
        "alice",
        Some(json!({"title": "x"})),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    app.call(
        Method::PATCH,
        &format!("/api/alice/tasks/{bobs}"),
        "alice",
        Some(json!({"title": "x"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
}

async fn path_user_must_be_the_token_user(app: TestApp) {
    for method in [Method::GET, Method::POST] {
        app.call(
            method,
            "/api/bob/tasks",
            "alice",
            Some(json!({"title": "t"})),
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    }
    assert_eq!(app.count("bob").await, 0);
}

async fn issuer_and_audience_when_configured(app: TestApp) {
    let mut auth = auth_config();
    auth.issuer = Some("https://auth.example.com".into());
    auth.audience = vec!["https://api.example.com".into()];
    let app = app.sibling(auth, CorsOrigins::None).await;
    let n = now();
    let iss = "https://auth.example.com";
    let aud = "https://api.example.com";
    for (claims, status) in [
        (
            json!({"sub": "a", "exp": n + 60, "iss": iss, "aud": aud}),
            StatusCode::OK,
        ),
        (
            json!({"sub": "a", "exp": n + 60, "iss": iss, "aud": ["other", aud]}),
            StatusCode::OK,
        ),
        (
            json!({"sub": "a", "exp": n + 60, "iss": iss}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            json!({"sub": "a", "exp": n + 60, "aud": aud}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            json!({"sub": "a", "exp": n + 60, "iss": "https://evil.example", "aud": aud}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            json!({"sub": "a", "exp": n + 60, "iss": iss, "aud": "https://other.example"}),
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let token = sign(Algorithm::HS256, SECRET, claims.clone());
        let reply = app
            .call_with_token(Method::GET, "/api/a/tasks", Some(&token), None)
            .await;
        assert_eq!(reply.status, status, "{claims}");
    }
}

crate::on_both_databases!(
    missing_or_other_scheme_is_auth_missing,
    bearer_scheme_is_case_insensitive,
    bad_tokens_are_auth_invalid,
    checks_answer_in_contract_order,
    path_user_must_be_the_token_user,
    issuer_and_audience_when_configured,
);
