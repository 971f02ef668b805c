//! What the two stores share, written once: every statement, and the logic of every
//! store call. A backend supplies only its dialect — how it spells "the next
//! `updated_at`" and "the version is one of these" — and a [`Db`]: how it sends one
//! statement with its arguments and reads a row's columns, and its way of claiming an
//! idempotency key atomically. [`TaskStore`] is implemented once, for every [`Db`].

use std::future::Future;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;

use super::{PgTaskStore, PoolStatus, StoreError, TaskPage, TaskStore};
use crate::idempotency::{Claim, IdempotencyKey, StoredCreate};
use crate::lists::{After, Listing, Sort, SortKey};
use crate::sync::{Change, ChangePage, Numbered};
use crate::tasks::{NewTask, Task, TaskPatch, TaskReplace};
use crate::versions::VersionGuard;

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

/// One statement: its text, and whether it writes (SQLite sends writes to its one writer
/// connection). A backend may keep it prepared per connection, keyed by its address
/// (every `Stmt` lives in a `static`).
#[derive(Debug)]
pub struct Stmt {
    pub sql: String,
    pub writes: bool,
}

impl Stmt {
    pub fn read(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            writes: false,
        }
    }

    pub fn write(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            writes: true,
        }
    }

    /// The statement's identity, for a per-connection cache of prepared statements.
    pub fn key(&'static self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}

/// Every statement both stores send, in their dialect. Numbered parameters (`$1`) work on
/// both.
pub struct Statements {
    /// One per [`ListShape`] ([`Statements::list`]).
    lists: Vec<Stmt>,
    pub change_marker: Stmt,
    /// The user's counter and their changes above `$2`, in one snapshot.
    pub changes: Stmt,
    pub create: Stmt,
    pub get: Stmt,
    /// Owner and version of a task, to explain a write that matched no row.
    pub owner_and_version: Stmt,
    /// PATCH, and PUT as a PATCH that names every field.
    pub patch: Stmt,
    pub delete: Stmt,
    pub stored_key: Stmt,
    pub purge_keys: Stmt,
    pub purge_tombstones: Stmt,
    pub store_ticket: Stmt,
    /// Deletes a ticket that has not expired, returning until when its token is valid.
    pub redeem_ticket: Stmt,
    pub purge_tickets: Stmt,
    pub unfolded: Stmt,
    pub refold: Stmt,
    pub store_secret: Stmt,
    pub secret: Stmt,
    pub ping: Stmt,
}

impl Statements {
    pub fn new<D: Dialect>() -> Self {
        let lists = ListShape::all()
            .map(|shape| Stmt::read(list::<D>(shape)))
            .collect();
        Self {
            lists,
            change_marker: Stmt::read("SELECT counter FROM user_changes WHERE user_id = $1"),
            // The counter is read once, in the same snapshot as the changes, and guards
            // both scans (PostgreSQL skips them by a one-time filter when it is not
            // above the cursor). Each side reads at most a page, in index order.
            changes: Stmt::read(format!(
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
            )),
            create: Stmt::write(format!(
                "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at,
                                    title_folded, description_folded, folded_version)
                 VALUES ($1, $2, $3, false, $4, $4, $5, $6, 1)
                 RETURNING {TASK}"
            )),
            get: Stmt::read(format!("SELECT {TASK} FROM tasks WHERE id = $1")),
            owner_and_version: Stmt::read("SELECT user_id, version FROM tasks WHERE id = $1"),
            // `title` and `complete` cannot be NULL, so NULL means "unchanged";
            // `description` can, so a flag says whether to set it. The folded copies
            // follow their fields, and stay current if they were, or if both are
            // rewritten now.
            patch: Stmt::write(format!(
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
            )),
            delete: Stmt::write(format!(
                "DELETE FROM tasks WHERE id = $1 AND user_id = $2 AND {}",
                D::version_is_one_of("$3"),
            )),
            stored_key: Stmt::read(
                "SELECT title, description, task_id, created_at FROM idempotency_keys
                 WHERE user_id = $1 AND idempotency_key = $2",
            ),
            // The age test is repeated outside the subquery: a key reclaimed by a create
            // while this statement waited for its row lock is re-checked on its new
            // version (PostgreSQL re-evaluates only the outer condition) and kept.
            purge_keys: Stmt::write(
                "DELETE FROM idempotency_keys
                         WHERE created_at <= $1 AND (user_id, idempotency_key) IN (
                             SELECT user_id, idempotency_key FROM idempotency_keys
                             WHERE created_at <= $1 ORDER BY created_at LIMIT $2)",
            ),
            purge_tombstones: Stmt::write(
                "DELETE FROM task_tombstones
                               WHERE deleted_at <= $1 AND (user_id, change_seq) IN (
                                   SELECT user_id, change_seq FROM task_tombstones
                                   WHERE deleted_at <= $1 ORDER BY deleted_at LIMIT $2)",
            ),
            store_ticket: Stmt::write(
                "INSERT INTO event_tickets (user_id, ticket, expires_at, token_valid_until)
                           VALUES ($1, $2, $3, $4)",
            ),
            // One statement: of two requests redeeming one ticket, only one deletes it.
            redeem_ticket: Stmt::write(
                "DELETE FROM event_tickets
                            WHERE user_id = $1 AND ticket = $2 AND expires_at > $3
                            RETURNING token_valid_until",
            ),
            purge_tickets: Stmt::write(
                "DELETE FROM event_tickets
                            WHERE expires_at <= $1 AND (user_id, ticket) IN (
                                SELECT user_id, ticket FROM event_tickets
                                WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
            ),
            unfolded: Stmt::read(
                "SELECT id, user_id, title, description, version FROM tasks
                       WHERE folded_version <> version ORDER BY id LIMIT $1",
            ),
            // Only if the task is still at the version that was folded.
            refold: Stmt::write(
                "UPDATE tasks
                     SET title_folded = $4, description_folded = $5, folded_version = version
                     WHERE user_id = $1 AND id = $2 AND version = $3",
            ),
            store_secret: Stmt::write(
                "INSERT INTO service_secrets (name, secret) VALUES ($1, $2)
                           ON CONFLICT (name) DO NOTHING",
            ),
            // On the writer, right after `store_secret`.
            secret: Stmt::write("SELECT secret FROM service_secrets WHERE name = $1"),
            ping: Stmt::read("SELECT 1"),
        }
    }

    /// The list statement for a shape.
    pub fn list(&self, shape: ListShape) -> &Stmt {
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

/// A value bound to a statement parameter; each backend binds it in its own types.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    Bool(bool),
    OptBool(Option<bool>),
    Instant(DateTime<Utc>),
    /// `If-Match` versions (`None`: any version).
    Versions(Option<&'a [i64]>),
    Bytes(&'a [u8]),
}

/// A result row, read by column position (every statement here names its columns in a
/// fixed order).
pub trait Row {
    fn int(&self, at: usize) -> Result<i64, StoreError>;
    fn opt_int(&self, at: usize) -> Result<Option<i64>, StoreError>;
    fn text(&self, at: usize) -> Result<String, StoreError>;
    fn opt_text(&self, at: usize) -> Result<Option<String>, StoreError>;
    fn boolean(&self, at: usize) -> Result<bool, StoreError>;
    fn instant(&self, at: usize) -> Result<DateTime<Utc>, StoreError>;
    fn opt_instant(&self, at: usize) -> Result<Option<DateTime<Utc>>, StoreError>;
    fn bytes(&self, at: usize) -> Result<Vec<u8>, StoreError>;
}

/// The task whose columns start at `at`, in [`TASK`] order.
pub(super) fn task_at(row: &impl Row, at: usize) -> Result<Task, StoreError> {
    Ok(Task {
        id: row.int(at)?,
        user_id: row.text(at + 1)?,
        title: row.text(at + 2)?,
        description: row.opt_text(at + 3)?,
        complete: row.boolean(at + 4)?,
        created_at: row.instant(at + 5)?,
        updated_at: row.instant(at + 6)?,
        version: row.int(at + 7)?,
    })
}

/// A new task's columns as the statements bind them, with its folded copies (search).
pub(super) struct NewRow<'a> {
    pub user_id: &'a str,
    pub title: &'a str,
    pub description: Option<&'a str>,
    pub now: DateTime<Utc>,
    pub title_folded: String,
    pub description_folded: Option<String>,
}

impl<'a> NewRow<'a> {
    pub fn new(user_id: &'a str, task: &'a NewTask, now: DateTime<Utc>) -> Self {
        let description = task.description.as_ref().map(|d| d.as_str());
        Self {
            user_id,
            title: task.title.as_str(),
            description,
            now,
            title_folded: crate::lists::fold(task.title.as_str()),
            description_folded: description.map(crate::lists::fold),
        }
    }

    /// The create statement's parameters (`$1`–`$6`).
    pub fn create_args(&self) -> [Arg<'_>; 6] {
        [
            Arg::Text(self.user_id),
            Arg::Text(self.title),
            Arg::OptText(self.description),
            Arg::Instant(self.now),
            Arg::Text(&self.title_folded),
            Arg::OptText(self.description_folded.as_deref()),
        ]
    }
}

/// A database the shared store logic runs on: one statement at a time, each its own
/// transaction, and what only the backend knows.
pub trait Db: Send + Sync + 'static {
    type Row: Row + Send + Sync;
    /// `"postgres"` or `"sqlite"`.
    const BACKEND: &'static str;

    /// Every statement, in this backend's dialect.
    fn sql() -> &'static Statements;

    /// Runs `stmt` with `args`; its rows.
    fn fetch(
        &self,
        stmt: &'static Stmt,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<Vec<Self::Row>, StoreError>> + Send;

    /// Runs `stmt` with `args`; how many rows it changed.
    fn execute(
        &self,
        stmt: &'static Stmt,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Creates the task and claims `key` for it in one atomic step, unless the key is
    /// held by a create made after `remembered_since`: the created task, or `None`.
    fn claim_key(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        task: &NewTask,
        now: DateTime<Utc>,
        remembered_since: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<Task>, StoreError>> + Send;

    fn as_postgres(&self) -> Option<PgTaskStore>;
    fn status(&self) -> PoolStatus;
    fn wait(&self) -> Histogram;
}

/// The user's change counter (0 before their first write): one index probe.
async fn counter<D: Db>(db: &D, user_id: &str) -> Result<i64, StoreError> {
    let rows = db
        .fetch(&D::sql().change_marker, &[Arg::Text(user_id)])
        .await?;
    match rows.first() {
        Some(row) => row.int(0),
        None => Ok(0),
    }
}

/// Tells 404 from 403 from 412 after a write matched no row.
async fn explain_missing<D: Db>(db: &D, id: i64, user_id: &str) -> StoreError {
    let found = match db.fetch(&D::sql().owner_and_version, &[Arg::Int(id)]).await {
        Ok(rows) => rows,
        Err(e) => return e,
    };
    let found = match found.first() {
        None => None,
        Some(row) => match (row.text(0), row.int(1)) {
            (Ok(owner), Ok(version)) => Some((owner, version)),
            (Err(e), _) | (_, Err(e)) => return e,
        },
    };
    super::missing(found, user_id)
}

/// Runs a purge statement (`$1` cutoff, `$2` limit); returns the rows it deleted.
async fn purge<D: Db>(
    db: &D,
    stmt: &'static Stmt,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    db.execute(stmt, &[Arg::Instant(cutoff), Arg::Int(limit)])
        .await
}

fn version_arg(guard: &VersionGuard) -> Arg<'_> {
    Arg::Versions(match guard {
        VersionGuard::Any => None,
        VersionGuard::OneOf(versions) => Some(versions),
    })
}

#[async_trait::async_trait]
impl<D: Db> TaskStore for D {
    async fn list(&self, user_id: &str, listing: &Listing) -> Result<TaskPage, StoreError> {
        // One row more than the limit tells whether another page follows.
        let limit = listing
            .limit
            .map_or(i64::MAX, |limit| limit.saturating_add(1));
        let mut args = Vec::with_capacity(7);
        args.extend([
            Arg::Text(user_id),
            Arg::Int(limit),
            Arg::Int(listing.offset),
        ]);
        if let Some(complete) = listing.complete {
            args.push(Arg::Bool(complete));
        }
        if let Some(q) = &listing.q {
            args.push(Arg::Text(q.folded.as_str()));
        }
        match &listing.after {
            None => {}
            Some(After::Id(id)) => args.push(Arg::Int(*id)),
            Some(After::Instant(at, id)) => args.extend([Arg::Int(*id), Arg::Instant(*at)]),
            Some(After::Title(title, id)) => args.extend([Arg::Int(*id), Arg::Text(title)]),
        }
        let rows = self
            .fetch(D::sql().list(ListShape::of(listing)), &args)
            .await?;
        let mut page = TaskPage {
            tasks: Vec::with_capacity(rows.len()),
            marker: 0,
            has_more: false,
        };
        for row in &rows {
            page.marker = row.int(0)?;
            if row.opt_int(1)?.is_some() {
                page.tasks.push(task_at(row, 1)?);
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
    ) -> Result<ChangePage, StoreError> {
        // An up-to-date poll, the commonest call, reads the counter and nothing else.
        // (Otherwise the statement below reads it again, in the snapshot of the changes.)
        let marker = counter(self, user_id).await?;
        if marker <= since {
            // (What was purged is never above the counter, so never above `since` here.)
            return Ok(ChangePage {
                changes: Vec::new(),
                marker,
                purged_through: 0,
                has_more: false,
            });
        }
        let args = [
            Arg::Text(user_id),
            Arg::Int(since),
            Arg::Int(limit.saturating_add(1)),
            Arg::Bool(deletions),
        ];
        let rows = self.fetch(&D::sql().changes, &args).await?;
        let mut page = ChangePage {
            changes: Vec::with_capacity(rows.len()),
            marker: 0,
            purged_through: 0,
            has_more: false,
        };
        // Columns: marker, purged_through, change_seq, the task's, deleted_at.
        for row in &rows {
            page.marker = row.int(0)?;
            page.purged_through = row.int(1)?;
            let Some(seq) = row.opt_int(2)? else {
                continue;
            };
            let change = match row.opt_instant(11)? {
                Some(deleted_at) => Change::Delete {
                    task_id: row.int(3)?,
                    deleted_at,
                },
                None => Change::Upsert {
                    task: task_at(row, 3)?,
                },
            };
            page.changes.push(Numbered { seq, change });
        }
        page.has_more = page.changes.len() as i64 > limit;
        page.changes.truncate(limit.max(0) as usize);
        Ok(page)
    }

    async fn change_marker(&self, user_id: &str) -> Result<i64, StoreError> {
        counter(self, user_id).await
    }

    async fn create(
        &self,
        user_id: &str,
        task: &NewTask,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError> {
        let row = NewRow::new(user_id, task, now);
        let rows = self.fetch(&D::sql().create, &row.create_args()).await?;
        match rows.first() {
            Some(row) => task_at(row, 0),
            None => Err(StoreError::database("the insert returned no row")),
        }
    }

    async fn create_with_key(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        task: &NewTask,
        now: DateTime<Utc>,
        remembered_since: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        // A key found taken may be purged (it expired) before it is read back: then it
        // is free, and claiming it again settles it.
        for _ in 0..2 {
            if let Some(created) = self
                .claim_key(user_id, key, task, now, remembered_since)
                .await?
            {
                return Ok(Claim::Created(created));
            }
            let rows = self
                .fetch(
                    &D::sql().stored_key,
                    &[Arg::Text(user_id), Arg::Text(key.as_str())],
                )
                .await?;
            if let Some(row) = rows.first() {
                return Ok(Claim::Taken(StoredCreate {
                    title: row.text(0)?,
                    description: row.opt_text(1)?,
                    task_id: row.int(2)?,
                    created_at: row.instant(3)?,
                }));
            }
        }
        Err(StoreError::KeyContended)
    }

    async fn get(&self, user_id: &str, id: i64) -> Result<Task, StoreError> {
        // One statement either way: the owner is compared here, and another user's row
        // is dropped before it can reach a response.
        let rows = self.fetch(&D::sql().get, &[Arg::Int(id)]).await?;
        match rows.first() {
            Some(row) => {
                let task = task_at(row, 0)?;
                if task.user_id == user_id {
                    Ok(task)
                } else {
                    Err(StoreError::NotOwner)
                }
            }
            None => Err(StoreError::NotFound),
        }
    }

    async fn replace(
        &self,
        user_id: &str,
        id: i64,
        task: &TaskReplace,
        guard: &VersionGuard,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError> {
        // A full replacement: every field named, a missing description null.
        let patch = TaskPatch {
            title: Some(task.title.clone()),
            description: Some(task.description.clone()),
            complete: Some(task.complete),
        };
        self.patch(user_id, id, &patch, guard, now).await
    }

    async fn patch(
        &self,
        user_id: &str,
        id: i64,
        patch: &TaskPatch,
        guard: &VersionGuard,
        now: DateTime<Utc>,
    ) -> Result<Task, StoreError> {
        let title = patch.title.as_ref().map(|t| t.as_str());
        let description = patch
            .description
            .as_ref()
            .and_then(|d| d.as_ref().map(|d| d.as_str()));
        let (title_folded, description_folded) = (
            title.map(crate::lists::fold),
            description.map(crate::lists::fold),
        );
        let args = [
            Arg::Int(id),
            Arg::Text(user_id),
            Arg::OptText(title),
            Arg::Bool(patch.description.is_some()),
            Arg::OptText(description),
            Arg::OptBool(patch.complete),
            Arg::Instant(now),
            version_arg(guard),
            Arg::OptText(title_folded.as_deref()),
            Arg::OptText(description_folded.as_deref()),
        ];
        let rows = self.fetch(&D::sql().patch, &args).await?;
        match rows.first() {
            Some(row) => task_at(row, 0),
            None => Err(explain_missing(self, id, user_id).await),
        }
    }

    async fn delete(&self, user_id: &str, id: i64, guard: &VersionGuard) -> Result<(), StoreError> {
        let args = [Arg::Int(id), Arg::Text(user_id), version_arg(guard)];
        if self.execute(&D::sql().delete, &args).await? == 0 {
            return Err(explain_missing(self, id, user_id).await);
        }
        Ok(())
    }

    async fn purge_idempotency_keys(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        purge(self, &D::sql().purge_keys, cutoff, limit).await
    }

    async fn purge_tombstones(&self, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, StoreError> {
        purge(self, &D::sql().purge_tombstones, cutoff, limit).await
    }

    async fn store_ticket(
        &self,
        user_id: &str,
        ticket: &[u8],
        expires_at: DateTime<Utc>,
        token_valid_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let args = [
            Arg::Text(user_id),
            Arg::Bytes(ticket),
            Arg::Instant(expires_at),
            Arg::Instant(token_valid_until),
        ];
        self.execute(&D::sql().store_ticket, &args).await?;
        Ok(())
    }

    async fn redeem_ticket(
        &self,
        user_id: &str,
        ticket: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let args = [Arg::Text(user_id), Arg::Bytes(ticket), Arg::Instant(now)];
        let rows = self.fetch(&D::sql().redeem_ticket, &args).await?;
        rows.first().map(|row| row.instant(0)).transpose()
    }

    async fn purge_tickets(&self, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, StoreError> {
        purge(self, &D::sql().purge_tickets, cutoff, limit).await
    }

    fn postgres(&self) -> Option<PgTaskStore> {
        self.as_postgres()
    }

    async fn refold(&self, limit: i64) -> Result<u64, StoreError> {
        let stale = self.fetch(&D::sql().unfolded, &[Arg::Int(limit)]).await?;
        let mut done = 0;
        for row in &stale {
            let (id, user_id, title, description, version) = (
                row.int(0)?,
                row.text(1)?,
                row.text(2)?,
                row.opt_text(3)?,
                row.int(4)?,
            );
            let (title_folded, description_folded) = (
                crate::lists::fold(&title),
                description.as_deref().map(crate::lists::fold),
            );
            let args = [
                Arg::Text(&user_id),
                Arg::Int(id),
                Arg::Int(version),
                Arg::Text(&title_folded),
                Arg::OptText(description_folded.as_deref()),
            ];
            done += self.execute(&D::sql().refold, &args).await?;
        }
        Ok(done)
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.execute(
            &D::sql().store_secret,
            &[Arg::Text(name), Arg::Bytes(candidate)],
        )
        .await?;
        let rows = self.fetch(&D::sql().secret, &[Arg::Text(name)]).await?;
        match rows.first() {
            Some(row) => row.bytes(0),
            None => Err(StoreError::database("the stored secret is missing")),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.fetch(&D::sql().ping, &[]).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        D::BACKEND
    }

    fn pool_status(&self) -> PoolStatus {
        self.status()
    }

    fn acquire_wait(&self) -> Histogram {
        self.wait()
    }
}
