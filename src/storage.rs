//! Task storage: one interface, with a PostgreSQL and an SQLite implementation.
//!
//! Every successful call is one SQL statement: the owner is part of the `WHERE` and the
//! row comes back through `RETURNING`, so there is no read-then-write race. Only when a
//! statement touches no row does a second query tell "no such task" (404) from "someone
//! else's task" (403).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use crate::tasks::{ListFilter, NewTask, Task, TaskPatch, TaskReplace};

pub mod pool;
pub mod postgres;
pub mod sqlite;

pub use postgres::PgTaskStore;
pub use sqlite::SqliteTaskStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task not found")]
    NotFound,
    #[error("task belongs to another user")]
    NotOwner,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("the database did not answer within {CALL_DEADLINE:?}")]
    Timeout,
}

/// Storage of tasks. `now` is passed in so that every backend stamps the same instant;
/// `updated_at` becomes `max(now, previous updated_at + 1 µs)`, so it strictly increases.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// The user's tasks, oldest first (by id).
    async fn list(&self, user_id: &str, filter: &ListFilter) -> Result<Vec<Task>, StoreError>;
    async fn create(
        &self,
        user_id: &str,
        task: &NewTask,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError>;
    async fn get(&self, user_id: &str, id: i64) -> Result<Task, StoreError>;
    async fn replace(
        &self,
        user_id: &str,
        id: i64,
        task: &TaskReplace,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError>;
    async fn patch(
        &self,
        user_id: &str,
        id: i64,
        patch: &TaskPatch,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError>;
    async fn delete(&self, user_id: &str, id: i64) -> Result<(), StoreError>;
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// `"postgres"` or `"sqlite"`.
    fn backend(&self) -> &'static str;
    /// Open and idle connections, now.
    fn pool_status(&self) -> PoolStatus;
    /// How long requests waited for a connection (shared with the metrics registry).
    fn acquire_wait(&self) -> prometheus_client::metrics::histogram::Histogram;
}

/// A snapshot of the connection pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolStatus {
    pub size: u32,
    pub idle: usize,
}

/// Tuning for the connection pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// How long a request waits for a free connection.
    pub acquire_timeout: Duration,
    /// The server cancels a statement that runs longer (PostgreSQL `statement_timeout`),
    /// so a stuck query cannot hold a connection.
    pub statement_timeout: Duration,
    /// A connection idle longer than this is pinged before it is handed out, so one the
    /// server or a proxy closed meanwhile is replaced instead of failing a request.
    pub check_after_idle: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_millis(1500),
            check_after_idle: Duration::from_secs(30),
        }
    }
}

/// The longest any one database call may take, waiting for a connection included:
/// past it the request gets 500 `DATABASE_ERROR` (contract: answered within 2 s).
pub const CALL_DEADLINE: Duration = Duration::from_millis(1500);

/// Runs a store call under [`CALL_DEADLINE`].
pub async fn within_deadline<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .unwrap_or(Err(StoreError::Timeout))
}

/// Opens the store a `DATABASE_URL` names and brings its schema up to date.
pub async fn connect(url: &str, pool: &PoolSettings) -> Result<Arc<dyn TaskStore>, sqlx::Error> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteTaskStore::connect(url, pool).await?))
    } else {
        Ok(Arc::new(PgTaskStore::connect(url, pool).await?))
    }
}

/// The instant stored for "now": both backends keep microseconds.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Tells 404 from 403 once a statement scoped to the owner matched no row.
fn missing(owner: Option<String>) -> StoreError {
    match owner {
        Some(_) => StoreError::NotOwner,
        None => StoreError::NotFound,
    }
}
