//! Fair use: the per-user limit and its headers, the failed-authentication limit per
//! client address, and limits shared by instances through a real Redis — which failing
//! or stopping never fails a request.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use task_api::auth::Verifier;
use task_api::http::HttpOptions;
use task_api::limits::{LimitSettings, Policy};

use crate::support::{Reply, TestApp, auth_config, tool};

fn limited(quota: u32, window_secs: u32) -> LimitSettings {
    LimitSettings {
        user: Policy::new(quota, window_secs),
        ..LimitSettings::default()
    }
}

async fn sqlite(limits: LimitSettings) -> TestApp {
    let auth = auth_config();
    let options = HttpOptions {
        limits,
        ..HttpOptions::default()
    };
    TestApp::sqlite_with_options(auth.clone(), Verifier::new(&auth), &options).await
}

async fn postgres(limits: LimitSettings) -> Option<TestApp> {
    let options = HttpOptions {
        limits,
        ..HttpOptions::default()
    };
    TestApp::postgres_with_options(auth_config(), &options, |o| o).await
}

/// `"user";r=<n>;t=<n>` → (r, t), checking the syntax on the way.
fn remaining(reply: &Reply) -> (u64, u64) {
    let value = reply
        .header("ratelimit")
        .unwrap_or_else(|| panic!("no RateLimit header on a {}", reply.status));
    let rest = value.strip_prefix("\"user\";r=").expect(value);
    let (r, t) = rest.split_once(";t=").expect(value);
    (r.parse().expect(value), t.parse().expect(value))
}

fn retry_after(reply: &Reply) -> u64 {
    let value: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(value >= 1);
    value
}

/// A fresh key prefix in the shared Redis, so tests never see each other's counts.
fn prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

async fn every_authenticated_answer_is_counted_and_carries_the_headers(app: TestApp) {
    let list = app.call(Method::GET, "/api/ann/tasks", "ann", None).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.header("ratelimit-policy"), Some("\"user\";q=5;w=60"));
    assert_eq!(remaining(&list), (4, 12));
    // 403, 422 and 404 answers count and carry the headers as well.
    let forbidden = app.call(Method::GET, "/api/bob/tasks", "ann", None).await;
    forbidden.assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    assert_eq!(remaining(&forbidden).0, 3);
    let invalid = app.call(Method::GET, "/api/ann/tasks/x", "ann", None).await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(remaining(&invalid).0, 2);
    let missing = app
        .call(Method::GET, "/api/ann/tasks/99", "ann", None)
        .await;
    missing.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(remaining(&missing).0, 1);
    let created = app.create_reply("ann", "last one").await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(remaining(&created), (0, 60));

    let refused = app.call(Method::GET, "/api/ann/tasks", "ann", None).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    assert_eq!(remaining(&refused), (0, 60));
    assert_eq!(retry_after(&refused), 12);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"user\";q=5;w=60")
    );
    // A refused write changes nothing.
    let refused = app.create_reply("ann", "one too many").await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");

    // Another user has their own quota.
    assert_eq!(app.count("bob").await, 0);
    // Never limited, never counted: the health check and the documentation.
    for path in ["/health", "/openapi.json", "/docs/"] {
        let reply = app.call_with_token(Method::GET, path, None, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert!(reply.header("ratelimit").is_none(), "{path}");
    }
    // An answer to a token that did not verify carries no counts.
    let unauthorized = app
        .call_with_token(Method::GET, "/api/ann/tasks", Some("garbage"), None)
        .await;
    unauthorized.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    assert!(unauthorized.header("ratelimit").is_none());
    let metrics = app.metrics.render();
    assert!(
        metrics.contains("task_api_rate_limited_requests_total{kind=\"user\"} 2"),
        "{metrics}"
    );
    let bob = app.call(Method::GET, "/api/bob/tasks", "bob", None).await;
    assert_eq!(remaining(&bob).0, 3, "bob: list and count");
}

#[tokio::test]
async fn every_authenticated_answer_is_counted_and_carries_the_headers_sqlite() {
    every_authenticated_answer_is_counted_and_carries_the_headers(sqlite(limited(5, 60)).await)
        .await;
}

