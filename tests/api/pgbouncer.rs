//! Behind PgBouncer in transaction mode (`DATABASE_POOLER=transaction`): server
//! connections are lent per transaction, so nothing may outlive one. (The v1 scenarios,
//! conditional requests and idempotency keys also run through PgBouncer: their
//! `pgbouncer::` tests.)

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use task_api::http::HttpOptions;
use task_api::storage::{PgTaskStore, PoolSettings, Pooler, TaskStore};

use crate::support::{PGBOUNCER_POOL_SIZE, Pgbouncer, TestApp, auth_config, pool_settings};

const USERS: usize = 8;
const REQUESTS: usize = 50;

/// [`USERS`] users with a task each, [`REQUESTS`] requests per user, the users at once:
/// rename the task, read it back by id, list it. Returns what went wrong: every failed
/// request, and every answer that is not the user's own task as the user last named it
/// (what a statement run on another client's parameters, or another statement, gives).
async fn clients_at_once(app: Arc<TestApp>) -> Vec<String> {
    let mut users = tokio::task::JoinSet::new();
    for u in 0..USERS {
        let app = app.clone();
        users.spawn(async move {
            let user = format!("user-{u}");
            let mut title = format!("{user} start");
            let created = app.create_reply(&user, &title).await;
            if created.status != StatusCode::CREATED {
                return vec![format!(
                    "{user}: create {} {}",
                    created.status, created.json
                )];
            }
            let id = created.json["id"].clone();
            let url = format!("/api/{user}/tasks/{id}");
            let mut wrong = Vec::new();
            for n in 0..REQUESTS {
                let (reply, what) = match n % 3 {
                    0 => {
                        let renamed = format!("{user} #{n}");
                        let body = json!({ "title": renamed });
                        let reply = app.call(Method::PATCH, &url, &user, Some(body)).await;
                        if reply.status == StatusCode::OK {
                            title = renamed;
                        }
                        (reply, "patch")
                    }
                    1 => (app.call(Method::GET, &url, &user, None).await, "get"),
                    _ => {
                        let list = format!("/api/{user}/tasks");
                        (app.call(Method::GET, &list, &user, None).await, "list")
                    }
                };
                if reply.status != StatusCode::OK {
                    wrong.push(format!(
                        "{user} {what} #{n}: {} {}",
                        reply.status, reply.json
                    ));
                    continue;
                }
                let task = match what {
                    "list" if reply.json["count"] != 1 => {
                        wrong.push(format!("{user} list #{n}: {}", reply.json));
                        continue;
                    }
                    "list" => &reply.json["tasks"][0],
                    _ => &reply.json,
                };
                if task["id"] != id || task["user_id"] != user.as_str() || task["title"] != title {
                    wrong.push(format!(
                        "{user} {what} #{n}: expected {title:?}, got {task}"
                    ));
                }
            }
            wrong
        });
    }
    users.join_all().await.concat()
}

/// The failure this mode exists for: with named statements (prepared once per
/// connection), two instances whose connections share PgBouncer's server connections
/// collide on the statements' names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_collide_behind_a_transaction_pooler() {
    let Some(bouncer) = Pgbouncer::start(PGBOUNCER_POOL_SIZE).await else {
        return;
    };
    let bouncer = Arc::new(bouncer);
    let mut instances = Vec::new();
    for _ in 0..2 {
        let store = TestApp::pgbouncer_store(&bouncer, Pooler::None, |u| u).await;
        let app = TestApp::through_pgbouncer(
            store,
            bouncer.clone(),
            auth_config(),
            &HttpOptions::default(),
        )
        .await;
        instances.push(clients_at_once(Arc::new(app)));
    }
    let wrong = futures_util::future::join_all(instances).await.concat();
    assert!(
        !wrong.is_empty(),
        "expected collisions between named statements"
    );
}

/// In pooler mode the same load succeeds: 5 connections in the service's pool take turns
/// on PgBouncer's 2, and every answer is the asking user's own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_two_server_connections() {
    let Some(app) = TestApp::pgbouncer().await else {
        return;
    };
    let wrong = clients_at_once(Arc::new(app)).await;
    assert!(wrong.is_empty(), "{} went wrong: {wrong:#?}", wrong.len());
}

