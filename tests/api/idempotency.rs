//! Idempotent create: `Idempotency-Key` replays, reuse, syntax, failures, expiry, the purge,
//! and one task per key under concurrency (on PostgreSQL across two instances).

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use task_api::http::HttpOptions;

use crate::support::{Reply, TestApp, auth_config, unlimited};

async fn create_with_key(app: &TestApp, user: &str, key: &str, body: Value) -> Reply {
    app.call_with_headers(
        Method::POST,
        &format!("/api/{user}/tasks"),
        user,
        &[("idempotency-key", key)],
        Some(body),
    )
    .await
}

async fn stored_keys(app: &TestApp) -> i64 {
    app.side_connection()
        .await
        .scalar("SELECT count(*) FROM idempotency_keys")
        .await
}

#[track_caller]
fn assert_replay_of(replay: &Reply, first: &Reply) {
    assert_eq!(replay.status, StatusCode::CREATED, "{}", replay.json);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.json, first.json);
    assert_eq!(replay.raw, first.raw);
    assert_eq!(replay.header("location"), first.header("location"));
    assert_eq!(replay.header("etag"), first.header("etag"));
}

async fn a_repeat_is_answered_the_first_response_and_creates_nothing(app: TestApp) {
    let body = json!({"title": "Buy milk", "description": "2 litres"});
    let first = create_with_key(&app, "alice", "k-1", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(first.header("etag"), Some("\"1\""));
    let url = first.header("location").unwrap().to_owned();
    assert_eq!(url, format!("/api/alice/tasks/{}", first.json["id"]));

    let replay = create_with_key(&app, "alice", "k-1", body.clone()).await;
    assert_replay_of(&replay, &first);
    // A quoted key is the same key.
    assert_replay_of(
        &create_with_key(&app, "alice", "\"k-1\"", body.clone()).await,
        &first,
    );
    assert_eq!(app.count("alice").await, 1);

    // Even after the task changed, and after it was deleted.
    app.call(
        Method::PATCH,
        &url,
        "alice",
        Some(json!({"title": "Buy oat milk"})),
    )
    .await;
    assert_replay_of(
        &create_with_key(&app, "alice", "k-1", body.clone()).await,
        &first,
    );
    app.call(Method::DELETE, &url, "alice", None).await;
    assert_replay_of(&create_with_key(&app, "alice", "k-1", body).await, &first);
    assert_eq!(app.count("alice").await, 0);
}

async fn an_absent_description_is_the_same_request_as_null(app: TestApp) {
    let first = create_with_key(&app, "alice", "k", json!({"title": "t"})).await;
    let replay = create_with_key(
        &app,
        "alice",
        "k",
        json!({"title": "t", "description": null, "x": 1}),
    )
    .await;
    assert_replay_of(&replay, &first);
}

async fn the_same_key_with_another_request_is_422(app: TestApp) {
    let first = create_with_key(
        &app,
        "alice",
        "k",
        json!({"title": "t", "description": "d"}),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    for other in [
        json!({"title": "T", "description": "d"}),
        json!({"title": "t"}),
        json!({"title": "t", "description": ""}),
        json!({"title": "t ", "description": "d"}),
    ] {
        let reply = create_with_key(&app, "alice", "k", other.clone()).await;
        reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(reply.json["detail"].as_array().unwrap().len(), 1);
        assert_eq!(
            reply.json["detail"][0]["loc"],
            json!(["header", "Idempotency-Key"])
        );
        assert_eq!(reply.header("idempotent-replayed"), None);
    }
    assert_eq!(app.count("alice").await, 1);
}

async fn keys_are_scoped_to_the_user(app: TestApp) {
    let body = json!({"title": "t"});
    let alice = create_with_key(&app, "alice", "shared", body.clone()).await;
    let bob = create_with_key(&app, "bob", "shared", body).await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert_eq!(bob.header("idempotent-replayed"), None);
    assert_ne!(alice.json["id"], bob.json["id"]);
    assert_eq!(bob.json["user_id"], "bob");
}

async fn malformed_keys_are_400_and_create_nothing(app: TestApp) {
    let long = "k".repeat(256);
    for bad in [
        "",
        "\"\"",
        "\"",
        "a b",
        "a\"b",
        "\"abc",
        "\t",
        long.as_str(),
    ] {
        let reply = create_with_key(&app, "alice", bad, json!({"title": "t"})).await;
        reply.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    }
    // Not ASCII: sent as raw bytes.
    let request = axum::http::Request::post("/api/alice/tasks")
        .header("authorization", format!("Bearer {}", app.token("alice")))
        .header("content-type", "application/json")
        .header(
            "idempotency-key",
            axum::http::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
        )
        .body(axum::body::Body::from(r#"{"title": "t"}"#))
        .unwrap();
    app.send(request)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    // Two keys are ambiguous.
    app.call_with_headers(
        Method::POST,
        "/api/alice/tasks",
        "alice",
        &[("idempotency-key", "a"), ("idempotency-key", "b")],
        Some(json!({"title": "t"})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    // The longest key is fine.
    let longest = "k".repeat(255);
    let ok = create_with_key(&app, "alice", &longest, json!({"title": "t"})).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(app.count("alice").await, 1);
    assert_eq!(stored_keys(&app).await, 1);
}

async fn a_refused_create_stores_no_key(app: TestApp) {
    // 422 and 415: nothing stored, so the retry creates.
    create_with_key(&app, "alice", "k", json!({"title": ""}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR");
    app.call_with_headers(
        Method::POST,
        "/api/alice/tasks",
        "bob",
        &[("idempotency-key", "k")],
        Some(json!({"title": "t"})),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    assert_eq!(stored_keys(&app).await, 0);
    let created = create_with_key(&app, "alice", "k", json!({"title": "other"})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.header("idempotent-replayed"), None);
}

async fn a_create_that_fails_in_the_database_stores_no_key(app: TestApp) {
    let mut side = app.side_connection().await;
    side.lock_tasks().await;
    create_with_key(&app, "alice", "k", json!({"title": "t"}))
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "DATABASE_ERROR");
    side.release().await;
    assert_eq!(stored_keys(&app).await, 0);
    let retried = create_with_key(&app, "alice", "k", json!({"title": "t"})).await;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert_eq!(retried.header("idempotent-replayed"), None);
    assert_eq!(app.count("alice").await, 1);
}

async fn a_key_is_forgotten_after_the_ttl(app: TestApp) {
    let options = HttpOptions {
        idempotency_ttl: Duration::from_millis(600),
        ..HttpOptions::default()
    };
    let app = app.sibling_with(auth_config(), &options).await;
    let first = create_with_key(&app, "alice", "k", json!({"title": "t"})).await;
    assert_replay_of(
        &create_with_key(&app, "alice", "k", json!({"title": "t"})).await,
        &first,
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Older than the TTL: a new key, for the same request or another one.
    let again = create_with_key(&app, "alice", "k", json!({"title": "t"})).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_ne!(again.json["id"], first.json["id"]);
    assert_replay_of(
        &create_with_key(&app, "alice", "k", json!({"title": "t"})).await,
        &again,
    );
    assert_eq!(app.count("alice").await, 2);
}

async fn the_purge_deletes_forgotten_keys_oldest_first_in_bounded_batches(app: TestApp) {
    let store = app.store();
    for n in 0..12 {
        create_with_key(&app, "alice", &format!("k{n}"), json!({"title": "t"})).await;
    }
    let now = task_api::storage::now();
    // Nothing is older than a day.
    assert_eq!(
        task_api::storage::upkeep::purge_idempotency_keys_once(
            store.as_ref(),
            Duration::from_secs(86_400)
        )
        .await
        .unwrap(),
        0
    );
    // A batch takes at most its limit.
    assert_eq!(store.purge_idempotency_keys(now, 5).await.unwrap(), 5);
    assert_eq!(stored_keys(&app).await, 7);
    // The oldest went first: k0..k4 are new keys again, k5 still replays.
    let k5 = create_with_key(&app, "alice", "k5", json!({"title": "t"})).await;
    assert_eq!(k5.header("idempotent-replayed"), Some("true"));
    let k0 = create_with_key(&app, "alice", "k0", json!({"title": "t"})).await;
    assert_eq!(k0.header("idempotent-replayed"), None);

    // The background purge empties the table of keys older than its TTL.
    let purge = tokio::spawn(task_api::storage::upkeep::run_forever(
        store.clone(),
        task_api::storage::upkeep::Upkeep {
            idempotency_ttl: Duration::from_millis(200),
            sync_retention: Duration::from_secs(86_400),
        },
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stored_keys(&app).await > 0 {
        assert!(std::time::Instant::now() < deadline, "keys were not purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    purge.abort();
    assert_eq!(
        app.count("alice").await,
        13,
        "the purge deletes keys, never tasks"
    );
}

crate::on_both_databases_and_pgbouncer!(
    a_repeat_is_answered_the_first_response_and_creates_nothing,
    an_absent_description_is_the_same_request_as_null,
    the_same_key_with_another_request_is_422,
    keys_are_scoped_to_the_user,
    malformed_keys_are_400_and_create_nothing,
    a_refused_create_stores_no_key,
    a_create_that_fails_in_the_database_stores_no_key,
    a_key_is_forgotten_after_the_ttl,
    the_purge_deletes_forgotten_keys_oldest_first_in_bounded_batches,
);

/// 30 concurrent creates with one key, 50 rounds: one task per key, and every answer is
/// the first create or a replay of it.
async fn one_task_per_key(instances: Vec<TestApp>) {
    let apps = std::sync::Arc::new(instances);
    for round in 0..50 {
        let key = format!("round-{round}");
        let mut requests = tokio::task::JoinSet::new();
        for n in 0..30 {
            let (apps, key) = (apps.clone(), key.clone());
            requests.spawn(async move {
                let body = json!({"title": format!("once {round}")});
                create_with_key(&apps[n % apps.len()], "alice", &key, body).await
            });
        }
        let replies = requests.join_all().await;
        let created: Vec<&Reply> = replies
            .iter()
            .filter(|r| r.header("idempotent-replayed").is_none())
            .collect();
        assert_eq!(
            created.len(),
            1,
            "round {round}: {:?}",
            replies.iter().map(|r| r.status).collect::<Vec<_>>()
        );
        for reply in &replies {
            assert_eq!(
                reply.status,
                StatusCode::CREATED,
                "round {round}: {}",
                reply.json
            );
            assert_eq!(reply.json, created[0].json, "round {round}");
        }
    }
    let tasks = apps[0]
        .call(Method::GET, "/api/alice/tasks", "alice", None)
        .await;
    assert_eq!(tasks.json["count"], 50);
}

mod concurrent {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_one_task_per_key() {
        let app = TestApp::sqlite().await;
        one_task_per_key(vec![app.sibling_with(auth_config(), &unlimited()).await]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_one_task_per_key_across_two_instances() {
        let Some(app) = TestApp::postgres_with_options(auth_config(), &unlimited(), |o| o).await
        else {
            return;
        };
        let peer = app.second_instance(&unlimited()).await;
        one_task_per_key(vec![app, peer]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pgbouncer_one_task_per_key_across_two_instances() {
        let Some(app) = TestApp::pgbouncer_with_options(auth_config(), &unlimited()).await else {
            return;
        };
        let peer = app.second_instance(&unlimited()).await;
        one_task_per_key(vec![app, peer]).await;
    }
}

/// A purge that waits on a key being reclaimed by a create re-checks the key's age once
/// the create commits, and keeps it: else the key would vanish and a retry create twice.
#[tokio::test]
async fn postgres_purge_keeps_a_key_reclaimed_while_it_waited() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    create_with_key(&app, "alice", "k", json!({"title": "t"})).await;
    let cutoff = task_api::storage::now();
    let mut side = app.side_connection().await;
    // A create reclaiming the (by now forgotten) key, not yet committed.
    side.execute(
        "BEGIN; UPDATE idempotency_keys SET created_at = now() + interval '1 hour'
         WHERE user_id = 'alice' AND idempotency_key = 'k'",
    )
    .await;
    let store = app.store();
    let purge = tokio::spawn(async move { store.purge_idempotency_keys(cutoff, 10).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !purge.is_finished(),
        "the purge waits for the reclaiming create"
    );
    side.execute("COMMIT").await;
    assert_eq!(purge.await.unwrap().unwrap(), 0);
    assert_eq!(stored_keys(&app).await, 1);
}
