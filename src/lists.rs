//! Lists of tasks: the query (`complete`, `limit`, `offset`, `sort`, `q`, `cursor`), the
//! search rule, and keyset cursors.
//!
//! **Search** (`q`) compares Unicode *full* case foldings (Unicode's CaseFolding.txt,
//! statuses C and F, not the Turkic mappings), with no normalization: `STRASSE` finds
//! `straße` (ß folds to `ss`), `ΣΊΣΥΦΟΣ` finds `σίσυφος` (σ, ς and Σ fold alike), `cafe`
//! does not find `café`, and a precomposed `é` does not find `e` + U+0301. Folding happens
//! here, in the service, for the stored copies and for `q` alike, so both backends give
//! the same answers: the databases compare the folded strings as bytes.
//!
//! **Keyset pages**: a list cursor carries the sort key and id of the last task of its
//! page, signed together with the user, `complete`, `sort` and `q` it was made for, so it
//! continues after that task whatever was created or deleted since.

use std::borrow::Cow;

use chrono::{DateTime, Utc};

use crate::cursors::{CursorKey, Kind, Reader};
use crate::error::FieldError;
use crate::tasks::{Task, parse_integer};

pub const LIST_LIMIT_MAX: i64 = 1000;
pub const QUERY_MAX_CHARS: usize = 200;

/// Unicode full case folding: the one place search folds text.
pub fn fold(text: &str) -> String {
    icu_casemap::CaseMapper::new()
        .fold_string(text)
        .into_owned()
}

/// What a list is ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Id,
    CreatedAt,
    UpdatedAt,
    /// By Unicode code point (on PostgreSQL `COLLATE "C"`, on SQLite its binary order:
    /// UTF-8 bytes sort as their code points do).
    Title,
}

/// `sort`: a key, ascending or (`-` prefix) descending; ties go by id the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sort {
    pub key: SortKey,
    pub descending: bool,
}

impl Default for Sort {
    fn default() -> Self {
        Self {
            key: SortKey::Id,
            descending: false,
        }
    }
}

impl Sort {
    /// Every sort order, in a fixed order (a store prepares one statement for each).
    pub const ALL: [Sort; 8] = {
        const fn s(key: SortKey, descending: bool) -> Sort {
            Sort { key, descending }
        }
        [
            s(SortKey::Id, false),
            s(SortKey::Id, true),
            s(SortKey::CreatedAt, false),
            s(SortKey::CreatedAt, true),
            s(SortKey::UpdatedAt, false),
            s(SortKey::UpdatedAt, true),
            s(SortKey::Title, false),
            s(SortKey::Title, true),
        ]
    };

    /// This order's place in [`Sort::ALL`].
    pub fn index(self) -> usize {
        let key = match self.key {
            SortKey::Id => 0,
            SortKey::CreatedAt => 1,
            SortKey::UpdatedAt => 2,
            SortKey::Title => 3,
        };
        key * 2 + usize::from(self.descending)
    }

    pub fn parse(raw: &str) -> Option<Self> {
        let (descending, name) = match raw.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, raw),
        };
        let key = match name {
            "id" => SortKey::Id,
            "created_at" => SortKey::CreatedAt,
            "updated_at" => SortKey::UpdatedAt,
            "title" => SortKey::Title,
            _ => return None,
        };
        Some(Self { key, descending })
    }

    pub fn as_str(self) -> &'static str {
        [
            "id",
            "-id",
            "created_at",
            "-created_at",
            "updated_at",
            "-updated_at",
            "title",
            "-title",
        ][self.index()]
    }
}

/// `q` as sent (what a cursor is bound to) and folded (what is compared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    pub raw: String,
    pub folded: String,
}

/// Where the previous page ended: its last task's sort key and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    Id(i64),
    Instant(DateTime<Utc>, i64),
    Title(String, i64),
}

