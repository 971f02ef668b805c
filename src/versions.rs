//! Versions and conditional requests (RFC 9110 §8.8.3 and §13): a task's `ETag`, the
//! list's `ETag`, and what `If-Match` and `If-None-Match` ask for.
//!
//! A task's version is `1` on creation and `+1` on every PUT or PATCH; its entity tag is
//! the version as a strong tag (`"3"`). The list's tag is weak and comes from the user's
//! change counter, which moves on every create, change and delete (`W/"changes-42"`),
//! so a list can be revalidated without reading a single task.

use axum::http::HeaderValue;
use axum::http::header::GetAll;

/// `ETag` of a task at `version`.
pub fn task_etag(version: i64) -> HeaderValue {
    // Digits and quotes only: always a valid header value.
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

/// The opaque part of the list's `ETag` for the user's change counter `marker`.
fn list_opaque(marker: i64) -> String {
    format!("changes-{marker}")
}

/// `ETag` of the user's task list when their change counter is `marker`.
pub fn list_etag(marker: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{}\"", list_opaque(marker)))
        .unwrap_or(HeaderValue::from_static("W/\"\""))
}

/// One entity tag of a conditional header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityTag {
    pub weak: bool,
    /// The characters between the quotes.
    pub opaque: String,
}

/// A parsed `If-Match` or `If-None-Match`: `*`, or a list of entity tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagList {
    Any,
    Tags(Vec<EntityTag>),
}

/// A header that is not `"*" / 1#entity-tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed;

impl TagList {
    /// Parses every line of the header as one list (RFC 9110 §5.3). `None` when absent.
    pub fn parse(values: GetAll<'_, HeaderValue>) -> Option<Result<Self, Malformed>> {
        let mut values = values.iter().peekable();
        values.peek()?;
        let mut tags = Vec::new();
        let mut any = false;
        for value in values {
            match parse_line(value.as_bytes()) {
                Ok(None) => any = true,
                Ok(Some(mut line)) => tags.append(&mut line),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(match (any, tags.is_empty()) {
            (true, true) => Ok(Self::Any),
            // `*` is a whole field value, never a list member.
            (true, false) => Err(Malformed),
            (false, true) => Err(Malformed),
            (false, false) => Ok(Self::Tags(tags)),
        })
    }

    /// `If-Match` (strong comparison): the versions it accepts, `None` meaning any (`*`).
    /// A weak tag, or one that is no canonical version number (`"abc"`, `"01"`), accepts
    /// none.
    pub fn accepted_versions(&self) -> VersionGuard {
        match self {
            Self::Any => VersionGuard::Any,
            Self::Tags(tags) => VersionGuard::OneOf(
                tags.iter()
                    .filter(|tag| !tag.weak)
                    .filter_map(|tag| parse_version(&tag.opaque))
                    .collect(),
            ),
        }
    }

    /// `If-None-Match` on one task (weak comparison): whether it matches `version`.
    pub fn matches_version(&self, version: i64) -> bool {
        self.matches_opaque(&version.to_string())
    }

    /// `If-None-Match` on the list (weak comparison) with change counter `marker`.
    pub fn matches_list(&self, marker: i64) -> bool {
        self.matches_opaque(&list_opaque(marker))
    }

    fn matches_opaque(&self, opaque: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Tags(tags) => tags.iter().any(|tag| tag.opaque == opaque),
        }
    }
}

/// What a write requires of the task's current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionGuard {
    /// No condition (no `If-Match`, or `If-Match: *`).
    Any,
    /// The version must be one of these; an empty list never matches.
    OneOf(Vec<i64>),
}

/// A version as its tag spells it: digits only, no leading zero, from 1 to 2^63−1.
fn parse_version(opaque: &str) -> Option<i64> {
    let canonical = !opaque.is_empty()
        && opaque.bytes().all(|b| b.is_ascii_digit())
        && !opaque.starts_with('0');
    canonical.then(|| opaque.parse().ok()).flatten()
}

