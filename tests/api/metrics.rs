//! Prometheus metrics: counts that match the traffic sent, route templates as labels
//! (never ids), and a listener of their own.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use crate::support::TestApp;

/// Scrapes the app's metrics router; returns the text and its samples by series.
async fn scrape(app: &TestApp) -> (String, HashMap<String, f64>) {
    let response = task_api::metrics::router(app.metrics.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| Some((series.to_owned(), value.parse().ok()?)))
        .collect();
    (text, samples)
}

async fn metrics_count_the_traffic_sent(app: TestApp) {
    let list = "/api/alice/tasks";
    for _ in 0..3 {
        assert_eq!(
            app.call(Method::GET, list, "alice", None).await.status,
            StatusCode::OK
        );
    }
    let created = app.create("alice", "counted").await;
    app.create("alice", "counted too").await;
    for _ in 0..4 {
        app.call(Method::GET, "/api/alice/tasks/987654321", "alice", None)
            .await;
    }
    app.call(
        Method::PATCH,
        &format!("/api/alice/tasks/{}", created["id"]),
        "alice",
        Some(json!({"complete": true})),
    )
    .await;
    app.call_with_token(Method::GET, list, None, None).await;
    app.call(Method::GET, "/no/such/route", "alice", None).await;

    let (text, samples) = scrape(&app).await;
    let get = |series: &str| {
        samples
            .get(series)
            .copied()
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let requests = |method: &str, route: &str, status: u16| {
        get(&format!(
            r#"task_api_http_requests_total{{method="{method}",route="{route}",status="{status}"}}"#
        ))
    };
    assert_eq!(requests("GET", "/api/{user_id}/tasks", 200), 3.0);
    assert_eq!(requests("GET", "/api/{user_id}/tasks", 401), 1.0);
    assert_eq!(requests("POST", "/api/{user_id}/tasks", 201), 2.0);
    assert_eq!(requests("GET", "/api/{user_id}/tasks/{task_id}", 404), 4.0);
    assert_eq!(
        requests("PATCH", "/api/{user_id}/tasks/{task_id}", 200),
        1.0
    );
    assert_eq!(requests("GET", "unmatched", 404), 1.0);
    let errors = |code: &str| {
        get(&format!(
            r#"task_api_http_errors_total{{error_code="{code}"}}"#
        ))
    };
    assert_eq!(errors("NOT_FOUND"), 5.0);
    assert_eq!(errors("AUTH_MISSING"), 1.0);
    let latency = r#"task_api_http_request_duration_seconds_count{method="GET",route="/api/{user_id}/tasks"}"#;
    assert_eq!(get(latency), 4.0);
    assert!(
        get(&format!(
            r#"task_api_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )) == 1.0
    );
    assert!(get("task_api_db_pool_connections") >= 1.0);
    assert!(get("task_api_db_pool_idle_connections") >= 0.0);
    // Every request that reached the database waited for a connection, and was timed.
    assert!(get("task_api_db_pool_acquire_wait_seconds_count") >= 10.0);
    // Bounded labels only: no user id, task id or concrete path.
    for leak in [
        "alice",
        "987654321",
        "/no/such/route",
        &created["id"].to_string(),
    ] {
        assert!(
            !text.contains(&format!("=\"{leak}\"")),
            "{leak} in metrics:\n{text}"
        );
        assert!(
            !text.contains(&format!("/{leak}")),
            "{leak} in metrics:\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"));
}

crate::on_both_databases!(metrics_count_the_traffic_sent);

#[tokio::test]
async fn jwks_fetches_are_counted_by_outcome() {
    use crate::jwks::{JwksServer, Mode, TestKey};
    use task_api::auth::Verifier;
    use task_api::auth::jwks::JwksSettings;

    let key = TestKey::generate("EdDSA", "k");
    let server = JwksServer::start(vec![key.jwk()]).await;
    let mut auth = crate::support::auth_config();
    auth.better_auth_url = Some(server.base_url.clone());
    auth.jwks_url = Some(
        format!("{}/api/auth/jwks", server.base_url)
            .parse()
            .unwrap(),
    );
    let settings = JwksSettings {
        min_refetch_interval: std::time::Duration::ZERO,
        ..Default::default()
    };
    let verifier = Verifier::with_jwks_settings(&auth, settings);
    let app =
        TestApp::sqlite_with_verifier(auth, verifier, task_api::config::CorsOrigins::None).await;
    let claims = json!({"sub": "u", "iss": server.base_url, "aud": server.base_url, "exp": chrono::Utc::now().timestamp() + 60});
    app.call_with_token(Method::GET, "/api/u/tasks", Some(&key.sign(&claims)), None)
        .await;
    server.set_mode(Mode::Unavailable);
    let stranger = TestKey::generate("EdDSA", "unknown");
    app.call_with_token(
        Method::GET,
        "/api/u/tasks",
        Some(&stranger.sign(&claims)),
        None,
    )
    .await;
    let (_, samples) = scrape(&app).await;
    assert_eq!(samples[r#"task_api_jwks_fetches_total{outcome="ok"}"#], 1.0);
    assert_eq!(
        samples[r#"task_api_jwks_fetches_total{outcome="error"}"#],
        1.0
    );
}
