//! What the two stores share, written once: every statement, and the logic of every
//! store call. A backend supplies only its dialect — how it spells "the next
//! `updated_at`" and "the version is one of these" — how it stores instants and binds
//! version lists, its pools, and its way of claiming an idempotency key atomically.
//!
//! The logic is one `macro_rules!` body expanded once per backend rather than a function
//! generic over `sqlx::Database`: sqlx's executor traits need higher-ranked bounds that
//! `async_trait` futures cannot carry, and each expansion is plain code over one
//! connection type.

use chrono::{DateTime, Utc};

use crate::idempotency::StoredCreate;
use crate::tasks::Task;

/// How a backend stores an instant: PostgreSQL as `timestamptz`, SQLite as integer
/// microseconds since the Unix epoch (UTC).
pub trait StoredInstant {
    fn utc(self) -> DateTime<Utc>;
}

impl StoredInstant for DateTime<Utc> {
    fn utc(self) -> DateTime<Utc> {
        self
    }
}

impl StoredInstant for i64 {
    fn utc(self) -> DateTime<Utc> {
        // Values outside chrono's range (±262,000 years) can only come from a hand-edited
        // file.
        DateTime::from_timestamp_micros(self).unwrap_or_default()
    }
}

/// A task as every statement returns it, its instants as the backend stores them.
#[derive(sqlx::FromRow)]
pub struct TaskRow<I> {
    pub id: i64,
    pub user_id: String,
    pub title: String,
    pub description: Option<String>,
    pub complete: bool,
    pub created_at: I,
    pub updated_at: I,
    pub version: i64,
}

impl<I: StoredInstant> From<TaskRow<I>> for Task {
    fn from(r: TaskRow<I>) -> Self {
        Task {
            id: r.id,
            user_id: r.user_id,
            title: r.title,
            description: r.description,
            complete: r.complete,
            created_at: r.created_at.utc(),
            updated_at: r.updated_at.utc(),
            version: r.version,
        }
    }
}

/// An idempotency key's row: the request it came with and the task it created.
#[derive(sqlx::FromRow)]
pub struct StoredKeyRow<I> {
    pub title: String,
    pub description: Option<String>,
    pub task_id: i64,
    pub created_at: I,
}

impl<I: StoredInstant> From<StoredKeyRow<I>> for StoredCreate {
    fn from(r: StoredKeyRow<I>) -> Self {
        StoredCreate {
            title: r.title,
            description: r.description,
            task_id: r.task_id,
            created_at: r.created_at.utc(),
        }
    }
}

/// How a backend spells the two expressions that differ between SQL dialects.
pub trait Dialect {
    /// `updated_at` after a write at instant `now`: never before the previous value
    /// plus one microsecond, so it strictly increases.
    fn next_updated_at(now: &str) -> String;
    /// "`version` is one of the list bound at `param`" (a NULL list: any version).
    fn version_is_one_of(param: &str) -> String;
}

/// The columns of a task, in the order every statement returns them.
const TASK: &str = "id, user_id, title, description, complete, created_at, updated_at, version";

/// Every statement both stores send, in their dialect. Numbered parameters (`$1`) work on
/// both.
pub struct Statements {
    /// The user's change counter and a page of their tasks, in one snapshot: the counter
    /// row always comes back, with NULL task columns when the page is empty.
    pub list: String,
    pub change_marker: &'static str,
    pub create: String,
    pub get: String,
    /// Owner and version of a task, to explain a write that matched no row.
    pub owner_and_version: &'static str,
    /// PATCH, and PUT as a PATCH that names every field.
    pub patch: String,
    pub delete: String,
    pub stored_key: &'static str,
    pub purge_keys: &'static str,
    pub ping: &'static str,
}

