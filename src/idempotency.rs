//! Idempotent create (`Idempotency-Key`): the key's syntax, what a repeat is answered, and
//! the purge of forgotten keys.
//!
//! The key is claimed in the same statement (PostgreSQL) or transaction (SQLite) that
//! inserts the task, and the claim is the primary key of `idempotency_keys`, so two
//! requests with one key can never both create: the second waits on the database for
//! the first to finish, then finds the key taken and is answered the first's response.
//! If the first fails, nothing was stored and the second creates.

use std::time::Duration;

use axum::http::HeaderValue;
use chrono::{DateTime, Utc};

use crate::tasks::{Description, NewTask, Task};

/// Longest key, in characters.
pub const MAX_KEY_LEN: usize = 255;
/// How long a key is remembered after its create, unless configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A valid `Idempotency-Key`: 1–255 visible ASCII characters other than `"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key of a header value: the value itself, or the characters between the quotes
    /// of a quoted string (`"abc"` and `abc` are one key; no escapes).
    pub fn parse(value: &HeaderValue) -> Option<Self> {
        let raw = value.as_bytes();
        let key = match raw {
            [b'"', inner @ .., b'"'] => inner,
            _ => raw,
        };
        let valid = (1..=MAX_KEY_LEN).contains(&key.len())
            && key.iter().all(|&b| b.is_ascii_graphic() && b != b'"');
        // Only ASCII passed the check.
        valid.then(|| Self(String::from_utf8_lossy(key).into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key already taken by an earlier create: the request it came with and the task that
/// request created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCreate {
    pub title: String,
    pub description: Option<String>,
    pub task_id: i64,
    pub created_at: DateTime<Utc>,
}

/// What a create with a key did.
#[derive(Debug)]
pub enum Claim {
    /// The key was free (or forgotten): this request created the task.
    Created(Task),
    /// An earlier create holds the key.
    Taken(StoredCreate),
}

/// The answer to a create with a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Created(Task),
    /// The first response again: the task exactly as it was created.
    Replayed(Task),
}

/// The same key with a different request (contract: 422 `IDEMPOTENCY_KEY_REUSED`).
#[derive(Debug, PartialEq, Eq)]
pub struct KeyReused;

impl Claim {
    /// A repeat is the same request when its title and description (after validation,
    /// an absent description being null) are those the key was first used with.
    pub fn answer(self, user_id: &str, request: &NewTask) -> Result<Outcome, KeyReused> {
        let stored = match self {
            Self::Created(task) => return Ok(Outcome::Created(task)),
            Self::Taken(stored) => stored,
        };
        let same = stored.title == request.title.as_str()
            && stored.description.as_deref()
                == request.description.as_ref().map(Description::as_str);
        if !same {
            return Err(KeyReused);
        }
        // A created task is always incomplete, at version 1, unchanged since creation.
        Ok(Outcome::Replayed(Task {
            id: stored.task_id,
            user_id: user_id.to_owned(),
            title: stored.title,
            description: stored.description,
            complete: false,
            created_at: stored.created_at,
            updated_at: stored.created_at,
            version: 1,
        }))
    }
}

/// The oldest creation time a key may have and still be remembered at `now`.
pub fn remembered_since(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|ttl| now.checked_sub_signed(ttl))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// How often forgotten keys are purged: often enough that the table holds little more
/// than a TTL's worth of keys, never more often than every 100 ms or less than every
/// minute.
pub fn purge_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Title;

    fn new_task(title: &str, description: Option<&str>) -> Option<NewTask> {
        Some(NewTask {
            title: Title::parse(title.to_owned()).ok()?,
            description: description.map(|d| Description::parse(d.to_owned()).unwrap()),
        })
    }

    fn key(raw: &[u8]) -> Option<String> {
        IdempotencyKey::parse(&HeaderValue::from_bytes(raw).unwrap()).map(|k| k.0)
    }

    #[test]
    fn key_syntax() {
        assert_eq!(key(b"abc").as_deref(), Some("abc"));
        assert_eq!(key(b"\"abc\"").as_deref(), Some("abc"));
        assert_eq!(key(&[b'k'; 255]).map(|k| k.len()), Some(255));
        let quoted: Vec<u8> = [&b"\""[..], &[b'k'; 255], b"\""].concat();
        assert_eq!(key(&quoted).map(|k| k.len()), Some(255));
        for bad in [
            &b""[..],
            b"\"\"",
            b"\"",
            b"a b",
            b"a\"b",
            b"\"a\"b\"",
            b"\"abc",
            b"\xc3\xa9",
            &[b'k'; 256],
        ] {
            assert_eq!(key(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn stored(title: &str, description: Option<&str>) -> Claim {
        Claim::Taken(StoredCreate {
            title: title.into(),
            description: description.map(Into::into),
            task_id: 7,
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
        })
    }

    #[test]
    fn a_repeat_is_replayed_as_first_created() {
        let request = new_task("t", Some("d")).unwrap();
        let Ok(Outcome::Replayed(task)) = stored("t", Some("d")).answer("u", &request) else {
            panic!("not a replay");
        };
        assert_eq!(
            (task.id, task.user_id.as_str(), task.version, task.complete),
            (7, "u", 1, false)
        );
        assert_eq!(task.created_at, task.updated_at);
    }

    #[test]
    fn a_different_request_is_refused() {
        let request = new_task("t", None).unwrap();
        assert_eq!(stored("t", Some("d")).answer("u", &request), Err(KeyReused));
        assert_eq!(stored("T", None).answer("u", &request), Err(KeyReused));
        // An empty description is not an absent one.
        assert_eq!(stored("t", Some("")).answer("u", &request), Err(KeyReused));
        assert!(stored("t", None).answer("u", &request).is_ok());
    }

    #[test]
    fn remembered_since_and_purge_interval() {
        let now = DateTime::from_timestamp(1_000_000, 0).unwrap();
        assert_eq!(
            remembered_since(now, Duration::from_secs(60)).timestamp(),
            1_000_000 - 60
        );
        assert_eq!(
            remembered_since(now, Duration::MAX),
            DateTime::<Utc>::MIN_UTC
        );
        assert_eq!(purge_interval(DEFAULT_TTL), Duration::from_secs(60));
        assert_eq!(
            purge_interval(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
        assert_eq!(
            purge_interval(Duration::from_millis(10)),
            Duration::from_millis(100)
        );
    }
}
