//! Hardening: a slow or unreachable database, overload, concurrent writers, oversized
//! headers. Every case is bounded in time and count, and loopback only.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use serde_json::json;
use task_api::http::HttpOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::support::{Reply, TestApp, auth_config, postgres_url};

/// The contract's bound: every request is answered within 2 s, whatever the database does.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

async fn a_stuck_database_gets_a_bounded_answer(app: TestApp) {
    let task = app.create("alice", "t").await;
    let mut side = app.side_connection().await;
    side.lock_tasks().await;
    let started = Instant::now();
    let reply = app
        .call(
            Method::PATCH,
            &format!("/api/alice/tasks/{}", task["id"]),
            "alice",
            Some(json!({"complete": true})),
        )
        .await;
    let took = started.elapsed();
    reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "DATABASE_ERROR");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert!(took < ANSWER_WITHIN, "answered after {took:?}");
    side.release().await;
    // Nothing half-applied, and the service works again at once.
    let after = app
        .call(
            Method::GET,
            &format!("/api/alice/tasks/{}", task["id"]),
            "alice",
            None,
        )
        .await;
    assert_eq!(after.json, task);
    let patched = app
        .call(
            Method::PATCH,
            &format!("/api/alice/tasks/{}", task["id"]),
            "alice",
            Some(json!({"complete": true})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK);
}

