//! Task storage: one interface, with a PostgreSQL and an SQLite implementation that share
//! their statements and logic (`sql`) and differ only in dialect.
//!
//! Every successful call is one SQL statement (an idempotent create on SQLite: one
//! transaction): the owner and the `If-Match` versions are part of the `WHERE` and the
//! row comes back through `RETURNING`, so there is no read-then-write race. Only when a
//! statement touches no row does a second query tell "no such task" (404) from "someone
//! else's task" (403) from "another version" (412).
//!
//! The logic of every call is written once (`sql`), over what a backend provides: how it
//! sends one statement and reads its rows.
//!
//! Every write also bumps the user's change counter: a trigger in the schema does it, in
//! the write's own transaction (see the migrations).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use secrecy::SecretString;

use crate::idempotency::{Claim, IdempotencyKey};
use crate::lists::Listing;
use crate::sync::ChangePage;
use crate::tasks::{NewTask, Task, TaskPatch, TaskReplace};
use crate::versions::VersionGuard;

pub mod pool;
pub mod postgres;
mod sql;
pub mod sqlite;
pub mod upkeep;

pub use postgres::PgTaskStore;
pub use sqlite::SqliteTaskStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task not found")]
    NotFound,
    #[error("task belongs to another user")]
    NotOwner,
    /// The database failed or could not be reached (the cause is logged, never shown).
    #[error(transparent)]
    Database(Box<dyn std::error::Error + Send + Sync>),
    #[error("the database did not answer within {CALL_DEADLINE:?}")]
    Timeout,
    /// The task exists and is the caller's, but its version is not one `If-Match` named.
    #[error("task is at version {current}")]
    VersionMismatch { current: i64 },
    /// An idempotency key was taken, then gone, twice in a row: other requests with the
    /// same key are claiming and expiring it right now.
    #[error("idempotency key contended")]
    KeyContended,
}

impl StoreError {
    /// A database error described by the store itself.
    pub fn database(what: &'static str) -> Self {
        Self::Database(what.into())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(Box::new(error))
    }
}

impl From<tokio_postgres::Error> for StoreError {
    /// With the server's own message when it sent one (tokio-postgres shows only "db
    /// error" for those).
    fn from(error: tokio_postgres::Error) -> Self {
        match error.as_db_error() {
            Some(db) => Self::Database(format!("database error: {db}").into()),
            None => Self::Database(Box::new(error)),
        }
    }
}

/// A page of the user's tasks and their change counter, read in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// The user's change counter (0 before their first write): the list's `ETag`.
    pub marker: i64,
    /// With a limit: more tasks follow the last one here.
    pub has_more: bool,
}

