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
use crate::lists::{Listing, Sort, SortKey};
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
    /// `column` compared by Unicode code point.
    fn code_point_order(column: &str) -> String;
    /// "the text `haystack` contains the text `needle`" (NULL or false when it does not).
    fn contains(haystack: &str, needle: &str) -> String;
    /// A NULL of the PostgreSQL type `ty` (for a column of a `UNION` that only one side
    /// has).
    fn null(ty: &str) -> String;
}

/// The columns of a task, in the order every statement returns them.
const TASK: &str = "id, user_id, title, description, complete, created_at, updated_at, version";

/// Every statement both stores send, in their dialect. Numbered parameters (`$1`) work on
/// both.
pub struct Statements {
    /// One per [`ListShape`] ([`Statements::list`]).
    lists: Vec<String>,
    pub change_marker: &'static str,
    /// The user's counter and their changes above `$2`, in one snapshot.
    pub changes: String,
    pub create: String,
    pub get: String,
    /// Owner and version of a task, to explain a write that matched no row.
    pub owner_and_version: &'static str,
    /// PATCH, and PUT as a PATCH that names every field.
    pub patch: String,
    pub delete: String,
    pub stored_key: &'static str,
    pub purge_keys: &'static str,
    pub purge_tombstones: &'static str,
    pub store_ticket: &'static str,
    /// Deletes a ticket that has not expired, returning until when its token is valid.
    pub redeem_ticket: &'static str,
    pub purge_tickets: &'static str,
    pub unfolded: &'static str,
    pub refold: &'static str,
    pub store_secret: &'static str,
    pub secret: &'static str,
    pub ping: &'static str,
}

