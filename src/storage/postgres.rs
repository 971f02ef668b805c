//! PostgreSQL task store (also hosted PostgreSQL such as Neon, over TLS).

use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Executor};

use super::pool::{Lifecycle, Pool, Pooled, wait_histogram};
use super::sql::{Backend, Dialect, Statements, impl_task_store};
use super::{PoolSettings, PoolStatus, Pooler, StoreError};
use crate::idempotency::IdempotencyKey;
use crate::tasks::{NewTask, Task};
use crate::versions::VersionGuard;

struct Postgres;

impl Dialect for Postgres {
    fn next_updated_at(now: &str) -> String {
        format!("GREATEST({now}, updated_at + interval '1 microsecond')")
    }

    fn version_is_one_of(param: &str) -> String {
        format!("({param}::int8[] IS NULL OR version = ANY({param}))")
    }

    fn code_point_order(column: &str) -> String {
        format!("{column} COLLATE \"C\"")
    }

    fn contains(haystack: &str, needle: &str) -> String {
        format!("strpos({haystack}, {needle}) > 0")
    }

    fn null(ty: &str) -> String {
        format!("NULL::{ty}")
    }
}

static SQL: LazyLock<Statements> = LazyLock::new(Statements::new::<Postgres>);

/// Claims the key and inserts the task in one statement. The task's id is drawn first,
/// so that the key's row can name it; a repeat draws one it never uses (ids may skip,
/// never repeat). A concurrent request with the same key waits on the key's primary key
/// until this statement commits or fails, then finds it taken, or free.
const CLAIM_KEY_AND_CREATE: &str = "
    WITH claim AS (
        INSERT INTO idempotency_keys AS k
            (user_id, idempotency_key, title, description, task_id, created_at)
        VALUES ($1, $2, $3, $4, nextval(pg_get_serial_sequence('tasks', 'id')), $5)
        ON CONFLICT (user_id, idempotency_key) DO UPDATE
            SET title = EXCLUDED.title, description = EXCLUDED.description,
                task_id = EXCLUDED.task_id, created_at = EXCLUDED.created_at
            WHERE k.created_at <= $6
        RETURNING task_id
    )
    INSERT INTO tasks (id, user_id, title, description, complete, created_at, updated_at,
                       title_folded, description_folded, folded_version)
    SELECT task_id, $1, $3, $4, false, $5, $5, $7, $8, 1 FROM claim
    RETURNING id, user_id, title, description, complete, created_at, updated_at, version";

fn to_instant(at: DateTime<Utc>) -> DateTime<Utc> {
    at
}

/// `If-Match` versions as an `int8[]`; NULL for any.
fn version_arg(guard: &VersionGuard) -> Option<&[i64]> {
    match guard {
        VersionGuard::Any => None,
        VersionGuard::OneOf(versions) => Some(versions),
    }
}

type Instant = DateTime<Utc>;
type TaskRow = super::sql::TaskRow<Instant>;
type StoredKeyRow = super::sql::StoredKeyRow<Instant>;

/// How long start-up waits to reach the database: a suspended Neon compute takes a few
/// seconds to wake.
pub const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct PgTaskStore {
    pool: Pool<PgConnection>,
    /// How the pool connects (the event listener connects the same way unless told
    /// otherwise).
    options: PgConnectOptions,
    /// Whether statements are prepared under names and kept per connection (not behind
    /// a transaction pooler).
    named_statements: bool,
}