impl After {
    /// The position of `task` in a list sorted by `key`.
    pub fn of(task: &Task, key: SortKey) -> Self {
        match key {
            SortKey::Id => Self::Id(task.id),
            SortKey::CreatedAt => Self::Instant(task.created_at, task.id),
            SortKey::UpdatedAt => Self::Instant(task.updated_at, task.id),
            SortKey::Title => Self::Title(task.title.clone(), task.id),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![CURSOR_FORMAT];
        match self {
            Self::Id(id) => out.extend_from_slice(&id.to_be_bytes()),
            Self::Instant(at, id) => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&at.timestamp_micros().to_be_bytes());
            }
            Self::Title(title, id) => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(title.as_bytes());
            }
        }
        out
    }

    fn decode(payload: &[u8], key: SortKey) -> Option<Self> {
        let mut r = Reader(payload);
        if r.byte()? != CURSOR_FORMAT {
            return None;
        }
        let id = r.i64()?;
        let after = match key {
            SortKey::Id => Self::Id(id),
            SortKey::CreatedAt | SortKey::UpdatedAt => {
                Self::Instant(DateTime::from_timestamp_micros(r.i64()?)?, id)
            }
            SortKey::Title => {
                return Some(Self::Title(String::from_utf8(r.rest().to_vec()).ok()?, id));
            }
        };
        r.rest().is_empty().then_some(after)
    }
}

/// The version of the list cursor's payload layout.
const CURSOR_FORMAT: u8 = 1;

/// A list query as sent: checked, its cursor not yet opened (that needs the user).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    pub complete: Option<bool>,
    /// `None`: every task of the user (after the cursor, if any).
    pub limit: Option<i64>,
    pub offset: i64,
    pub sort: Sort,
    pub q: Option<Search>,
    pub cursor: Option<String>,
}

/// A list query as a store runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub complete: Option<bool>,
    pub limit: Option<i64>,
    pub offset: i64,
    pub sort: Sort,
    pub q: Option<Search>,
    /// Continue after this position (keyset).
    pub after: Option<After>,
}

const CURSOR_LOC: &[&str] = &["query", "cursor"];

impl ListParams {
    /// Parses a raw query string. Unknown parameters are ignored; when one is repeated the
    /// last value counts.
    pub fn parse(query: Option<&str>) -> Result<Self, Vec<FieldError>> {
        let mut raw: [Option<Cow<str>>; 6] = Default::default();
        const NAMES: [&str; 6] = ["complete", "limit", "offset", "sort", "q", "cursor"];
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if let Some(i) = NAMES.iter().position(|n| *n == key) {
                raw[i] = Some(value);
            }
        }
        let [complete, limit, offset, sort, q, cursor] = raw;
        let mut errors = Vec::new();
        let mut params = Self::default();
        if let Some(value) = complete {
            match &*value {
                "true" => params.complete = Some(true),
                "false" => params.complete = Some(false),
                _ => errors.push(FieldError::new(
                    &["query", "complete"],
                    "bool_parsing",
                    "Input should be true or false",
                )),
            }
        }
        if let Some(value) = limit {
            match parse_integer(&["query", "limit"], &value, 1) {
                Ok(n) if n > LIST_LIMIT_MAX => errors.push(FieldError::new(
                    &["query", "limit"],
                    "less_than_equal",
                    "Input should be less than or equal to 1000",
                )),
                Ok(n) => params.limit = Some(n),
                Err(e) => errors.push(e),
            }
        }
        let offset_given = offset.is_some();
        if let Some(value) = offset {
            match parse_integer(&["query", "offset"], &value, 0) {
                Ok(n) => params.offset = n,
                Err(e) => errors.push(e),
            }
        }
        if let Some(value) = sort {
            match Sort::parse(&value) {
                Some(sort) => params.sort = sort,
                None => errors.push(FieldError::new(
                    &["query", "sort"],
                    "enum",
                    "Input should be 'id', 'created_at', 'updated_at' or 'title', optionally prefixed with '-'",
                )),
            }
        }
        if let Some(value) = q {
            match search(value.into_owned()) {
                Ok(q) => params.q = Some(q),
                Err(e) => errors.push(e),
            }
        }
        if let Some(value) = cursor {
            if offset_given {
                errors.push(FieldError::new(
                    CURSOR_LOC,
                    "value_error",
                    "Value error, cursor cannot be combined with offset",
                ));
            } else {
                params.cursor = Some(value.into_owned());
            }
        }
        if errors.is_empty() {
            Ok(params)
        } else {
            Err(errors)
        }
    }

    /// Opens the cursor, if any, for `user`: 422 when it is malformed, forged, or made
    /// for another user, filter, sort or `q`.
    pub fn open(self, key: &CursorKey, user: &str) -> Result<Listing, FieldError> {
        let after = match &self.cursor {
            None => None,
            Some(cursor) => Some(
                key.open(
                    Kind::List,
                    user,
                    &context(self.complete, self.sort, self.q.as_ref()),
                    cursor,
                )
                .and_then(|payload| After::decode(&payload, self.sort.key))
                .ok_or_else(malformed_cursor)?,
            ),
        };
        Ok(Listing {
            complete: self.complete,
            limit: self.limit,
            offset: self.offset,
            sort: self.sort,
            q: self.q,
            after,
        })
    }
}

