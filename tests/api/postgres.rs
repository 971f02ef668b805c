//! PostgreSQL only: adopting the Stage 1 table, migrations that cannot half-apply, TLS,
//! and how the pool treats its connections.

use axum::http::{Method, StatusCode};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};
use task_api::config::CorsOrigins;
use task_api::lists::Listing;
use task_api::storage::postgres::connections::{PIPELINE_DEPTH, WRITES_PER_CONNECTION};
use task_api::storage::{PgTaskStore, PoolSettings, TaskStore};

use crate::support::{PgSchema, TestApp, pool_settings, postgres_url, utc};

/// The table exactly as the Python service created it.
const STAGE1_DDL: &str = "
    CREATE TABLE tasks (
        id SERIAL PRIMARY KEY,
        user_id VARCHAR NOT NULL,
        title VARCHAR(200) NOT NULL,
        description VARCHAR(1000),
        complete BOOLEAN NOT NULL,
        created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL
    );
    CREATE INDEX ix_tasks_user_id ON tasks (user_id);
    INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at) VALUES
        ('alice', 'old one', NULL, false, '2025-03-01 12:00:00', '2025-03-01 12:00:00'),
        ('alice', 'old two', 'desc', true, '2025-03-02 08:30:15.250', '2025-03-04 09:00:00'),
        ('bob', 'bob''s', NULL, false, '2025-03-03 00:00:00', '2025-03-03 00:00:00');
";

async fn stage1_schema(url: &str) -> (PgSchema, PgPool) {
    let schema = PgSchema::create(url).await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(schema.options())
        .await
        .unwrap();
    pool.execute(STAGE1_DDL).await.unwrap();
    (schema, pool)
}

