//! Sync: the change feed (`GET /api/{user_id}/changes`).
//!
//! Every write to a user's tasks takes the next number of the user's change counter in
//! its own transaction (a trigger in the schema), and the counter's row stays locked to
//! commit, so one user's changes commit in the order of their numbers. A task carries the
//! number of its last change; a deleted task leaves a tombstone with the number of its
//! deletion. "What changed since N" is then every task and tombstone numbered above N,
//! read in one snapshot together with the counter: a change committed after that snapshot
//! gets a number above the counter it read, so it is in a later page, never skipped.
//!
//! A feed cursor is a counter value and a time, signed for its user (`cursors`). The time
//! is when the sync it continues began: a page with `has_more` passes on the time of the
//! cursor it was asked with (a full sync: its own), and only the last page of a sync,
//! which leaves the client up to date, issues a fresh time. A client holding a cursor of
//! time T holds only tasks it saw at or after T, so their deletions are stamped after T;
//! tombstones are kept [`TOMBSTONE_MARGIN`] longer than `SYNC_RETENTION`, so every
//! deletion a valid cursor may need is still there.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::cursors::{CursorKey, Kind, Reader};
use crate::error::FieldError;
use crate::tasks::{Task, parse_integer, rfc3339_utc};

pub const CHANGES_LIMIT_DEFAULT: i64 = 500;
pub const CHANGES_LIMIT_MAX: i64 = 1000;
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How much longer than `SYNC_RETENTION` tombstones are kept: room for clocks that
/// disagree between instances and the database, and for a delete's transaction to
/// commit after the instant it was stamped with.
pub const TOMBSTONE_MARGIN: Duration = Duration::from_secs(3600);

/// One entry of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"type": "delete", "task_id": 7, "deleted_at": "2026-01-01T10:01:00.000000Z"}))]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Change {
    /// The task as it is now: put it (create or replace).
    #[schema(title = "upsert")]
    Upsert { task: Task },
    /// The task was deleted: remove it (a no-op when the client does not hold it).
    #[schema(title = "delete")]
    Delete {
        task_id: i64,
        /// RFC 3339, UTC.
        #[serde(serialize_with = "rfc3339_utc")]
        #[schema(value_type = String, format = DateTime)]
        deleted_at: DateTime<Utc>,
    },
}

/// A change and its number in the user's change counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    pub seq: i64,
    pub change: Change,
}

/// Changes above a counter value, read in one snapshot with the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePage {
    /// At most the limit asked for, in counter order.
    pub changes: Vec<Numbered>,
    /// The user's counter in the same snapshot.
    pub marker: i64,
    /// More changes follow the last one here.
    pub has_more: bool,
}

/// A position in the feed: the counter value the client is up to, and when the sync it
/// belongs to began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub counter: i64,
    pub since: DateTime<Utc>,
}

/// The version of the feed cursor's payload layout.
const CURSOR_FORMAT: u8 = 1;

impl Position {
    pub fn seal(&self, key: &CursorKey, user: &str) -> String {
        let mut payload = Vec::with_capacity(17);
        payload.push(CURSOR_FORMAT);
        payload.extend_from_slice(&self.counter.to_be_bytes());
        payload.extend_from_slice(&self.since.timestamp_micros().to_be_bytes());
        key.seal(Kind::Feed, user, &[], &payload)
    }

    /// Opens a feed cursor (or event id) issued to `user`.
    pub fn open(
        key: &CursorKey,
        user: &str,
        cursor: &str,
        now: DateTime<Utc>,
        retention: Duration,
    ) -> Result<Self, Refused> {
        let payload = key
            .open(Kind::Feed, user, &[], cursor)
            .ok_or(Refused::Malformed)?;
        let mut r = Reader(&payload);
        let position = (|| {
            if r.byte()? != CURSOR_FORMAT {
                return None;
            }
            let counter = r.i64()?;
            let since = DateTime::from_timestamp_micros(r.i64()?)?;
            (counter >= 0 && r.0.is_empty()).then_some(Self { counter, since })
        })()
        .ok_or(Refused::Malformed)?;
        if expired(position.since, now, retention) {
            return Err(Refused::Expired);
        }
        Ok(position)
    }
}

fn expired(since: DateTime<Utc>, now: DateTime<Utc>, retention: Duration) -> bool {
    chrono::Duration::from_std(retention).is_ok_and(|r| now.signed_duration_since(since) > r)
}

/// Why a cursor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// 422: not a cursor issued to this user.
    Malformed,
    /// 410: issued more than `SYNC_RETENTION` ago, or ahead of the database (restored
    /// from a backup since).
    Expired,
}

/// The feed's answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"changes": [{"type": "upsert", "task": {"id": 8, "user_id": "alice", "title": "Buy milk", "description": null, "complete": true, "created_at": "2026-01-01T09:30:00.123456Z", "updated_at": "2026-01-01T10:00:00.000001Z", "version": 2}}, {"type": "delete", "task_id": 7, "deleted_at": "2026-01-01T10:01:00.000000Z"}], "cursor": "AQAAAAAAAAAJAAYGNQ2ZAnyqQ8Z3u2YfZ9wJ3Gq7wB3u", "has_more": false}))]
pub struct Feed {
    /// In order: apply each (`upsert` puts the task, `delete` removes it).
    pub changes: Vec<Change>,
    /// Send it back as `cursor` to get what changed after this answer.
    pub cursor: String,
    /// `true`: ask again at once with `cursor`; more changes are waiting.
    pub has_more: bool,
}