#[tokio::test]
async fn every_authenticated_answer_is_counted_and_carries_the_headers_postgres() {
    if let Some(app) = postgres(limited(5, 60)).await {
        every_authenticated_answer_is_counted_and_carries_the_headers(app).await;
    }
}

#[tokio::test]
async fn the_quota_comes_back_after_waiting() {
    // Two per second: one request back every 500 ms.
    let app = sqlite(limited(2, 1)).await;
    for _ in 0..2 {
        assert_eq!(app.count("cat").await, 0);
    }
    let refused = app.call(Method::GET, "/api/cat/tasks", "cat", None).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    let wait = retry_after(&refused);
    assert_eq!(wait, 1);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let again = app.call(Method::GET, "/api/cat/tasks", "cat", None).await;
    assert_eq!(again.status, StatusCode::OK);
}

#[tokio::test]
async fn the_defaults_are_on_and_zero_turns_the_limit_off() {
    let app = sqlite(LimitSettings::default()).await;
    let reply = app.call(Method::GET, "/api/dan/tasks", "dan", None).await;
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"user\";q=1200;w=60")
    );
    assert_eq!(remaining(&reply), (1199, 1));

    let app = sqlite(LimitSettings::off()).await;
    for _ in 0..30 {
        let reply = app.call(Method::GET, "/api/dan/tasks", "dan", None).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.header("ratelimit").is_none());
        assert!(reply.header("ratelimit-policy").is_none());
    }
}

/// Concurrent requests of one user never pass more than the quota (the in-memory step is
/// one compare-and-swap), many rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_pass_more_than_the_quota() {
    let app = std::sync::Arc::new(sqlite(limited(10, 3600)).await);
    for round in 0..10 {
        let ok = racing(std::slice::from_ref(&app), &format!("race-{round}"), 40).await;
        assert_eq!(ok, 10, "round {round}");
    }
}

/// Sends `n` requests of `user` at once, spread over `apps`; how many got 200.
async fn racing(apps: &[std::sync::Arc<TestApp>], user: &str, n: usize) -> usize {
    let replies = futures_util::future::join_all((0..n).map(|i| {
        let (app, user) = (apps[i % apps.len()].clone(), user.to_owned());
        tokio::spawn(async move {
            app.call(Method::GET, &format!("/api/{user}/tasks"), &user, None)
                .await
                .status
        })
    }))
    .await;
    replies
        .into_iter()
        .filter(|r| *r.as_ref().unwrap() == StatusCode::OK)
        .count()
}