/// Each call is a transaction of its own that carries its limits (no session state):
/// the statement timeout cancels a slow statement, and a failed call is rolled back.
#[tokio::test]
async fn each_call_is_a_transaction_with_its_own_limits() {
    let Some(app) = TestApp::pgbouncer().await else {
        return;
    };
    let crate::support::Db::Pgbouncer { store, .. } = &app.db else {
        unreachable!()
    };
    let show = async |setting: &str| -> String {
        let mut conn = store.connection().await.unwrap();
        let rows = conn.fetch_sql(&format!("SHOW {setting}")).await.unwrap();
        rows[0].get(0)
    };
    assert_eq!(show("statement_timeout").await, "1500ms");
    assert_eq!(show("idle_in_transaction_session_timeout").await, "1500ms");
    assert_eq!(show("transaction_isolation").await, "read committed");
    // No session setup: the pooler-less mode's setting is not there.
    assert_eq!(show("plan_cache_mode").await, "auto");
    // Inside a transaction block (`SET LOCAL` would do nothing outside one).
    let mut conn = store.connection().await.unwrap();
    let rows = conn
        .fetch_sql("SELECT now() = statement_timestamp()")
        .await
        .unwrap();
    assert!(
        !rows[0].get::<_, bool>(0),
        "the statement ran inside BEGIN … COMMIT"
    );

    let mut conn = store.connection().await.unwrap();
    let slow = conn.fetch_sql("SELECT pg_sleep(3)").await;
    assert!(slow.unwrap_err().to_string().contains("statement timeout"));

    // A call that fails half-way leaves nothing behind, and its server connection goes
    // back to the pooler outside any transaction.
    let mut conn = store.connection().await.unwrap();
    let failed = conn
        .fetch_sql(
            "WITH gone AS (INSERT INTO service_secrets (name, secret) VALUES ('gone', '')
                           RETURNING 1)
             SELECT 1 / 0 FROM gone",
        )
        .await;
    assert!(failed.is_err());
    drop(conn);
    let mut side = app.side_connection().await;
    assert_eq!(
        side.scalar("SELECT count(*) FROM service_secrets WHERE name = 'gone'")
            .await,
        0
    );
    // The store carries on, every call on whichever server connection is free.
    app.create("alice", "after").await;
    assert_eq!(app.count("alice").await, 1);
    store.ping().await.unwrap();
}

/// The migrations hold a session-level lock and prepare named statements. Through the
/// pooler a second start finds the first one's statement names taken on the server
/// connection it is lent, so pooler mode runs them on the direct URL, and will not start
/// without one.
#[tokio::test]
async fn migrations_take_the_direct_url() {
    let Some(bouncer) = Pgbouncer::start(PGBOUNCER_POOL_SIZE).await else {
        return;
    };
    let without = PoolSettings {
        pooler: Pooler::Transaction,
        direct_url: None,
        ..pool_settings()
    };
    let refused = PgTaskStore::connect(&bouncer.url, &without)
        .await
        .err()
        .expect("refused");
    assert!(
        refused.to_string().contains("DATABASE_DIRECT_URL"),
        "{refused}"
    );

    let through_the_pooler = async || {
        let options = bouncer.options().extra_float_digits(None);
        let mut conn = PgConnection::connect_with(&options).await.unwrap();
        sqlx::migrate!("migrations/postgres").run(&mut conn).await
    };
    through_the_pooler().await.unwrap();
    let second = through_the_pooler().await.unwrap_err();
    assert!(second.to_string().contains("already exists"), "{second}");

    for _ in 0..3 {
        let store = TestApp::pgbouncer_store(&bouncer, Pooler::Transaction, |o| o).await;
        store.ping().await.unwrap();
    }
}

/// A connection idle past `check_after_idle` is pinged (a bare `Sync`) before it is
/// handed out: PgBouncer answers that too.
#[tokio::test]
async fn idle_connections_are_checked_through_the_pooler() {
    let Some(bouncer) = Pgbouncer::start(PGBOUNCER_POOL_SIZE).await else {
        return;
    };
    let settings = PoolSettings {
        pooler: Pooler::Transaction,
        direct_url: Some(bouncer.direct_url.clone().into()),
        check_after_idle: std::time::Duration::ZERO,
        ..pool_settings()
    };
    let store = PgTaskStore::connect(&bouncer.url, &settings).await.unwrap();
    for _ in 0..5 {
        store.ping().await.unwrap();
        assert_eq!(store.change_marker("alice").await.unwrap(), 0);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        store.pool_status().size,
        1,
        "the checked connection is kept"
    );
}
