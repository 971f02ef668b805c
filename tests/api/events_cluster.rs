//! Live updates across instances and through failures: two service instances on one
//! PostgreSQL database (each with its own pool, hubs and listener), the listener
//! connection killed or silently black-holed, and the no-gap/no-repeat invariant under
//! concurrent writers with streams that drop and resume — on both databases.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use task_api::events::fanout::EventSettings;
use task_api::http::HttpOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    EventClient, LiveServer, Next, SseEvent, TestApp, auth_config, postgres_url, server_tasks,
    unlimited,
};
use task_api::auth::Verifier;

/// Options for an instance whose listener has a name of its own (so a test can find
/// and kill exactly its connection), checking itself every `check`.
fn options(listener_url: Option<String>, check: Duration) -> HttpOptions {
    HttpOptions {
        events: EventSettings {
            // Long: a change must arrive through a notification, not the periodic
            // re-check.
            heartbeat: Duration::from_secs(30),
            listener_check: check,
            listener_url: listener_url.map(Into::into),
            ..EventSettings::default()
        },
        ..unlimited()
    }
}

/// A listener URL for this test's database with a unique `application_name`.
fn named_listener(name: &str) -> Option<String> {
    let base = postgres_url()?;
    Some(format!("{base}?application_name={name}"))
}

/// Instance A (listener named `name`, or through `via`), instance B on the same schema.
async fn two_instances(listener: Option<String>, check: Duration) -> Option<(TestApp, TestApp)> {
    let a = TestApp::postgres_with_options(auth_config(), &options(listener, check), |o| o).await?;
    let b = a.second_instance(&options(None, check)).await;
    Some((a, b))
}

async fn create(app: &TestApp, user: &str, title: &str) -> Value {
    app.create(user, title).await
}

/// Waits for the next change event within `wait`.
async fn change_within(stream: &mut EventClient, wait: Duration) -> Option<SseEvent> {
    match stream.next_within(wait).await {
        Next::Event(e) if e.event == "change" => Some(e),
        Next::Event(e) => panic!("unexpected event {e:?}"),
        _ => None,
    }
}

#[tokio::test]
async fn a_write_on_one_instance_reaches_a_stream_on_another_within_a_second() {
    let Some((a, b)) = two_instances(None, Duration::from_secs(5)).await else {
        return;
    };
    writes_reach_streams_on_the_other_instance(a, b).await;
}

/// Behind PgBouncer in transaction mode: notifications are sent through it (each in a
/// call's transaction), and each instance listens on the direct URL.
#[tokio::test]
async fn pgbouncer_a_write_on_one_instance_reaches_a_stream_on_another_within_a_second() {
    let check = Duration::from_secs(5);
    let Some(a) = TestApp::pgbouncer_with_options(auth_config(), &options(None, check)).await
    else {
        return;
    };
    let b = a.second_instance(&options(None, check)).await;
    writes_reach_streams_on_the_other_instance(a, b).await;
}