impl Statements {
    pub fn new<D: Dialect>() -> Self {
        let lists = ListShape::all().map(list::<D>).collect();
        Self {
            lists,
            change_marker: "SELECT counter FROM user_changes WHERE user_id = $1",
            // The counter is read once, in the same snapshot as the changes, and guards
            // both scans (PostgreSQL skips them by a one-time filter when it is not
            // above the cursor). Each side reads at most a page, in index order.
            changes: format!(
                "WITH marker AS MATERIALIZED (
                     SELECT COALESCE(c.counter, 0) AS counter,
                            COALESCE(c.purged_through, 0) AS purged_through
                     FROM (SELECT 1) AS one LEFT JOIN user_changes AS c ON c.user_id = $1)
                 SELECT marker.counter AS marker, marker.purged_through, c.*
                 FROM marker LEFT JOIN (
                     SELECT * FROM (
                         SELECT * FROM (
                             SELECT change_seq, {TASK}, {} AS deleted_at FROM tasks
                             WHERE user_id = $1 AND change_seq > $2
                               AND (SELECT counter FROM marker) > $2
                             ORDER BY change_seq LIMIT $3) AS live
                         UNION ALL
                         SELECT * FROM (
                             SELECT change_seq, task_id, {}, {}, {}, {}, {}, {}, {}, deleted_at
                             FROM task_tombstones
                             WHERE user_id = $1 AND change_seq > $2 AND $4
                               AND (SELECT counter FROM marker) > $2
                             ORDER BY change_seq LIMIT $3) AS dead
                     ) AS u ORDER BY change_seq LIMIT $3
                 ) AS c ON true
                 ORDER BY c.change_seq",
                D::null("timestamptz"),
                D::null("text"),
                D::null("text"),
                D::null("text"),
                D::null("boolean"),
                D::null("timestamptz"),
                D::null("timestamptz"),
                D::null("int8"),
            ),
            create: format!(
                "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at,
                                    title_folded, description_folded, folded_version)
                 VALUES ($1, $2, $3, false, $4, $4, $5, $6, 1)
                 RETURNING {TASK}"
            ),
            get: format!("SELECT {TASK} FROM tasks WHERE id = $1"),
            owner_and_version: "SELECT user_id, version FROM tasks WHERE id = $1",
            // `title` and `complete` cannot be NULL, so NULL means "unchanged";
            // `description` can, so a flag says whether to set it. The folded copies
            // follow their fields, and stay current if they were, or if both are
            // rewritten now.
            patch: format!(
                "UPDATE tasks
                 SET title = COALESCE($3, title),
                     description = CASE WHEN $4 THEN $5 ELSE description END,
                     complete = COALESCE($6, complete),
                     version = version + 1,
                     updated_at = {},
                     title_folded = CASE WHEN $3 IS NULL THEN title_folded ELSE $9 END,
                     description_folded = CASE WHEN $4 THEN $10 ELSE description_folded END,
                     folded_version = CASE WHEN folded_version = version OR ($3 IS NOT NULL AND $4)
                                           THEN version + 1 ELSE folded_version END
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
            purge_tombstones: "DELETE FROM task_tombstones
                               WHERE deleted_at <= $1 AND (user_id, change_seq) IN (
                                   SELECT user_id, change_seq FROM task_tombstones
                                   WHERE deleted_at <= $1 ORDER BY deleted_at LIMIT $2)",
            store_ticket:
                "INSERT INTO event_tickets (user_id, ticket, expires_at, token_valid_until)
                           VALUES ($1, $2, $3, $4)",
            // One statement: of two requests redeeming one ticket, only one deletes it.
            redeem_ticket: "DELETE FROM event_tickets
                            WHERE user_id = $1 AND ticket = $2 AND expires_at > $3
                            RETURNING token_valid_until",
            purge_tickets: "DELETE FROM event_tickets
                            WHERE expires_at <= $1 AND (user_id, ticket) IN (
                                SELECT user_id, ticket FROM event_tickets
                                WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
            unfolded: "SELECT id, user_id, title, description, version FROM tasks
                       WHERE folded_version <> version ORDER BY id LIMIT $1",
            // Only if the task is still at the version that was folded.
            refold: "UPDATE tasks
                     SET title_folded = $4, description_folded = $5, folded_version = version
                     WHERE user_id = $1 AND id = $2 AND version = $3",
            store_secret: "INSERT INTO service_secrets (name, secret) VALUES ($1, $2)
                           ON CONFLICT (name) DO NOTHING",
            secret: "SELECT secret FROM service_secrets WHERE name = $1",
            ping: "SELECT 1",
        }
    }

    /// The list statement for a shape.
    pub fn list(&self, shape: ListShape) -> &str {
        &self.lists[shape.index()]
    }
}

/// What a list statement filters and continues by: one statement per combination.
#[derive(Debug, Clone, Copy)]
pub struct ListShape {
    pub sort: Sort,
    pub after: bool,
    pub complete: bool,
    pub q: bool,
}

impl ListShape {
    pub fn of(listing: &Listing) -> Self {
        Self {
            sort: listing.sort,
            after: listing.after.is_some(),
            complete: listing.complete.is_some(),
            q: listing.q.is_some(),
        }
    }

    fn index(self) -> usize {
        ((self.sort.index() * 2 + usize::from(self.after)) * 2 + usize::from(self.complete)) * 2
            + usize::from(self.q)
    }

    fn all() -> impl Iterator<Item = Self> {
        Sort::ALL.into_iter().flat_map(|sort| {
            [false, true].into_iter().flat_map(move |after| {
                [false, true].into_iter().flat_map(move |complete| {
                    [false, true].into_iter().map(move |q| Self {
                        sort,
                        after,
                        complete,
                        q,
                    })
                })
            })
        })
    }
}