async fn overload_is_shed_at_once_with_retry_after(app: TestApp) {
    let options = HttpOptions {
        max_concurrent_requests: 2,
        ..HttpOptions::default()
    };
    let app = Arc::new(app.sibling_with(auth_config(), &options).await);
    let mut side = app.side_connection().await;
    side.lock_tasks().await;
    // Two writers take both slots and wait on the lock.
    let busy: Vec<_> = (0..2)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { app.create_reply("alice", &format!("w{i}")).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The excess is answered at once, not queued.
    for _ in 0..5 {
        let reply = app
            .call(Method::GET, "/api/alice/tasks", "alice", None)
            .await;
        reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    assert!(
        busy.iter().all(|b| !b.is_finished()),
        "the shed requests did not wait for the busy ones"
    );
    side.release().await;
    for b in busy {
        let status = b.await.unwrap();
        assert!(
            status == StatusCode::CREATED || status == StatusCode::INTERNAL_SERVER_ERROR,
            "{status}"
        );
    }
    assert_eq!(
        app.call(Method::GET, "/api/alice/tasks", "alice", None)
            .await
            .status,
        StatusCode::OK
    );
}

async fn concurrent_patches_leave_one_consistent_task(app: TestApp) {
    let task = app.create("alice", "contended").await;
    let url = format!("/api/alice/tasks/{}", task["id"]);
    let app = Arc::new(app);
    let patches: Vec<_> = (0..50)
        .map(|i| {
            let (app, url) = (app.clone(), url.clone());
            tokio::spawn(async move {
                let body = json!({"title": format!("writer {i}"), "complete": i % 2 == 0});
                app.call(Method::PATCH, &url, "alice", Some(body)).await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for p in patches {
        let reply = p.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
        replies.push(reply.json);
    }
    // Every update got its own, later timestamp.
    let stamps: HashSet<String> = replies
        .iter()
        .map(|r| r["updated_at"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stamps.len(), 50);
    let last = replies
        .iter()
        .max_by_key(|r| r["updated_at"].as_str().unwrap().to_owned())
        .unwrap();
    // The stored task is exactly the last write: no mix of two writers' fields.
    let stored = app.call(Method::GET, &url, "alice", None).await.json;
    assert_eq!(&stored, last);
    let i: u32 = stored["title"]
        .as_str()
        .unwrap()
        .trim_start_matches("writer ")
        .parse()
        .unwrap();
    assert_eq!(stored["complete"], i % 2 == 0);
    assert!(stored["updated_at"].as_str().unwrap() > task["updated_at"].as_str().unwrap());
}

async fn users_never_see_each_others_rows_under_concurrency(app: TestApp) {
    let app = Arc::new(app);
    let users: Vec<String> = (0..5).map(|u| format!("user-{u}")).collect();
    let work: Vec<_> = users
        .iter()
        .cloned()
        .map(|user| {
            let app = app.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    app.create(&user, &format!("{user} #{i}")).await;
                    let listed = app
                        .call(Method::GET, &format!("/api/{user}/tasks"), &user, None)
                        .await;
                    for task in listed.json["tasks"].as_array().unwrap() {
                        assert_eq!(task["user_id"], user.as_str(), "{user} saw {task}");
                    }
                    assert_eq!(listed.json["count"], i + 1);
                }
            })
        })
        .collect();
    for w in work {
        w.await.unwrap();
    }
}

async fn oversized_headers_get_a_contract_431(app: TestApp) {
    let server = app.serve().await;
    let client = reqwest::Client::new();
    // One huge header, and many ordinary ones: 431 in the error shape, from the service.
    let huge = client
        .get(format!("{}/api/alice/tasks", server.base_url))
        .header("x-padding", "x".repeat(40 * 1024))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 431);
    let body: serde_json::Value = serde_json::from_slice(&huge.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error_code"], "VALIDATION_ERROR");
    let mut many = client.get(format!("{}/health", server.base_url));
    for i in 0..90 {
        many = many.header(format!("x-h{i}"), "y".repeat(400));
    }
    let many = many.send().await.unwrap();
    assert_eq!(many.status(), 431);
    // A long token is refused as a token, before any cryptography.
    let long_token = app
        .call_with_token(
            Method::GET,
            "/api/alice/tasks",
            Some(&"a".repeat(10_000)),
            None,
        )
        .await;
    long_token.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    // Beyond hyper's own buffer (about 400 KiB) the connection is refused by hyper, with
    // a 431 but no JSON body: still no handler runs and nothing is stored.
    let enormous = client
        .get(format!("{}/health", server.base_url))
        .header("x-padding", "x".repeat(600 * 1024))
        .send()
        .await;
    if let Ok(response) = enormous {
        assert_eq!(response.status(), 431);
    }
    assert_eq!(
        app.call(Method::GET, "/health", "alice", None).await.status,
        StatusCode::OK
    );
}

crate::on_both_databases!(
    a_stuck_database_gets_a_bounded_answer,
    overload_is_shed_at_once_with_retry_after,
    concurrent_patches_leave_one_consistent_task,
    users_never_see_each_others_rows_under_concurrency,
    oversized_headers_get_a_contract_431,
);

/// A TCP proxy in front of PostgreSQL that the test can cut (connections refused),
/// stall (connections accepted and never answered, like a black-holed network) and
/// restore.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let links = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (accepting, stalling, tracked, holding) =
            (open.clone(), stalled.clone(), links.clone(), held.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if stalling.load(Ordering::SeqCst) {
                    holding.lock().unwrap().push(client); // accepted, never answered
                    continue;
                }
                if !accepting.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tracked.lock().unwrap().push(link.abort_handle());
            }
        });
        Self {
            port,
            open,
            stalled,
            links,
            held,
        }
    }

    /// The database stops answering: open connections are severed, new ones hang.
    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// The database becomes unreachable: open connections are severed, new ones closed.
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        self.open.store(true, Ordering::SeqCst);
        self.held.lock().unwrap().clear();
    }
}

#[derive(Debug)]
struct Outcome {
    at: Duration,
    took: Duration,
    reply: Reply,
    /// The task id and title of an acknowledged create.
    created: Option<(i64, String)>,
}

#[tokio::test]
async fn postgres_outage_is_answered_in_time_and_loses_no_acknowledged_write() {
    outage(false).await;
}

#[tokio::test]
async fn postgres_that_stops_answering_is_answered_in_time_too() {
    outage(true).await;
}

