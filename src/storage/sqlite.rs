//! Embedded SQLite task store: the zero-configuration default.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};

use super::pool::{Lifecycle, Pool, Pooled, wait_histogram};
use super::sql::{Backend, Dialect, Statements, impl_task_store};
use super::{PoolSettings, PoolStatus, StoreError};
use crate::idempotency::IdempotencyKey;
use crate::tasks::{NewTask, Task};
use crate::versions::VersionGuard;

struct Sqlite;

impl Dialect for Sqlite {
    fn next_updated_at(now: &str) -> String {
        format!("max({now}, updated_at + 1)")
    }

    fn version_is_one_of(param: &str) -> String {
        format!("({param} IS NULL OR version IN (SELECT value FROM json_each({param})))")
    }

    /// SQLite's default (binary) collation compares UTF-8 bytes, which order as their
    /// code points do.
    fn code_point_order(column: &str) -> String {
        column.to_owned()
    }

    fn contains(haystack: &str, needle: &str) -> String {
        format!("instr({haystack}, {needle}) > 0")
    }

    /// SQLite's columns take any type.
    fn null(_ty: &str) -> String {
        "NULL".to_owned()
    }
}

static SQL: LazyLock<Statements> = LazyLock::new(Statements::new::<Sqlite>);

/// Claims the key for the task just inserted in the same transaction; no row back when
/// the key is held by a create made after `$7`.
const CLAIM_KEY: &str = "
    INSERT INTO idempotency_keys AS k
        (user_id, idempotency_key, title, description, task_id, created_at)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (user_id, idempotency_key) DO UPDATE
        SET title = excluded.title, description = excluded.description,
            task_id = excluded.task_id, created_at = excluded.created_at
        WHERE k.created_at <= $7
    RETURNING task_id";

fn to_instant(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// `If-Match` versions as a JSON array (SQLite has no array type); NULL for any.
fn version_arg(guard: &VersionGuard) -> Option<String> {
    match guard {
        VersionGuard::Any => None,
        VersionGuard::OneOf(versions) => serde_json::to_string(versions).ok(),
    }
}

/// Timestamps are stored as microseconds since the Unix epoch (UTC): compact, ordered,
/// and `max(now, updated_at + 1)` keeps `updated_at` strictly increasing.
type Instant = i64;
type TaskRow = super::sql::TaskRow<Instant>;
type StoredKeyRow = super::sql::StoredKeyRow<Instant>;

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

/// Page cache per SQLite connection, in KiB.
pub const SQLITE_PAGE_CACHE_KIB: u32 = 1024;

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
            .busy_timeout(Duration::from_secs(5))
            // Each connection keeps its own page cache (SQLite's default: 2 MB): 1 MiB
            // each keeps the process's memory bounded (`DATABASE_MAX_CONNECTIONS` readers
            // and the writer) while the hot pages of a large user still fit; the rest
            // comes from the operating system's file cache.
            .pragma("cache_size", format!("-{SQLITE_PAGE_CACHE_KIB}"));
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
        conn.run(async |conn| {
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

    fn as_postgres(&self) -> Option<super::PgTaskStore> {
        None
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

    /// Inserts the task and claims the key for it in one transaction on the writer
    /// connection; rolls both back when the key is taken. The created task, or `None`.
    async fn claim_key(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        task: &NewTask,
        now: DateTime<Utc>,
        remembered_since: DateTime<Utc>,
    ) -> Result<Option<Task>, StoreError> {
        let mut conn = self.write().await?;
        let (title, description) = (
            task.title.as_str(),
            task.description.as_ref().map(|d| d.as_str()),
        );
        let created = conn
            .run(async move |conn| {
                let mut tx = conn.begin().await?;
                let rows: Vec<TaskRow> = sqlx::query_as(&SQL.create)
                    .bind(user_id)
                    .bind(title)
                    .bind(description)
                    .bind(now.timestamp_micros())
                    .bind(crate::lists::fold(title))
                    .bind(description.map(crate::lists::fold))
                    .fetch_all(&mut *tx)
                    .await?;
                let row = rows.into_iter().next().ok_or(sqlx::Error::RowNotFound)?;
                let claimed: Vec<i64> = sqlx::query_scalar(CLAIM_KEY)
                    .bind(user_id)
                    .bind(key.as_str())
                    .bind(title)
                    .bind(description)
                    .bind(row.id)
                    .bind(now.timestamp_micros())
                    .bind(remembered_since.timestamp_micros())
                    .fetch_all(&mut *tx)
                    .await?;
                if !claimed.is_empty() {
                    tx.commit().await?;
                    Ok(Some(row))
                } else {
                    tx.rollback().await?;
                    Ok(None)
                }
            })
            .await?;
        Ok(created.map(Task::from))
    }

    fn status(&self) -> PoolStatus {
        let (readers, writer) = (self.readers.status(), self.writer.status());
        if self.readers.is_same(&self.writer) {
            return writer;
        }
        PoolStatus {
            size: readers.size + writer.size,
            idle: readers.idle + writer.idle,
        }
    }

    fn wait(&self) -> Histogram {
        self.writer.acquire_wait().clone()
    }
}

impl Backend for SqliteTaskStore {
    type Connection = SqliteConnection;

    fn named_statements(&self) -> bool {
        true
    }
}

impl_task_store!(SqliteTaskStore, "sqlite");

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_connection_caps_its_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
        let store = SqliteTaskStore::connect(&url, &PoolSettings::default())
            .await
            .unwrap();
        for mut conn in [store.read().await.unwrap(), store.write().await.unwrap()] {
            let size: i64 = conn
                .run(async |c| sqlx::query_scalar("PRAGMA cache_size").fetch_one(c).await)
                .await
                .unwrap();
            assert_eq!(size, -i64::from(SQLITE_PAGE_CACHE_KIB));
        }
    }
}