async fn writes_reach_streams_on_the_other_instance(a: TestApp, b: TestApp) {
    let (server_a, server_b) = (a.serve().await, b.serve().await);
    let mut on_b = EventClient::bearer(&server_b.base_url, "ann", &b.token("ann"), &[]).await;
    assert_eq!(on_b.next().await.event, "ready");
    for round in 0..5 {
        let started = Instant::now();
        let task = create(&a, "ann", &format!("from A {round}")).await;
        let event = change_within(&mut on_b, Duration::from_secs(1))
            .await
            .unwrap_or_else(|| panic!("round {round}: no event on B within 1 s"));
        assert_eq!(event.data, json!({"type": "upsert", "task": task}));
        eprintln!("A → B: {:?}", started.elapsed());
        // And back: a write on B reaches a stream on A.
        let mut on_a = EventClient::bearer(&server_a.base_url, "ann", &a.token("ann"), &[]).await;
        assert_eq!(on_a.next().await.event, "ready");
        let task = create(&b, "ann", &format!("from B {round}")).await;
        let event = change_within(&mut on_a, Duration::from_secs(1))
            .await
            .expect("B → A within 1 s");
        assert_eq!(event.data["task"], task);
        // B's own stream sees B's write too (locally).
        let event = change_within(&mut on_b, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(event.data["task"], task);
    }
}

#[tokio::test]
async fn a_ticket_from_one_instance_opens_a_stream_on_another_once() {
    let Some((a, b)) = two_instances(None, Duration::from_secs(5)).await else {
        return;
    };
    let server_b = b.serve().await;
    let reply = a
        .call(Method::POST, "/api/tia/events/tickets", "tia", None)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let ticket = reply.json["ticket"].as_str().unwrap().to_owned();
    let path = format!("/api/tia/events?ticket={ticket}");
    let mut stream = EventClient::open(&server_b.base_url, &path, &[])
        .await
        .map_err(|(s, body, _)| format!("{s} {body}"))
        .unwrap();
    assert_eq!(stream.next().await.event, "ready");
    let task = create(&a, "tia", "seen through a ticket").await;
    let event = change_within(&mut stream, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(event.data["task"], task);
    // Used up on B, so refused on A as well.
    let server_a = a.serve().await;
    let (status, body, _) = EventClient::open(&server_a.base_url, &path, &[])
        .await
        .err()
        .expect("a used ticket is refused on every instance");
    assert_eq!(
        (status, body["error_code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("AUTH_INVALID"))
    );
}

/// Kills the listener's backend (the one named `name`); returns how many were killed.
async fn kill_listener(app: &TestApp, name: &str) -> i64 {
    let mut side = app.side_connection().await;
    side.scalar(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{name}'"
    ))
    .await
}

#[tokio::test]
async fn streams_lose_nothing_when_the_listener_connection_is_killed() {
    let name = format!("listener-{}", uuid::Uuid::new_v4().simple());
    let Some((a, b)) = two_instances(named_listener(&name), Duration::from_secs(5)).await else {
        return;
    };
    let server_a = a.serve().await;
    let mut stream = EventClient::bearer(&server_a.base_url, "kim", &a.token("kim"), &[]).await;
    assert_eq!(stream.next().await.event, "ready");
    // The listener is up once a write on B reaches A.
    create(&b, "kim", "first").await;
    let mut held = Mirror::default();
    held.apply(
        &change_within(&mut stream, Duration::from_secs(2))
            .await
            .expect("the listener works"),
    );

    let b = Arc::new(b);
    let writer = {
        let b = b.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let task = b.create("kim", &format!("during {i}")).await;
                if i % 3 == 0 {
                    let id = task["id"].as_i64().unwrap();
                    b.call(
                        Method::PATCH,
                        &format!("/api/kim/tasks/{id}"),
                        "kim",
                        Some(json!({"complete": true})),
                    )
                    .await;
                }
                if i % 5 == 0 {
                    let id = task["id"].as_i64().unwrap();
                    b.call(Method::DELETE, &format!("/api/kim/tasks/{id}"), "kim", None)
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut kills = 0;
    let started = Instant::now();
    while !writer.is_finished() {
        if started.elapsed() > Duration::from_millis(300 * (kills + 1)) && kills < 3 {
            kills += kill_listener(&a, &name).await.min(1) as u64;
        }
        if let Some(event) = change_within(&mut stream, Duration::from_millis(50)).await {
            held.apply(&event);
        }
    }
    writer.await.unwrap();
    assert!(kills >= 2, "the listener was killed {kills} times");
    // Everything arrives well within a second of the last write.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(event) = change_within(&mut stream, Duration::from_millis(200)).await {
            held.apply(&event);
        }
        if held.tasks == server_tasks(&a, "kim").await {
            return;
        }
    }
    assert_same(&held.tasks, &server_tasks(&a, "kim").await);
}

/// A TCP proxy to PostgreSQL that can black-hole the connections it carries: data stops
/// flowing, nothing is closed, as with a NAT that forgot the connection.
struct Blackhole {
    port: u16,
    frozen: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Blackhole {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let flag = Arc::new(AtomicBool::new(false));
                registry.lock().unwrap().push(flag.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, flag.clone()));
                tokio::spawn(pipe(sr, cw, flag));
            }
        });
        Self { port, frozen }
    }

    /// Every connection open now stops carrying data; new ones work.
    fn freeze(&self) {
        for flag in self.frozen.lock().unwrap().drain(..) {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Keep both sockets open and forward nothing, ever.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_silently_dead_listener_is_noticed_and_replaced() {
    let Some(base) = postgres_url() else { return };
    let target: std::net::SocketAddr = {
        let url = url::Url::parse(&base).unwrap();
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
            .parse()
            .unwrap()
    };
    let proxy = Blackhole::start(target).await;
    let mut through = url::Url::parse(&base).unwrap();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port)).unwrap();
    let check = Duration::from_millis(300);
    let Some((a, b)) = two_instances(Some(through.to_string()), check).await else {
        return;
    };
    let server_a = a.serve().await;
    let mut stream = EventClient::bearer(&server_a.base_url, "sid", &a.token("sid"), &[]).await;
    assert_eq!(stream.next().await.event, "ready");
    create(&b, "sid", "before").await;
    assert!(
        change_within(&mut stream, Duration::from_secs(2))
            .await
            .is_some(),
        "the listener works"
    );

    proxy.freeze();
    let task = create(&b, "sid", "after the network broke").await;
    // Noticed within two checks, reconnected, caught up: well before the 30 s heartbeat.
    let event = change_within(&mut stream, Duration::from_secs(3))
        .await
        .expect("the change arrives once the dead listener is replaced");
    assert_eq!(event.data["task"], task);
    // And it keeps working.
    let task = create(&b, "sid", "later").await;
    let event = change_within(&mut stream, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(event.data["task"], task);
}

/// What a client holds after applying events.
#[derive(Default)]
struct Mirror {
    tasks: BTreeMap<i64, Value>,
    seen_ids: HashSet<String>,
    last_id: Option<String>,
    events: usize,
}

impl Mirror {
    #[track_caller]
    fn apply(&mut self, event: &SseEvent) {
        let id = event.id.clone().expect("a change has an id");
        assert!(
            self.seen_ids.insert(id.clone()),
            "event repeated: {event:?}"
        );
        self.last_id = Some(id);
        self.events += 1;
        if event.data["type"] == "upsert" {
            let task = &event.data["task"];
            if let Some(held) = self.tasks.get(&task["id"].as_i64().unwrap()) {
                assert!(
                    task["version"].as_i64() > held["version"].as_i64(),
                    "an older or repeated state of a task: {task} after {held}"
                );
            }
        }
        crate::support::apply_change(&mut self.tasks, &event.data);
    }
}

/// The client holds exactly the server's tasks (the differences are what a failure shows).
#[track_caller]
fn assert_same(held: &BTreeMap<i64, Value>, server: &BTreeMap<i64, Value>) {
    let mut differences = Vec::new();
    for (id, task) in server {
        match held.get(id) {
            None => differences.push(format!("missing {task}")),
            Some(h) if h != task => differences.push(format!("stale {h}, server has {task}")),
            Some(_) => {}
        }
    }
    for (id, task) in held {
        if !server.contains_key(id) {
            differences.push(format!("deleted on the server but held: {task}"));
        }
    }
    assert!(
        differences.is_empty(),
        "the client does not hold the server's tasks ({} differences):\n{}",
        differences.len(),
        differences
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Writers change one user's tasks through `writers` while a client follows the stream
/// on `servers` (switching instance and reconnecting with `Last-Event-ID` now and then);
/// at the end the client holds exactly the server's tasks, and saw no event twice.
async fn follow_while_writing(writers: Vec<Arc<TestApp>>, servers: Vec<(String, Arc<TestApp>)>) {
    const USER: &str = "ivy";
    // The client starts as every client does: a full sync from the feed (nothing yet),
    // then the stream from the feed's cursor.
    let first = writers[0]
        .call(Method::GET, &format!("/api/{USER}/changes"), USER, None)
        .await;
    assert_eq!(first.status, StatusCode::OK);
    let mut held = Mirror {
        last_id: Some(first.json["cursor"].as_str().unwrap().to_owned()),
        ..Mirror::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (n, app) in writers.iter().cycle().take(4).enumerate() {
        let (app, stop) = (app.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut mine: Vec<i64> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match (i + n as u64) % 4 {
                    0 | 1 => {
                        let task = app.create(USER, &format!("w{n}-{i}")).await;
                        mine.push(task["id"].as_i64().unwrap());
                    }
                    2 if !mine.is_empty() => {
                        let id = mine[(i as usize) % mine.len()];
                        app.call(
                            Method::PATCH,
                            &format!("/api/{USER}/tasks/{id}"),
                            USER,
                            Some(json!({"title": format!("p{i}")})),
                        )
                        .await;
                    }
                    _ if !mine.is_empty() => {
                        let id = mine.swap_remove((i as usize) % mine.len());
                        app.call(
                            Method::DELETE,
                            &format!("/api/{USER}/tasks/{id}"),
                            USER,
                            None,
                        )
                        .await;
                    }
                    _ => {}
                }
            }
            i
        }));
    }
    let started = Instant::now();
    let mut reconnects = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let (base, app) = &servers[reconnects % servers.len()];
        let resume = held.last_id.clone();
        // Alternately as EventSource resumes (`Last-Event-ID`) and as a fresh connection
        // from a saved position (`?cursor=` is tested elsewhere; the header here).
        let headers: Vec<(&str, &str)> = resume
            .iter()
            .map(|id| ("last-event-id", id.as_str()))
            .collect();
        let mut stream = EventClient::bearer(base, USER, &app.token(USER), &headers).await;
        let ready = stream.next().await;
        assert_eq!(ready.event, "ready");
        // Stay connected for a random-ish while, then drop the connection.
        let stay = Duration::from_millis(100 + (reconnects as u64 * 137) % 400);
        let until = Instant::now() + stay;
        while Instant::now() < until {
            if let Some(event) = change_within(&mut stream, Duration::from_millis(20)).await {
                held.apply(&event);
            }
        }
        reconnects += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for h in handles {
        writes += h.await.unwrap();
    }
    // The last connection catches up with everything.
    let (base, app) = &servers[0];
    let resume = held.last_id.clone().expect("events were seen");
    let mut stream =
        EventClient::bearer(base, USER, &app.token(USER), &[("last-event-id", &resume)]).await;
    assert_eq!(stream.next().await.event, "ready");
    for event in stream.drain(Duration::from_millis(700)).await {
        held.apply(&event);
    }
    let server = server_tasks(app, USER).await;
    eprintln!(
        "{writes} writes, {} events, {reconnects} reconnects, {} tasks at the end",
        held.events,
        server.len()
    );
    assert!(
        reconnects >= 5 && held.events > 50,
        "the test exercised too little: {reconnects} reconnects, {} events",
        held.events
    );
    assert_same(&held.tasks, &server);
}

#[tokio::test]
async fn sqlite_a_following_client_ends_with_exactly_the_servers_tasks() {
    let auth = auth_config();
    let app = TestApp::sqlite_with_options(auth.clone(), Verifier::new(&auth), &unlimited()).await;
    let app = Arc::new(app);
    let server = app.serve().await;
    follow_while_writing(
        vec![app.clone()],
        vec![(server.base_url.clone(), app.clone())],
    )
    .await;
}

#[tokio::test]
async fn postgres_a_following_client_ends_with_exactly_the_servers_tasks_across_instances() {
    let Some((a, b)) = two_instances(None, Duration::from_secs(5)).await else {
        return;
    };
    let (a, b) = (Arc::new(a), Arc::new(b));
    let (server_a, server_b): (LiveServer, LiveServer) = (a.serve().await, b.serve().await);
    follow_while_writing(
        vec![a.clone(), b.clone()],
        vec![
            (server_b.base_url.clone(), b.clone()),
            (server_a.base_url.clone(), a.clone()),
        ],
    )
    .await;
}

/// Several streams of one user open at once, on a hub that does not exist yet, while
/// writes go on: whichever stream starts the hub's pump, each stream gets every change
/// after its own starting point (a stream that read the feed before the pump's start
/// reads the difference itself). Many rounds, a fresh user each.
async fn streams_opening_together_each_get_every_change(app: TestApp) {
    let app = Arc::new(app);
    let server = app.serve().await;
    for round in 0..8 {
        let user = format!("crowd{round}");
        let start = app
            .call(Method::GET, &format!("/api/{user}/changes"), &user, None)
            .await;
        let cursor = start.json["cursor"].as_str().unwrap().to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (app, stop, user) = (app.clone(), stop.clone(), user.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    app.create(&user, &format!("t{n}")).await;
                    n += 1;
                }
            })
        };
        let mut streams = Vec::new();
        for _ in 0..6 {
            let (base, token, user, cursor) = (
                server.base_url.clone(),
                app.token(&user),
                user.clone(),
                cursor.clone(),
            );
            streams.push(tokio::spawn(async move {
                let mut stream =
                    EventClient::bearer(&base, &user, &token, &[("last-event-id", &cursor)]).await;
                assert_eq!(stream.next().await.event, "ready");
                stream
            }));
        }
        let mut opened = Vec::new();
        for s in streams {
            opened.push(s.await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
        let expected = server_tasks(&app, &user).await;
        let drained: Vec<_> = opened
            .into_iter()
            .map(|mut stream| {
                tokio::spawn(async move { stream.drain(Duration::from_millis(400)).await })
            })
            .collect();
        for events in drained {
            let mut held = Mirror::default();
            for event in events.await.unwrap() {
                held.apply(&event);
            }
            assert_same(&held.tasks, &expected);
        }
    }
}

