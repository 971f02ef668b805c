//! Embedded SQLite task store: the zero-configuration default.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};

use super::pool::{Lifecycle, Pool, Pooled, Tracked};
use super::{PoolSettings, PoolStatus, StoreError, TaskStore, missing};
use crate::metrics::wait_histogram;
use crate::tasks::{ListFilter, NewTask, Task, TaskPatch, TaskReplace};

/// Timestamps are stored as microseconds since the Unix epoch (UTC): compact, ordered,
/// and `max(now, updated_at + 1)` keeps `updated_at` strictly increasing.
#[derive(sqlx::FromRow)]
struct TaskRow {
    id: i64,
    user_id: String,
    title: String,
    description: Option<String>,
    complete: bool,
    created_at: i64,
    updated_at: i64,
}

impl From<TaskRow> for Task {
    fn from(r: TaskRow) -> Self {
        Task {
            id: r.id,
            user_id: r.user_id,
            title: r.title,
            description: r.description,
            complete: r.complete,
            created_at: from_micros(r.created_at),
            updated_at: from_micros(r.updated_at),
        }
    }
}

fn from_micros(micros: i64) -> DateTime<Utc> {
    // Values outside chrono's range (±262,000 years) can only come from a hand-edited file.
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

#[derive(Clone)]
pub struct SqliteTaskStore {
    /// Reads: up to `max_connections` at once (in WAL mode readers block neither each
    /// other nor the writer).
    readers: Pool<SqliteConnection>,
    /// Writes: SQLite takes one writer at a time, so writes share one connection and
    /// queue for it in the pool, first come first served. Left to SQLite's busy handler,
    /// whose sleeps grow the longer it waits, concurrent writers get long tails.
    writer: Pool<SqliteConnection>,
}

impl SqliteTaskStore {
    /// Opens (creating if missing) the database file, in WAL mode, and migrates it.
    pub async fn connect(url: &str, settings: &PoolSettings) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            // WAL: readers never block the writer; NORMAL sync is durable in WAL mode
            // except for the last transactions on power loss (not on a crash).
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // Another process (a backup, the sqlite3 shell) may hold the write lock:
            // wait for it instead of failing at once.
            .busy_timeout(Duration::from_secs(5));
        let connect = move || -> super::pool::Connect<SqliteConnection> {
            let options = options.clone();
            Box::new(move || {
                let options = options.clone();
                Box::pin(async move { options.connect().await })
            })
        };
        let wait = wait_histogram();
        let file = Lifecycle {
            max_lifetime: None,
            // sqlx's SQLite worker finishes or resets a statement whose caller went
            // away, so the connection stays usable; dropping it would not stop that
            // statement, and a second writer would open beside it.
            drop_interrupted: false,
            ..Lifecycle::server(settings.check_after_idle)
        };
        // An in-memory database lives and dies with its one connection.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let writer = if in_memory {
            // Nothing may ever close the one connection that holds the database.
            let keep = Lifecycle {
                check_after_idle: Duration::MAX,
                idle_timeout: None,
                ..file
            };
            Pool::new(connect(), 1, settings.acquire_timeout, keep, wait.clone())
        } else {
            Pool::new(connect(), 1, settings.acquire_timeout, file, wait.clone())
        };
        let mut conn = writer.get().await?;
        conn.run(|conn| async {
            sqlx::migrate!("migrations/sqlite").run(conn).await?;
            Ok(())
        })
        .await?;
        drop(conn);
        let readers = if in_memory {
            writer.clone()
        } else {
            let size = settings.max_connections as usize;
            Pool::new(connect(), size, settings.acquire_timeout, file, wait)
        };
        Ok(Self { readers, writer })
    }

    /// Closes every connection; calls made afterwards fail.
    pub fn close(&self) {
        self.readers.close();
        self.writer.close();
    }

    async fn read(&self) -> Result<Pooled<SqliteConnection>, sqlx::Error> {
        self.readers.get().await
    }

    async fn write(&self) -> Result<Pooled<SqliteConnection>, sqlx::Error> {
        self.writer.get().await
    }
}

