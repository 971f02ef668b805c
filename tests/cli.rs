//! The binary itself: start-up with nothing configured, the `token` command, and
//! configuration errors that stop start-up with one line naming the setting.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_task-api");

/// The binary in an empty directory with none of the service's settings in its environment.
fn task_api(dir: &std::path::Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir).env_clear();
    // PATH, and the coverage tool's profile location so the child's runs are measured too.
    for keep in ["PATH", "LLVM_PROFILE_FILE"] {
        if let Ok(value) = std::env::var(keep) {
            command.env(keep, value);
        }
    }
    command
}

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

#[tokio::test]
async fn token_command_mints_a_token_the_service_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(task_api(dir.path())
        .env("JWT_SECRET", "cli-test-secret")
        .args(["token", "--user", "alice", "--ttl", "2h"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let config = task_api::config::Config::from_lookup(|k| {
        (k == "JWT_SECRET").then(|| "cli-test-secret".to_owned())
    })
    .unwrap();
    let verifier = task_api::auth::Verifier::new(&config.auth);
    assert_eq!(verifier.verify(&token).await.unwrap(), "alice");

    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        7200
    );
}

#[test]
fn token_command_needs_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(task_api(dir.path()).args(["token", "--user", "alice"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT_SECRET"));
}

#[test]
fn bad_settings_stop_start_up_with_one_line_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value, expected_code) in [
        ("PORT", "eighty", 2),
        ("LOG_FORMAT", "xml", 2),
        ("APP_ENV", "production", 2),
        ("CORS_ORIGINS", "nope", 2),
        ("METRICS_ADDR", "everywhere", 2),
        ("REQUIRE_IF_MATCH", "yes", 2),
        ("IDEMPOTENCY_TTL", "a day", 2),
        ("IDEMPOTENCY_TTL", "0s", 2),
        // Reachable only at start-up: nothing listens on port 1.
        ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1:1/db", 1),
    ] {
        let out = run(task_api(dir.path()).env(name, value));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(expected_code), "{name}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "{name}: {stderr}");
        let setting = if name == "APP_ENV" {
            "JWT_SECRET"
        } else {
            name
        };
        assert!(lines[0].contains(setting), "{name}: {stderr}");
        assert!(!stderr.contains("hunter2"), "password in output: {stderr}");
    }
}

/// Runs the binary with no configuration at all, as a newcomer would, follows the printed
/// instructions, then stops it with SIGTERM.
#[tokio::test]
async fn runs_with_nothing_configured_and_prints_a_working_token() {
    let dir = tempfile::tempdir().unwrap();
    // Port 0: any free port; the banner prints the real one.
    let (mut child, mut lines) = start(
        dir.path(),
        &[("PORT", "0".into()), ("RUST_LOG", "warn".into())],
    );
    let (mut token, mut url) = (None, None);
    while token.is_none() || url.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("banner in time")
            .unwrap()
            .expect("banner before end of output");
        if let Some(t) = line.trim().strip_prefix("export TOKEN=") {
            token = Some(t.to_owned());
        }
        if let Some(rest) = line
            .trim()
            .strip_prefix("curl -H \"Authorization: Bearer $TOKEN\" ")
        {
            url = Some(rest.to_owned());
        }
    }
    let (token, url) = (token.unwrap(), url.unwrap());
    let rest = url.strip_prefix("http://").unwrap();
    let (address, path) = rest.split_at(rest.find('/').unwrap());
    assert_eq!(path, "/api/dev-user/tasks");

    let response = http_get(address, path, &token).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""count":0"#), "{response}");
    assert!(
        dir.path().join("tasks.db").exists(),
        "SQLite file in the working directory"
    );

    let status = terminate(&mut child).await;
    assert!(status.success(), "{status}");
}