/// The answer to a feed request that started at `from` (`None`: a full sync), given the
/// page the store read.
pub fn answer(
    page: ChangePage,
    from: Option<Position>,
    now: DateTime<Utc>,
    key: &CursorKey,
    user: &str,
) -> Result<Feed, Refused> {
    // A cursor ahead of the counter was issued before the database was restored.
    if from.is_some_and(|from| from.counter > page.marker) {
        return Err(Refused::Expired);
    }
    let next = match page.changes.last() {
        Some(last) if page.has_more => Position {
            counter: last.seq,
            since: from.map_or(now, |from| from.since),
        },
        _ => Position {
            counter: page.marker,
            since: now,
        },
    };
    Ok(Feed {
        changes: page.changes.into_iter().map(|n| n.change).collect(),
        cursor: next.seal(key, user),
        has_more: page.has_more,
    })
}

/// The feed query: `limit` 1–1000 (default 500), `cursor` still sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangesParams {
    pub limit: i64,
    pub cursor: Option<String>,
}

impl ChangesParams {
    /// Parses a raw query string. Unknown parameters are ignored; the last of a repeated
    /// one counts.
    pub fn parse(query: Option<&str>) -> Result<Self, Vec<FieldError>> {
        let (mut limit, mut cursor) = (None, None);
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "limit" => limit = Some(value),
                "cursor" => cursor = Some(value.into_owned()),
                _ => {}
            }
        }
        let mut params = Self {
            limit: CHANGES_LIMIT_DEFAULT,
            cursor,
        };
        if let Some(value) = limit {
            match parse_integer(&["query", "limit"], &value, 1) {
                Ok(n) if n > CHANGES_LIMIT_MAX => {
                    return Err(vec![FieldError::new(
                        &["query", "limit"],
                        "less_than_equal",
                        "Input should be less than or equal to 1000",
                    )]);
                }
                Ok(n) => params.limit = n,
                Err(e) => return Err(vec![e]),
            }
        }
        Ok(params)
    }
}

pub fn malformed_cursor() -> FieldError {
    FieldError::new(
        &["query", "cursor"],
        "value_error",
        "Value error, not a cursor this feed issued to this user",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CursorKey {
        CursorKey::new(b"k")
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn upsert(seq: i64) -> Numbered {
        Numbered {
            seq,
            change: Change::Delete {
                task_id: seq,
                deleted_at: at(0),
            },
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn cursors_round_trip_and_expire_after_the_retention() {
        let p = Position {
            counter: 42,
            since: at(1_000_000),
        };
        let c = p.seal(&key(), "alice");
        assert_eq!(
            Position::open(&key(), "alice", &c, at(1_000_000 + 86_400), DAY),
            Ok(p)
        );
        assert_eq!(
            Position::open(&key(), "alice", &c, at(1_000_000 + 86_401), DAY),
            Err(Refused::Expired)
        );
        assert_eq!(
            Position::open(&key(), "bob", &c, at(1_000_000), DAY),
            Err(Refused::Malformed)
        );
        assert_eq!(
            Position::open(&key(), "alice", "", at(0), DAY),
            Err(Refused::Malformed)
        );
    }

    #[test]
    fn pages_with_more_keep_the_start_time_and_the_last_page_is_fresh() {
        let from = Position {
            counter: 3,
            since: at(100),
        };
        let open = |feed: &Feed| Position::open(&key(), "u", &feed.cursor, at(500), DAY).unwrap();
        let more = ChangePage {
            changes: vec![upsert(4), upsert(6)],
            marker: 9,
            has_more: true,
        };
        let feed = answer(more.clone(), Some(from), at(500), &key(), "u").unwrap();
        assert_eq!(
            open(&feed),
            Position {
                counter: 6,
                since: at(100)
            }
        );
        let full = answer(more, None, at(500), &key(), "u").unwrap();
        assert_eq!(
            open(&full),
            Position {
                counter: 6,
                since: at(500)
            }
        );
        let last = ChangePage {
            changes: vec![upsert(7)],
            marker: 9,
            has_more: false,
        };
        let feed = answer(last, Some(from), at(500), &key(), "u").unwrap();
        assert_eq!(
            open(&feed),
            Position {
                counter: 9,
                since: at(500)
            }
        );
        assert!(!feed.has_more);
    }

    #[test]
    fn a_cursor_ahead_of_the_database_is_expired() {
        let from = Position {
            counter: 10,
            since: at(100),
        };
        let page = ChangePage {
            changes: vec![],
            marker: 4,
            has_more: false,
        };
        assert_eq!(
            answer(page, Some(from), at(200), &key(), "u").err(),
            Some(Refused::Expired)
        );
    }

    #[test]
    fn params_default_and_bounds() {
        assert_eq!(
            ChangesParams::parse(None),
            Ok(ChangesParams {
                limit: 500,
                cursor: None
            })
        );
        assert_eq!(
            ChangesParams::parse(Some("limit=1000&cursor="))
                .unwrap()
                .cursor,
            Some(String::new())
        );
        for bad in ["limit=0", "limit=1001", "limit=x"] {
            assert_eq!(
                ChangesParams::parse(Some(bad)).unwrap_err()[0].loc,
                ["query", "limit"]
            );
        }
    }
}
