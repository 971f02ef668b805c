//! Versions and conditional requests: `version`, `ETag`, `If-Match`, `If-None-Match`,
//! `REQUIRE_IF_MATCH`, and their place in the check order.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use task_api::http::HttpOptions;

use crate::support::{Reply, TestApp, auth_config};

fn task_url(task: &Value) -> String {
    format!(
        "/api/{}/tasks/{}",
        task["user_id"].as_str().unwrap(),
        task["id"]
    )
}

fn etag_of(version: i64) -> String {
    format!("\"{version}\"")
}

#[track_caller]
fn assert_tagged(reply: &Reply, version: i64) {
    assert_eq!(reply.json["version"], version, "{}", reply.json);
    assert_eq!(reply.header("etag"), Some(etag_of(version).as_str()));
}

async fn patch(app: &TestApp, url: &str, headers: &[(&str, &str)], body: Value) -> Reply {
    app.call_with_headers(Method::PATCH, url, "alice", headers, Some(body))
        .await
}

async fn versions_start_at_one_and_count_every_write(app: TestApp) {
    let created = app.create_reply("alice", "t").await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_tagged(&created, 1);
    let url = task_url(&created.json);

    let got = app.call(Method::GET, &url, "alice", None).await;
    assert_tagged(&got, 1);
    let patched = patch(&app, &url, &[], json!({"complete": true})).await;
    assert_tagged(&patched, 2);
    let put = app
        .call(
            Method::PUT,
            &url,
            "alice",
            Some(json!({"title": "u", "complete": false})),
        )
        .await;
    assert_tagged(&put, 3);
    let list = app
        .call(Method::GET, "/api/alice/tasks", "alice", None)
        .await;
    assert_eq!(list.json["tasks"][0]["version"], 3);
}