/// Load, then 2.5 s of outage (`stall`: connections hang; else refused), then recovery.
async fn outage(stall: bool) {
    let Some(url) = postgres_url() else { return };
    let parsed = url::Url::parse(&url).unwrap();
    let upstream =
        tokio::net::lookup_host((parsed.host_str().unwrap(), parsed.port().unwrap_or(5432)))
            .await
            .unwrap()
            .next()
            .unwrap();
    let proxy = Proxy::start(upstream).await;
    let app = Arc::new(
        TestApp::postgres_with_options(auth_config(), &crate::support::unlimited(), |u| {
            let mut u = url::Url::parse(&u).unwrap();
            u.set_host(Some("127.0.0.1")).unwrap();
            u.set_port(Some(proxy.port)).unwrap();
            u.into()
        })
        .await
        .unwrap(),
    );

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (app, stop, outcomes) = (app.clone(), stop.clone(), outcomes.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let at = start.elapsed();
                    let (reply, title) = if n % 2 == 0 {
                        let title = format!("w{w}-{n}");
                        (app.create_reply("load", &title).await, Some(title))
                    } else {
                        (
                            app.call(Method::GET, "/api/load/tasks?limit=5", "load", None)
                                .await,
                            None,
                        )
                    };
                    let took = start.elapsed() - at;
                    let created = (reply.status == StatusCode::CREATED)
                        .then(|| (reply.json["id"].as_i64().unwrap(), title.clone().unwrap()));
                    outcomes.lock().unwrap().push(Outcome {
                        at,
                        took,
                        reply,
                        created,
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let health = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let at = start.elapsed();
                let reply = app
                    .call_with_token(Method::GET, "/health", None, None)
                    .await;
                seen.push((at, start.elapsed() - at, reply.status));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cut_at = start.elapsed();
    if stall {
        proxy.stall();
    } else {
        proxy.cut();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let restored_at = start.elapsed();
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let health = health.await.unwrap();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());

    // Every request answered within 2 s; every failure a DATABASE_ERROR with Retry-After.
    let worst = outcomes.iter().map(|o| o.took).max().unwrap();
    assert!(worst < ANSWER_WITHIN, "slowest answer {worst:?}");
    let failures: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.reply.status.is_success())
        .collect();
    for f in &failures {
        f.reply
            .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "DATABASE_ERROR");
        assert_eq!(f.reply.header("retry-after"), Some("1"));
    }
    // Requests that started and finished while the database was away.
    let in_outage =
        |o: &&Outcome| o.at > cut_at + Duration::from_millis(100) && o.at + o.took < restored_at;
    let during = outcomes.iter().filter(in_outage).count();
    let failed_during = failures.iter().filter(|o| in_outage(o)).count();
    assert!(
        during > 0 && failed_during == during,
        "{failed_during} of {during} failed during the outage"
    );
    // /health: 503 during the outage, in time.
    assert!(health.iter().all(|(_, took, _)| *took < ANSWER_WITHIN));
    assert!(health.iter().any(|(at, _, status)| *at > cut_at
        && *at < restored_at
        && *status == StatusCode::SERVICE_UNAVAILABLE));
    // Recovery within 2 s of the database's return, with no restart.
    let last_failure = failures.iter().map(|f| f.at).max().unwrap();
    assert!(
        last_failure < restored_at + ANSWER_WITHIN,
        "failures until {last_failure:?}, restored at {restored_at:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.at > restored_at + ANSWER_WITHIN && o.reply.status.is_success())
    );
    assert!(
        health
            .iter()
            .any(|(at, _, status)| *at > restored_at + ANSWER_WITHIN && *status == StatusCode::OK)
    );

    // Every acknowledged write is there, whole.
    let acknowledged: Vec<(i64, String)> =
        outcomes.iter().filter_map(|o| o.created.clone()).collect();
    let stored: Vec<(i64, String, String)> = app.side_connection().await.rows().await;
    for (id, title) in &acknowledged {
        assert!(
            stored
                .iter()
                .any(|(i, u, t)| i == id && u == "load" && t == title),
            "acknowledged task {id} lost"
        );
    }
    let recovered_in = outcomes
        .iter()
        .filter(|o| o.at >= restored_at && o.reply.status.is_success())
        .map(|o| o.at + o.took - restored_at)
        .min()
        .unwrap();
    assert!(recovered_in < ANSWER_WITHIN);
    eprintln!(
        "outage ({}): {} requests, {} during the outage, worst latency {worst:?}, recovered {recovered_in:?} after the database returned, last failure began {:?} after, {} acknowledged writes, 0 lost",
        if stall {
            "database stops answering"
        } else {
            "connections refused"
        },
        outcomes.len(),
        during,
        last_failure.saturating_sub(restored_at),
        acknowledged.len()
    );
}