/// A page of the user's tasks and their change counter, in one snapshot (the counter row
/// always comes back, with NULL task columns when the page is empty). Parameters: `$1`
/// user, `$2` limit, `$3` offset, then, numbered on in this order, only those the shape
/// has: `complete`, the folded `q`, the position's id and its sort key (unless sorting
/// by id).
///
/// Each shape is its own statement, with no "`$n IS NULL OR …`" filters: PostgreSQL plans
/// a prepared statement once for every value (the pool forces generic plans), and such a
/// filter makes it expect almost no rows, so it would sort all of a large user's tasks
/// instead of reading the first few in index order.
fn list<D: Dialect>(shape: ListShape) -> String {
    let sort = shape.sort;
    let column = match sort.key {
        SortKey::Id => None,
        SortKey::CreatedAt => Some("created_at".to_owned()),
        SortKey::UpdatedAt => Some("updated_at".to_owned()),
        SortKey::Title => Some(D::code_point_order("title")),
    };
    let (direction, beyond) = if sort.descending {
        ("DESC", "<")
    } else {
        ("ASC", ">")
    };
    let order = |table: &str| match &column {
        None => format!("{table}id {direction}"),
        Some(column) => format!("{table}{column} {direction}, {table}id {direction}"),
    };
    let mut next = 3;
    let mut param = || {
        next += 1;
        format!("${next}")
    };
    let mut filters = String::new();
    if shape.complete {
        filters += &format!(" AND complete = {}", param());
    }
    if shape.q {
        let q = param();
        filters += &format!(
            " AND folded_version = version AND ({} OR {})",
            D::contains("title_folded", &q),
            D::contains("description_folded", &q)
        );
    }
    if shape.after {
        let id = param();
        filters += &match &column {
            None => format!(" AND id {beyond} {id}"),
            Some(column) => format!(" AND ({column}, id) {beyond} ({}, {id})", param()),
        };
    }
    format!(
        "SELECT marker.counter AS marker, t.*
         FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = $1), 0)
               AS counter) AS marker
         LEFT JOIN (SELECT {TASK} FROM tasks
                    WHERE user_id = $1{filters}
                    ORDER BY {} LIMIT $2 OFFSET $3) AS t ON true
         ORDER BY {}",
        order(""),
        order("t."),
    )
}

