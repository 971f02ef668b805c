//! Embedded SQLite task store: the zero-configuration default.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::Sqlite as Driver;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row as _};

use super::pool::{Lifecycle, Pool, Pooled, wait_histogram};
use super::sql::{Arg, Db, Dialect, NewRow, Row, Statements, Stmt, task_at};
use super::{PoolSettings, PoolStatus, StoreError};
use crate::idempotency::IdempotencyKey;
use crate::tasks::{NewTask, Task};

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
static CLAIM: LazyLock<Stmt> = LazyLock::new(|| Stmt::write(CLAIM_KEY));

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

/// Timestamps are stored as microseconds since the Unix epoch (UTC): compact, ordered,
/// and `max(now, updated_at + 1)` keeps `updated_at` strictly increasing.
fn to_instant(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_instant(micros: i64) -> DateTime<Utc> {
    // Values outside chrono's range (±262,000 years) can only come from a hand-edited file.
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

type Query<'q> = sqlx::query::Query<'q, Driver, SqliteArguments<'q>>;

/// `stmt` with `args` bound in SQLite's types.
fn query<'q>(stmt: &'q Stmt, args: &[Arg<'q>]) -> Query<'q> {
    args.iter()
        .fold(sqlx::query(&stmt.sql), |query, arg| match *arg {
            Arg::Text(text) => query.bind(text),
            Arg::OptText(text) => query.bind(text),
            Arg::Int(n) => query.bind(n),
            Arg::Bool(b) => query.bind(b),
            Arg::OptBool(b) => query.bind(b),
            Arg::Instant(at) => query.bind(to_instant(at)),
            // A JSON array (SQLite has no array type); NULL for any.
            Arg::Versions(versions) => {
                query.bind(versions.and_then(|versions| serde_json::to_string(versions).ok()))
            }
            Arg::Bytes(bytes) => query.bind(bytes),
        })
}

impl Row for SqliteRow {
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
        Ok(from_instant(self.try_get(at)?))
    }

    fn opt_instant(&self, at: usize) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.try_get::<Option<i64>, _>(at)?.map(from_instant))
    }

    fn bytes(&self, at: usize) -> Result<Vec<u8>, StoreError> {
        Ok(self.try_get(at)?)
    }
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

/// Page cache per SQLite connection, in KiB.
pub const SQLITE_PAGE_CACHE_KIB: u32 = 1024;

/// SQLite's soft heap limit, in bytes: one bound on the memory SQLite allocates in the
/// whole process, whatever `DATABASE_MAX_CONNECTIONS` is. Near it, SQLite recycles
/// cached pages instead of allocating new ones. Each connection's cache is allocated
/// on that connection's own thread, and the C allocator keeps a heap per thread, so
/// without it the process held about three times the pages' size: 82 MiB at its peak
/// after searching users with thousands of tasks, against 44 MiB with this limit, at
/// the same speed. The limit is soft: a statement that needs more still gets it.
pub const SQLITE_HEAP_LIMIT_BYTES: i64 = 8 * 1024 * 1024;

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
            .pragma("cache_size", format!("-{SQLITE_PAGE_CACHE_KIB}"))
            // Process-wide: every connection sets the same value.
            .pragma("soft_heap_limit", SQLITE_HEAP_LIMIT_BYTES.to_string());
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

    /// A connection for `stmt`: the writer for a write, a reader otherwise.
    async fn connection(&self, stmt: &Stmt) -> Result<Pooled<SqliteConnection>, sqlx::Error> {
        if stmt.writes {
            self.write().await
        } else {
            self.read().await
        }
    }
}

/// Writes with `RETURNING` are read to their end (`fetch_all`), never stopped after the
/// first row: SQLite runs its WAL auto-checkpoint only when a statement is stepped to its
/// end, and sqlx resets a statement stopped early, which commits without checkpointing —
/// the WAL file would then grow by every write, without bound.
impl Db for SqliteTaskStore {
    type Row = SqliteRow;
    const BACKEND: &'static str = "sqlite";

    fn sql() -> &'static Statements {
        &SQL
    }

    async fn fetch(
        &self,
        stmt: &'static Stmt,
        args: &[Arg<'_>],
    ) -> Result<Vec<SqliteRow>, StoreError> {
        let mut conn = self.connection(stmt).await?;
        Ok(conn
            .run(async |conn| query(stmt, args).fetch_all(conn).await)
            .await?)
    }

    async fn execute(&self, stmt: &'static Stmt, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let mut conn = self.connection(stmt).await?;
        let done = conn
            .run(async |conn| query(stmt, args).execute(conn).await)
            .await?;
        Ok(done.rows_affected())
    }

    /// Inserts the task and claims the key for it in one transaction on the writer
    /// connection; rolls both back when the key is taken.
    async fn claim_key(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        task: &NewTask,
        now: DateTime<Utc>,
        remembered_since: DateTime<Utc>,
    ) -> Result<Option<Task>, StoreError> {
        let mut conn = self.write().await?;
        let new = NewRow::new(user_id, task, now);
        let row = conn
            .run(async move |conn| {
                let mut tx = conn.begin().await?;
                let rows = query(&SQL.create, &new.create_args())
                    .fetch_all(&mut *tx)
                    .await?;
                let row = rows.into_iter().next().ok_or(sqlx::Error::RowNotFound)?;
                let id: i64 = row.try_get(0)?;
                let claim = [
                    Arg::Text(user_id),
                    Arg::Text(key.as_str()),
                    Arg::Text(new.title),
                    Arg::OptText(new.description),
                    Arg::Int(id),
                    Arg::Instant(now),
                    Arg::Instant(remembered_since),
                ];
                let claimed = query(&CLAIM, &claim).fetch_all(&mut *tx).await?;
                if claimed.is_empty() {
                    tx.rollback().await?;
                    Ok(None)
                } else {
                    tx.commit().await?;
                    Ok(Some(row))
                }
            })
            .await?;
        row.map(|row| task_at(&row, 0)).transpose()
    }

    fn as_postgres(&self) -> Option<super::PgTaskStore> {
        None
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `PRAGMA name` (without a value, it reads the setting back) on `conn`.
    async fn pragma(conn: &mut Pooled<SqliteConnection>, name: &str) -> i64 {
        let sql = format!("PRAGMA {name}");
        conn.run(async |c| sqlx::query_scalar(&sql).fetch_one(c).await)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn every_connection_bounds_its_memory() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
        let store = SqliteTaskStore::connect(&url, &PoolSettings::default())
            .await
            .unwrap();
        for mut conn in [store.read().await.unwrap(), store.write().await.unwrap()] {
            let cache = pragma(&mut conn, "cache_size").await;
            assert_eq!(cache, -i64::from(SQLITE_PAGE_CACHE_KIB));
            // One limit for the whole process, whichever connection reads it.
            let limit = pragma(&mut conn, "soft_heap_limit").await;
            assert_eq!(limit, SQLITE_HEAP_LIMIT_BYTES);
        }
    }
}