async fn if_match_with_the_current_version_writes(app: TestApp) {
    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    let reply = patch(&app, &url, &[("if-match", "\"1\"")], json!({"title": "a"})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_tagged(&reply, 2);
    // Any listed tag may match; `*` matches any version.
    let reply = patch(
        &app,
        &url,
        &[("if-match", "\"9\", \"2\"")],
        json!({"title": "b"}),
    )
    .await;
    assert_tagged(&reply, 3);
    let reply = patch(&app, &url, &[("if-match", "*")], json!({"title": "c"})).await;
    assert_tagged(&reply, 4);
    let reply = app
        .call_with_headers(
            Method::PUT,
            &url,
            "alice",
            &[("if-match", "\"4\"")],
            Some(json!({"title": "d", "complete": true})),
        )
        .await;
    assert_tagged(&reply, 5);
    let reply = app
        .call_with_headers(
            Method::DELETE,
            &url,
            "alice",
            &[("if-match", "\"5\"")],
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
}

async fn if_match_with_another_version_is_412_and_changes_nothing(app: TestApp) {
    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    patch(&app, &url, &[], json!({"title": "now"})).await;
    // Stale, weak (strong comparison never matches W/), non-numeric, non-canonical.
    for tag in [
        "\"1\"",
        "W/\"2\"",
        "\"abc\"",
        "\"02\"",
        "\"\"",
        "\"3\", \"4\"",
    ] {
        for method in [Method::PATCH, Method::PUT, Method::DELETE] {
            let body = (method != Method::DELETE).then(|| json!({"title": "x", "complete": true}));
            let reply = app
                .call_with_headers(method.clone(), &url, "alice", &[("if-match", tag)], body)
                .await;
            reply.assert_error(StatusCode::PRECONDITION_FAILED, "PRECONDITION_FAILED");
            assert_eq!(reply.header("etag"), Some("\"2\""), "{method} {tag}");
        }
    }
    let now = app.call(Method::GET, &url, "alice", None).await;
    assert_eq!(now.json["title"], "now");
    assert_tagged(&now, 2);
}

async fn malformed_conditional_headers_are_400_and_change_nothing(app: TestApp) {
    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    for bad in [
        "1",
        "\"1",
        "W/1",
        "w/\"1\"",
        "\"1\" \"2\"",
        "*, \"1\"",
        ",",
        "\"a b\"",
    ] {
        for method in [Method::PATCH, Method::PUT, Method::DELETE] {
            let body = (method != Method::DELETE).then(|| json!({"title": "x", "complete": true}));
            let reply = app
                .call_with_headers(method.clone(), &url, "alice", &[("if-match", bad)], body)
                .await;
            reply.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
        }
        for uri in [url.as_str(), "/api/alice/tasks"] {
            let reply = app
                .call_with_headers(Method::GET, uri, "alice", &[("if-none-match", bad)], None)
                .await;
            reply.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
        }
    }
    let now = app.call(Method::GET, &url, "alice", None).await;
    assert_eq!(
        (now.json["title"].as_str(), now.json["version"].as_i64()),
        (Some("t"), Some(1))
    );
}

async fn if_none_match_on_one_task_is_304_while_it_is_unchanged(app: TestApp) {
    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    for tag in ["\"1\"", "W/\"1\"", "*", "\"7\", W/\"1\""] {
        let reply = app
            .call_with_headers(Method::GET, &url, "alice", &[("if-none-match", tag)], None)
            .await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{tag}");
        assert!(reply.raw.is_empty());
        assert_eq!(reply.header("etag"), Some("\"1\""));
    }
    patch(&app, &url, &[], json!({"complete": true})).await;
    let reply = app
        .call_with_headers(
            Method::GET,
            &url,
            "alice",
            &[("if-none-match", "\"1\"")],
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_tagged(&reply, 2);
    // 404 and 403 come before any precondition.
    app.call_with_headers(
        Method::GET,
        "/api/alice/tasks/999999",
        "alice",
        &[("if-none-match", "*")],
        None,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    app.call_with_headers(
        Method::GET,
        &url.replace("alice", "bob"),
        "bob",
        &[("if-none-match", "*")],
        None,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
}

async fn list_etag(app: &TestApp, uri: &str) -> String {
    let reply = app.call(Method::GET, uri, "alice", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.header("etag").expect("list ETag").to_owned()
}

async fn list_etag_changes_with_every_create_change_and_delete(app: TestApp) {
    let mut seen = vec![list_etag(&app, "/api/alice/tasks").await];
    assert!(seen[0].starts_with("W/\""), "{}", seen[0]);

    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    let after_create = list_etag(&app, "/api/alice/tasks").await;
    // The same tag for every list URL of the user.
    for uri in [
        "/api/alice/tasks?complete=false",
        "/api/alice/tasks?limit=1&offset=5",
    ] {
        assert_eq!(list_etag(&app, uri).await, after_create);
    }
    // Another user's writes do not move it.
    app.create("bob", "b").await;
    assert_eq!(list_etag(&app, "/api/alice/tasks").await, after_create);
    seen.push(after_create);

    patch(&app, &url, &[], json!({"complete": true})).await;
    seen.push(list_etag(&app, "/api/alice/tasks").await);
    app.call(Method::DELETE, &url, "alice", None).await;
    seen.push(list_etag(&app, "/api/alice/tasks").await);
    let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "{seen:?}");

    // Revalidation: 304 while nothing changed, with the tag; 200 once something did.
    let current = seen.last().unwrap().clone();
    for tag in [current.as_str(), &current[2..], "*"] {
        let reply = app
            .call_with_headers(
                Method::GET,
                "/api/alice/tasks?complete=true",
                "alice",
                &[("if-none-match", tag)],
                None,
            )
            .await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{tag}");
        assert_eq!(reply.header("etag"), Some(current.as_str()));
        assert!(reply.raw.is_empty());
    }
    let stale = app
        .call_with_headers(
            Method::GET,
            "/api/alice/tasks",
            "alice",
            &[("if-none-match", seen[1].as_str())],
            None,
        )
        .await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.header("etag"), Some(current.as_str()));
    assert_eq!(stale.json["count"], 0);
}

async fn preconditions_come_after_every_v1_check(app: TestApp) {
    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    let stale = [("if-match", "\"9\"")];
    // 401: no token, with a malformed If-Match too.
    let reply = app
        .call_with_token(Method::PATCH, &url, None, Some(json!({"title": "x"})))
        .await;
    reply.assert_error(StatusCode::UNAUTHORIZED, "AUTH_MISSING");
    // 403: another user's path, malformed If-Match.
    app.call_with_headers(
        Method::PATCH,
        &url,
        "bob",
        &[("if-match", "bad")],
        Some(json!({"title": "x"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    // 422: a bad task id or body beats a failing precondition.
    app.call_with_headers(
        Method::PATCH,
        "/api/alice/tasks/abc",
        "alice",
        &stale,
        Some(json!({"title": "x"})),
    )
    .await
    .assert_invalid(&[(&["path", "task_id"], "int_parsing")]);
    app.call_with_headers(
        Method::PATCH,
        &url,
        "alice",
        &stale,
        Some(json!({"title": 5})),
    )
    .await
    .assert_invalid(&[(&["body", "title"], "string_type")]);
    // 404 and the task-owner 403 beat 412.
    app.call_with_headers(
        Method::PATCH,
        "/api/alice/tasks/999999",
        "alice",
        &stale,
        Some(json!({"title": "x"})),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let bobs = app.create("bob", "b").await;
    app.call_with_headers(
        Method::DELETE,
        &task_url(&bobs).replace("bob", "alice"),
        "alice",
        &stale,
        None,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    // A DELETE that finds the task already gone is 404, whatever If-Match says.
    app.call(Method::DELETE, &url, "alice", None).await;
    app.call_with_headers(
        Method::DELETE,
        &url,
        "alice",
        &[("if-match", "\"1\"")],
        None,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
}

async fn require_if_match_answers_428_in_the_place_of_a_precondition(app: TestApp) {
    let options = HttpOptions {
        require_if_match: true,
        ..HttpOptions::default()
    };
    let app = app.sibling_with(auth_config(), &options).await;
    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    for method in [Method::PATCH, Method::PUT, Method::DELETE] {
        let body = (method != Method::DELETE).then(|| json!({"title": "x", "complete": true}));
        app.call(method.clone(), &url, "alice", body.clone())
            .await
            .assert_error(StatusCode::PRECONDITION_REQUIRED, "PRECONDITION_REQUIRED");
        // After 404 and 403, before nothing else.
        app.call(
            method.clone(),
            "/api/alice/tasks/999999",
            "alice",
            body.clone(),
        )
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
        if method != Method::DELETE {
            app.call(method.clone(), &url, "alice", Some(json!({"title": ""})))
                .await
                .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR");
        }
    }
    let bobs = app.create("bob", "b").await;
    app.call(
        Method::DELETE,
        &task_url(&bobs).replace("bob", "alice"),
        "alice",
        None,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    // Nothing changed; with If-Match the writes go through.
    let now = app.call(Method::GET, &url, "alice", None).await;
    assert_tagged(&now, 1);
    let reply = patch(
        &app,
        &url,
        &[("if-match", "\"1\"")],
        json!({"complete": true}),
    )
    .await;
    assert_tagged(&reply, 2);
    let reply = app
        .call_with_headers(Method::DELETE, &url, "alice", &[("if-match", "*")], None)
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    // Creates and reads never need it.
    assert_eq!(
        app.create_reply("alice", "n").await.status,
        StatusCode::CREATED
    );
}

crate::on_both_databases_and_pgbouncer!(
    versions_start_at_one_and_count_every_write,
    if_match_with_the_current_version_writes,
    if_match_with_another_version_is_412_and_changes_nothing,
    malformed_conditional_headers_are_400_and_change_nothing,
    if_none_match_on_one_task_is_304_while_it_is_unchanged,
    list_etag_changes_with_every_create_change_and_delete,
    preconditions_come_after_every_v1_check,
    require_if_match_answers_428_in_the_place_of_a_precondition,
    writes_from_outside_the_service_move_versions_and_counters,
);

/// Two clients with the same `If-Match`, at once, 50 rounds: exactly one writes.
async fn one_winner_per_if_match(app: TestApp, peer: Option<TestApp>) {
    let peer = peer.as_ref().unwrap_or(&app);
    for round in 0..50 {
        let task = app.create("alice", &format!("race {round}")).await;
        let url = task_url(&task);
        let (a, b) = tokio::join!(
            patch(
                &app,
                &url,
                &[("if-match", "\"1\"")],
                json!({"title": "from a"})
            ),
            patch(
                peer,
                &url,
                &[("if-match", "\"1\"")],
                json!({"title": "from b"})
            ),
        );
        let mut statuses = [a.status, b.status];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
            "round {round}"
        );
        let (winner, loser) = if a.status == StatusCode::OK {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert_eq!(loser.header("etag"), Some("\"2\""));
        let stored = app.call(Method::GET, &url, "alice", None).await;
        assert_eq!(stored.json["title"], winner.json["title"]);
        assert_eq!(stored.json["version"], 2);

        // Two DELETEs with the current tag: one 204, the other 404 (or 412).
        let (a, b) = tokio::join!(
            app.call_with_headers(
                Method::DELETE,
                &url,
                "alice",
                &[("if-match", "\"2\"")],
                None
            ),
            peer.call_with_headers(
                Method::DELETE,
                &url,
                "alice",
                &[("if-match", "\"2\"")],
                None
            ),
        );
        let mut statuses = [a.status, b.status];
        statuses.sort();
        assert_eq!(statuses[0], StatusCode::NO_CONTENT, "round {round}");
        assert!(
            matches!(
                statuses[1],
                StatusCode::NOT_FOUND | StatusCode::PRECONDITION_FAILED
            ),
            "round {round}: {statuses:?}"
        );
    }
}

mod concurrent {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_one_winner_per_if_match() {
        one_winner_per_if_match(TestApp::sqlite().await, None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_one_winner_per_if_match_across_two_instances() {
        let Some(app) = TestApp::postgres().await else {
            return;
        };
        let peer = app.second_instance(&HttpOptions::default()).await;
        one_winner_per_if_match(app, Some(peer)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pgbouncer_one_winner_per_if_match_across_two_instances() {
        let Some(app) = TestApp::pgbouncer().await else {
            return;
        };
        let peer = app.second_instance(&HttpOptions::default()).await;
        one_winner_per_if_match(app, Some(peer)).await;
    }

    /// The list's revalidation reads the change counter only: it answers while the tasks
    /// table is locked against every reader, where a full list cannot.
    #[tokio::test]
    async fn postgres_list_revalidation_does_not_read_the_tasks() {
        let Some(app) = TestApp::postgres().await else {
            return;
        };
        app.create("alice", "t").await;
        let list = app
            .call(Method::GET, "/api/alice/tasks", "alice", None)
            .await;
        let etag = list.header("etag").unwrap().to_owned();
        let mut side = app.side_connection().await;
        side.lock_tasks().await;
        let started = std::time::Instant::now();
        let reply = app
            .call_with_headers(
                Method::GET,
                "/api/alice/tasks",
                "alice",
                &[("if-none-match", &etag)],
                None,
            )
            .await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let full = app
            .call(Method::GET, "/api/alice/tasks", "alice", None)
            .await;
        full.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "DATABASE_ERROR");
        side.release().await;
    }
}

/// A database file from before versions existed keeps its tasks, each at version 1, and
/// every user's counter counts their tasks.
#[tokio::test]
async fn sqlite_v1_file_is_upgraded_with_versions_and_counters() {
    use sqlx::{Connection, Executor};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
    let options = url
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .unwrap()
        .create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let mut v1 = sqlx::migrate!("migrations/sqlite");
    v1.migrations = std::borrow::Cow::Owned(v1.migrations[..1].to_vec());
    v1.run(&mut conn).await.unwrap();
    conn.execute(
        "INSERT INTO tasks (user_id, title, created_at, updated_at) VALUES
         ('alice', 'a1', 1, 1), ('bob', 'b1', 2, 2), ('alice', 'a2', 3, 3)",
    )
    .await
    .unwrap();
    conn.close().await.unwrap();

    let store = task_api::storage::SqliteTaskStore::connect(&url, &crate::support::pool_settings())
        .await
        .unwrap();
    let page = task_api::storage::TaskStore::list(&store, "alice", &Default::default())
        .await
        .unwrap();
    assert_eq!(page.marker, 2);
    assert_eq!(
        page.tasks
            .iter()
            .map(|t| (t.title.as_str(), t.version))
            .collect::<Vec<_>>(),
        [("a1", 1), ("a2", 1)]
    );
    let bob = task_api::storage::TaskStore::change_marker(&store, "bob")
        .await
        .unwrap();
    assert_eq!(bob, 1);
}

/// An update made outside the service (a script, an older instance during a rolling
/// upgrade) still moves the task's version and the user's change counter, so no client
/// holding the old tag can overwrite it or be told "not modified".
async fn writes_from_outside_the_service_move_versions_and_counters(app: TestApp) {
    let task = app.create("alice", "t").await;
    let url = task_url(&task);
    let before = list_etag(&app, "/api/alice/tasks").await;
    let mut side = app.side_connection().await;
    side.execute(&format!(
        "UPDATE tasks SET title = 'edited' WHERE id = {}",
        task["id"]
    ))
    .await;
    let now = app.call(Method::GET, &url, "alice", None).await;
    assert_eq!(now.json["title"], "edited");
    assert_tagged(&now, 2);
    assert_ne!(list_etag(&app, "/api/alice/tasks").await, before);
    patch(
        &app,
        &url,
        &[("if-match", "\"1\"")],
        json!({"title": "stale"}),
    )
    .await
    .assert_error(StatusCode::PRECONDITION_FAILED, "PRECONDITION_FAILED");
    // The service's own writes still count one version each.
    assert_tagged(
        &patch(
            &app,
            &url,
            &[("if-match", "\"2\"")],
            json!({"complete": true}),
        )
        .await,
        3,
    );
}
