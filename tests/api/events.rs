//! Live updates: the event stream and its tickets (contract, "Live updates: server-sent
//! events"), over real HTTP on both databases.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use task_api::auth::Verifier;
use task_api::events::fanout::EventSettings;
use task_api::events::tickets::Ticket;
use task_api::http::HttpOptions;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::support::{EventClient, Next, Reply, SECRET, SseEvent, TestApp, auth_config, utc};

/// Which database a scenario runs on; scenarios that need their own settings build their
/// apps from it.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    async fn app(self, options: HttpOptions) -> TestApp {
        match self {
            Self::Sqlite => {
                let auth = auth_config();
                let verifier = Verifier::new(&auth);
                TestApp::sqlite_with_options(auth, verifier, &options).await
            }
            Self::Postgres => TestApp::postgres_with_options(auth_config(), &options, |o| o)
                .await
                .expect("PostgreSQL is configured"),
        }
    }

    async fn default_app(self) -> TestApp {
        self.app(HttpOptions::default()).await
    }
}

fn with_events(events: EventSettings) -> HttpOptions {
    HttpOptions {
        events,
        ..HttpOptions::default()
    }
}

/// Declares each scenario `async fn name(backend: Backend)` as `sqlite::name` and
/// `postgres::name` (which skips, or under CI fails, without `TEST_DATABASE_URL`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::support::postgres_url().is_some() {
                        super::$name(super::Backend::Postgres).await
                    }
                }
            )*
        }
    };
}

// ---------------------------------------------------------------------------------------
// Helpers

fn events_path(user: &str) -> String {
    format!("/api/{user}/events")
}

fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// An error the stream answered instead of opening, as a [`Reply`] (for its asserts).
fn reply_of((status, json, headers): (StatusCode, Value, HeaderMap)) -> Reply {
    Reply {
        status,
        headers,
        json,
        raw: Vec::new(),
    }
}

/// Opens a stream that must be refused; its error reply.
async fn refused(base: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    match EventClient::open(base, path, headers).await {
        Ok(_) => panic!("{path} {headers:?}: the stream opened"),
        Err(error) => reply_of(error),
    }
}

/// Opens a stream that must open.
async fn opened(base: &str, path: &str, headers: &[(&str, &str)]) -> EventClient {
    match EventClient::open(base, path, headers).await {
        Ok(client) => client,
        Err((status, body, _)) => panic!("{path} {headers:?}: refused {status} {body}"),
    }
}

/// The first event, `ready`: asserts its shape and returns its cursor (also its id).
async fn ready(client: &mut EventClient) -> String {
    let event = client.next().await;
    assert_ready(&event)
}

fn assert_ready(event: &SseEvent) -> String {
    assert_eq!(event.event, "ready", "{event:?}");
    assert_eq!(
        event.data.as_object().map(|o| o.len()),
        Some(1),
        "{event:?}"
    );
    let cursor = event.data["cursor"].as_str().expect("a cursor").to_owned();
    assert!(!cursor.is_empty());
    assert_eq!(event.id.as_deref(), Some(cursor.as_str()), "{event:?}");
    cursor
}

/// The next event, a change: its id and data.
async fn change(client: &mut EventClient) -> (String, Value) {
    let event = client.next().await;
    assert_eq!(event.event, "change", "{event:?}");
    (event.id.expect("a change has an id"), event.data)
}

/// `n` change events, their ids and data.
async fn changes(client: &mut EventClient, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(change(client).await);
    }
    out
}

