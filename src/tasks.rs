//! The task resource and every input rule of the contract, in one place.
//!
//! Inputs are parsed at the edge into validated types (`Title`, `NewTask`, `TaskPatch`, …):
//! once one exists it is valid, so handlers and storage never check again.
//!
//! Bodies are checked field by field over a decoded JSON object rather than through a
//! `#[derive(Deserialize)]` struct, because the contract's 422 lists *every* problem
//! (FastAPI's shape) and serde stops at the first one.

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::FieldError;

pub const TITLE_MAX_CHARS: usize = 200;
pub const DESCRIPTION_MAX_CHARS: usize = 1000;

/// A stored task, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"id": 1, "user_id": "alice", "title": "Buy milk", "description": "2 litres", "complete": false, "created_at": "2026-01-01T09:30:00.123456Z", "updated_at": "2026-01-01T09:30:00.123456Z", "version": 1}))]
pub struct Task {
    /// Assigned by the server; never reused.
    #[schema(minimum = 1)]
    pub id: i64,
    /// The owner: always the authenticated user.
    pub user_id: String,
    pub title: String,
    pub description: Option<String>,
    pub complete: bool,
    /// RFC 3339, UTC; set once.
    #[serde(serialize_with = "rfc3339_utc")]
    pub created_at: DateTime<Utc>,
    /// RFC 3339, UTC; strictly increases on every PUT or PATCH.
    #[serde(serialize_with = "rfc3339_utc")]
    pub updated_at: DateTime<Utc>,
    /// 1 on creation, +1 on every PUT or PATCH; the task's `ETag` is `"<version>"`.
    #[schema(minimum = 1)]
    pub version: i64,
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`: microseconds are kept so that two updates in the same
/// millisecond stay ordered. Written by hand into a stack buffer because chrono's
/// `format` parses its pattern again for every call, which showed in the profile.
pub(crate) fn rfc3339_utc<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    // Years outside 0..=9999 cannot be stored by either backend's timestamp types in use.
    put(0, 4, at.year().clamp(0, 9999) as u32);
    put(5, 2, at.month());
    put(8, 2, at.day());
    put(11, 2, at.hour());
    put(14, 2, at.minute());
    put(17, 2, at.second());
    put(20, 6, at.nanosecond() / 1000 % 1_000_000);
    // Only ASCII digits and separators were written.
    s.serialize_str(std::str::from_utf8(&out).unwrap_or_default())
}

/// `GET /tasks` response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"tasks": [{"id": 1, "user_id": "alice", "title": "Buy milk", "description": null, "complete": false, "created_at": "2026-01-01T09:30:00.123456Z", "updated_at": "2026-01-01T09:30:00.123456Z", "version": 1}], "count": 1, "next_cursor": "AQAAAAAAAAABDq3mW0cK9d2Vv2fD3a0bQw"}))]
pub struct TaskList {
    /// In the order `sort` asks for (default: oldest first, by id).
    pub tasks: Vec<Task>,
    /// The number of tasks in this response.
    pub count: usize,
    /// Only with `limit`: send it back as `cursor` (with the same `complete`, `sort` and
    /// `q`) for the tasks after this page; `null` when none follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, required = false)]
    pub next_cursor: Option<Option<String>>,
}

impl From<Vec<Task>> for TaskList {
    fn from(tasks: Vec<Task>) -> Self {
        Self {
            count: tasks.len(),
            tasks,
            next_cursor: None,
        }
    }
}

/// A title: 1–200 characters, not only whitespace, no NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title(String);

impl Title {
    pub fn parse(value: String) -> Result<Self, FieldError> {
        const LOC: &[&str] = &["body", "title"];
        let chars = value.chars().count();
        if chars == 0 {
            return Err(FieldError::new(
                LOC,
                "string_too_short",
                "String should have at least 1 character",
            ));
        }
        if chars > TITLE_MAX_CHARS {
            return Err(FieldError::new(
                LOC,
                "string_too_long",
                "String should have at most 200 characters",
            ));
        }
        // `char::is_whitespace` is Unicode White_Space: U+3000 and U+00A0 included.
        if value.chars().all(char::is_whitespace) {
            return Err(FieldError::new(
                LOC,
                "value_error",
                "Value error, title must not be blank",
            ));
        }
        reject_nul(LOC, &value)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A description: at most 1000 characters, no NUL; stored exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description(String);

impl Description {
    pub fn parse(value: String) -> Result<Self, FieldError> {
        const LOC: &[&str] = &["body", "description"];
        if value.chars().count() > DESCRIPTION_MAX_CHARS {
            return Err(FieldError::new(
                LOC,
                "string_too_long",
                "String should have at most 1000 characters",
            ));
        }
        reject_nul(LOC, &value)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// PostgreSQL cannot store U+0000 in text; reject it everywhere so that behaviour does not
/// depend on the backend.
fn reject_nul(loc: &'static [&'static str], value: &str) -> Result<(), FieldError> {
    if value.contains('\0') {
        return Err(FieldError::new(
            loc,
            "value_error",
            "Value error, must not contain the NUL character",
        ));
    }
    Ok(())
}

/// `POST` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub title: Title,
    pub description: Option<Description>,
}

/// `PUT` body: a full replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskReplace {
    pub title: Title,
    pub description: Option<Description>,
    pub complete: bool,
}

/// `PATCH` body: `None` leaves a field unchanged; `description: Some(None)` clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPatch {
    pub title: Option<Title>,
    pub description: Option<Option<Description>>,
    pub complete: Option<bool>,
}

/// Why a body was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// 422: fields of the wrong shape.
    Invalid(Vec<FieldError>),
    /// 400: a PATCH naming none of its fields.
    EmptyPatch,
}

impl NewTask {
    pub fn from_json(mut body: Map<String, Value>) -> Result<Self, BodyError> {
        match (
            title(body.remove("title")),
            description(body.remove("description")),
        ) {
            (Ok(title), Ok(description)) => Ok(Self {
                title,
                description: description.flatten(),
            }),
            (title, description) => Err(invalid([title.err(), description.err()])),
        }
    }
}

impl TaskReplace {
    pub fn from_json(mut body: Map<String, Value>) -> Result<Self, BodyError> {
        match (
            title(body.remove("title")),
            description(body.remove("description")),
            complete(body.remove("complete")),
        ) {
            (Ok(title), Ok(description), Ok(complete)) => Ok(Self {
                title,
                description: description.flatten(),
                complete,
            }),
            (title, description, complete) => {
                Err(invalid([title.err(), description.err(), complete.err()]))
            }
        }
    }
}

impl TaskPatch {
    pub fn from_json(mut body: Map<String, Value>) -> Result<Self, BodyError> {
        let (title_value, description_value, complete_value) = (
            body.remove("title"),
            body.remove("description"),
            body.remove("complete"),
        );
        if title_value.is_none() && description_value.is_none() && complete_value.is_none() {
            return Err(BodyError::EmptyPatch);
        }
        // Absent fields stay `None`; present ones follow the same rules as in a PUT.
        match (
            title_value.map(|v| title(Some(v))).transpose(),
            description(description_value),
            complete_value.map(|v| complete(Some(v))).transpose(),
        ) {
            (Ok(title), Ok(description), Ok(complete)) => Ok(Self {
                title,
                description,
                complete,
            }),
            (title, description, complete) => {
                Err(invalid([title.err(), description.err(), complete.err()]))
            }
        }
    }
}

/// The 422 for the fields that failed, in field order.
fn invalid<const N: usize>(errors: [Option<FieldError>; N]) -> BodyError {
    BodyError::Invalid(errors.into_iter().flatten().collect())
}

/// `title`: required, a string, never null.
fn title(value: Option<Value>) -> Result<Title, FieldError> {
    const LOC: &[&str] = &["body", "title"];
    match value {
        None => Err(FieldError::missing(LOC)),
        Some(Value::String(s)) => Title::parse(s),
        Some(_) => Err(string_type(LOC)),
    }
}

/// `complete`: required where used, JSON `true`/`false` only.
fn complete(value: Option<Value>) -> Result<bool, FieldError> {
    const LOC: &[&str] = &["body", "complete"];
    match value {
        None => Err(FieldError::missing(LOC)),
        Some(Value::Bool(b)) => Ok(b),
        Some(_) => Err(FieldError::new(
            LOC,
            "bool_type",
            "Input should be a valid boolean",
        )),
    }
}

/// `description`: absent → `None`; null → `Some(None)`; a string → `Some(Some(..))`.
fn description(value: Option<Value>) -> Result<Option<Option<Description>>, FieldError> {
    const LOC: &[&str] = &["body", "description"];
    value
        .map(|value| match value {
            Value::Null => Ok(None),
            Value::String(s) => Description::parse(s).map(Some),
            _ => Err(string_type(LOC)),
        })
        .transpose()
}

fn string_type(loc: &'static [&'static str]) -> FieldError {
    FieldError::new(loc, "string_type", "Input should be a valid string")
}

/// `task_id` in a path: an integer from 1 to 2^63−1, digits only.
pub fn parse_task_id(raw: &str) -> Result<i64, FieldError> {
    const LOC: &[&str] = &["path", "task_id"];
    parse_integer(LOC, raw, 1)
}

pub(crate) fn parse_integer(
    loc: &'static [&'static str],
    raw: &str,
    min: i64,
) -> Result<i64, FieldError> {
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FieldError::new(
            loc,
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
        ));
    }
    if negative {
        return Err(greater_than_equal(loc, min));
    }
    match digits.parse::<i64>() {
        Ok(n) if n >= min => Ok(n),
        Ok(_) => Err(greater_than_equal(loc, min)),
        Err(_) => Err(FieldError::new(
            loc,
            "less_than_equal",
            "Input should be less than or equal to 9223372036854775807",
        )),
    }
}

fn greater_than_equal(loc: &'static [&'static str], min: i64) -> FieldError {
    FieldError::new(
        loc,
        "greater_than_equal",
        format!("Input should be greater than or equal to {min}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn kinds(e: BodyError) -> Vec<(&'static [&'static str], &'static str)> {
        match e {
            BodyError::Invalid(errors) => errors.into_iter().map(|e| (e.loc, e.kind)).collect(),
            BodyError::EmptyPatch => panic!("unexpected empty patch"),
        }
    }

    #[test]
    fn title_counts_characters_not_bytes() {
        assert!(Title::parse("é".repeat(200)).is_ok());
        assert_eq!(
            Title::parse("é".repeat(201)).unwrap_err().kind,
            "string_too_long"
        );
        assert_eq!(
            Title::parse(String::new()).unwrap_err().kind,
            "string_too_short"
        );
    }

    #[test]
    fn blank_titles_are_rejected_including_unicode_whitespace() {
        for blank in [" ", "\t\n", "\u{3000}", "\u{a0}", " \u{2003} "] {
            assert_eq!(
                Title::parse(blank.to_owned()).unwrap_err().kind,
                "value_error",
                "{blank:?}"
            );
        }
        assert_eq!(Title::parse(" a ".into()).unwrap().as_str(), " a ");
    }

    #[test]
    fn nul_is_rejected_in_title_and_description() {
        assert_eq!(Title::parse("a\0b".into()).unwrap_err().kind, "value_error");
        assert_eq!(
            Description::parse("\0".into()).unwrap_err().loc,
            &["body", "description"]
        );
    }

    #[test]
    fn description_is_kept_exactly_and_limited_to_1000_chars() {
        assert_eq!(Description::parse("".into()).unwrap().as_str(), "");
        assert_eq!(Description::parse("  ".into()).unwrap().as_str(), "  ");
        assert!(Description::parse("ü".repeat(1000)).is_ok());
        assert!(Description::parse("ü".repeat(1001)).is_err());
    }

    #[test]
    fn new_task_reports_every_problem() {
        let err = NewTask::from_json(object(json!({"description": 5}))).unwrap_err();
        assert_eq!(
            kinds(err),
            vec![
                (&["body", "title"][..], "missing"),
                (&["body", "description"][..], "string_type")
            ]
        );
        let err = NewTask::from_json(object(json!({"title": null}))).unwrap_err();
        assert_eq!(kinds(err), vec![(&["body", "title"][..], "string_type")]);
    }

    #[test]
    fn new_task_ignores_unknown_and_server_fields() {
        let task = NewTask::from_json(object(
            json!({"title": "t", "id": 9, "user_id": "eve", "complete": true}),
        ))
        .unwrap();
        assert_eq!(task.title.as_str(), "t");
        assert_eq!(task.description, None);
    }

    #[test]
    fn replace_needs_complete_as_a_real_boolean() {
        for bad in [json!("true"), json!(1), json!(null)] {
            let err =
                TaskReplace::from_json(object(json!({"title": "t", "complete": bad}))).unwrap_err();
            assert_eq!(kinds(err), vec![(&["body", "complete"][..], "bool_type")]);
        }
        let err = TaskReplace::from_json(object(json!({"title": "t"}))).unwrap_err();
        assert_eq!(kinds(err), vec![(&["body", "complete"][..], "missing")]);
        let ok = TaskReplace::from_json(object(json!({"title": "t", "complete": true}))).unwrap();
        assert!(ok.complete);
        assert_eq!(ok.description, None);
    }

    #[test]
    fn patch_distinguishes_absent_null_and_value() {
        let p = TaskPatch::from_json(object(json!({"description": null}))).unwrap();
        assert_eq!(p.description, Some(None));
        assert_eq!(p.title, None);
        let p = TaskPatch::from_json(object(json!({"complete": false}))).unwrap();
        assert_eq!((p.complete, p.description), (Some(false), None));
        assert_eq!(
            TaskPatch::from_json(object(json!({"other": 1}))).unwrap_err(),
            BodyError::EmptyPatch
        );
        let err =
            TaskPatch::from_json(object(json!({"title": null, "complete": "no"}))).unwrap_err();
        assert_eq!(
            kinds(err),
            vec![
                (&["body", "title"][..], "string_type"),
                (&["body", "complete"][..], "bool_type")
            ]
        );
    }

    #[test]
    fn task_ids_are_positive_64_bit_integers() {
        assert_eq!(parse_task_id("1"), Ok(1));
        assert_eq!(parse_task_id("9223372036854775807"), Ok(i64::MAX));
        for (raw, kind) in [
            ("0", "greater_than_equal"),
            ("-1", "greater_than_equal"),
            ("abc", "int_parsing"),
            ("1.5", "int_parsing"),
            ("", "int_parsing"),
            ("+1", "int_parsing"),
            ("9223372036854775808", "less_than_equal"),
        ] {
            assert_eq!(parse_task_id(raw).unwrap_err().kind, kind, "{raw}");
        }
    }

    #[test]
    fn tasks_serialize_with_utc_z_timestamps() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let task = Task {
            id: 1,
            user_id: "u".into(),
            title: "t".into(),
            description: None,
            complete: false,
            created_at: at,
            updated_at: at,
            version: 1,
        };
        let v = serde_json::to_value(&task).unwrap();
        assert_eq!(v["created_at"], "2026-01-02T03:04:05.123456Z");
        assert_eq!(v["description"], Value::Null);
    }
}