/// Headless Chromium: a native `EventSource` opened with a ticket sees a change made
/// over HTTP, and after reconnecting with a fresh ticket and its last event id, the
/// change it missed.
async fn a_real_browser_follows_the_stream_with_a_ticket(app: TestApp) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(_) = crate::support::tool(
        repo.join("tests/browser/node_modules/playwright-core"),
        "npm ci --prefix tests/browser",
    ) else {
        return;
    };
    let Some(_) = crate::support::tool("/usr/bin/chromium".into(), "apt-get install chromium")
    else {
        return;
    };
    let server = app.serve().await;
    let out = tokio::process::Command::new("node")
        .arg(repo.join("tests/browser/events.mjs"))
        .args([&server.base_url, &app.token("tab-user"), "tab-user"])
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The upkeep purges expired tickets (used ones are deleted when used) and keeps live ones.
async fn expired_tickets_are_purged(app: TestApp) {
    let store = app.store();
    let now = task_api::storage::now();
    for (i, offset) in [-120i64, -61, 30, 59].into_iter().enumerate() {
        let at = now + chrono::Duration::seconds(offset);
        store
            .store_ticket("pat", &[i as u8; 16], at, now + chrono::Duration::hours(1))
            .await
            .unwrap();
    }
    let upkeep = task_api::storage::upkeep::Upkeep {
        idempotency_ttl: Duration::from_secs(3600),
        sync_retention: Duration::from_secs(3600),
    };
    let done = task_api::storage::upkeep::run_once(store.as_ref(), upkeep)
        .await
        .unwrap();
    assert_eq!(done.tickets, 2);
    let mut side = app.side_connection().await;
    assert_eq!(side.scalar("SELECT count(*) FROM event_tickets").await, 2);
    // The live ones still redeem, once.
    let redeems = async |id: u8| store.redeem_ticket("pat", &[id; 16], now).await.unwrap();
    assert!(redeems(2).await.is_some());
    assert!(redeems(2).await.is_none());
    assert!(redeems(0).await.is_none());
}