/// Tells 404 from 403 after a statement scoped to the owner matched no row.
async fn explain_missing(conn: &mut Tracked<SqliteConnection>, id: i64) -> StoreError {
    let owner = conn
        .run(|conn| {
            sqlx::query_scalar("SELECT user_id FROM tasks WHERE id = ?1")
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
impl TaskStore for SqliteTaskStore {
    async fn list(&self, user_id: &str, filter: &ListFilter) -> Result<Vec<Task>, StoreError> {
        let mut conn = self.read().await?;
        // `LIMIT -1` is no limit.
        let rows: Vec<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "SELECT id, user_id, title, description, complete, created_at, updated_at
             FROM tasks
             WHERE user_id = ?1 AND (?2 IS NULL OR complete = ?2)
             ORDER BY id LIMIT ?3 OFFSET ?4",
                )
                .bind(user_id)
                .bind(filter.complete)
                .bind(filter.limit.unwrap_or(-1))
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
        let mut conn = self.write().await?;
        let row: TaskRow = conn
            .run(|conn| {
                sqlx::query_as(
            "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at)
             VALUES (?1, ?2, ?3, 0, ?4, ?4)
             RETURNING id, user_id, title, description, complete, created_at, updated_at",
        )
        .bind(user_id)
        .bind(task.title.as_str())
        .bind(task.description.as_ref().map(|d| d.as_str()))
        .bind(now.timestamp_micros())
        .fetch_one(conn)
            })
            .await?;
        Ok(row.into())
    }

    async fn get(&self, user_id: &str, id: i64) -> Result<Task, StoreError> {
        let mut conn = self.read().await?;
        let row: Option<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "SELECT id, user_id, title, description, complete, created_at, updated_at
             FROM tasks WHERE id = ?1",
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
        let mut conn = self.write().await?;
        let row: Option<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "UPDATE tasks
             SET title = ?3, description = ?4, complete = ?5,
                 updated_at = max(?6, updated_at + 1)
             WHERE id = ?1 AND user_id = ?2
             RETURNING id, user_id, title, description, complete, created_at, updated_at",
                )
                .bind(id)
                .bind(user_id)
                .bind(task.title.as_str())
                .bind(task.description.as_ref().map(|d| d.as_str()))
                .bind(task.complete)
                .bind(now.timestamp_micros())
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
        let mut conn = self.write().await?;
        let row: Option<TaskRow> = conn
            .run(|conn| {
                sqlx::query_as(
                    "UPDATE tasks
             SET title = coalesce(?3, title),
                 description = CASE WHEN ?4 THEN ?5 ELSE description END,
                 complete = coalesce(?6, complete),
                 updated_at = max(?7, updated_at + 1)
             WHERE id = ?1 AND user_id = ?2
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
                .bind(now.timestamp_micros())
                .fetch_optional(conn)
            })
            .await?;
        match row {
            Some(row) => Ok(row.into()),
            None => Err(explain_missing(&mut conn, id).await),
        }
    }

    async fn delete(&self, user_id: &str, id: i64) -> Result<(), StoreError> {
        let mut conn = self.write().await?;
        let done = conn
            .run(|conn| {
                sqlx::query("DELETE FROM tasks WHERE id = ?1 AND user_id = ?2")
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
        let mut conn = self.read().await?;
        conn.run(|conn| sqlx::query("SELECT 1").execute(conn))
            .await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn pool_status(&self) -> PoolStatus {
        let (readers, writer) = (self.readers.status(), self.writer.status());
        if self.readers.is_same(&self.writer) {
            return writer;
        }
        PoolStatus {
            size: readers.size + writer.size,
            idle: readers.idle + writer.idle,
        }
    }

    fn acquire_wait(&self) -> Histogram {
        self.writer.acquire_wait().clone()
    }
}
