//! PostgreSQL task store (also hosted PostgreSQL such as Neon, over TLS).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Executor};

use super::pool::{Lifecycle, Pool, Pooled, Tracked};
use super::{PoolSettings, PoolStatus, StoreError, TaskStore, missing};
use crate::metrics::wait_histogram;
use crate::tasks::{ListFilter, NewTask, Task, TaskPatch, TaskReplace};

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: i64,
    user_id: String,
    title: String,
    description: Option<String>,
    complete: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<TaskRow> for Task {
    fn from(r: TaskRow) -> Self {
        Task {
            id: r.id,
            user_id: r.user_id,
            title: r.title,
            description: r.description,
            complete: r.complete,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// How long start-up waits to reach the database: a suspended Neon compute takes a few
/// seconds to wake.
pub const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct PgTaskStore {
    pool: Pool<PgConnection>,
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
        // Migrations run on a connection of their own, without the statement timeout
        // below: waiting for another instance's migration lock, or rewriting a large
        // Stage 1 table, may well take longer than a request may.
        let mut conn = tokio::time::timeout(STARTUP_CONNECT_TIMEOUT, options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        sqlx::migrate!("migrations/postgres").run(&mut conn).await?;
        conn.close().await?;

        // One round trip when a connection opens. Every statement here is prepared once
        // per connection and its best plan is the same whatever the parameters (an index
        // lookup by owner or id), so the generic plan is kept: by default PostgreSQL
        // re-plans the list statement on every execution, which costs more than running
        // it.
        let session_setup: Arc<str> = format!(
            "SET statement_timeout = {}; SET plan_cache_mode = force_generic_plan",
            settings.statement_timeout.as_millis()
        )
        .into();
        let pool = Pool::new(
            Box::new(move || {
                let (options, session_setup) = (options.clone(), session_setup.clone());
                Box::pin(async move {
                    let mut conn = options.connect().await?;
                    conn.execute(&*session_setup).await?;
                    Ok(conn)
                })
            }),
            settings.max_connections as usize,
            settings.acquire_timeout,
            Lifecycle::server(settings.check_after_idle),
            wait_histogram(),
        );
        Ok(Self { pool })
    }

    /// The store's connection pool (for tools and tests that need a raw connection).
    pub fn pool(&self) -> &Pool<PgConnection> {
        &self.pool
    }

    async fn conn(&self) -> Result<Pooled<PgConnection>, sqlx::Error> {
        self.pool.get().await
    }
}

/// Tells 404 from 403 after a statement scoped to the owner matched no row.
async fn explain_missing(conn: &mut Tracked<PgConnection>, id: i64) -> StoreError {
    let owner = conn
        .run(|conn| {
            sqlx::query_scalar("SELECT user_id FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_optional(conn)
        })
        .await;
    match owner {
        Ok(owner) => missing(owner),
        Err(e) => StoreError::Database(e),
    }
}

#[async_trait]
impl TaskStore for PgTaskStore {
    async fn list(&self, user_id: &str, filter: &ListFilter) -> Result<Vec<Task>, StoreError> {
        let mut conn = self.conn().await?;
        // `LIMIT NULL` is `LIMIT ALL`.
        let rows: Vec<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "SELECT id, user_id, title, description, complete, created_at, updated_at
             FROM tasks
             WHERE user_id = $1 AND ($2::boolean IS NULL OR complete = $2)
             ORDER BY id LIMIT $3 OFFSET $4",
                )
                .bind(user_id)
                .bind(filter.complete)
                .bind(filter.limit)
                .bind(filter.offset)
                .fetch_all(conn)
            })
            .await?;
        Ok(rows.into_iter().map(Task::from).collect())
    }

    async fn create(
        &self,
        user_id: &str,
        task: &NewTask,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError> {
        let mut conn = self.conn().await?;
        let row: TaskRow = conn
            .run(|conn| {
                sqlx::query_as(
            "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at)
             VALUES ($1, $2, $3, false, $4, $4)
             RETURNING id, user_id, title, description, complete, created_at, updated_at",
        )
        .bind(user_id)
        .bind(task.title.as_str())
        .bind(task.description.as_ref().map(|d| d.as_str()))
        .bind(now)
        .fetch_one(conn)
            })
            .await?;
        Ok(row.into())
    }

    async fn get(&self, user_id: &str, id: i64) -> Result<Task, StoreError> {
        let mut conn = self.conn().await?;
        // One statement either way: the owner is compared here, and another user's row is
        // dropped before it can reach a response.
        let row: Option<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "SELECT id, user_id, title, description, complete, created_at, updated_at
             FROM tasks WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(conn)
            })
            .await?;
        match row {
            Some(row) if row.user_id == user_id => Ok(row.into()),
            Some(_) => Err(StoreError::NotOwner),
            None => Err(StoreError::NotFound),
        }
    }

    async fn replace(
        &self,
        user_id: &str,
        id: i64,
        task: &TaskReplace,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError> {
        let mut conn = self.conn().await?;
        let row: Option<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "UPDATE tasks
             SET title = $3, description = $4, complete = $5,
                 updated_at = GREATEST($6, updated_at + interval '1 microsecond')
             WHERE id = $1 AND user_id = $2
             RETURNING id, user_id, title, description, complete, created_at, updated_at",
                )
                .bind(id)
                .bind(user_id)
                .bind(task.title.as_str())
                .bind(task.description.as_ref().map(|d| d.as_str()))
                .bind(task.complete)
                .bind(now)
                .fetch_optional(conn)
            })
            .await?;
        match row {
            Some(row) => Ok(row.into()),
            None => Err(explain_missing(&mut conn, id).await),
        }
    }

    async fn patch(
        &self,
        user_id: &str,
        id: i64,
        patch: &TaskPatch,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError> {
        let mut conn = self.conn().await?;
        // `title` and `complete` cannot be NULL, so NULL means "unchanged"; `description`
        // can, so a flag says whether to set it.
        let row: Option<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "UPDATE tasks
             SET title = COALESCE($3, title),
                 description = CASE WHEN $4 THEN $5 ELSE description END,
                 complete = COALESCE($6, complete),
                 updated_at = GREATEST($7, updated_at + interval '1 microsecond')
             WHERE id = $1 AND user_id = $2
             RETURNING id, user_id, title, description, complete, created_at, updated_at",
                )
                .bind(id)
                .bind(user_id)
                .bind(patch.title.as_ref().map(|t| t.as_str()))
                .bind(patch.description.is_some())
                .bind(
                    patch
                        .description
                        .as_ref()
                        .and_then(|d| d.as_ref().map(|d| d.as_str())),
                )
                .bind(patch.complete)
                .bind(now)
                .fetch_optional(conn)
            })
            .await?;
        match row {
            Some(row) => Ok(row.into()),
            None => Err(explain_missing(&mut conn, id).await),
        }
    }

    async fn delete(&self, user_id: &str, id: i64) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let done = conn
            .run(|conn| {
                sqlx::query("DELETE FROM tasks WHERE id = $1 AND user_id = $2")
                    .bind(id)
                    .bind(user_id)
                    .execute(conn)
            })
            .await?;
        if done.rows_affected() == 0 {
            return Err(explain_missing(&mut conn, id).await);
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        conn.run(|conn| sqlx::query("SELECT 1").execute(conn))
            .await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn pool_status(&self) -> PoolStatus {
        self.pool.status()
    }

    fn acquire_wait(&self) -> Histogram {
        self.pool.acquire_wait().clone()
    }
}