/// The failed-authentication limit per client address, over a real connection (the peer
/// address is the connection's).
#[tokio::test]
async fn failed_authentications_block_the_address_before_any_signature_is_checked() {
    let app = sqlite(LimitSettings {
        auth_failures: Policy::new(3, 60),
        ..LimitSettings::default()
    })
    .await;
    let server = app.serve().await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/eve/tasks", server.base_url);
    let send = |token: String, forwarded: Option<&'static str>| {
        let mut request = client.get(&url).bearer_auth(token);
        if let Some(f) = forwarded {
            request = request.header("x-forwarded-for", f);
        }
        request.send()
    };
    for _ in 0..3 {
        let reply = send("forged".into(), None).await.unwrap();
        assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
    }
    let refused = send("forged".into(), None).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // Now even a valid token from this address is refused before it is checked; it is
    // not counted against the user either (no RateLimit header).
    let refused = send(app.token("eve"), None).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().get("ratelimit").is_none());
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    let body: serde_json::Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error_code"], "RATE_LIMITED");
    // X-Forwarded-For from a peer that is not a trusted proxy changes nothing.
    let refused = send(app.token("eve"), Some("203.0.113.5")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // The health check is never limited.
    let health = client
        .get(format!("{}/health", server.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let metrics = app.metrics.render();
    assert!(
        metrics.contains("task_api_rate_limited_requests_total{kind=\"auth_failures\"} 3"),
        "{metrics}"
    );
}

/// Behind a trusted proxy the client is the last `X-Forwarded-For` hop: one client's
/// failures do not block another's requests through the same proxy.
#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_is_limited_on_its_own() {
    let app = sqlite(LimitSettings {
        auth_failures: Policy::new(2, 60),
        trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
        ..LimitSettings::default()
    })
    .await;
    let server = app.serve().await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/fay/tasks", server.base_url);
    let send = |token: String, forwarded: &'static str| {
        client
            .get(&url)
            .bearer_auth(token)
            .header("x-forwarded-for", forwarded)
            .send()
    };
    for _ in 0..2 {
        let reply = send("forged".into(), "10.9.9.9, 198.51.100.1")
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
    }
    let reply = send("forged".into(), "198.51.100.1").await.unwrap();
    assert_eq!(reply.status(), StatusCode::TOO_MANY_REQUESTS);
    let blocked = send(app.token("fay"), "198.51.100.1").await.unwrap();
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    let other = send(app.token("fay"), "198.51.100.2").await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    // Only the last hop counts: a client cannot pick its address by prefixing one.
    let spoofed = send(app.token("fay"), "198.51.100.3, 198.51.100.1")
        .await
        .unwrap();
    assert_eq!(spoofed.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// The shared Redis (`TEST_REDIS_URL`, default the local one): present, or the test
/// skips, except under CI.
fn redis_url() -> Option<String> {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let address = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    if std::net::TcpStream::connect(&address).is_ok() {
        return Some(url);
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("Redis is not reachable at {url} under CI");
    }
    eprintln!("SKIPPED: Redis test (no Redis at {url}; set TEST_REDIS_URL)");
    None
}

fn shared(url: &str, prefix: &str, quota: u32) -> LimitSettings {
    LimitSettings {
        user: Policy::new(quota, 3600),
        auth_failures: Policy::new(3, 60),
        redis_url: Some(url.to_owned().into()),
        redis_prefix: prefix.to_owned(),
        ..LimitSettings::default()
    }
}

/// Two instances sharing one Redis share each user's quota exactly, also when their
/// requests race (the step is one Lua script), many rounds.
#[tokio::test]
async fn instances_sharing_redis_share_the_quota() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let a = std::sync::Arc::new(sqlite(shared(&url, &prefix, 10)).await);
    let b = std::sync::Arc::new(sqlite(shared(&url, &prefix, 10)).await);
    // Alternating: the count carries over from one instance to the other.
    for i in 0..10u64 {
        let app = if i % 2 == 0 { &a } else { &b };
        let reply = app.call(Method::GET, "/api/gus/tasks", "gus", None).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(remaining(&reply).0, 9 - i);
    }
    for app in [&a, &b] {
        let reply = app.call(Method::GET, "/api/gus/tasks", "gus", None).await;
        reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    }
    for round in 0..8 {
        let ok = racing(&[a.clone(), b.clone()], &format!("racer-{round}"), 30).await;
        assert_eq!(ok, 10, "round {round}");
    }
}

/// Failed authentications counted on one instance block the address on the other.
#[tokio::test]
async fn failed_authentications_are_shared_through_redis() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let a = sqlite(shared(&url, &prefix, 100)).await;
    let b = sqlite(shared(&url, &prefix, 100)).await;
    let (sa, sb) = (a.serve().await, b.serve().await);
    let client = reqwest::Client::new();
    let send = |base: &str, token: &str| {
        client
            .get(format!("{base}/api/hal/tasks"))
            .bearer_auth(token)
            .send()
    };
    for base in [&sa.base_url, &sb.base_url, &sa.base_url] {
        assert_eq!(
            send(base, "forged").await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // The fourth failure, on B, is one too many: B now refuses the address at once.
    assert_eq!(
        send(&sb.base_url, "forged").await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let valid = a.token("hal");
    assert_eq!(
        send(&sb.base_url, &valid).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// A Redis of the test's own on a free port, stopped by its PID.
struct ThrowawayRedis {
    child: std::process::Child,
    port: u16,
}

impl ThrowawayRedis {
    fn start(port: u16) -> Option<Self> {
        let binary = tool(
            "/usr/bin/redis-server".into(),
            "apt-get install -y redis-server",
        )?;
        let child = std::process::Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Owned from here on: stopped and reaped by `Drop`, whatever happens.
        let redis = Self { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(redis);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {port}");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_errors(app: &TestApp) -> u64 {
    let metrics = app.metrics.render();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("task_api_redis_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"))
}

/// Redis stopped, frozen, or back: requests are served unlimited meanwhile (never a
/// 5xx), each failure is counted, and once Redis answers again the limit applies again.
#[tokio::test]
async fn requests_are_served_unlimited_while_redis_is_down_or_slow() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(redis) = ThrowawayRedis::start(port) else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let app = sqlite(shared(&url, &prefix(), 3)).await;
    let get = || app.call(Method::GET, "/api/ida/tasks", "ida", None);
    for _ in 0..3 {
        assert_eq!(get().await.status, StatusCode::OK);
    }
    get()
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    assert_eq!(redis_errors(&app), 0);

    // Frozen: every call runs over its budget.
    redis.signal("-STOP");
    for _ in 0..3 {
        let reply = get().await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"user\";q=3;w=3600")
        );
        // Served unlimited: the whole quota is there.
        assert_eq!(reply.header("ratelimit"), Some("\"user\";r=3;t=0"));
    }
    assert_eq!(redis_errors(&app), 3);
    redis.signal("-CONT");

    // Gone: connections are refused.
    drop(redis);
    for _ in 0..5 {
        assert_eq!(get().await.status, StatusCode::OK);
    }
    assert!(redis_errors(&app) >= 8);

    // Back (empty): the limit applies again once the connection manager reconnects.
    let _redis = ThrowawayRedis::start(port).unwrap();
    let mut limited = false;
    for _ in 0..100 {
        let reply = get().await;
        assert_ne!(reply.status.as_u16() / 100, 5);
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        limited,
        "the limit did not apply again after Redis came back"
    );
}

/// The OpenAPI document names the 429 and the rate-limit headers on every `/api`
/// operation, and on no other.
#[tokio::test]
async fn the_document_describes_the_limits() {
    let app = sqlite(LimitSettings::default()).await;
    let doc = app
        .call_with_token(Method::GET, "/openapi.json", None, None)
        .await
        .json;
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            if path.starts_with("/api/") {
                operations += 1;
                let limited = &responses["429"];
                assert!(
                    limited["headers"]["Retry-After"].is_object(),
                    "{method} {path}"
                );
                for (status, response) in responses {
                    for name in ["RateLimit", "RateLimit-Policy"] {
                        assert!(
                            response["headers"][name].is_object(),
                            "{name} on {status} of {method} {path}"
                        );
                    }
                }
            } else {
                assert!(!responses.contains_key("429"), "{method} {path}");
            }
        }
    }
    assert!(operations >= 9, "{operations}");
}

/// A ticket replayed after it has opened its stream (tickets travel in URLs, so they end
/// up in logs) is a failed authentication of the replaying address.
#[tokio::test]
async fn a_replayed_ticket_counts_as_a_failed_authentication() {
    let app = sqlite(LimitSettings {
        auth_failures: Policy::new(2, 60),
        ..LimitSettings::default()
    })
    .await;
    let server = app.serve().await;
    let client = reqwest::Client::new();
    let issued = client
        .post(format!("{}/api/kim/events/tickets", server.base_url))
        .bearer_auth(app.token("kim"))
        .send()
        .await
        .unwrap();
    assert_eq!(issued.status(), StatusCode::CREATED);
    let body: serde_json::Value = serde_json::from_slice(&issued.bytes().await.unwrap()).unwrap();
    let url = format!(
        "{}/api/kim/events?ticket={}",
        server.base_url,
        body["ticket"].as_str().unwrap()
    );
    let stream = client.get(&url).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    for expected in [
        StatusCode::UNAUTHORIZED,
        StatusCode::UNAUTHORIZED,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(client.get(&url).send().await.unwrap().status(), expected);
    }
    drop(stream);
}