/// Storage of tasks. `now` is passed in so that every backend stamps the same instant;
/// `updated_at` becomes `max(now, previous updated_at + 1 µs)`, so it strictly increases.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// A page of the user's tasks in the listing's order, and their change counter.
    async fn list(&self, user_id: &str, listing: &Listing) -> Result<TaskPage, StoreError>;
    /// Up to `limit` of the user's changes numbered above `since`, in counter order,
    /// with the counter, in one snapshot. `deletions: false` leaves tombstones out (a
    /// full sync's first page). When the counter is not above `since`, reading it is all
    /// this does.
    async fn changes(
        &self,
        user_id: &str,
        since: i64,
        deletions: bool,
        limit: i64,
    ) -> Result<ChangePage, StoreError>;
    /// The user's change counter alone: one index probe, no task read.
    async fn change_marker(&self, user_id: &str) -> Result<i64, StoreError>;
    async fn create(
        &self,
        user_id: &str,
        task: &NewTask,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError>;
    /// Creates the task and claims `key` for it in one atomic step, unless the key is
    /// held by a create made after `remembered_since`: then that create is returned.
    async fn create_with_key(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        task: &NewTask,
        now: DateTime<Utc>,
        remembered_since: DateTime<Utc>,
    ) -> Result<Claim, StoreError>;
    async fn get(&self, user_id: &str, id: i64) -> Result<Task, StoreError>;
    async fn replace(
        &self,
        user_id: &str,
        id: i64,
        task: &TaskReplace,
        guard: &VersionGuard,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError>;
    async fn patch(
        &self,
        user_id: &str,
        id: i64,
        patch: &TaskPatch,
        guard: &VersionGuard,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError>;
    async fn delete(&self, user_id: &str, id: i64, guard: &VersionGuard) -> Result<(), StoreError>;
    /// Deletes up to `limit` idempotency keys made at or before `cutoff`, oldest first;
    /// returns how many.
    async fn purge_idempotency_keys(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError>;
    /// Deletes up to `limit` tombstones of deletions made at or before `cutoff`, oldest
    /// first; returns how many.
    async fn purge_tombstones(&self, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, StoreError>;
    /// Stores an event-stream ticket's id for `user_id`, usable until `expires_at`.
    async fn store_ticket(
        &self,
        user_id: &str,
        ticket: &[u8],
        expires_at: DateTime<Utc>,
        token_valid_until: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Uses up the user's ticket if it is stored and not expired at `now`, in one atomic
    /// step; returns until when the token that asked for it is valid (`None`: unknown,
    /// used or expired).
    async fn redeem_ticket(
        &self,
        user_id: &str,
        ticket: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Deletes up to `limit` tickets that expired at or before `cutoff`; returns how many.
    async fn purge_tickets(&self, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, StoreError>;
    /// The PostgreSQL store behind this one, for what only PostgreSQL has (LISTEN/NOTIFY).
    fn postgres(&self) -> Option<PgTaskStore>;
    /// Folds the search copies of up to `limit` tasks whose copies are missing or stale
    /// (written by something other than this service); returns how many.
    async fn refold(&self, limit: i64) -> Result<u64, StoreError>;
    /// The secret stored under `name`, storing `candidate` first if there is none: every
    /// instance gets the one the first stored.
    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError>;
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
    /// What sits between the service and PostgreSQL (`DATABASE_POOLER`); SQLite ignores it.
    pub pooler: Pooler,
    /// A direct connection to PostgreSQL, past any pooler (`DATABASE_DIRECT_URL`): the
    /// migrations run on it when it is set, since they hold a session-level lock.
    pub direct_url: Option<SecretString>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_millis(1500),
            check_after_idle: Duration::from_secs(30),
            pooler: Pooler::None,
            direct_url: None,
        }
    }
}

/// What sits between the service and PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pooler {
    /// Nothing, or a pooler that gives each client a server session of its own (PgBouncer
    /// `pool_mode = session`): connections keep their settings and prepared statements.
    #[default]
    None,
    /// A pooler that lends a server connection for one transaction at a time (PgBouncer
    /// `pool_mode = transaction`, Neon's `-pooler` endpoint). The store then keeps no
    /// session state: no per-connection settings and only unnamed statements, each store
    /// call in a transaction of its own so that all of its messages reach one server
    /// connection.
    Transaction,
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
pub async fn connect(url: &str, pool: &PoolSettings) -> Result<Arc<dyn TaskStore>, StoreError> {
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

/// Tells 404 from 403 from 412 once a write scoped to the owner and the `If-Match`
/// versions matched no row, from the task's owner and version (if it exists).
fn missing(found: Option<(String, i64)>, user_id: &str) -> StoreError {
    match found {
        None => StoreError::NotFound,
        Some((owner, _)) if owner != user_id => StoreError::NotOwner,
        Some((_, current)) => StoreError::VersionMismatch { current },
    }
}

/// The key that signs list and feed cursors, shared by every instance on this database:
/// made by the first instance to start, read by the others.
pub async fn cursor_key(store: &dyn TaskStore) -> Result<crate::cursors::CursorKey, StoreError> {
    let candidate = crate::cursors::CursorKey::generate_secret()
        .map_err(|_| StoreError::database("the operating system's random source failed"))?;
    let secret = within_deadline(store.shared_secret("cursor_key", &candidate)).await?;
    Ok(crate::cursors::CursorKey::new(&secret))
}