/// One header line: `Ok(None)` for `*`, else its tags. Empty list elements are allowed
/// and skipped (RFC 9110 §5.6.1), but a line must hold at least one tag.
fn parse_line(line: &[u8]) -> Result<Option<Vec<EntityTag>>, Malformed> {
    let trimmed = trim_ows(line);
    if trimmed == b"*" {
        return Ok(None);
    }
    let mut tags = Vec::new();
    let mut rest = trimmed;
    loop {
        rest = trim_ows(rest);
        if let Some(after) = rest.strip_prefix(b",") {
            rest = after;
            continue;
        }
        if rest.is_empty() {
            break;
        }
        let (tag, after) = parse_tag(rest)?;
        tags.push(tag);
        rest = trim_ows(after);
        match rest.first() {
            None => break,
            Some(b',') => rest = &rest[1..],
            Some(_) => return Err(Malformed),
        }
    }
    if tags.is_empty() {
        return Err(Malformed);
    }
    Ok(Some(tags))
}

/// `entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE`, `etagc = %x21 / %x23-7E / obs-text`.
fn parse_tag(input: &[u8]) -> Result<(EntityTag, &[u8]), Malformed> {
    let (weak, input) = match input.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, input),
    };
    let body = input.strip_prefix(b"\"").ok_or(Malformed)?;
    let end = body.iter().position(|&b| b == b'"').ok_or(Malformed)?;
    let opaque = &body[..end];
    if !opaque
        .iter()
        .all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
    {
        return Err(Malformed);
    }
    let tag = EntityTag {
        weak,
        // obs-text bytes are kept as Latin-1 characters: they can match nothing we issue.
        opaque: opaque.iter().map(|&b| b as char).collect(),
    };
    Ok((tag, &body[end + 1..]))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn parse(lines: &[&[u8]]) -> Option<Result<TagList, Malformed>> {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("if-match", HeaderValue::from_bytes(line).unwrap());
        }
        TagList::parse(headers.get_all("if-match"))
    }

    fn tag(weak: bool, opaque: &str) -> EntityTag {
        EntityTag {
            weak,
            opaque: opaque.into(),
        }
    }

    #[test]
    fn absent_star_and_lists() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[b"*"]), Some(Ok(TagList::Any)));
        assert_eq!(parse(&[b" * "]), Some(Ok(TagList::Any)));
        assert_eq!(
            parse(&[b"\"1\", W/\"2\",,\"\"", b"\"x\""]),
            Some(Ok(TagList::Tags(vec![
                tag(false, "1"),
                tag(true, "2"),
                tag(false, ""),
                tag(false, "x")
            ])))
        );
    }

    #[test]
    fn malformed_headers() {
        for bad in [
            &b""[..],
            b" ",
            b",",
            b"1",
            b"\"1",
            b"W/1",
            b"w/\"1\"",
            b"\"1\" \"2\"",
            b"\"a b\"",
            b"\"1\"x",
            b"*, \"1\"",
            b"**",
        ] {
            assert_eq!(parse(&[bad]), Some(Err(Malformed)), "{:?}", bad);
        }
        assert_eq!(parse(&[b"*", b"\"1\""]), Some(Err(Malformed)));
    }

    #[test]
    fn if_match_accepts_only_strong_canonical_versions() {
        let list = parse(&[b"\"3\", W/\"4\", \"abc\", \"05\", \"0\", \"99999999999999999999\""])
            .unwrap()
            .unwrap();
        assert_eq!(list.accepted_versions(), VersionGuard::OneOf(vec![3]));
        assert_eq!(TagList::Any.accepted_versions(), VersionGuard::Any);
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let list = parse(&[b"W/\"7\""]).unwrap().unwrap();
        assert!(list.matches_version(7));
        assert!(!list.matches_version(8));
        assert!(TagList::Any.matches_version(1));
        let list = parse(&[b"W/\"changes-5\""]).unwrap().unwrap();
        assert!(list.matches_list(5));
        assert!(!list.matches_list(6));
        assert!(!list.matches_version(5));
    }

    #[test]
    fn etags_are_well_formed() {
        assert_eq!(task_etag(12), "\"12\"");
        assert_eq!(list_etag(0), "W/\"changes-0\"");
    }
}
