//! PostgreSQL task store (also hosted PostgreSQL such as Neon, over TLS).
//!
//! Requests run on tokio-postgres clients shared by every request ([`connections`]);
//! the migrations and the event listener's `LISTEN` use sqlx, on connections of their own.

use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::pool::wait_histogram;
use super::sql::{Arg, Db, Dialect, NewRow, Row, Statements, Stmt, task_at};
use super::{PoolSettings, PoolStatus, Pooler, StoreError};
use crate::idempotency::IdempotencyKey;
use crate::tasks::{NewTask, Task};

pub mod connections;
pub mod tls;

pub use connections::{Connections, Lease};
use connections::{Sharing, Upkeep};

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
static CLAIM: LazyLock<Stmt> = LazyLock::new(|| Stmt::write(CLAIM_KEY_AND_CREATE));
static NOTIFY: LazyLock<Stmt> = LazyLock::new(|| {
    Stmt::write("SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)")
});

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

/// How long start-up waits to reach the database: a suspended Neon compute takes a few
/// seconds to wake.
pub const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection is kept before it is replaced (as `sqlx::Pool`'s default).
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

#[derive(Clone)]
pub struct PgTaskStore {
    connections: Arc<Connections>,
    /// How the event listener connects unless told otherwise (sqlx's options).
    options: PgConnectOptions,
}

impl PgTaskStore {
    /// Connects (TLS as `sslmode` says) and runs the embedded migrations, adopting a
    /// Stage 1 table if one is there.
    pub async fn connect(url: &str, settings: &PoolSettings) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("task-api");
        let (mut config, tls) = tls::connection_settings(url)?;
        config.application_name("task-api");
        let sharing = match settings.pooler {
            // One round trip when a connection opens. Every statement here is prepared
            // once per connection and its best plan is the same whatever the parameters
            // (an index lookup by owner or id), so the generic plan is kept: by default
            // PostgreSQL re-plans the list statement on every execution, which costs more
            // than running it.
            Pooler::None => Sharing::Pipelined {
                setup: format!(
                    "SET statement_timeout = {}; SET plan_cache_mode = force_generic_plan",
                    settings.statement_timeout.as_millis()
                ),
            },
            // A session setting would stay on whichever server connection it reached:
            // each call's transaction sets its limits for itself instead, in the round
            // trip that opens it. They also end the session if a call cut short leaves
            // it idle inside its transaction, so that it cannot hold the pooler's server
            // connection, or its row locks, until the client's next use. (An unnamed
            // statement is planned for its parameters each time: there is no plan to
            // keep.)
            Pooler::Transaction => Sharing::Exclusive {
                begin: begin_statement(settings.statement_timeout),
            },
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
                return Err(StoreError::database(
                    "behind a transaction pooler the migrations need a direct URL \
                     (DATABASE_DIRECT_URL)",
                ));
            }
        };
        let mut conn = tokio::time::timeout(STARTUP_CONNECT_TIMEOUT, migrations.connect())
            .await
            .map_err(|_| StoreError::database("the database did not answer in time"))??;
        sqlx::migrate!("migrations/postgres")
            .run(&mut conn)
            .await
            .map_err(sqlx::Error::from)?;
        conn.close().await?;

        let connections = Connections::new(
            config,
            tls,
            sharing,
            settings.max_connections as usize,
            Upkeep {
                acquire_timeout: settings.acquire_timeout,
                check_after_idle: settings.check_after_idle,
                max_lifetime: MAX_LIFETIME,
            },
            wait_histogram(),
        );
        Ok(Self {
            connections: Arc::new(connections),
            options,
        })
    }

    /// How the event listener connects to PostgreSQL (unless given a URL of its own).
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
        self.fetch(&NOTIFY, &[Arg::Text(channel), Arg::Text(payload)])
            .await?;
        Ok(())
    }

    /// A client of the store's own, for one call (tools and tests that need to send
    /// their own statements).
    pub async fn connection(&self) -> Result<Lease<'_>, StoreError> {
        self.connections.get(false).await
    }

    /// A client as a write gets one: waited for in turn while every client carries its
    /// share of writes (tools and tests).
    pub async fn write_connection(&self) -> Result<Lease<'_>, StoreError> {
        self.connections.get(true).await
    }

    /// Closes every connection; calls made afterwards fail.
    pub fn close(&self) {
        self.connections.close();
    }
}

/// The statement that opens a call's transaction behind a transaction pooler, with its
/// limits: one simple query, so one round trip however many settings it makes.
fn begin_statement(timeout: Duration) -> String {
    let ms = timeout.as_millis().max(1);
    format!(
        "BEGIN; SET LOCAL statement_timeout = {ms}; \
         SET LOCAL idle_in_transaction_session_timeout = {ms}"
    )
}

impl Row for tokio_postgres::Row {
    fn int(&self, at: usize) -> Result<i64, StoreError> {
        Ok(self.try_get(at)?)
    }

    fn opt_int(&self, at: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(at)?)
    }

    fn text(&self, at: usize) -> Result<String, StoreError> {
        Ok(self.try_get(at)?)
    }

    fn opt_text(&self, at: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(at)?)
    }

    fn boolean(&self, at: usize) -> Result<bool, StoreError> {
        Ok(self.try_get(at)?)
    }

    fn instant(&self, at: usize) -> Result<DateTime<Utc>, StoreError> {
        Ok(self.try_get(at)?)
    }

    fn opt_instant(&self, at: usize) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.try_get(at)?)
    }

    fn bytes(&self, at: usize) -> Result<Vec<u8>, StoreError> {
        Ok(self.try_get(at)?)
    }
}

impl Db for PgTaskStore {
    type Row = tokio_postgres::Row;
    const BACKEND: &'static str = "postgres";

    fn sql() -> &'static Statements {
        &SQL
    }

    async fn fetch(
        &self,
        stmt: &'static Stmt,
        args: &[Arg<'_>],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.connections
            .get(stmt.writes)
            .await?
            .fetch(stmt, args)
            .await
    }

    async fn execute(&self, stmt: &'static Stmt, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        self.connections
            .get(stmt.writes)
            .await?
            .execute(stmt, args)
            .await
    }

    /// One statement: the key's row and the task are inserted together.
    async fn claim_key(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        task: &NewTask,
        now: DateTime<Utc>,
        remembered_since: DateTime<Utc>,
    ) -> Result<Option<Task>, StoreError> {
        let row = NewRow::new(user_id, task, now);
        let args = [
            Arg::Text(user_id),
            Arg::Text(key.as_str()),
            Arg::Text(row.title),
            Arg::OptText(row.description),
            Arg::Instant(now),
            Arg::Instant(remembered_since),
            Arg::Text(&row.title_folded),
            Arg::OptText(row.description_folded.as_deref()),
        ];
        let rows = self.fetch(&CLAIM, &args).await?;
        rows.first().map(|row| task_at(row, 0)).transpose()
    }

    fn as_postgres(&self) -> Option<PgTaskStore> {
        Some(self.clone())
    }

    fn status(&self) -> PoolStatus {
        self.connections.status()
    }

    fn wait(&self) -> Histogram {
        self.connections.acquire_wait().clone()
    }
}