/// Nothing more arrives for a while (no repeat, nothing of another user's).
async fn quiet(client: &mut EventClient) {
    match client.next_within(Duration::from_millis(400)).await {
        Next::Quiet => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
}

async fn feed(app: &TestApp, user: &str, cursor: Option<&str>) -> Reply {
    let uri = match cursor {
        Some(cursor) => format!("/api/{user}/changes?cursor={}", encode(cursor)),
        None => format!("/api/{user}/changes"),
    };
    app.call(Method::GET, &uri, user, None).await
}

/// Every change the feed gives after `cursor` (all pages), and its last cursor.
async fn sync_from(app: &TestApp, user: &str, cursor: Option<&str>) -> (Vec<Value>, String) {
    let mut out = Vec::new();
    let mut cursor = cursor.map(str::to_owned);
    loop {
        let reply = feed(app, user, cursor.as_deref()).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
        out.extend(reply.json["changes"].as_array().unwrap().iter().cloned());
        cursor = Some(reply.json["cursor"].as_str().unwrap().to_owned());
        if reply.json["has_more"] == false {
            return (out, cursor.unwrap());
        }
    }
}

async fn changes_after(app: &TestApp, user: &str, cursor: &str) -> Vec<Value> {
    sync_from(app, user, Some(cursor)).await.0
}

fn task_url(task: &Value) -> String {
    format!(
        "/api/{}/tasks/{}",
        task["user_id"].as_str().unwrap(),
        task["id"]
    )
}

async fn patch(app: &TestApp, task: &Value, body: Value) -> Value {
    let user = task["user_id"].as_str().unwrap();
    let reply = app
        .call(Method::PATCH, &task_url(task), user, Some(body))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    reply.json
}

async fn delete(app: &TestApp, task: &Value) {
    let user = task["user_id"].as_str().unwrap();
    let reply = app.call(Method::DELETE, &task_url(task), user, None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.json);
}

fn upsert(task: &Value) -> Value {
    json!({"type": "upsert", "task": task})
}

/// Asserts a delete entry for `task` and returns it.
#[track_caller]
fn assert_delete(entry: &Value, task: &Value) {
    assert_eq!(entry["type"], "delete", "{entry}");
    assert_eq!(entry["task_id"], task["id"], "{entry}");
    utc(&entry["deleted_at"]);
    assert_eq!(entry.as_object().unwrap().len(), 3, "{entry}");
}

/// A new ticket for `user`, asked for with `token`.
async fn ticket_with(app: &TestApp, user: &str, token: &str) -> String {
    let reply = app
        .call_with_token(
            Method::POST,
            &format!("/api/{user}/events/tickets"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
    reply.json["ticket"].as_str().expect("ticket").to_owned()
}

async fn ticket(app: &TestApp, user: &str) -> String {
    ticket_with(app, user, &app.token(user)).await
}

fn ticket_path(user: &str, ticket: &str) -> String {
    format!("/api/{user}/events?ticket={}", encode(ticket))
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// An HS256 token for `user` whose `exp` is `exp_offset` seconds from now.
fn token_expiring(user: &str, exp_offset: i64) -> String {
    let now = unix_now();
    let claims = json!({"sub": user, "iat": now - 120, "exp": now + exp_offset});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The `task_api_event_streams_open` gauge.
fn open_streams(app: &TestApp) -> i64 {
    let text = app.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix("task_api_event_streams_open "))
        .unwrap_or_else(|| panic!("no stream gauge in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits (up to 2 s) until the gauge reads `n`.
async fn until_open_streams(app: &TestApp, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while open_streams(app) != n {
        assert!(
            Instant::now() < deadline,
            "the gauge stayed at {} (expected {n})",
            open_streams(app)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Retries opening a stream until it opens (2 s at most): a place freed by a client
/// that left is noticed by the server only once the connection closes.
async fn open_within_2s(base: &str, path: &str, headers: &[(&str, &str)]) -> EventClient {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match EventClient::open(base, path, headers).await {
            Ok(client) => return client,
            Err((status, body, _)) => {
                assert!(
                    status == StatusCode::TOO_MANY_REQUESTS
                        || status == StatusCode::SERVICE_UNAVAILABLE,
                    "{status} {body}"
                );
                assert!(
                    Instant::now() < deadline,
                    "no place freed within 2 s: {status} {body}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

/// Server-sent events parsed from raw body bytes (an in-process stream).
#[derive(Default)]
struct SseText {
    buffer: String,
}

impl SseText {
    fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.push_str(std::str::from_utf8(bytes).unwrap());
        let mut out = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            out.extend(crate::support::parse_sse_block(&block).0);
        }
        out
    }
}

/// Opens a stream in-process (no TCP): the response, its body not yet polled.
async fn in_process_stream(
    app: &TestApp,
    user: &str,
    last_event_id: Option<&str>,
) -> axum::response::Response {
    let mut request = Request::get(events_path(user))
        .header(header::AUTHORIZATION, format!("Bearer {}", app.token(user)));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = app
        .router
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response
}

/// What the server sent on an in-process stream until `enough` events, or until it
/// ended (`true`); panics when neither happens by `wait`.
async fn read_body(
    body: &mut Body,
    parser: &mut SseText,
    enough: usize,
    wait: Duration,
) -> (Vec<SseEvent>, bool) {
    let deadline = Instant::now() + wait;
    let mut events = Vec::new();
    while events.len() < enough {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => panic!(
                "neither {enough} events nor the end within {wait:?}: {} events",
                events.len()
            ),
            Ok(None) => return (events, true),
            Ok(Some(frame)) => {
                if let Ok(data) = frame.expect("a body frame").into_data() {
                    events.extend(parser.push(&data));
                }
            }
        }
    }
    (events, false)
}

// ---------------------------------------------------------------------------------------
// 1. A fresh stream

async fn a_fresh_stream_starts_ready_then_sends_each_change_as_the_feed_gives_it(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let b = app.create("alice", "b").await;
    let c = app.create("alice", "c").await;
    let d = app.create("alice", "d").await;
    let bobs = app.create("bob", "bob's").await;

    let mut stream = EventClient::bearer(&server.base_url, "alice", &app.token("alice"), &[]).await;
    // Buffering proxies are told not to hold events back.
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    let start = ready(&mut stream).await;
    // The ready cursor is the current feed position: nothing after it yet.
    let reply = feed(&app, "alice", Some(&start)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    assert_eq!(reply.json["changes"], json!([]));
    assert_eq!(reply.json["has_more"], false);

    // Each write reaches the stream, exactly as the write returned it; bob's never do.
    app.create("bob", "not alice's").await;
    let a = app.create("alice", "a").await;
    let (id1, first) = change(&mut stream).await;
    assert_eq!(first, upsert(&a));

    patch(&app, &bobs, json!({"title": "bob's, edited"})).await;
    let b2 = patch(&app, &b, json!({"complete": true})).await;
    let (id2, second) = change(&mut stream).await;
    assert_eq!(second, upsert(&b2));

    delete(&app, &bobs).await;
    delete(&app, &c).await;
    let (id3, third) = change(&mut stream).await;
    assert_delete(&third, &c);

    let reply = app
        .call(
            Method::PUT,
            &task_url(&d),
            "alice",
            Some(json!({"title": "d, replaced", "complete": true})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    let (id4, fourth) = change(&mut stream).await;
    assert_eq!(fourth, upsert(&reply.json));

    // Every id is a feed cursor: the feed after it gives exactly the later changes.
    let all = vec![first, second, third, fourth];
    assert_eq!(changes_after(&app, "alice", &start).await, all);
    assert_eq!(changes_after(&app, "alice", &id1).await, all[1..]);
    assert_eq!(changes_after(&app, "alice", &id2).await, all[2..]);
    assert_eq!(changes_after(&app, "alice", &id3).await, all[3..]);
    assert!(changes_after(&app, "alice", &id4).await.is_empty());

    app.create("bob", "still not alice's").await;
    quiet(&mut stream).await;
}

// ---------------------------------------------------------------------------------------
// 2. Resuming

#[derive(Clone, Copy)]
enum Resume {
    Header,
    Query,
}

async fn open_resuming(app: &TestApp, base: &str, from: &str, how: Resume) -> EventClient {
    let token = format!("Bearer {}", app.token("alice"));
    match how {
        Resume::Header => {
            opened(
                base,
                &events_path("alice"),
                &[("authorization", &token), ("last-event-id", from)],
            )
            .await
        }
        Resume::Query => {
            let path = format!("{}?cursor={}", events_path("alice"), encode(from));
            opened(base, &path, &[("authorization", &token)]).await
        }
    }
}

async fn resume(backend: Backend, how: Resume) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let x = app.create("alice", "x").await;
    let mut stream = EventClient::bearer(&server.base_url, "alice", &app.token("alice"), &[]).await;
    ready(&mut stream).await;
    let y = app.create("alice", "y").await;
    let (last, seen) = change(&mut stream).await;
    assert_eq!(seen, upsert(&y));
    drop(stream);

    // While disconnected.
    let x2 = patch(&app, &x, json!({"title": "x, edited"})).await;
    let z = app.create("alice", "z").await;
    delete(&app, &y).await;
    let missed = changes_after(&app, "alice", &last).await;
    assert_eq!(missed.len(), 3, "{missed:?}");
    assert_eq!(missed[0], upsert(&x2));
    assert_eq!(missed[1], upsert(&z));
    assert_delete(&missed[2], &y);

    let mut stream = open_resuming(&app, &server.base_url, &last, how).await;
    // `ready` is at the resume point: the feed after it is the feed after `last`.
    let resumed = ready(&mut stream).await;
    assert_eq!(changes_after(&app, "alice", &resumed).await, missed);
    // First what was missed, each id a feed cursor ...
    let replay = changes(&mut stream, missed.len()).await;
    for (i, (id, data)) in replay.iter().enumerate() {
        assert_eq!(data, &missed[i]);
        assert_eq!(changes_after(&app, "alice", id).await, missed[i + 1..]);
    }
    // ... then live ones, none repeated.
    let w = app.create("alice", "w").await;
    let (_, live) = change(&mut stream).await;
    assert_eq!(live, upsert(&w));
    quiet(&mut stream).await;
}

async fn a_stream_resumed_with_last_event_id_replays_what_was_missed_then_goes_live(
    backend: Backend,
) {
    resume(backend, Resume::Header).await;
}

async fn a_stream_resumed_with_a_cursor_replays_what_was_missed_then_goes_live(backend: Backend) {
    resume(backend, Resume::Query).await;
}

async fn last_event_id_wins_over_the_cursor_query(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let token = format!("Bearer {}", app.token("alice"));
    let mut stream = EventClient::bearer(&server.base_url, "alice", &app.token("alice"), &[]).await;
    let start = ready(&mut stream).await;
    app.create("alice", "a").await;
    app.create("alice", "b").await;
    let seen = changes(&mut stream, 2).await;
    drop(stream);
    let c = app.create("alice", "c").await;

    // From `start`, `a`, `b` and `c` would come; from the header's id, only `c`.
    let path = format!("{}?cursor={}", events_path("alice"), encode(&start));
    let mut stream = opened(
        &server.base_url,
        &path,
        &[("authorization", &token), ("last-event-id", &seen[1].0)],
    )
    .await;
    let resumed = ready(&mut stream).await;
    assert_eq!(changes_after(&app, "alice", &resumed).await, [upsert(&c)]);
    assert_eq!(change(&mut stream).await.1, upsert(&c));
    quiet(&mut stream).await;

    // A bad header is not rescued by a good cursor.
    let reply = refused(
        &server.base_url,
        &path,
        &[("authorization", &token), ("last-event-id", "garbage")],
    )
    .await;
    reply.assert_invalid(&[(&["header", "Last-Event-ID"], "value_error")]);
}

async fn a_full_sync_then_a_stream_from_its_cursor_loses_nothing(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(app.create("alice", &format!("t{i}")).await);
    }
    patch(&app, &tasks[0], json!({"complete": true})).await;

    // A full sync, in pages.
    let mut replica: BTreeMap<i64, Value> = BTreeMap::new();
    let apply = crate::support::apply_change;
    let mut cursor: Option<String> = None;
    loop {
        let uri = match &cursor {
            Some(c) => format!("/api/alice/changes?limit=2&cursor={}", encode(c)),
            None => "/api/alice/changes?limit=2".to_owned(),
        };
        let reply = app.call(Method::GET, &uri, "alice", None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
        for change in reply.json["changes"].as_array().unwrap() {
            apply(&mut replica, change);
        }
        cursor = Some(reply.json["cursor"].as_str().unwrap().to_owned());
        if reply.json["has_more"] == false {
            break;
        }
    }
    let cursor = cursor.unwrap();

    // Writes between the sync and the stream.
    app.create("alice", "after the sync").await;
    delete(&app, &tasks[1]).await;
    patch(&app, &tasks[2], json!({"title": "t2, edited"})).await;
    let missed = changes_after(&app, "alice", &cursor).await;
    assert_eq!(missed.len(), 3, "{missed:?}");

    let path = format!("{}?cursor={}", events_path("alice"), encode(&cursor));
    let token = format!("Bearer {}", app.token("alice"));
    let mut stream = opened(&server.base_url, &path, &[("authorization", &token)]).await;
    ready(&mut stream).await;
    for (_, change) in changes(&mut stream, 3).await {
        apply(&mut replica, &change);
    }
    delete(&app, &tasks[3]).await;
    patch(&app, &tasks[4], json!({"description": "live"})).await;
    for (_, change) in changes(&mut stream, 2).await {
        apply(&mut replica, &change);
    }
    quiet(&mut stream).await;

    assert_eq!(replica, crate::support::server_tasks(&app, "alice").await);
}

/// A cursor from the middle of a paged full sync (`has_more: true`) is a feed cursor
/// too: a stream from it gives the rest of the sync, then live changes.
async fn a_stream_from_a_cursor_in_the_middle_of_a_full_sync_completes_it(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(app.create("alice", &format!("t{i}")).await);
    }
    let first = app
        .call(Method::GET, "/api/alice/changes?limit=2", "alice", None)
        .await;
    assert_eq!(first.json["has_more"], true, "{}", first.json);
    let mut replica: BTreeMap<i64, Value> = first.json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["task"]["id"].as_i64().unwrap(), c["task"].clone()))
        .collect();
    let cursor = first.json["cursor"].as_str().unwrap().to_owned();
    delete(&app, &tasks[4]).await;

    let path = format!("{}?cursor={}", events_path("alice"), encode(&cursor));
    let token = format!("Bearer {}", app.token("alice"));
    let mut stream = opened(&server.base_url, &path, &[("authorization", &token)]).await;
    let resumed = ready(&mut stream).await;
    let rest = changes_after(&app, "alice", &resumed).await;
    assert_eq!(rest, changes_after(&app, "alice", &cursor).await);
    let replay = changes(&mut stream, rest.len()).await;
    let live = app.create("alice", "live").await;
    let (_, last) = change(&mut stream).await;
    assert_eq!(last, upsert(&live));
    quiet(&mut stream).await;
    for data in replay.iter().map(|(_, d)| d).chain([&last]) {
        crate::support::apply_change(&mut replica, data);
    }
    assert_eq!(replica, crate::support::server_tasks(&app, "alice").await);
}

/// A user id that a URL must encode: the stream (path decoded) and the writes' wake-ups
/// agree on whose it is, so changes arrive at once, not at the next re-check.
async fn a_user_whose_id_needs_encoding_gets_their_events(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    for (user, in_path) in [
        ("ann+tag@example.com", "ann%2Btag%40example.com"),
        ("zoë", "zo%C3%AB"),
    ] {
        let bearer = format!("Bearer {}", app.token(user));
        let path = format!("/api/{in_path}/events");
        let mut stream = opened(&server.base_url, &path, &[("authorization", &bearer)]).await;
        ready(&mut stream).await;
        let reply = app
            .call(
                Method::POST,
                &format!("/api/{in_path}/tasks"),
                user,
                Some(json!({"title": "mine"})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
        assert_eq!(reply.json["user_id"], user);
        // Well before the 15 s re-check.
        match stream.next_within(Duration::from_secs(2)).await {
            Next::Event(event) => assert_eq!(event.data, upsert(&reply.json)),
            other => panic!("{user}: expected the change, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Resume points that are refused

async fn a_resume_point_not_issued_to_this_user_is_422(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let token = format!("Bearer {}", app.token("alice"));
    let auth = ("authorization", token.as_str());
    let path = events_path("alice");
    let in_header: &[(&[&str], &str)] = &[(&["header", "Last-Event-ID"], "value_error")];
    let in_query: &[(&[&str], &str)] = &[(&["query", "cursor"], "value_error")];
    let with_cursor = |cursor: &str| format!("{path}?cursor={}", encode(cursor));

    refused(base, &path, &[auth, ("last-event-id", "garbage")])
        .await
        .assert_invalid(in_header);
    refused(base, &with_cursor("garbage"), &[auth])
        .await
        .assert_invalid(in_query);
    refused(base, &format!("{path}?cursor="), &[auth])
        .await
        .assert_invalid(in_query);

    // Another user's cursor, and another user's event id.
    let (_, bobs_cursor) = sync_from(&app, "bob", None).await;
    let mut bobs_stream = EventClient::bearer(base, "bob", &app.token("bob"), &[]).await;
    let bobs_event_id = ready(&mut bobs_stream).await;
    for bobs in [&bobs_cursor, &bobs_event_id] {
        refused(base, &with_cursor(bobs), &[auth])
            .await
            .assert_invalid(in_query);
        refused(base, &path, &[auth, ("last-event-id", bobs)])
            .await
            .assert_invalid(in_header);
    }

    // A list cursor is not a feed position.
    app.create("alice", "one").await;
    app.create("alice", "two").await;
    let list = app
        .call(Method::GET, "/api/alice/tasks?limit=1", "alice", None)
        .await;
    let list_cursor = list.json["next_cursor"].as_str().expect("a list cursor");
    refused(base, &with_cursor(list_cursor), &[auth])
        .await
        .assert_invalid(in_query);
    refused(base, &path, &[auth, ("last-event-id", list_cursor)])
        .await
        .assert_invalid(in_header);

    // An empty Last-Event-ID is no Last-Event-ID: the cursor counts ...
    refused(
        base,
        &with_cursor("garbage"),
        &[auth, ("last-event-id", "")],
    )
    .await
    .assert_invalid(in_query);
    // ... and alone it opens a fresh stream, at the current position.
    let mut stream = opened(base, &path, &[auth, ("last-event-id", "")]).await;
    let start = ready(&mut stream).await;
    assert_eq!(
        changes_after(&app, "alice", &start).await,
        Vec::<Value>::new()
    );
    let t = app.create("alice", "live").await;
    assert_eq!(change(&mut stream).await.1, upsert(&t));
}

async fn an_expired_resume_point_is_410(backend: Backend) {
    let options = HttpOptions {
        sync_retention: Duration::from_secs(1),
        ..HttpOptions::default()
    };
    let app = backend.app(options).await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let token = format!("Bearer {}", app.token("alice"));
    let auth = ("authorization", token.as_str());
    let path = events_path("alice");

    let (_, cursor) = sync_from(&app, "alice", None).await;
    let mut stream = EventClient::bearer(base, "alice", &app.token("alice"), &[]).await;
    let event_id = ready(&mut stream).await;
    drop(stream);
    // Still fresh: accepted.
    let mut fresh = opened(base, &path, &[auth, ("last-event-id", &event_id)]).await;
    ready(&mut fresh).await;
    drop(fresh);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    for old in [&cursor, &event_id] {
        refused(base, &path, &[auth, ("last-event-id", old)])
            .await
            .assert_error(StatusCode::GONE, "CURSOR_EXPIRED");
        refused(base, &format!("{path}?cursor={}", encode(old)), &[auth])
            .await
            .assert_error(StatusCode::GONE, "CURSOR_EXPIRED");
    }
    // A fresh stream still opens.
    let mut stream = opened(base, &path, &[auth]).await;
    ready(&mut stream).await;
}

// ---------------------------------------------------------------------------------------
// 4. Authorization

async fn the_stream_needs_a_bearer_header_and_never_takes_a_jwt_in_the_url(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let path = events_path("alice");
    let jwt = app.token("alice");

    refused(base, &path, &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    for name in ["access_token", "token"] {
        refused(base, &format!("{path}?{name}={jwt}"), &[])
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    }
    // Not under another scheme either.
    let basic = format!("Basic {jwt}");
    refused(
        base,
        &format!("{path}?access_token={jwt}"),
        &[("authorization", &basic)],
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    // A JWT is not a ticket.
    refused(base, &ticket_path("alice", &jwt), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    for bad in ["Bearer garbage".to_owned(), format!("Bearer {jwt}x")] {
        refused(base, &path, &[("authorization", &bad)])
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    }
    // Expired beyond the leeway.
    let expired = format!("Bearer {}", token_expiring("alice", -120));
    refused(base, &path, &[("authorization", &expired)])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    let bearer = format!("Bearer {jwt}");
    refused(base, &events_path("bob"), &[("authorization", &bearer)])
        .await
        .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");

    let mut stream = opened(base, &path, &[("authorization", &bearer)]).await;
    ready(&mut stream).await;
}

// ---------------------------------------------------------------------------------------
// 5. Tickets

async fn a_ticket_is_issued_to_its_user_only(backend: Backend) {
    let app = backend.default_app().await;
    let before = chrono::Utc::now();
    let reply = app
        .call(Method::POST, "/api/alice/events/tickets", "alice", None)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json.as_object().unwrap();
    assert_eq!(body.len(), 2, "{}", reply.json);
    let first = body["ticket"].as_str().expect("ticket");
    assert!(!first.is_empty());
    let expires_at = utc(&body["expires_at"]);
    let ahead = (expires_at - before).num_milliseconds();
    assert!((59_000..=62_000).contains(&ahead), "{ahead} ms ahead");

    let second = app
        .call(Method::POST, "/api/alice/events/tickets", "alice", None)
        .await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_ne!(second.json["ticket"], body["ticket"]);

    let path = "/api/alice/events/tickets";
    app.call_with_token(Method::POST, path, None, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    app.call_with_token(Method::POST, path, Some("garbage"), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    // A ticket does not buy another ticket.
    app.call_with_token(Method::POST, path, Some(first), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    app.call(Method::POST, "/api/bob/events/tickets", "alice", None)
        .await
        .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
}

async fn a_ticket_opens_one_stream_once(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let ticket = ticket(&app, "alice").await;

    let mut stream = opened(base, &ticket_path("alice", &ticket), &[]).await;
    let start = ready(&mut stream).await;
    assert_eq!(
        changes_after(&app, "alice", &start).await,
        Vec::<Value>::new()
    );
    let a = app.create("alice", "a").await;
    app.create("bob", "bob's").await;
    assert_eq!(change(&mut stream).await.1, upsert(&a));
    let a2 = patch(&app, &a, json!({"complete": true})).await;
    assert_eq!(change(&mut stream).await.1, upsert(&a2));

    // Used up: refused while its stream is open, and after.
    refused(base, &ticket_path("alice", &ticket), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    drop(stream);
    refused(base, &ticket_path("alice", &ticket), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    for garbage in [
        "garbage",
        "",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        refused(base, &ticket_path("alice", garbage), &[])
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    }
    // A stream opened with a ticket resumes like any other.
    let resumed = ticket_path(
        "alice",
        &ticket_with(&app, "alice", &app.token("alice")).await,
    );
    let mut stream = opened(base, &resumed, &[("last-event-id", &start)]).await;
    ready(&mut stream).await;
    assert_eq!(change(&mut stream).await.1, upsert(&a2));
}

async fn a_ticket_refused_for_another_reason_is_not_used_up(backend: Backend) {
    let app = backend
        .app(with_events(EventSettings {
            max_streams_per_user: 1,
            ..EventSettings::default()
        }))
        .await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let ticket = ticket(&app, "alice").await;

    // On another user's path: 403, and the ticket stays unused.
    refused(base, &ticket_path("bob", &ticket), &[])
        .await
        .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    // With a bad resume point: 422.
    let bad_cursor = format!("{}&cursor=garbage", ticket_path("alice", &ticket));
    refused(base, &bad_cursor, &[])
        .await
        .assert_invalid(&[(&["query", "cursor"], "value_error")]);
    refused(
        base,
        &ticket_path("alice", &ticket),
        &[("last-event-id", "garbage")],
    )
    .await
    .assert_invalid(&[(&["header", "Last-Event-ID"], "value_error")]);
    // Over the stream limit: 429.
    let held = EventClient::bearer(base, "alice", &app.token("alice"), &[]).await;
    let reply = refused(base, &ticket_path("alice", &ticket), &[]).await;
    reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    drop(held);

    // Still good for alice's own stream.
    let mut stream = open_within_2s(base, &ticket_path("alice", &ticket), &[]).await;
    ready(&mut stream).await;
    let t = app.create("alice", "t").await;
    assert_eq!(change(&mut stream).await.1, upsert(&t));
    drop(stream);
    // And now used up.
    tokio::time::sleep(Duration::from_millis(50)).await;
    refused(base, &ticket_path("alice", &ticket), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
}

async fn a_ticket_is_not_a_bearer_token_and_authorizes_the_stream_only(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let ticket = ticket(&app, "alice").await;

    app.call_with_token(Method::GET, "/api/alice/tasks", Some(&ticket), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    let reply = app
        .call_with_token(
            Method::GET,
            &format!("/api/alice/tasks?ticket={}", encode(&ticket)),
            None,
            None,
        )
        .await;
    reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    let reply = app
        .call_with_token(
            Method::GET,
            &format!("/api/alice/changes?ticket={}", encode(&ticket)),
            None,
            None,
        )
        .await;
    reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    // Nor does the stream take it as a bearer token.
    let bearer = format!("Bearer {ticket}");
    refused(
        &server.base_url,
        &events_path("alice"),
        &[("authorization", &bearer)],
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    // None of that used it up.
    let mut stream = opened(&server.base_url, &ticket_path("alice", &ticket), &[]).await;
    ready(&mut stream).await;
}

async fn an_expired_or_unknown_ticket_is_refused(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let store = app.store();
    let key = task_api::storage::cursor_key(store.as_ref()).await.unwrap();
    let now = chrono::Utc::now();
    let minute = chrono::Duration::seconds(60);
    let second = chrono::Duration::seconds(1);
    let made = |expires_at| Ticket {
        user: "alice".to_owned(),
        id: *uuid::Uuid::new_v4().as_bytes(),
        expires_at,
    };

    // A ticket made here, stored as the service stores one, opens a stream: so the
    // refusals below are for what each one lacks.
    let good = made(now + minute);
    store
        .store_ticket("alice", &good.id, good.expires_at, now + minute * 10)
        .await
        .unwrap();
    let mut stream = opened(base, &ticket_path("alice", &good.seal(&key)), &[]).await;
    ready(&mut stream).await;
    drop(stream);

    // Its signed expiry has passed (its row would still be good).
    let expired = made(now - second);
    store
        .store_ticket("alice", &expired.id, now + minute, now + minute * 10)
        .await
        .unwrap();
    refused(base, &ticket_path("alice", &expired.seal(&key)), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    // Its row has expired (the database's test), though its signed expiry has not.
    let row_expired = made(now + minute);
    store
        .store_ticket("alice", &row_expired.id, now - second, now + minute * 10)
        .await
        .unwrap();
    refused(base, &ticket_path("alice", &row_expired.seal(&key)), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    // Signed, but never stored.
    let unknown = made(now + minute);
    refused(base, &ticket_path("alice", &unknown.seal(&key)), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");

    // Signed with another key.
    let other_key = task_api::cursors::CursorKey::new(b"another service");
    let forged = made(now + minute);
    store
        .store_ticket("alice", &forged.id, forged.expires_at, now + minute * 10)
        .await
        .unwrap();
    refused(base, &ticket_path("alice", &forged.seal(&other_key)), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
}

// ---------------------------------------------------------------------------------------
// 6. One ticket, many racing opens

async fn one_ticket_opens_one_stream_however_many_race_for_it(backend: Backend) {
    // 140 losing racers from one address: over the failed-authentication limit, which
    // has tests of its own.
    let app = backend
        .app(HttpOptions {
            events: EventSettings {
                max_streams_per_user: 100,
                ..EventSettings::default()
            },
            limits: task_api::limits::LimitSettings::off(),
            ..HttpOptions::default()
        })
        .await;
    let server = app.serve().await;
    for round in 0..20 {
        let ticket = ticket(&app, "alice").await;
        let path = ticket_path("alice", &ticket);
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (base, path, barrier) =
                    (server.base_url.clone(), path.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    EventClient::open(&base, &path, &[]).await
                })
            })
            .collect();
        let mut streams = Vec::new();
        let mut refusals = Vec::new();
        for racer in racers {
            match racer.await.unwrap() {
                Ok(stream) => streams.push(stream),
                Err(error) => refusals.push(reply_of(error)),
            }
        }
        assert_eq!(
            (streams.len(), refusals.len()),
            (1, 7),
            "round {round}: {:?}",
            refusals
                .iter()
                .map(|r| (r.status, r.json.clone()))
                .collect::<Vec<_>>()
        );
        for reply in &refusals {
            reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
        }
        ready(&mut streams[0]).await;
    }
}

// ---------------------------------------------------------------------------------------
// 7. The token's expiry ends the stream

async fn assert_token_expired_then_end(stream: &mut EventClient, opened_at: Instant) {
    match stream.next_within(Duration::from_secs(4)).await {
        Next::Event(event) => {
            assert_eq!(event.event, "token-expired", "{event:?}");
            assert!(event.data.is_object(), "{event:?}");
        }
        other => panic!("expected token-expired, got {other:?}"),
    }
    // The token was good for more than a second after the stream opened.
    let lived = opened_at.elapsed();
    assert!(lived >= Duration::from_millis(900), "ended after {lived:?}");
    match stream.next_within(Duration::from_secs(2)).await {
        Next::End => {}
        other => panic!("expected the end of the stream, got {other:?}"),
    }
}

async fn a_stream_ends_with_token_expired_when_its_token_does(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    // Expired 58 s ago: accepted for the 60 s leeway, so for 1–2 s more.
    let opened_at = Instant::now();
    let token = token_expiring("alice", -58);
    let mut stream = EventClient::bearer(&server.base_url, "alice", &token, &[]).await;
    ready(&mut stream).await;
    let t = app.create("alice", "before the end").await;
    assert_eq!(change(&mut stream).await.1, upsert(&t));
    assert_token_expired_then_end(&mut stream, opened_at).await;
}

async fn a_ticket_stream_ends_when_the_token_that_asked_for_it_does(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let opened_at = Instant::now();
    let token = token_expiring("alice", -58);
    let short = ticket_with(&app, "alice", &token).await;
    let mut stream = opened(&server.base_url, &ticket_path("alice", &short), &[]).await;
    ready(&mut stream).await;
    assert_token_expired_then_end(&mut stream, opened_at).await;

    // A ticket from a long-lived token makes a stream that outlives that.
    let long = ticket(&app, "alice").await;
    let mut stream = opened(&server.base_url, &ticket_path("alice", &long), &[]).await;
    ready(&mut stream).await;
    match stream.next_within(Duration::from_millis(2500)).await {
        Next::Quiet => {}
        other => panic!("expected a quiet, open stream, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 8. Limits

async fn a_user_may_open_only_so_many_streams(backend: Backend) {
    let app = backend
        .app(with_events(EventSettings {
            max_streams_per_user: 2,
            ..EventSettings::default()
        }))
        .await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let token = app.token("alice");
    let mut first = EventClient::bearer(base, "alice", &token, &[]).await;
    ready(&mut first).await;
    let mut second = EventClient::bearer(base, "alice", &token, &[]).await;
    ready(&mut second).await;

    let bearer = format!("Bearer {token}");
    let reply = refused(base, &events_path("alice"), &[("authorization", &bearer)]).await;
    reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    let retry_after: u64 = reply
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry_after >= 1);

    // Another user is not affected.
    let mut bobs = EventClient::bearer(base, "bob", &app.token("bob"), &[]).await;
    ready(&mut bobs).await;

    // A stream that goes frees its place.
    drop(first);
    let mut third =
        open_within_2s(base, &events_path("alice"), &[("authorization", &bearer)]).await;
    ready(&mut third).await;
    let t = app.create("alice", "t").await;
    assert_eq!(change(&mut second).await.1, upsert(&t));
    assert_eq!(change(&mut third).await.1, upsert(&t));
}

async fn an_instance_opens_only_so_many_streams(backend: Backend) {
    let app = backend
        .app(with_events(EventSettings {
            max_streams: 3,
            ..EventSettings::default()
        }))
        .await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let mut streams = Vec::new();
    for user in ["alice", "bob", "alice"] {
        let mut stream = EventClient::bearer(base, user, &app.token(user), &[]).await;
        ready(&mut stream).await;
        streams.push(stream);
    }
    for user in ["carol", "alice"] {
        let bearer = format!("Bearer {}", app.token(user));
        refused(base, &events_path(user), &[("authorization", &bearer)])
            .await
            .assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
    }
    // Other requests are served meanwhile.
    assert_eq!(app.count("carol").await, 0);

    streams.remove(1);
    let bearer = format!("Bearer {}", app.token("carol"));
    let mut carols =
        open_within_2s(base, &events_path("carol"), &[("authorization", &bearer)]).await;
    ready(&mut carols).await;
}

async fn streams_do_not_count_against_the_cap_on_requests_in_progress(backend: Backend) {
    let options = HttpOptions {
        max_concurrent_requests: 2,
        ..HttpOptions::default()
    };
    let app = backend.app(options).await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = EventClient::bearer(base, "alice", &app.token("alice"), &[]).await;
        ready(&mut stream).await;
        streams.push(stream);
    }
    // In-process and over the network, through the same cap.
    assert_eq!(app.count("alice").await, 0);
    let response = reqwest::Client::new()
        .get(format!("{base}/api/alice/tasks"))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let t = app.create("alice", "t").await;
    for stream in &mut streams {
        assert_eq!(change(stream).await.1, upsert(&t));
    }
}

// ---------------------------------------------------------------------------------------
// 9. Heartbeats

async fn a_quiet_stream_gets_heartbeat_comments(backend: Backend) {
    let app = backend
        .app(with_events(EventSettings {
            heartbeat: Duration::from_millis(200),
            ..EventSettings::default()
        }))
        .await;
    let server = app.serve().await;
    let mut stream = EventClient::bearer(&server.base_url, "alice", &app.token("alice"), &[]).await;
    ready(&mut stream).await;
    let before = stream.comments;
    let deadline = Instant::now() + Duration::from_secs(1);
    while stream.comments < before + 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} heartbeat(s) in 1 s",
            stream.comments - before
        );
        match stream.next_within(left).await {
            Next::Quiet => {}
            other => panic!("a quiet stream gave {other:?}"),
        }
    }
    // Still a live stream.
    let t = app.create("alice", "t").await;
    assert_eq!(change(&mut stream).await.1, upsert(&t));
}

/// The pump re-reads the feed every heartbeat: a change no write announced (made
/// straight in the database, or by an instance that died before its notification)
/// still arrives.
async fn a_change_nothing_announced_arrives_by_the_next_recheck(backend: Backend) {
    let app = backend
        .app(with_events(EventSettings {
            heartbeat: Duration::from_millis(200),
            ..EventSettings::default()
        }))
        .await;
    let server = app.serve().await;
    let task = app
        .create("alice", "deleted behind the service's back")
        .await;
    let mut stream = EventClient::bearer(&server.base_url, "alice", &app.token("alice"), &[]).await;
    ready(&mut stream).await;
    let mut side = app.side_connection().await;
    side.execute(&format!("DELETE FROM tasks WHERE id = {}", task["id"]))
        .await;
    let event = match stream.next_within(Duration::from_millis(1500)).await {
        Next::Event(event) => event,
        other => panic!("nothing within 1.5 s: {other:?}"),
    };
    assert_eq!(event.event, "change", "{event:?}");
    assert_delete(&event.data, &task);
}

/// At shutdown every open stream ends at once, so its client reconnects elsewhere.
async fn shutdown_closes_open_streams_at_once(backend: Backend) {
    let closing = tokio_util::sync::CancellationToken::new();
    let app = backend
        .app(HttpOptions {
            closing: closing.clone(),
            ..HttpOptions::default()
        })
        .await;
    let server = app.serve().await;
    let mut streams = Vec::new();
    for user in ["alice", "alice", "bob"] {
        let mut stream = EventClient::bearer(&server.base_url, user, &app.token(user), &[]).await;
        ready(&mut stream).await;
        streams.push(stream);
    }
    closing.cancel();
    for stream in &mut streams {
        match stream.next_within(Duration::from_secs(1)).await {
            Next::End => {}
            other => panic!("expected the end of the stream, got {other:?}"),
        }
    }
    until_open_streams(&app, 0).await;
}

// ---------------------------------------------------------------------------------------
// 10. A stream that cannot keep up

async fn a_stream_that_cannot_keep_up_is_closed_and_resumes_from_its_last_id(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    // Opened, never read while the writes happen.
    let mut body = in_process_stream(&app, "alice", None).await.into_body();
    // Another stream of the same user, read after each write: so each write was
    // broadcast in a batch of its own before the next (the pump cannot merge them), and
    // a stream that keeps up is not closed.
    let mut observer =
        EventClient::bearer(&server.base_url, "alice", &app.token("alice"), &[]).await;
    ready(&mut observer).await;
    // More separate batches than the 256 a stream may fall behind.
    let writes = 300;
    let mut created = BTreeSet::new();
    for i in 0..writes {
        let task = app.create("alice", &format!("t{i}")).await;
        assert_eq!(change(&mut observer).await.1, upsert(&task));
        created.insert(task["id"].as_i64().unwrap());
    }

    let mut parser = SseText::default();
    let (events, ended) =
        read_body(&mut body, &mut parser, writes + 1, Duration::from_secs(5)).await;
    assert!(ended, "the stream was not closed: {} events", events.len());
    assert_ready(&events[0]);
    let delivered: Vec<&SseEvent> = events[1..].iter().collect();
    assert!(
        delivered.len() < 256,
        "{} of {writes} changes delivered before the stream closed",
        delivered.len()
    );
    let mut seen = BTreeSet::new();
    for event in &delivered {
        assert_eq!(event.event, "change", "{event:?}");
        assert!(seen.insert(event.data["task"]["id"].as_i64().unwrap()));
    }
    drop(body);

    // The client resumes from the last id it got, and gets all the rest.
    let last = events.last().unwrap().id.clone().expect("an id");
    let expected = changes_after(&app, "alice", &last).await;
    assert_eq!(expected.len(), writes - delivered.len());
    let mut body = in_process_stream(&app, "alice", Some(&last))
        .await
        .into_body();
    let mut parser = SseText::default();
    let (events, ended) = read_body(
        &mut body,
        &mut parser,
        expected.len() + 1,
        Duration::from_secs(5),
    )
    .await;
    assert!(!ended);
    assert_ready(&events[0]);
    let replayed: Vec<Value> = events[1..].iter().map(|e| e.data.clone()).collect();
    assert_eq!(replayed, expected);
    for data in &replayed {
        assert_eq!(data["type"], "upsert");
        assert!(
            seen.insert(data["task"]["id"].as_i64().unwrap()),
            "repeated: {data}"
        );
    }
    assert_eq!(seen, created);
    // The stream that kept up is still open and up to date.
    let last = app.create("alice", "last").await;
    assert_eq!(change(&mut observer).await.1, upsert(&last));
}

// ---------------------------------------------------------------------------------------
// 11. The open-streams gauge

async fn the_open_streams_gauge_follows_the_streams(backend: Backend) {
    let app = backend.default_app().await;
    let server = app.serve().await;
    let base = server.base_url.as_str();
    assert_eq!(open_streams(&app), 0);
    let mut first = EventClient::bearer(base, "alice", &app.token("alice"), &[]).await;
    ready(&mut first).await;
    let mut second = EventClient::bearer(base, "bob", &app.token("bob"), &[]).await;
    ready(&mut second).await;
    assert_eq!(open_streams(&app), 2);

    // In-process: dropping the response's body closes the stream at once.
    let response = in_process_stream(&app, "alice", None).await;
    assert_eq!(open_streams(&app), 3);
    drop(response);
    assert_eq!(open_streams(&app), 2);

    // Refused streams leave nothing counted.
    let ticket = ticket(&app, "alice").await;
    let mut third = opened(base, &ticket_path("alice", &ticket), &[]).await;
    ready(&mut third).await;
    assert_eq!(open_streams(&app), 3);
    refused(base, &ticket_path("alice", &ticket), &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    refused(
        base,
        &events_path("alice"),
        &[("authorization", "Bearer x")],
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID");
    assert_eq!(open_streams(&app), 3);

    // Over the network: the server notices the client left.
    drop(first);
    until_open_streams(&app, 2).await;
    drop(third);
    until_open_streams(&app, 1).await;
    drop(second);
    until_open_streams(&app, 0).await;
}

on_both_backends!(
    a_fresh_stream_starts_ready_then_sends_each_change_as_the_feed_gives_it,
    a_stream_resumed_with_last_event_id_replays_what_was_missed_then_goes_live,
    a_stream_resumed_with_a_cursor_replays_what_was_missed_then_goes_live,
    last_event_id_wins_over_the_cursor_query,
    a_full_sync_then_a_stream_from_its_cursor_loses_nothing,
    a_stream_from_a_cursor_in_the_middle_of_a_full_sync_completes_it,
    a_user_whose_id_needs_encoding_gets_their_events,
    a_resume_point_not_issued_to_this_user_is_422,
    an_expired_resume_point_is_410,
    the_stream_needs_a_bearer_header_and_never_takes_a_jwt_in_the_url,
    a_ticket_is_issued_to_its_user_only,
    a_ticket_opens_one_stream_once,
    a_ticket_refused_for_another_reason_is_not_used_up,
    a_ticket_is_not_a_bearer_token_and_authorizes_the_stream_only,
    an_expired_or_unknown_ticket_is_refused,
    one_ticket_opens_one_stream_however_many_race_for_it,
    a_stream_ends_with_token_expired_when_its_token_does,
    a_ticket_stream_ends_when_the_token_that_asked_for_it_does,
    a_user_may_open_only_so_many_streams,
    an_instance_opens_only_so_many_streams,
    streams_do_not_count_against_the_cap_on_requests_in_progress,
    a_quiet_stream_gets_heartbeat_comments,
    a_change_nothing_announced_arrives_by_the_next_recheck,
    shutdown_closes_open_streams_at_once,
    a_stream_that_cannot_keep_up_is_closed_and_resumes_from_its_last_id,
    the_open_streams_gauge_follows_the_streams,
);