async fn http_get(address: &str, path: &str, token: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// With only BETTER_AUTH_URL set and its JWKS unreachable, the service still starts and
/// serves /health; JWKS tokens get 503 until keys arrive.
#[tokio::test]
async fn starts_while_the_jwks_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let auth_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (_child, mut lines) = start(
        dir.path(),
        &[
            ("PORT", "0".into()),
            ("LOG_FORMAT", "json".into()),
            ("BETTER_AUTH_URL", auth_url.clone()),
        ],
    );
    let address = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("log line in time")
            .unwrap()
            .expect("listening before end of output");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(
            !line.contains("DEVELOPMENT MODE"),
            "a key is configured: {line}"
        );
        if event["fields"]["message"] == "listening" {
            break event["fields"]["address"].as_str().unwrap().to_owned();
        }
    };
    let response = http_get(&address, "/health", "unused").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // A well-formed EdDSA token (its signature is never reached).
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.AAAA",
        b64(serde_json::json!({"alg": "EdDSA", "kid": "k"})),
        b64(serde_json::json!({"sub": "u", "exp": 4_000_000_000u64}))
    );
    let response = http_get(&address, "/api/u/tasks", &token).await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("SERVICE_UNAVAILABLE"), "{response}");
}

/// Starts the binary in `dir` with `env`, its stdout piped; killed when dropped.
fn start(
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut command = task_api(dir);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = tokio::process::Command::from(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Sends SIGTERM and waits (up to 15 s) for the process to exit.
async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap()
}

/// Waits for the JSON log line announcing `message`; the event.
async fn wait_for_log(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    message: &str,
) -> serde_json::Value {
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("log line in time")
            .unwrap()
            .unwrap_or_else(|| panic!("exited before logging {message:?}; it logged {seen:?}"));
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if event["fields"]["message"] == message {
            return event;
        }
        seen.push(line);
    }
}

/// The port of a "listening" (or "metrics at /metrics") event: every test asks for port
/// 0 and the service picks a free one, with no race against other tests for it.
fn listening_port(event: &serde_json::Value) -> u16 {
    let address: std::net::SocketAddr = event["fields"]["address"]
        .as_str()
        .expect("the listening event names its address")
        .parse()
        .unwrap();
    address.port()
}

#[tokio::test]
async fn serves_https_and_metrics_on_their_own_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let (mut child, mut lines) = start(
        dir.path(),
        &[
            ("PORT", "0".into()),
            ("LOG_FORMAT", "json".into()),
            ("JWT_SECRET", "cli-test-secret".into()),
            (
                "TLS_CERT_FILE",
                dir.path().join("cert.pem").display().to_string(),
            ),
            (
                "TLS_KEY_FILE",
                dir.path().join("key.pem").display().to_string(),
            ),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
        ],
    );
    let port = listening_port(&wait_for_log(&mut lines, "listening").await);
    let metrics_port = listening_port(&wait_for_log(&mut lines, "metrics at /metrics").await);

    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
        )
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let health = client
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("strict-transport-security"));
    // Metrics are not on the public port…
    let public = client
        .get(format!("https://localhost:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    // …but on their own listener, counting what was served.
    let scrape = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains(
            r#"task_api_http_requests_total{method="GET",route="/health",status="200"} 1"#
        ),
        "{scrape}"
    );

    let status = terminate(&mut child).await;
    assert!(status.success(), "{status}");
}

#[test]
fn a_missing_certificate_stops_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(task_api(dir.path())
        .env("JWT_SECRET", "s")
        .env("TLS_CERT_FILE", "/nonexistent/cert.pem")
        .env("TLS_KEY_FILE", "/nonexistent/key.pem"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("TLS_CERT_FILE"), "{stderr}");
}

/// SIGTERM while writers are busy: requests in flight finish, the process exits in
/// bounded time, and every acknowledged create is in the database afterwards.
#[tokio::test]
async fn sigterm_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines) = start(
        dir.path(),
        &[
            ("PORT", "0".into()),
            ("LOG_FORMAT", "json".into()),
            ("JWT_SECRET", "cli-test-secret".into()),
        ],
    );
    let port = listening_port(&wait_for_log(&mut lines, "listening").await);
    // Keep reading the log so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let token = String::from_utf8(
        run(task_api(dir.path())
            .env("JWT_SECRET", "cli-test-secret")
            .args(["token", "--user", "writer"]))
        .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let url = format!("http://127.0.0.1:{port}/api/writer/tasks");
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut acknowledged = Vec::new();
                for n in 0.. {
                    let title = format!("w{w}-{n}");
                    let sent = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(serde_json::json!({ "title": title }).to_string())
                        .send()
                        .await;
                    let Ok(response) = sent else { break };
                    if response.status() != 201 {
                        break;
                    }
                    let task: serde_json::Value =
                        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
                    acknowledged.push((task["id"].as_i64().unwrap(), title));
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let signalled = std::time::Instant::now();
    let status = terminate(&mut child).await;
    let stopped_in = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        stopped_in < Duration::from_secs(12),
        "took {stopped_in:?} to stop"
    );

    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.unwrap());
    }
    assert!(
        acknowledged.len() > 20,
        "load was running: {} writes",
        acknowledged.len()
    );
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("tasks.db").display()
    ))
    .await
    .unwrap();
    let stored: Vec<(i64, String)> = sqlx::query_as("SELECT id, title FROM tasks")
        .fetch_all(&db)
        .await
        .unwrap();
    for write in &acknowledged {
        assert!(stored.contains(write), "acknowledged {write:?} lost");
    }
    eprintln!(
        "shutdown under load: {} acknowledged writes, all stored; stopped {stopped_in:?} after SIGTERM",
        acknowledged.len()
    );
}

