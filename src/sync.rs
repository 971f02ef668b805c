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
//! A feed cursor is signed for its user (`cursors`) and holds the counter value the
//! client is up to, the time it was issued (it expires `SYNC_RETENTION` later), and a
//! *floor*: deletions numbered at or below it cannot concern the client. A client that
//! finished a sync at counter N holds the server's tasks as of N, so only deletions above
//! N concern it (floor N). A full sync in pages holds only tasks it saw in a snapshot at
//! or after its first page, whose counter was M, so deletions at or below M cannot
//! concern it (floor M), even while its pages are still below M.
//!
//! Tombstones are purged after `SYNC_RETENTION` (plus [`TOMBSTONE_MARGIN`]), and the
//! purge records, per user, the highest number it purged (`purged_through`, kept by a
//! trigger in the same statement). A cursor whose position and floor are both below that
//! may need a deletion that is gone: it gets 410 and a full sync. So no deletion is ever
//! silently missed, whatever the instances' clocks or settings.

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
    /// The highest change number whose tombstone was purged (0: none), same snapshot.
    pub purged_through: i64,
    /// More changes follow the last one here.
    pub has_more: bool,
}

/// A position in the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The counter value the client is up to.
    pub counter: i64,
    /// Deletions numbered at or below this cannot concern the client.
    pub floor: i64,
    /// When the cursor was issued.
    pub issued: DateTime<Utc>,
}

/// The version of the feed cursor's payload layout.
const CURSOR_FORMAT: u8 = 1;

impl Position {
    pub fn seal(&self, key: &CursorKey, user: &str) -> String {
        let mut payload = Vec::with_capacity(25);
        payload.push(CURSOR_FORMAT);
        payload.extend_from_slice(&self.counter.to_be_bytes());
        payload.extend_from_slice(&self.floor.to_be_bytes());
        payload.extend_from_slice(&self.issued.timestamp_micros().to_be_bytes());
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
            let floor = r.i64()?;
            let issued = DateTime::from_timestamp_micros(r.i64()?)?;
            (counter >= 0 && floor >= 0 && r.0.is_empty()).then_some(Self {
                counter,
                floor,
                issued,
            })
        })()
        .ok_or(Refused::Malformed)?;
        if expired(position.issued, now, retention) {
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
    /// 410: issued more than `SYNC_RETENTION` ago, from before deletions it may need were
    /// purged, or ahead of the database (restored from a backup since).
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
    if let Some(from) = from {
        check(from, &page)?;
    }
    let next = match page.changes.last() {
        Some(last) if page.has_more => Position {
            counter: last.seq,
            // A full sync's first page: what it shows is as of this snapshot.
            floor: from.map_or(page.marker, |from| from.floor),
            issued: now,
        },
        _ => Position {
            counter: page.marker,
            floor: page.marker,
            issued: now,
        },
    };
    Ok(Feed {
        changes: page.changes.into_iter().map(|n| n.change).collect(),
        cursor: next.seal(key, user),
        has_more: page.has_more,
    })
}

/// Whether the feed can continue from `from`, given a page read from it.
pub fn check(from: Position, page: &ChangePage) -> Result<(), Refused> {
    // Ahead of the counter: issued before the database was restored from a backup.
    // Below what was purged: a deletion that concerns it may be gone.
    if from.counter > page.marker || page.purged_through > from.counter.max(from.floor) {
        return Err(Refused::Expired);
    }
    Ok(())
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

    fn page(seqs: &[i64], marker: i64, purged_through: i64, has_more: bool) -> ChangePage {
        ChangePage {
            changes: seqs.iter().map(|&s| upsert(s)).collect(),
            marker,
            purged_through,
            has_more,
        }
    }

    fn position(counter: i64, floor: i64, issued: i64) -> Position {
        Position {
            counter,
            floor,
            issued: at(issued),
        }
    }

    #[test]
    fn cursors_round_trip_and_expire_after_the_retention() {
        let p = position(42, 40, 1_000_000);
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
    fn every_page_issues_a_fresh_cursor_and_a_full_sync_keeps_its_first_counter_as_floor() {
        let open = |feed: &Feed| Position::open(&key(), "u", &feed.cursor, at(500), DAY).unwrap();
        // A full sync's first page: the floor is the counter of its snapshot.
        let first = answer(page(&[4, 6], 9, 0, true), None, at(500), &key(), "u").unwrap();
        assert_eq!(open(&first), position(6, 9, 500));
        // Its next pages keep that floor.
        let from = position(6, 9, 400);
        let next = answer(page(&[7], 12, 0, true), Some(from), at(500), &key(), "u").unwrap();
        assert_eq!(open(&next), position(7, 9, 500));
        // The last page of a sync: up to the counter, floor and all.
        let last = answer(page(&[7], 12, 0, false), Some(from), at(500), &key(), "u").unwrap();
        assert_eq!(open(&last), position(12, 12, 500));
        assert!(!last.has_more);
        let empty = answer(
            page(&[], 12, 0, false),
            Some(position(12, 12, 1)),
            at(500),
            &key(),
            "u",
        );
        assert_eq!(open(&empty.unwrap()), position(12, 12, 500));
    }

    #[test]
    fn a_cursor_below_what_was_purged_or_ahead_of_the_database_is_expired() {
        let ask = |from: Position, marker: i64, purged: i64| {
            answer(
                page(&[], marker, purged, false),
                Some(from),
                at(200),
                &key(),
                "u",
            )
            .err()
        };
        // Ahead of the counter (a restored database).
        assert_eq!(ask(position(10, 10, 100), 4, 0), Some(Refused::Expired));
        // Deletions above the cursor were purged.
        assert_eq!(ask(position(5, 5, 100), 9, 6), Some(Refused::Expired));
        assert_eq!(ask(position(5, 5, 100), 9, 5), None);
        // A full sync in pages below its floor: purged deletions at or below the floor
        // are of tasks it never saw.
        assert_eq!(ask(position(2, 8, 100), 9, 8), None);
        assert_eq!(ask(position(2, 8, 100), 9, 9), Some(Refused::Expired));
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