/// With the default limits, a user's 21st open stream on an instance is refused 429 with
/// `Retry-After`, and another user is not affected.
async fn the_default_limit_refuses_a_users_21st_stream(app: TestApp) {
    let server = app.serve().await;
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut stream = EventClient::bearer(&server.base_url, "max", &app.token("max"), &[]).await;
        assert_eq!(stream.next().await.event, "ready");
        open.push(stream);
    }
    let auth = format!("Bearer {}", app.token("max"));
    let (status, body, headers) = EventClient::open(
        &server.base_url,
        "/api/max/events",
        &[("authorization", &auth)],
    )
    .await
    .err()
    .expect("the 21st stream is refused");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error_code"], "RATE_LIMITED");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    let mut other = EventClient::bearer(&server.base_url, "min", &app.token("min"), &[]).await;
    assert_eq!(other.next().await.event, "ready");
    // A place freed is a place taken.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match EventClient::open(
            &server.base_url,
            "/api/max/events",
            &[("authorization", &auth)],
        )
        .await
        {
            Ok(_) => break,
            Err((status, ..)) => {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
                assert!(Instant::now() < deadline, "no place freed within 2 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

crate::on_both_databases!(
    the_default_limit_refuses_a_users_21st_stream,
    expired_tickets_are_purged,
    streams_opening_together_each_get_every_change,
    a_real_browser_follows_the_stream_with_a_ticket,
);