/// `TaskStore` for a backend, from these items in scope where it is expanded:
/// `SQL: LazyLock<Statements>`; `Instant` (how it stores an instant), `TaskRow` and
/// `StoredKeyRow` (the rows above, with that type); `to_instant(DateTime<Utc>)` and `version_arg(&VersionGuard)`
/// (values to bind); and inherent methods `read()`/`write()` (a pooled connection),
/// `claim_key(..) -> Result<Option<Task>, StoreError>`, `status()`, `wait()`; plus
/// [`Backend`] (in scope) for the connection type and how statements are sent.
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
                listing: &$crate::lists::Listing,
            ) -> Result<$crate::storage::TaskPage, $crate::storage::StoreError> {
                use sqlx::{FromRow, Row};
                use $crate::lists::After;
                let mut conn = self.read().await?;
                // One row more than the limit tells whether another page follows.
                let limit = listing
                    .limit
                    .map_or(i64::MAX, |limit| limit.saturating_add(1));
                let rows = conn
                    .run(async |conn| {
                        let shape = $crate::storage::sql::ListShape::of(listing);
                        let mut query = sqlx::query(SQL.list(shape))
                            .persistent(self.named_statements())
                            .bind(user_id)
                            .bind(limit)
                            .bind(listing.offset);
                        if let Some(complete) = listing.complete {
                            query = query.bind(complete);
                        }
                        if let Some(q) = &listing.q {
                            query = query.bind(q.folded.as_str());
                        }
                        let query = match &listing.after {
                            None => query,
                            Some(After::Id(id)) => query.bind(*id),
                            Some(After::Instant(at, id)) => query.bind(*id).bind(to_instant(*at)),
                            Some(After::Title(title, id)) => query.bind(*id).bind(title.as_str()),
                        };
                        query.fetch_all(conn).await
                    })
                    .await?;
                let mut page = $crate::storage::TaskPage {
                    tasks: Vec::with_capacity(rows.len()),
                    marker: 0,
                    has_more: false,
                };
                for row in &rows {
                    page.marker = row.try_get("marker")?;
                    if row.try_get::<Option<i64>, _>("id")?.is_some() {
                        page.tasks.push(TaskRow::from_row(row)?.into());
                    }
                }
                if let Some(limit) = listing.limit {
                    page.has_more = page.tasks.len() as i64 > limit;
                    page.tasks.truncate(limit as usize);
                }
                Ok(page)
            }

            async fn changes(
                &self,
                user_id: &str,
                since: i64,
                deletions: bool,
                limit: i64,
            ) -> Result<$crate::sync::ChangePage, $crate::storage::StoreError> {
                use sqlx::{FromRow, Row};
                use $crate::sync::{Change, Numbered};
                let mut conn = self.read().await?;
                // An up-to-date poll, the commonest call, reads the counter and nothing
                // else. (Otherwise the statement below reads it again, in the snapshot
                // of the changes.)
                let marker = counter(self, &mut conn, user_id).await?;
                if marker <= since {
                    // (What was purged is never above the counter, so never above
                    // `since` here.)
                    return Ok($crate::sync::ChangePage {
                        changes: Vec::new(),
                        marker,
                        purged_through: 0,
                        has_more: false,
                    });
                }
                let rows = conn
                    .run(async |conn| {
                        sqlx::query(&SQL.changes)
                            .persistent(self.named_statements())
                            .bind(user_id)
                            .bind(since)
                            .bind(limit.saturating_add(1))
                            .bind(deletions)
                            .fetch_all(conn)
                            .await
                    })
                    .await?;
                let mut page = $crate::sync::ChangePage {
                    changes: Vec::with_capacity(rows.len()),
                    marker: 0,
                    purged_through: 0,
                    has_more: false,
                };
                for row in &rows {
                    page.marker = row.try_get("marker")?;
                    page.purged_through = row.try_get("purged_through")?;
                    let Some(seq) = row.try_get::<Option<i64>, _>("change_seq")? else {
                        continue;
                    };
                    let change = match row.try_get::<Option<Instant>, _>("deleted_at")? {
                        Some(deleted_at) => Change::Delete {
                            task_id: row.try_get("id")?,
                            deleted_at: $crate::storage::sql::StoredInstant::utc(deleted_at),
                        },
                        None => Change::Upsert {
                            task: TaskRow::from_row(row)?.into(),
                        },
                    };
                    page.changes.push(Numbered { seq, change });
                }
                page.has_more = page.changes.len() as i64 > limit;
                page.changes.truncate(limit.max(0) as usize);
                Ok(page)
            }

            async fn change_marker(
                &self,
                user_id: &str,
            ) -> Result<i64, $crate::storage::StoreError> {
                let mut conn = self.read().await?;
                counter(self, &mut conn, user_id).await
            }

            async fn create(
                &self,
                user_id: &str,
                task: &$crate::tasks::NewTask,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::tasks::Task, $crate::storage::StoreError> {
                let mut conn = self.write().await?;
                let rows: Vec<TaskRow> = conn
                    .run(async |conn| {
                        sqlx::query_as(&SQL.create)
                            .persistent(self.named_statements())
                            .bind(user_id)
                            .bind(task.title.as_str())
                            .bind(task.description.as_ref().map(|d| d.as_str()))
                            .bind(to_instant(now))
                            .bind($crate::lists::fold(task.title.as_str()))
                            .bind(
                                task.description
                                    .as_ref()
                                    .map(|d| $crate::lists::fold(d.as_str())),
                            )
                            .fetch_all(conn)
                            .await
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
                        .run(async |conn| {
                            sqlx::query_as(SQL.stored_key)
                                .persistent(self.named_statements())
                                .bind(user_id)
                                .bind(key.as_str())
                                .fetch_optional(conn)
                                .await
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
                    .run(async |conn| {
                        sqlx::query_as(&SQL.get)
                            .persistent(self.named_statements())
                            .bind(id)
                            .fetch_optional(conn)
                            .await
                    })
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
                    .run(async |conn| {
                        sqlx::query_as(&SQL.patch)
                            .persistent(self.named_statements())
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
                            .bind(
                                patch
                                    .title
                                    .as_ref()
                                    .map(|t| $crate::lists::fold(t.as_str())),
                            )
                            .bind(
                                patch.description.as_ref().and_then(|d| {
                                    d.as_ref().map(|d| $crate::lists::fold(d.as_str()))
                                }),
                            )
                            .fetch_all(conn)
                            .await
                    })
                    .await?;
                match rows.into_iter().next() {
                    Some(row) => Ok(row.into()),
                    None => Err(explain_missing(self, &mut conn, id, user_id).await),
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
                    .run(async |conn| {
                        sqlx::query(&SQL.delete)
                            .persistent(self.named_statements())
                            .bind(id)
                            .bind(user_id)
                            .bind(version_arg(guard))
                            .execute(conn)
                            .await
                    })
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(explain_missing(self, &mut conn, id, user_id).await);
                }
                Ok(())
            }

            async fn purge_idempotency_keys(
                &self,
                cutoff: chrono::DateTime<chrono::Utc>,
                limit: i64,
            ) -> Result<u64, $crate::storage::StoreError> {
                purge(self, SQL.purge_keys, cutoff, limit).await
            }

            async fn purge_tombstones(
                &self,
                cutoff: chrono::DateTime<chrono::Utc>,
                limit: i64,
            ) -> Result<u64, $crate::storage::StoreError> {
                purge(self, SQL.purge_tombstones, cutoff, limit).await
            }

            async fn store_ticket(
                &self,
                user_id: &str,
                ticket: &[u8],
                expires_at: chrono::DateTime<chrono::Utc>,
                token_valid_until: chrono::DateTime<chrono::Utc>,
            ) -> Result<(), $crate::storage::StoreError> {
                let mut conn = self.write().await?;
                conn.run(async |conn| {
                    sqlx::query(SQL.store_ticket)
                        .persistent(self.named_statements())
                        .bind(user_id)
                        .bind(ticket)
                        .bind(to_instant(expires_at))
                        .bind(to_instant(token_valid_until))
                        .execute(conn)
                        .await
                })
                .await?;
                Ok(())
            }

            async fn redeem_ticket(
                &self,
                user_id: &str,
                ticket: &[u8],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<chrono::DateTime<chrono::Utc>>, $crate::storage::StoreError> {
                use $crate::storage::sql::StoredInstant;
                let mut conn = self.write().await?;
                let valid_until: Option<Instant> = conn
                    .run(async |conn| {
                        sqlx::query_scalar(SQL.redeem_ticket)
                            .persistent(self.named_statements())
                            .bind(user_id)
                            .bind(ticket)
                            .bind(to_instant(now))
                            .fetch_optional(conn)
                            .await
                    })
                    .await?;
                Ok(valid_until.map(StoredInstant::utc))
            }

            async fn purge_tickets(
                &self,
                cutoff: chrono::DateTime<chrono::Utc>,
                limit: i64,
            ) -> Result<u64, $crate::storage::StoreError> {
                purge(self, SQL.purge_tickets, cutoff, limit).await
            }

            fn postgres(&self) -> Option<$crate::storage::PgTaskStore> {
                self.as_postgres()
            }

            async fn refold(&self, limit: i64) -> Result<u64, $crate::storage::StoreError> {
                let stale: Vec<(i64, String, String, Option<String>, i64)> = {
                    let mut conn = self.read().await?;
                    conn.run(async |conn| {
                        sqlx::query_as(SQL.unfolded)
                            .persistent(self.named_statements())
                            .bind(limit)
                            .fetch_all(conn)
                            .await
                    })
                    .await?
                };
                let mut done = 0;
                for (id, user_id, title, description, version) in stale {
                    let mut conn = self.write().await?;
                    let updated = conn
                        .run(async |conn| {
                            sqlx::query(SQL.refold)
                                .persistent(self.named_statements())
                                .bind(user_id.as_str())
                                .bind(id)
                                .bind(version)
                                .bind($crate::lists::fold(&title))
                                .bind(description.as_deref().map($crate::lists::fold))
                                .execute(conn)
                                .await
                        })
                        .await?;
                    done += updated.rows_affected();
                }
                Ok(done)
            }

            async fn shared_secret(
                &self,
                name: &str,
                candidate: &[u8],
            ) -> Result<Vec<u8>, $crate::storage::StoreError> {
                let mut conn = self.write().await?;
                conn.run(async |conn| {
                    sqlx::query(SQL.store_secret)
                        .persistent(self.named_statements())
                        .bind(name)
                        .bind(candidate)
                        .execute(conn)
                        .await
                })
                .await?;
                let secret: Vec<u8> = conn
                    .run(async |conn| {
                        sqlx::query_scalar(SQL.secret)
                            .persistent(self.named_statements())
                            .bind(name)
                            .fetch_one(conn)
                            .await
                    })
                    .await?;
                Ok(secret)
            }

            async fn ping(&self) -> Result<(), $crate::storage::StoreError> {
                let mut conn = self.read().await?;
                conn.run(async |conn| {
                    sqlx::query(SQL.ping)
                        .persistent(self.named_statements())
                        .execute(conn)
                        .await
                })
                .await?;
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

        /// The user's change counter (0 before their first write): one index probe.
        async fn counter(
            store: &$store,
            conn: &mut $crate::storage::pool::Tracked<
                <$store as $crate::storage::sql::Backend>::Connection,
            >,
            user_id: &str,
        ) -> Result<i64, $crate::storage::StoreError> {
            let marker: Option<i64> = conn
                .run(async |conn| {
                    sqlx::query_scalar(SQL.change_marker)
                        .persistent(store.named_statements())
                        .bind(user_id)
                        .fetch_optional(conn)
                        .await
                })
                .await?;
            Ok(marker.unwrap_or(0))
        }

        /// Runs a purge statement (`$1` cutoff, `$2` limit); returns the rows it deleted.
        async fn purge(
            store: &$store,
            statement: &'static str,
            cutoff: chrono::DateTime<chrono::Utc>,
            limit: i64,
        ) -> Result<u64, $crate::storage::StoreError> {
            let mut conn = store.write().await?;
            let done = conn
                .run(async |conn| {
                    sqlx::query(statement)
                        .persistent(store.named_statements())
                        .bind(to_instant(cutoff))
                        .bind(limit)
                        .execute(conn)
                        .await
                })
                .await?;
            Ok(done.rows_affected())
        }

        /// Tells 404 from 403 from 412 after a write matched no row.
        async fn explain_missing(
            store: &$store,
            conn: &mut $crate::storage::pool::Tracked<
                <$store as $crate::storage::sql::Backend>::Connection,
            >,
            id: i64,
            user_id: &str,
        ) -> $crate::storage::StoreError {
            let found = conn
                .run(async |conn| {
                    sqlx::query_as(SQL.owner_and_version)
                        .persistent(store.named_statements())
                        .bind(id)
                        .fetch_optional(conn)
                        .await
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

/// The connection type a store's pools hold (named in the shared code), and how its
/// statements are sent.
pub trait Backend {
    type Connection;

    /// Whether every statement is prepared under a name, once per connection, and kept
    /// (sqlx's default): not behind a transaction pooler, whose server connections are
    /// shared by every client, where names collide and only unnamed statements work.
    /// Every statement of the shared code is sent `.persistent(this)`.
    fn named_statements(&self) -> bool;
}