async fn column_type(pool: &PgPool, column: &str) -> String {
    sqlx::query_scalar(
        "SELECT data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'tasks' AND column_name = $1",
    )
    .bind(column)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn stage1_table_is_adopted_with_every_row() {
    let Some(url) = postgres_url() else { return };
    let (schema, pool) = stage1_schema(&url).await;
    let store = PgTaskStore::connect(&schema.url(), &pool_settings())
        .await
        .unwrap();
    let app = TestApp::from_store(store, schema).await;

    assert_eq!(column_type(&pool, "id").await, "bigint");
    assert_eq!(
        column_type(&pool, "created_at").await,
        "timestamp with time zone"
    );

    let reply = app
        .call(Method::GET, "/api/alice/tasks", "alice", None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["count"], 2);
    let tasks = reply.json["tasks"].as_array().unwrap();
    assert_eq!(tasks[0]["title"], "old one");
    // Naive timestamps were UTC.
    assert_eq!(tasks[0]["created_at"], "2025-03-01T12:00:00.000000Z");
    assert_eq!(tasks[1]["created_at"], "2025-03-02T08:30:15.250000Z");
    assert_eq!(tasks[1]["updated_at"], "2025-03-04T09:00:00.000000Z");
    assert_eq!(tasks[1]["description"], "desc");
    assert_eq!(tasks[1]["complete"], true);
    assert_eq!(app.count("bob").await, 1);
    // Adopted tasks start at version 1; each user's get change numbers 1..n, so the
    // list's ETag names alice's two.
    assert_eq!(
        (tasks[0]["version"].as_i64(), tasks[1]["version"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(reply.header("etag"), Some("W/\"changes-2\""));
    let numbers: Vec<(String, i64)> =
        sqlx::query_as("SELECT user_id, change_seq FROM tasks ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        numbers,
        [("alice".into(), 1), ("alice".into(), 2), ("bob".into(), 1)]
    );

    // New rows continue the old sequence, and it now goes past 32 bits.
    let next = app.create("alice", "new").await;
    assert_eq!(next["id"], 4);
    pool.execute("SELECT setval(pg_get_serial_sequence('tasks', 'id'), 3000000000)")
        .await
        .unwrap();
    let big = app.create("alice", "past 32 bits").await;
    assert_eq!(big["id"], 3_000_000_001_i64);
    let fetched = app
        .call(Method::GET, "/api/alice/tasks/3000000001", "alice", None)
        .await;
    assert_eq!(fetched.json["title"], "past 32 bits");
    // Old rows are updated like new ones.
    let patched = app
        .call(
            Method::PATCH,
            "/api/alice/tasks/1",
            "alice",
            Some(json!({"complete": true})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert!(utc(&patched.json["updated_at"]) > utc(&tasks[0]["updated_at"]));

    // Starting again changes nothing.
    PgTaskStore::connect(&app.pg_schema_url(), &pool_settings())
        .await
        .unwrap();
    assert_eq!(app.count("alice").await, 4);
}

#[tokio::test]
async fn an_interrupted_adoption_leaves_the_table_as_it_was() {
    let Some(url) = postgres_url() else { return };
    let (schema, pool) = stage1_schema(&url).await;
    // The adoption migration, cut short by a failure before it commits.
    let mut tx = pool.begin().await.unwrap();
    tx.execute(include_str!(
        "../../migrations/postgres/0002_bigint_ids_utc_timestamps.sql"
    ))
    .await
    .unwrap();
    assert_eq!(
        sqlx::query_scalar::<_, String>(
            "SELECT data_type::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'tasks' AND column_name = 'id'"
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap(),
        "bigint"
    );
    assert!(tx.execute("SELECT 1 / 0").await.is_err());
    drop(tx);

    assert_eq!(column_type(&pool, "id").await, "integer");
    assert_eq!(
        column_type(&pool, "created_at").await,
        "timestamp without time zone"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);

    // The next start-up completes the adoption.
    PgTaskStore::connect(&schema.url(), &pool_settings())
        .await
        .unwrap();
    assert_eq!(column_type(&pool, "id").await, "bigint");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn works_over_tls_with_sslmode_require() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let separator = if url.contains('?') { '&' } else { '?' };
    let tls_url = format!(
        "{url}{separator}sslmode=require&options=-c%20search_path%3D{}",
        schema.name
    );
    // Through the same URL parsing the service uses.
    let store = PgTaskStore::connect(&tls_url, &pool_settings())
        .await
        .unwrap();
    let mut conn = store.connection().await.unwrap();
    let rows = conn
        .fetch_sql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    assert!(rows[0].get::<_, bool>(0));
    drop(conn);

    // And the whole API over an encrypted connection.
    let app = TestApp::postgres_with(crate::support::auth_config(), CorsOrigins::None, |u| {
        format!("{u}&sslmode=require")
    })
    .await
    .unwrap();
    let task = app.create("alice", "over tls").await;
    let reply = app
        .call(
            Method::GET,
            &format!("/api/alice/tasks/{}", task["id"]),
            "alice",
            None,
        )
        .await;
    assert_eq!(reply.json, task);
}

#[tokio::test]
async fn every_connection_carries_a_statement_timeout_and_keeps_generic_plans() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = store_on(&schema, 1, |s| s).await;
    let mut conn = store.connection().await.unwrap();
    for (setting, value) in [
        ("statement_timeout", "1500ms"),
        ("plan_cache_mode", "force_generic_plan"),
    ] {
        let rows = conn.fetch_sql(&format!("SHOW {setting}")).await.unwrap();
        assert_eq!(rows[0].get::<_, String>(0), value);
    }
    // A statement past it is cancelled by the server.
    let slow = conn.fetch_sql("SELECT pg_sleep(3)").await;
    assert!(slow.unwrap_err().to_string().contains("statement timeout"));
}

/// A store on `schema` with a pool of `max_connections`, other settings as `tweak` says.
async fn store_on(
    schema: &PgSchema,
    max_connections: u32,
    tweak: impl FnOnce(PoolSettings) -> PoolSettings,
) -> PgTaskStore {
    let settings = tweak(PoolSettings {
        max_connections,
        ..pool_settings()
    });
    PgTaskStore::connect(&schema.url(), &settings)
        .await
        .unwrap()
}

/// The server process behind the connection a call gets now.
async fn backend_pid(store: &PgTaskStore) -> i32 {
    let mut conn = store.connection().await.unwrap();
    let rows = conn.fetch_sql("SELECT pg_backend_pid()").await.unwrap();
    rows[0].get(0)
}

async fn terminate(url: &str, pid: i32) {
    let mut side = PgConnection::connect(url).await.unwrap();
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut side)
        .await
        .unwrap();
    assert!(done);
}

#[tokio::test]
async fn a_finished_call_leaves_its_connection_for_the_next() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = store_on(&schema, 1, |s| s).await;
    let first = backend_pid(&store).await;
    store.list("alice", &Listing::default()).await.unwrap();
    assert_eq!(backend_pid(&store).await, first);
    assert_eq!(store.pool_status().size, 1);
}

/// A call abandoned half-way (its deadline passed) leaves the shared connection as it
/// was: the reply to its statement is read and dropped, and the next call gets its own.
#[tokio::test]
async fn a_call_cut_short_leaves_its_connection_usable() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = store_on(&schema, 1, |s| s).await;
    let first = backend_pid(&store).await;
    let cut = tokio::time::timeout(Duration::from_millis(100), async {
        let mut conn = store.connection().await.unwrap();
        conn.fetch_sql("SELECT pg_sleep(0.5)").await
    })
    .await;
    assert!(cut.is_err());
    let page = store.list("alice", &Listing::default()).await.unwrap();
    assert!(page.tasks.is_empty());
    assert_eq!(store.change_marker("alice").await.unwrap(), 0);
    assert_eq!(backend_pid(&store).await, first);
    assert_eq!(store.pool_status().size, 1);
}

#[tokio::test]
async fn a_connection_the_server_closed_is_replaced() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = store_on(&schema, 1, |s| PoolSettings {
        check_after_idle: Duration::ZERO,
        ..s
    })
    .await;
    terminate(&url, backend_pid(&store).await).await;
    // The ping before use finds it dead; the call runs on a fresh connection.
    store.list("alice", &Listing::default()).await.unwrap();

    // Without the idle check, the store notices by itself that the server went away,
    // and the next call opens a new connection.
    let store = store_on(&schema, 1, |s| PoolSettings {
        check_after_idle: Duration::from_secs(3600),
        ..s
    })
    .await;
    let first = backend_pid(&store).await;
    terminate(&url, first).await;
    let noticed = tokio::time::timeout(Duration::from_secs(5), async {
        while store.pool_status().size != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(noticed.is_ok(), "the closed connection is still counted");
    store.list("alice", &Listing::default()).await.unwrap();
    assert_ne!(backend_pid(&store).await, first);
}

/// Calls share the first connection until it carries `PIPELINE_DEPTH` at once; only then
/// does the next one open.
#[tokio::test]
async fn calls_share_the_first_connection_until_it_is_busy() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = store_on(&schema, 3, |s| s).await;
    let first = backend_pid(&store).await;
    for _ in 0..3 {
        assert_eq!(backend_pid(&store).await, first);
    }
    assert_eq!(store.pool_status().size, 1);
    let mut held = Vec::new();
    for _ in 0..PIPELINE_DEPTH {
        held.push(store.connection().await.unwrap());
    }
    assert_eq!(store.pool_status().size, 1);
    let mut next = store.connection().await.unwrap();
    let rows = next.fetch_sql("SELECT pg_backend_pid()").await.unwrap();
    assert_ne!(rows[0].get::<_, i32>(0), first);
    assert_eq!(store.pool_status().size, 2);
    drop((held, next));
    assert_eq!(backend_pid(&store).await, first);
}

/// Writes spread over the connections, the fewest on each first, up to
/// `WRITES_PER_CONNECTION` each; with every connection carrying that many, the next write
/// waits (first come, first served) for one to finish and runs there, instead of queueing
/// behind other writes' commits on a shared connection.
#[tokio::test]
async fn writes_spread_over_the_connections_and_the_rest_wait_their_turn() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = std::sync::Arc::new(store_on(&schema, 3, |s| s).await);
    let pid = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i32>(0);
    let mut read = store.connection().await.unwrap();
    let read_pid = pid(read.fetch_sql("SELECT pg_backend_pid()").await.unwrap());

    let mut writes = Vec::new();
    for n in 0..3 * WRITES_PER_CONNECTION {
        let mut write = store.write_connection().await.unwrap();
        let write_pid = pid(write.fetch_sql("SELECT pg_backend_pid()").await.unwrap());
        writes.push((write_pid, write));
        let pids: std::collections::HashSet<_> = writes.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            pids.len(),
            (n + 1).min(3),
            "each write on a connection with the fewest"
        );
    }
    assert_eq!(store.pool_status().size, 3);

    // Every connection carries its share of writes: the next two wait, in the order they
    // came.
    let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
    let (mut waiting, mut releases) = (Vec::new(), Vec::new());
    for n in 0..2 {
        let (store, order_tx) = (store.clone(), order_tx.clone());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        releases.push(release);
        waiting.push(tokio::spawn(async move {
            let mut write = store.write_connection().await.unwrap();
            let rows = write.fetch_sql("SELECT pg_backend_pid()").await.unwrap();
            order_tx.send((n, rows[0].get::<_, i32>(0))).unwrap();
            // Each holds its connection until the test lets it go.
            let _ = released.await;
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(order.try_recv().is_err(), "a write ran beside another");

    // A write sharing the read's connection ends: the first waiter runs there, the second
    // still waits.
    let freed = writes
        .iter()
        .position(|(p, _)| *p == read_pid)
        .expect("writes share the read's connection too");
    drop(writes.remove(freed));
    let (first, first_pid) = tokio::time::timeout(Duration::from_secs(5), order.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first, first_pid), (0, read_pid));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        order.try_recv().is_err(),
        "the second ran beside another write"
    );
    drop(writes);
    let (second, _) = tokio::time::timeout(Duration::from_secs(5), order.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second, 1);
    drop(releases);
    for task in waiting {
        task.await.unwrap();
    }
    drop(read.fetch_sql("SELECT 1").await.unwrap());
}

/// A write given up while its connection is still being opened (a deadline, a client gone)
/// leaves its place for the next: the connections still take their full share of writes.
#[tokio::test]
async fn a_write_given_up_while_connecting_keeps_no_place() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = store_on(&schema, 3, |s| s).await;
    let mut given_up = 0;
    for _ in 0..20 {
        // Cut short at the first wait: the write has its place and is opening a
        // connection that none of the three has yet.
        if tokio::time::timeout(Duration::from_micros(1), store.write_connection())
            .await
            .is_err()
        {
            given_up += 1;
        }
    }
    assert!(
        given_up >= 3 * WRITES_PER_CONNECTION,
        "only {given_up} cut short"
    );
    let mut writes = Vec::new();
    for _ in 0..3 * WRITES_PER_CONNECTION {
        let write = tokio::time::timeout(Duration::from_secs(5), store.write_connection()).await;
        writes.push(write.expect("a place was lost").unwrap());
    }
}

/// The first write goes to a connection the reads do not fill first.
#[tokio::test]
async fn writes_take_the_connections_reads_fill_last() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let store = store_on(&schema, 3, |s| s).await;
    let read_pid = backend_pid(&store).await;
    let mut write = store.write_connection().await.unwrap();
    let rows = write.fetch_sql("SELECT pg_backend_pid()").await.unwrap();
    assert_ne!(rows[0].get::<_, i32>(0), read_pid);
    drop(write);
    // Reads still share the first connection.
    assert_eq!(backend_pid(&store).await, read_pid);
}

#[tokio::test]
async fn migrations_wait_out_a_lock_longer_than_any_request_may() {
    let Some(url) = postgres_url() else { return };
    let schema = PgSchema::create(&url).await;
    let _first = store_on(&schema, 1, |s| s).await;
    // Another instance holds the migrations table for 2.5 s, past the 1.5 s statement
    // timeout requests run under (the server itself ends that session after 2.5 s).
    let mut other = PgConnection::connect_with(&schema.options()).await.unwrap();
    other
        .execute(
            "SET idle_in_transaction_session_timeout = 2500;
             BEGIN; LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE",
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let second = PgTaskStore::connect(&schema.url(), &pool_settings()).await;
    assert!(second.is_ok(), "{:?}", second.err());
    assert!(started.elapsed() >= Duration::from_secs(2), "it did wait");
}

/// A keyed create draws its task id from the id column's sequence, so a table whose
/// sequence is not owned by the column is refused at start-up, naming the fix.
#[tokio::test]
async fn an_id_sequence_not_owned_by_the_column_stops_start_up() {
    let Some(url) = postgres_url() else { return };
    let (schema, pool) = stage1_schema(&url).await;
    pool.execute("ALTER SEQUENCE tasks_id_seq OWNED BY NONE")
        .await
        .unwrap();
    let Err(error) = PgTaskStore::connect(&schema.url(), &pool_settings()).await else {
        panic!("start-up accepted a table whose id sequence is not owned");
    };
    assert!(error.to_string().contains("OWNED BY tasks.id"), "{error}");
}