impl PgTaskStore {
    /// Connects (TLS as `sslmode` says) and runs the embedded migrations, adopting a
    /// Stage 1 table if one is there.
    pub async fn connect(url: &str, settings: &PoolSettings) -> Result<Self, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?.application_name("task-api");
        Self::connect_with(options, settings).await
    }

    pub async fn connect_with(
        options: PgConnectOptions,
        settings: &PoolSettings,
    ) -> Result<Self, sqlx::Error> {
        let (options, session_setup, lifecycle) = match settings.pooler {
            // One round trip when a connection opens. Every statement here is prepared
            // once per connection and its best plan is the same whatever the parameters
            // (an index lookup by owner or id), so the generic plan is kept: by default
            // PostgreSQL re-plans the list statement on every execution, which costs more
            // than running it.
            Pooler::None => (
                options,
                Some(Arc::<str>::from(format!(
                    "SET statement_timeout = {}; SET plan_cache_mode = force_generic_plan",
                    settings.statement_timeout.as_millis()
                ))),
                Lifecycle::server(settings.check_after_idle),
            ),
            // A session setting would stay on whichever server connection it reached:
            // each call's transaction sets the timeout for itself instead, in the round
            // trip that opens it. (An unnamed statement is planned for its parameters
            // each time: there is no plan to keep.) And a pooler refuses startup
            // parameters it does not track (PgBouncer by default all but a few): this one
            // only shapes floats in text results, which no statement here reads.
            Pooler::Transaction => (
                options.extra_float_digits(None),
                None,
                Lifecycle {
                    transaction_per_call: Some(settings.statement_timeout),
                    ..Lifecycle::server(settings.check_after_idle)
                },
            ),
        };

        // Migrations run on a connection of their own, without the statement timeout:
        // waiting for another instance's migration lock, or rewriting a large Stage 1
        // table, may well take longer than a request may. They hold a session-level
        // advisory lock and prepare named statements, so they go past any pooler when a
        // direct URL is given.
        // Through a transaction pooler they would leave their statements' names on a
        // shared server connection, and the next start would collide with them.
        let migrations = match (&settings.direct_url, settings.pooler) {
            (Some(url), _) => {
                PgConnectOptions::from_str(url.expose_secret())?.application_name("task-api")
            }
            (None, Pooler::None) => options.clone(),
            (None, Pooler::Transaction) => {
                return Err(sqlx::Error::Configuration(
                    "behind a transaction pooler the migrations need a direct URL \
                     (DATABASE_DIRECT_URL)"
                        .into(),
                ));
            }
        };
        let mut conn = tokio::time::timeout(STARTUP_CONNECT_TIMEOUT, migrations.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        sqlx::migrate!("migrations/postgres").run(&mut conn).await?;
        conn.close().await?;

        let pool_options = options.clone();
        let pool = Pool::new(
            Box::new(move || {
                let (options, session_setup) = (options.clone(), session_setup.clone());
                Box::pin(async move {
                    let mut conn = options.connect().await?;
                    if let Some(setup) = session_setup {
                        conn.execute(&*setup).await?;
                    }
                    Ok(conn)
                })
            }),
            settings.max_connections as usize,
            settings.acquire_timeout,
            lifecycle,
            wait_histogram(),
        );
        Ok(Self {
            pool,
            options: pool_options,
            named_statements: settings.pooler == Pooler::None,
        })
    }

    /// How this store connects to PostgreSQL.
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// Sends `NOTIFY channel, payload` (delivered when it commits: at once, here).
    ///
    /// Its transaction commits without waiting for the disk (`synchronous_commit` off for
    /// it alone): a notification needs no durability — a crash loses it only together
    /// with the listeners that would have heard it — and waiting for a WAL flush would
    /// add a disk round trip to every change's way to other instances.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        conn.run(async |conn| {
            sqlx::query("SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)")
                .persistent(self.named_statements)
                .bind(channel)
                .bind(payload)
                .execute(conn)
                .await
        })
        .await?;
        Ok(())
    }

    fn as_postgres(&self) -> Option<PgTaskStore> {
        Some(self.clone())
    }

    /// The store's connection pool (for tools and tests that need a raw connection).
    pub fn pool(&self) -> &Pool<PgConnection> {
        &self.pool
    }

    async fn read(&self) -> Result<Pooled<PgConnection>, sqlx::Error> {
        self.pool.get().await
    }

    async fn write(&self) -> Result<Pooled<PgConnection>, sqlx::Error> {
        self.pool.get().await
    }

    /// The created task, or `None` when the key is taken.
    async fn claim_key(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        task: &NewTask,
        now: DateTime<Utc>,
        remembered_since: DateTime<Utc>,
    ) -> Result<Option<Task>, StoreError> {
        let mut conn = self.write().await?;
        let row: Option<TaskRow> = conn
            .run(async |conn| {
                sqlx::query_as(CLAIM_KEY_AND_CREATE)
                    .persistent(self.named_statements)
                    .bind(user_id)
                    .bind(key.as_str())
                    .bind(task.title.as_str())
                    .bind(task.description.as_ref().map(|d| d.as_str()))
                    .bind(now)
                    .bind(remembered_since)
                    .bind(crate::lists::fold(task.title.as_str()))
                    .bind(
                        task.description
                            .as_ref()
                            .map(|d| crate::lists::fold(d.as_str())),
                    )
                    .fetch_optional(conn)
                    .await
            })
            .await?;
        Ok(row.map(Task::from))
    }

    fn status(&self) -> PoolStatus {
        self.pool.status()
    }

    fn wait(&self) -> Histogram {
        self.pool.acquire_wait().clone()
    }
}

impl Backend for PgTaskStore {
    type Connection = PgConnection;

    fn named_statements(&self) -> bool {
        self.named_statements
    }
}

impl_task_store!(PgTaskStore, "postgres");