impl Listing {
    /// The cursor that continues after `last`, for `user`.
    pub fn cursor_after(&self, key: &CursorKey, user: &str, last: &Task) -> String {
        let payload = After::of(last, self.sort.key).encode();
        key.seal(
            Kind::List,
            user,
            &context(self.complete, self.sort, self.q.as_ref()),
            &payload,
        )
    }
}

/// What a list cursor is bound to, besides its user (`q` is never empty, so an empty
/// part means "no q").
fn context(complete: Option<bool>, sort: Sort, q: Option<&Search>) -> [&[u8]; 3] {
    let complete: &[u8] = match complete {
        None => b"",
        Some(true) => b"true",
        Some(false) => b"false",
    };
    [
        complete,
        sort.as_str().as_bytes(),
        q.map_or(&b""[..], |q| q.raw.as_bytes()),
    ]
}

pub fn malformed_cursor() -> FieldError {
    FieldError::new(
        CURSOR_LOC,
        "value_error",
        "Value error, not a cursor this list issued: use next_cursor as given, with the same complete, sort and q",
    )
}

/// `q`: 1–200 characters, no NUL.
fn search(raw: String) -> Result<Search, FieldError> {
    const LOC: &[&str] = &["query", "q"];
    let chars = raw.chars().count();
    if chars == 0 {
        return Err(FieldError::new(
            LOC,
            "string_too_short",
            "String should have at least 1 character",
        ));
    }
    if chars > QUERY_MAX_CHARS {
        return Err(FieldError::new(
            LOC,
            "string_too_long",
            "String should have at most 200 characters",
        ));
    }
    if raw.contains('\0') {
        return Err(FieldError::new(
            LOC,
            "value_error",
            "Value error, must not contain the NUL character",
        ));
    }
    Ok(Search {
        folded: fold(&raw),
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: i64, title: &str, micros: i64) -> Task {
        let at = DateTime::from_timestamp_micros(micros).unwrap();
        Task {
            id,
            user_id: "u".into(),
            title: title.into(),
            description: None,
            complete: false,
            created_at: at,
            updated_at: at,
            version: 1,
        }
    }

    #[test]
    fn folding_is_unicode_full_case_folding_without_normalization() {
        assert_eq!(fold("STRASSE"), fold("straße"));
        assert_eq!(fold("Straße"), "strasse");
        assert_eq!(fold("ΣΊΣΥΦΟΣ"), fold("σίσυφος"));
        assert_eq!(fold("ẞ"), "ss");
        assert_ne!(fold("cafe"), fold("café"));
        assert_ne!(fold("\u{e9}"), fold("e\u{301}"));
        assert_eq!(fold("İ"), "i\u{307}");
        assert_eq!(fold("😀 OK"), "😀 ok");
    }

    #[test]
    fn every_sort_parses_from_its_name_and_has_its_own_index() {
        let mut seen = std::collections::BTreeSet::new();
        for sort in Sort::ALL {
            assert_eq!(Sort::parse(sort.as_str()), Some(sort));
            assert_eq!(Sort::ALL[sort.index()], sort);
            assert!(seen.insert(sort.index()));
        }
        for bad in ["", "-", "+id", "ID", "--id", "title ", "priority"] {
            assert_eq!(Sort::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Sort::default().as_str(), "id");
    }

    #[test]
    fn positions_round_trip_through_their_encoding() {
        let t = task(42, "héllo", 1_767_225_600_123_456);
        for key in [
            SortKey::Id,
            SortKey::CreatedAt,
            SortKey::UpdatedAt,
            SortKey::Title,
        ] {
            let after = After::of(&t, key);
            assert_eq!(After::decode(&after.encode(), key), Some(after.clone()));
        }
        // A position for one key does not decode as another's.
        let by_id = After::of(&t, SortKey::Id).encode();
        assert_eq!(After::decode(&by_id, SortKey::CreatedAt), None);
        let by_time = After::of(&t, SortKey::CreatedAt).encode();
        assert_eq!(After::decode(&by_time, SortKey::Id), None);
        assert_eq!(After::decode(&[9], SortKey::Id), None);
        assert_eq!(After::decode(&[], SortKey::Title), None);
    }

    #[test]
    fn a_cursor_opens_only_for_the_same_user_filter_sort_and_q() {
        let key = CursorKey::new(b"k");
        let params = ListParams::parse(Some("limit=2&sort=-title&q=Milk&complete=false")).unwrap();
        let listing = params.clone().open(&key, "alice").unwrap();
        let cursor = listing.cursor_after(&key, "alice", &task(7, "b", 0));
        let next = |query: &str, user: &str| {
            ListParams::parse(Some(&format!("{query}&cursor={cursor}")))
                .unwrap()
                .open(&key, user)
        };
        let opened = next("sort=-title&q=Milk&complete=false", "alice").unwrap();
        assert_eq!(opened.after, Some(After::Title("b".into(), 7)));
        assert_eq!(opened.limit, None);
        for (query, user) in [
            ("sort=-title&q=Milk&complete=false", "bob"),
            ("sort=title&q=Milk&complete=false", "alice"),
            ("sort=-title&q=milk&complete=false", "alice"),
            ("sort=-title&complete=false", "alice"),
            ("sort=-title&q=Milk&complete=true", "alice"),
            ("sort=-title&q=Milk", "alice"),
        ] {
            assert_eq!(
                next(query, user),
                Err(malformed_cursor()),
                "{query} as {user}"
            );
        }
    }

    #[test]
    fn the_list_query_reports_each_bad_parameter() {
        assert_eq!(ListParams::parse(None), Ok(ListParams::default()));
        let errors = ListParams::parse(Some("complete=1&limit=0&offset=-1&sort=name&q=&cursor=x"))
            .unwrap_err();
        let got: Vec<_> = errors.iter().map(|e| (e.loc[1], e.kind)).collect();
        assert_eq!(
            got,
            [
                ("complete", "bool_parsing"),
                ("limit", "greater_than_equal"),
                ("offset", "greater_than_equal"),
                ("sort", "enum"),
                ("q", "string_too_short"),
                ("cursor", "value_error"),
            ]
        );
        assert_eq!(
            ListParams::parse(Some("limit=1001")).unwrap_err()[0].kind,
            "less_than_equal"
        );
        assert_eq!(
            ListParams::parse(Some("limit=1000")).unwrap().limit,
            Some(1000)
        );
        let long = "é".repeat(201);
        assert_eq!(
            ListParams::parse(Some(&format!("q={long}"))).unwrap_err()[0].kind,
            "string_too_long"
        );
        assert!(ListParams::parse(Some(&format!("q={}", "é".repeat(200)))).is_ok());
        assert_eq!(
            ListParams::parse(Some("q=a%00b")).unwrap_err()[0].kind,
            "value_error"
        );
        let q = ListParams::parse(Some("q=STRASSE")).unwrap().q.unwrap();
        assert_eq!((q.raw.as_str(), q.folded.as_str()), ("STRASSE", "strasse"));
    }
}
