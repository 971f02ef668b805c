//! Service behaviour around the endpoints: errors for unknown routes and methods, request
//! ids, health, database failure, CORS, response headers, logging, graceful shutdown.

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use task_api::config::CorsOrigins;

use crate::support::{TestApp, auth_config};

async fn unknown_routes_and_methods_are_json_errors(app: TestApp) {
    for path in [
        "/",
        "/nope",
        "/api",
        "/api/alice",
        "/api/alice/tasks/1/extra",
        "/api/alice/task",
    ] {
        let reply = app.call(Method::GET, path, "alice", None).await;
        reply.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    for (method, path, allow) in [
        (Method::DELETE, "/api/alice/tasks", "GET,HEAD,POST"),
        (Method::PUT, "/api/alice/tasks", "GET,HEAD,POST"),
        (
            Method::POST,
            "/api/alice/tasks/1",
            "GET,HEAD,PUT,PATCH,DELETE",
        ),
        (Method::POST, "/health", "GET,HEAD"),
    ] {
        // Even without a token: the method is wrong whoever asks.
        let reply = app.call_with_token(method.clone(), path, None, None).await;
        reply.assert_error(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
        let mut got: Vec<&str> = reply
            .header("allow")
            .unwrap()
            .split(',')
            .map(str::trim)
            .collect();
        let mut want: Vec<&str> = allow.split(',').collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{method} {path}");
    }
}

async fn request_ids_are_echoed_or_generated(app: TestApp) {
    let with_id = |id: &str| {
        Request::builder()
            .uri("/nope")
            .header("x-request-id", id)
            .body(Body::empty())
            .unwrap()
    };
    let reply = app.send(with_id("trace-abc-123")).await;
    assert_eq!(reply.header("x-request-id"), Some("trace-abc-123"));
    assert_eq!(reply.json["request_id"], "trace-abc-123");

    let ok = app
        .call(Method::GET, "/api/alice/tasks", "alice", None)
        .await;
    let generated = ok.header("x-request-id").unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");

    // An id that is too long or has spaces is replaced, never echoed.
    for unsafe_id in ["x".repeat(129), "has space".to_owned()] {
        let reply = app.send(with_id(&unsafe_id)).await;
        let id = reply.header("x-request-id").unwrap();
        assert_ne!(id, unsafe_id);
        assert_eq!(reply.json["request_id"], id);
    }
}

async fn health_reports_the_database(app: TestApp) {
    let reply = app
        .call_with_token(Method::GET, "/health", None, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["status"], "ok");
    app.close_database().await;
    let reply = app
        .call_with_token(Method::GET, "/health", None, None)
        .await;
    reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
    assert!(reply.header("retry-after").is_some());
}

async fn database_failure_is_a_500_that_reveals_nothing(app: TestApp) {
    let task = app.create("alice", "t").await;
    app.close_database().await;
    let url = format!("/api/alice/tasks/{}", task["id"]);
    for (method, uri, body) in [
        (Method::GET, "/api/alice/tasks", None),
        (
            Method::POST,
            "/api/alice/tasks",
            Some(json!({"title": "t"})),
        ),
        (Method::GET, url.as_str(), None),
        (
            Method::PUT,
            url.as_str(),
            Some(json!({"title": "t", "complete": true})),
        ),
        (Method::PATCH, url.as_str(), Some(json!({"complete": true}))),
        (Method::DELETE, url.as_str(), None),
    ] {
        let reply = app.call(method, uri, "alice", body).await;
        reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "DATABASE_ERROR");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.json["detail"], "The database is unavailable");
        let text = String::from_utf8_lossy(&reply.raw).to_lowercase();
        for secret in ["sqlx", "pool", "sqlite", "postgres", "select", "closed"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}

async fn responses_are_not_cacheable(app: TestApp) {
    for reply in [
        app.call(Method::GET, "/api/alice/tasks", "alice", None)
            .await,
        app.call(Method::GET, "/api/alice/tasks/1", "alice", None)
            .await,
        app.call_with_token(Method::GET, "/api/alice/tasks", None, None)
            .await,
    ] {
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    }
}

async fn cors_follows_the_configured_origins(app: TestApp) {
    let preflight = |origin: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/api/alice/tasks")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    // Off by default.
    let reply = app.send(preflight("https://app.example.com")).await;
    assert!(reply.header("access-control-allow-origin").is_none());

    let allowed = CorsOrigins::List(vec![HeaderValue::from_static("https://app.example.com")]);
    let app = app.sibling(auth_config(), allowed).await;
    let reply = app.send(preflight("https://app.example.com")).await;
    assert!(reply.status.is_success(), "{:?}", reply.status);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let methods = reply
        .header("access-control-allow-methods")
        .unwrap()
        .to_owned();
    assert!(
        methods.contains("PATCH") && methods.contains("DELETE"),
        "{methods}"
    );
    let headers = reply
        .header("access-control-allow-headers")
        .unwrap()
        .to_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"));
    for name in [
        "if-match",
        "if-none-match",
        "idempotency-key",
        "last-event-id",
    ] {
        assert!(headers.contains(name), "{name} not allowed: {headers}");
    }

    let reply = app.send(preflight("https://evil.example.com")).await;
    assert!(reply.header("access-control-allow-origin").is_none());

    let token = app.token("alice");
    let request = Request::builder()
        .uri("/api/alice/tasks")
        .header(header::ORIGIN, "https://app.example.com")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let reply = app.send(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let exposed = reply
        .header("access-control-expose-headers")
        .unwrap()
        .to_lowercase();
    for name in [
        "etag",
        "location",
        "x-request-id",
        "retry-after",
        "idempotent-replayed",
        "ratelimit",
        "ratelimit-policy",
    ] {
        assert!(
            exposed.split(',').any(|h| h.trim() == name),
            "{name} not exposed: {exposed}"
        );
    }
}

/// Collects log output in memory.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn one_log_line_per_request_without_token_or_body(app: TestApp) {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let token = app.token("alice");
    let marker = "body-marker-7f3a";
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/alice/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", "log-test-1")
        .body(Body::from(json!({"title": marker}).to_string()))
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::CREATED);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(&token), "token in log: {text}");
    assert!(!text.contains(marker), "body in log: {text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| l["fields"]["message"] == "request")
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = &lines[0];
    assert_eq!(line["fields"]["status"], 201);
    assert!(line["fields"]["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(line["span"]["method"], "POST");
    assert_eq!(line["span"]["route"], "/api/{user_id}/tasks");
    assert_eq!(line["span"]["user_id"], "alice");
    assert_eq!(line["span"]["request_id"], "log-test-1");
}

async fn shutdown_lets_requests_in_flight_finish(app: TestApp) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::{Duration, sleep, timeout};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(task_api::serve(listener, app.router.clone(), async {
        let _ = stopped.await;
    }));

    // A request whose body is still arriving when the signal comes.
    let body = json!({"title": "in flight"}).to_string();
    let token = app.token("alice");
    let mut stream = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /api/alice/tasks HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..4]).await.unwrap();
    sleep(Duration::from_millis(200)).await;
    stop.send(()).unwrap();
    sleep(Duration::from_millis(200)).await;
    stream.write_all(&body.as_bytes()[4..]).await.unwrap();

    let mut response = String::new();
    timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    // The server then stops by itself, well within its grace period.
    timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(app.count("alice").await, 1);
}

crate::on_both_databases!(
    shutdown_lets_requests_in_flight_finish,
    unknown_routes_and_methods_are_json_errors,
    request_ids_are_echoed_or_generated,
    health_reports_the_database,
    database_failure_is_a_500_that_reveals_nothing,
    responses_are_not_cacheable,
    cors_follows_the_configured_origins,
    one_log_line_per_request_without_token_or_body,
);