/// A directory and the settings of a service with a shared secret (on a port of its
/// choosing, see [`listening_port`]), and a token for `user` that it accepts.
fn with_secret(user: &str) -> (tempfile::TempDir, [(&'static str, String); 3], String) {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("PORT", "0".into()),
        ("LOG_FORMAT", "json".into()),
        ("JWT_SECRET", "cli-test-secret".into()),
    ];
    let token = String::from_utf8(
        run(task_api(dir.path())
            .env("JWT_SECRET", "cli-test-secret")
            .args(["token", "--user", user]))
        .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    (dir, env, token)
}

/// An `Idempotency-Key` outlives the process: after a restart, the repeat of a create is
/// answered the first response and creates nothing.
#[tokio::test]
async fn a_create_is_replayed_after_a_restart() {
    let (dir, env, token) = with_secret("phone");
    let url = |port: u16| format!("http://127.0.0.1:{port}/api/phone/tasks");
    let create = |port: u16| {
        reqwest::Client::new()
            .post(url(port))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("idempotency-key", "offline-edit-1")
            .body(r#"{"title": "Call mum"}"#)
            .send()
    };

    let (mut child, mut lines) = start(dir.path(), &env);
    let port = listening_port(&wait_for_log(&mut lines, "listening").await);
    let first = create(port).await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.text().await.unwrap();
    assert!(terminate(&mut child).await.success());

    let (mut child, mut lines) = start(dir.path(), &env);
    let port = listening_port(&wait_for_log(&mut lines, "listening").await);
    let replay = create(port).await.unwrap();
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), first_body);
    let list = reqwest::Client::new()
        .get(url(port))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["count"], 1);
    assert!(terminate(&mut child).await.success());
}

/// Reads a stream's body until `needle` appears (or the stream ends); returns what came.
async fn read_until(response: &mut reqwest::Response, seen: &mut String, needle: &str) -> bool {
    while !seen.contains(needle) {
        match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
            Ok(Ok(Some(bytes))) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            _ => return false,
        }
    }
    true
}

/// The last `id:` line of an event stream's text.
fn last_event_id(seen: &str) -> String {
    seen.lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("an event id")
        .to_owned()
}

/// SIGTERM ends open event streams at once (the drain does not wait for them, so the
/// process exits long before its grace period), and after a restart a client resuming
/// from its last event id gets what changed meanwhile.
#[tokio::test]
async fn sigterm_ends_event_streams_at_once_and_streams_resume_after_a_restart() {
    let (dir, env, token) = with_secret("lap");
    let base = |port: u16| format!("http://127.0.0.1:{port}/api/lap");
    let client = reqwest::Client::new();
    let create = |port: u16, title: &'static str| {
        client
            .post(format!("{}/tasks", base(port)))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(format!(r#"{{"title": "{title}"}}"#))
            .send()
    };

    let (mut child, mut lines) = start(dir.path(), &env);
    let port = listening_port(&wait_for_log(&mut lines, "listening").await);
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut response = client
            .get(format!("{}/events", base(port)))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut seen = String::new();
        assert!(read_until(&mut response, &mut seen, "event: ready").await);
        streams.push((response, seen));
    }
    assert_eq!(
        create(port, "before the restart").await.unwrap().status(),
        201
    );
    for (response, seen) in &mut streams {
        assert!(read_until(response, seen, "before the restart").await);
    }
    let resume_from = last_event_id(&streams[0].1);

    let pid = child.id().unwrap().to_string();
    let signalled = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    for (response, _) in &mut streams {
        // The body ends (no error from a dropped connection needed): within a second.
        let end = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(Some(_)) = response.chunk().await {}
        })
        .await;
        assert!(end.is_ok(), "a stream was still open 1 s after SIGTERM");
    }
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits well within its 10 s grace period")
        .unwrap();
    assert!(status.success());
    eprintln!(
        "stopped with 3 open streams {:?} after SIGTERM",
        signalled.elapsed()
    );

    let (mut child, mut lines) = start(dir.path(), &env);
    let port = listening_port(&wait_for_log(&mut lines, "listening").await);
    assert_eq!(
        create(port, "after the restart").await.unwrap().status(),
        201
    );
    let mut response = client
        .get(format!("{}/events", base(port)))
        .bearer_auth(&token)
        .header("last-event-id", &resume_from)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    assert!(read_until(&mut response, &mut seen, "after the restart").await);
    assert!(
        !seen.contains("before the restart"),
        "nothing repeated: {seen}"
    );
    drop(response);
    assert!(terminate(&mut child).await.success());
}

