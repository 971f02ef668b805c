//! Task storage: one interface, with a PostgreSQL and an SQLite implementation.
//!
//! Every successful call is one SQL statement: the owner is part of the `WHERE` and the
//! row comes back through `RETURNING`, so there is no read-then-write race. Only when a
//! statement touches no row does a second query tell "no such task" (404) from "someone
//! else's task" (403).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use crate::tasks::{ListFilter, NewTask, Task, TaskPatch, TaskReplace};

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
    pub acquire_timeout: std::time::Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: std::time::Duration::from_secs(5),
        }
    }
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