impl Statements {
    pub fn new<D: Dialect>() -> Self {
        Self {
            list: format!(
                "SELECT marker.counter AS marker, t.*
                 FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = $1), 0)
                       AS counter) AS marker
                 LEFT JOIN (SELECT {TASK} FROM tasks
                            WHERE user_id = $1 AND ($2 IS NULL OR complete = $2)
                            ORDER BY id LIMIT $3 OFFSET $4) AS t ON true
                 ORDER BY t.id"
            ),
            change_marker: "SELECT counter FROM user_changes WHERE user_id = $1",
            create: format!(
                "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at)
                 VALUES ($1, $2, $3, false, $4, $4)
                 RETURNING {TASK}"
            ),
            get: format!("SELECT {TASK} FROM tasks WHERE id = $1"),
            owner_and_version: "SELECT user_id, version FROM tasks WHERE id = $1",
            // `title` and `complete` cannot be NULL, so NULL means "unchanged";
            // `description` can, so a flag says whether to set it.
            patch: format!(
                "UPDATE tasks
                 SET title = COALESCE($3, title),
                     description = CASE WHEN $4 THEN $5 ELSE description END,
                     complete = COALESCE($6, complete),
                     version = version + 1,
                     updated_at = {}
                 WHERE id = $1 AND user_id = $2 AND {}
                 RETURNING {TASK}",
                D::next_updated_at("$7"),
                D::version_is_one_of("$8"),
            ),
            delete: format!(
                "DELETE FROM tasks WHERE id = $1 AND user_id = $2 AND {}",
                D::version_is_one_of("$3"),
            ),
            stored_key: "SELECT title, description, task_id, created_at FROM idempotency_keys
                         WHERE user_id = $1 AND idempotency_key = $2",
            // The age test is repeated outside the subquery: a key reclaimed by a create
            // while this statement waited for its row lock is re-checked on its new
            // version (PostgreSQL re-evaluates only the outer condition) and kept.
            purge_keys: "DELETE FROM idempotency_keys
                         WHERE created_at <= $1 AND (user_id, idempotency_key) IN (
                             SELECT user_id, idempotency_key FROM idempotency_keys
                             WHERE created_at <= $1 ORDER BY created_at LIMIT $2)",
            ping: "SELECT 1",
        }
    }
}