/// `SHUTDOWN_DELAY`: from SIGTERM on, `/health` answers 503 at once while requests are
/// still served (asking clients to close their connections) for the delay; then the
/// listener closes and the process exits.
#[tokio::test]
async fn sigterm_with_a_shutdown_delay_fails_health_and_keeps_serving() {
    let (dir, env, token) = with_secret("roll");
    let mut env = env.to_vec();
    env.push(("SHUTDOWN_DELAY", "2s".into()));
    let (mut child, mut lines) = start(dir.path(), &env);
    let port = listening_port(&wait_for_log(&mut lines, "listening").await);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let health = || client.get(format!("{base}/health")).send();
    assert_eq!(health().await.unwrap().status(), 200);

    let pid = child.id().unwrap().to_string();
    let signalled = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for_log(
        &mut lines,
        "shutting down: /health answers 503; still serving for SHUTDOWN_DELAY",
    )
    .await;
    let reply = health().await.unwrap();
    assert_eq!(reply.status(), 503);
    let body: serde_json::Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error_code"], "SERVICE_UNAVAILABLE");
    // Still served, on fresh connections, for the rest of the delay.
    let mut served = 0;
    while signalled.elapsed() < Duration::from_millis(1500) {
        let reply = client
            .post(format!("{base}/api/roll/tasks"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(r#"{"title": "during the delay"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 201);
        assert_eq!(reply.headers()["connection"], "close");
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 5, "{served}");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after the delay and the drain")
        .unwrap();
    assert!(status.success());
    let stopped = signalled.elapsed();
    assert!(stopped >= Duration::from_secs(2), "{stopped:?}");
    // Afterwards nothing listens.
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
}

/// The binary has the allocator give freed memory back after 10 ms (src/allocator.rs),
/// and `MIMALLOC_PURGE_DELAY` still overrides that.
#[tokio::test]
async fn the_allocator_returns_freed_memory_soon_unless_told_otherwise() {
    for (setting, expected) in [(None, 10), (Some("250"), 250)] {
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![
            ("PORT", "0".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
            ("JWT_SECRET", "cli-test-secret".to_owned()),
            ("RUST_LOG", "task_api=debug".to_owned()),
        ];
        if let Some(value) = setting {
            env.push(("MIMALLOC_PURGE_DELAY", value.to_owned()));
        }
        // Killed when dropped, at the end of the round.
        let (_child, mut lines) = start(dir.path(), &env);
        let event = wait_for_log(&mut lines, "allocator").await;
        assert_eq!(event["fields"]["purge_delay_ms"], expected, "{setting:?}");
    }
}

/// A SIGTERM that comes as soon as the service says it is listening, before it has
/// served anything, is a graceful shutdown, not the signal's default (death).
#[tokio::test]
async fn sigterm_right_after_start_up_is_a_graceful_shutdown() {
    let (dir, env, _token) = with_secret("early");
    for _ in 0..5 {
        let (mut child, mut lines) = start(dir.path(), &env);
        wait_for_log(&mut lines, "listening").await;
        let status = terminate(&mut child).await;
        assert!(status.success(), "{status}");
    }
}