/// `TaskStore` for a backend, from these items in scope where it is expanded:
/// `SQL: LazyLock<Statements>`; `TaskRow` and `StoredKeyRow` (the rows above, with the
/// backend's instant type); `to_instant(DateTime<Utc>)` and `version_arg(&VersionGuard)`
/// (values to bind); and inherent methods `read()`/`write()` (a pooled connection),
/// `claim_key(..) -> Result<Option<Task>, StoreError>`, `status()`, `wait()`; plus
/// [`Backend`] for the connection type.
///
/// Writes with `RETURNING` are read with `fetch_all`, never `fetch_one`/`fetch_optional`:
/// SQLite runs its WAL auto-checkpoint only when a statement is stepped to its end, and
/// sqlx stops after the first row and resets the statement, which commits without
/// checkpointing — the WAL file then grows by every write, without bound.
macro_rules! impl_task_store {
    ($store:ty, $backend:literal) => {
        #[async_trait::async_trait]
        impl $crate::storage::TaskStore for $store {
            async fn list(
                &self,
                user_id: &str,
                filter: &$crate::tasks::ListFilter,
            ) -> Result<$crate::storage::TaskPage, $crate::storage::StoreError> {
                use sqlx::{FromRow, Row};
                let mut conn = self.read().await?;
                let rows = conn
                    .run(|conn| {
                        sqlx::query(&SQL.list)
                            .bind(user_id)
                            .bind(filter.complete)
                            .bind(filter.limit.unwrap_or(i64::MAX))
                            .bind(filter.offset)
                            .fetch_all(conn)
                    })
                    .await?;
                let mut page = $crate::storage::TaskPage {
                    tasks: Vec::with_capacity(rows.len()),
                    marker: 0,
                };
                for row in &rows {
                    page.marker = row.try_get("marker")?;
                    if row.try_get::<Option<i64>, _>("id")?.is_some() {
                        page.tasks.push(TaskRow::from_row(row)?.into());
                    }
                }
                Ok(page)
            }

            async fn change_marker(
                &self,
                user_id: &str,
            ) -> Result<i64, $crate::storage::StoreError> {
                let mut conn = self.read().await?;
                let marker: Option<i64> = conn
                    .run(|conn| {
                        sqlx::query_scalar(SQL.change_marker)
                            .bind(user_id)
                            .fetch_optional(conn)
                    })
                    .await?;
                Ok(marker.unwrap_or(0))
            }

            async fn create(
                &self,
                user_id: &str,
                task: &$crate::tasks::NewTask,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::tasks::Task, $crate::storage::StoreError> {
                let mut conn = self.write().await?;
                let rows: Vec<TaskRow> = conn
                    .run(|conn| {
                        sqlx::query_as(&SQL.create)
                            .bind(user_id)
                            .bind(task.title.as_str())
                            .bind(task.description.as_ref().map(|d| d.as_str()))
                            .bind(to_instant(now))
                            .fetch_all(conn)
                    })
                    .await?;
                match rows.into_iter().next() {
                    Some(row) => Ok(row.into()),
                    None => Err(sqlx::Error::RowNotFound.into()),
                }
            }

            async fn create_with_key(
                &self,
                user_id: &str,
                key: &$crate::idempotency::IdempotencyKey,
                task: &$crate::tasks::NewTask,
                now: chrono::DateTime<chrono::Utc>,
                remembered_since: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::idempotency::Claim, $crate::storage::StoreError> {
                // A key found taken may be purged (it expired) before it is read back:
                // then it is free, and the second attempt claims it.
                for _ in 0..2 {
                    if let Some(created) = self
                        .claim_key(user_id, key, task, now, remembered_since)
                        .await?
                    {
                        return Ok($crate::idempotency::Claim::Created(created));
                    }
                    let mut conn = self.read().await?;
                    let stored: Option<StoredKeyRow> = conn
                        .run(|conn| {
                            sqlx::query_as(SQL.stored_key)
                                .bind(user_id)
                                .bind(key.as_str())
                                .fetch_optional(conn)
                        })
                        .await?;
                    if let Some(stored) = stored {
                        return Ok($crate::idempotency::Claim::Taken(stored.into()));
                    }
                }
                Err($crate::storage::StoreError::KeyContended)
            }

            async fn get(
                &self,
                user_id: &str,
                id: i64,
            ) -> Result<$crate::tasks::Task, $crate::storage::StoreError> {
                let mut conn = self.read().await?;
                // One statement either way: the owner is compared here, and another
                // user's row is dropped before it can reach a response.
                let row: Option<TaskRow> = conn
                    .run(|conn| sqlx::query_as(&SQL.get).bind(id).fetch_optional(conn))
                    .await?;
                match row {
                    Some(row) if row.user_id == user_id => Ok(row.into()),
                    Some(_) => Err($crate::storage::StoreError::NotOwner),
                    None => Err($crate::storage::StoreError::NotFound),
                }
            }

            async fn replace(
                &self,
                user_id: &str,
                id: i64,
                task: &$crate::tasks::TaskReplace,
                guard: &$crate::versions::VersionGuard,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::tasks::Task, $crate::storage::StoreError> {
                // A full replacement: every field named, a missing description null.
                let patch = $crate::tasks::TaskPatch {
                    title: Some(task.title.clone()),
                    description: Some(task.description.clone()),
                    complete: Some(task.complete),
                };
                $crate::storage::TaskStore::patch(self, user_id, id, &patch, guard, now).await
            }

            async fn patch(
                &self,
                user_id: &str,
                id: i64,
                patch: &$crate::tasks::TaskPatch,
                guard: &$crate::versions::VersionGuard,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::tasks::Task, $crate::storage::StoreError> {
                let mut conn = self.write().await?;
                let rows: Vec<TaskRow> = conn
                    .run(|conn| {
                        sqlx::query_as(&SQL.patch)
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
                            .bind(to_instant(now))
                            .bind(version_arg(guard))
                            .fetch_all(conn)
                    })
                    .await?;
                match rows.into_iter().next() {
                    Some(row) => Ok(row.into()),
                    None => Err(explain_missing(&mut conn, id, user_id).await),
                }
            }

            async fn delete(
                &self,
                user_id: &str,
                id: i64,
                guard: &$crate::versions::VersionGuard,
            ) -> Result<(), $crate::storage::StoreError> {
                let mut conn = self.write().await?;
                let done = conn
                    .run(|conn| {
                        sqlx::query(&SQL.delete)
                            .bind(id)
                            .bind(user_id)
                            .bind(version_arg(guard))
                            .execute(conn)
                    })
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(explain_missing(&mut conn, id, user_id).await);
                }
                Ok(())
            }

            async fn purge_idempotency_keys(
                &self,
                cutoff: chrono::DateTime<chrono::Utc>,
                limit: i64,
            ) -> Result<u64, $crate::storage::StoreError> {
                let mut conn = self.write().await?;
                let done = conn
                    .run(|conn| {
                        sqlx::query(SQL.purge_keys)
                            .bind(to_instant(cutoff))
                            .bind(limit)
                            .execute(conn)
                    })
                    .await?;
                Ok(done.rows_affected())
            }

            async fn ping(&self) -> Result<(), $crate::storage::StoreError> {
                let mut conn = self.read().await?;
                conn.run(|conn| sqlx::query(SQL.ping).execute(conn)).await?;
                Ok(())
            }

            fn backend(&self) -> &'static str {
                $backend
            }

            fn pool_status(&self) -> $crate::storage::PoolStatus {
                self.status()
            }

            fn acquire_wait(&self) -> prometheus_client::metrics::histogram::Histogram {
                self.wait()
            }
        }

        /// Tells 404 from 403 from 412 after a write matched no row.
        async fn explain_missing(
            conn: &mut $crate::storage::pool::Tracked<
                <$store as $crate::storage::sql::Backend>::Connection,
            >,
            id: i64,
            user_id: &str,
        ) -> $crate::storage::StoreError {
            let found = conn
                .run(|conn| {
                    sqlx::query_as(SQL.owner_and_version)
                        .bind(id)
                        .fetch_optional(conn)
                })
                .await;
            match found {
                Ok(found) => $crate::storage::missing(found, user_id),
                Err(e) => $crate::storage::StoreError::Database(e),
            }
        }
    };
}

pub(crate) use impl_task_store;

/// The connection type a store's pools hold (named in the shared code).
pub trait Backend {
    type Connection;
}
