//! Extractors that turn a request into validated values, in the contract's check order.
//!
//! Handlers take them in this order, and axum runs them in argument order, so the first
//! failing check answers: token (401) → path owner (403) → `task_id`, query and body
//! (400/415/422); the store then answers 404 → 403 for the task.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use super::AppState;
use crate::auth::{Identity, bearer_token};
use crate::error::{ApiError, FieldError};
use crate::idempotency::IdempotencyKey;
use crate::lists::ListParams;
use crate::sync::ChangesParams;
use crate::tasks::parse_task_id;
use crate::versions::TagList;

/// Positions of the path parameters in `/api/{user_id}/tasks/{task_id}`.
pub const USER_ID_SEGMENT: usize = 2;
const TASK_ID_SEGMENT: usize = 4;

/// The authenticated caller, who is also the `{user_id}` of the path.
pub struct Owner(pub String);

impl FromRequestParts<AppState> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(identity) = Caller::from_request_parts(parts, state).await?;
        Ok(Self(identity.user))
    }
}

/// The authenticated caller and their token's lifetime; the caller is also the
/// `{user_id}` of the path.
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let identity = authenticate(parts, state).await?;
        owns_path(&parts.uri, &identity.user)?;
        Ok(Self(identity))
    }
}

/// The bearer token's caller, in the contract's order: 429 while the client's address is
/// over the failed-authentication limit (before any signature work), 401 (a failure is
/// counted against the address), then the caller's own limit (429).
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<Identity, ApiError> {
    let limits = &state.limits;
    let address = limits.client_address(&parts.extensions, &parts.headers);
    limits.check_address(address)?;
    let verified = match bearer_token(&parts.headers) {
        Ok(token) => state.verifier.identify(token).await,
        Err(refused) => Err(refused),
    };
    let identity = match verified {
        Ok(identity) => identity,
        Err(refused @ ApiError::AuthInvalid(_)) => {
            limits.failed_authentication(address).await?;
            return Err(refused);
        }
        Err(other) => return Err(other),
    };
    limits.admit(&identity.user).await?;
    Ok(identity)
}

/// 403 unless `user` is the path's `{user_id}`.
pub fn owns_path(uri: &axum::http::Uri, user: &str) -> Result<(), ApiError> {
    tracing::Span::current().record("user_id", user);
    // Compared as bytes: a segment that does not decode to UTF-8 is simply not the
    // caller's id (403), rather than a malformed request.
    match path_segment(uri, USER_ID_SEGMENT) {
        Some(path_user) if *path_user == *user.as_bytes() => Ok(()),
        _ => Err(ApiError::Forbidden),
    }
}

/// `{task_id}`: an integer from 1 to 2^63−1, else 422.
pub struct TaskId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for TaskId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let raw = path_segment(&parts.uri, TASK_ID_SEGMENT).unwrap_or_default();
        // Bytes that are not UTF-8 are not digits either: parsing them as empty gives the
        // same "not an integer" answer.
        parse_task_id(std::str::from_utf8(&raw).unwrap_or_default())
            .map(Self)
            .map_err(ApiError::validation)
    }
}

/// The list query (`complete`, `limit`, `offset`, `sort`, `q`, `cursor`).
pub struct ListQuery(pub ListParams);

impl<S: Send + Sync> FromRequestParts<S> for ListQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        ListParams::parse(parts.uri.query())
            .map(Self)
            .map_err(ApiError::Validation)
    }
}

/// The change feed query (`cursor`, `limit`).
pub struct ChangesQuery(pub ChangesParams);

impl<S: Send + Sync> FromRequestParts<S> for ChangesQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        ChangesParams::parse(parts.uri.query())
            .map(Self)
            .map_err(ApiError::Validation)
    }
}

/// `If-Match`, if sent: 400 when it is not `*` or a list of entity tags.
pub struct IfMatch(pub Option<TagList>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        tag_list(parts, &header::IF_MATCH, "If-Match").map(Self)
    }
}

/// `If-None-Match`, if sent: 400 when it is not `*` or a list of entity tags.
pub struct IfNoneMatch(pub Option<TagList>);

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        tag_list(parts, &header::IF_NONE_MATCH, "If-None-Match").map(Self)
    }
}

fn tag_list(
    parts: &Parts,
    name: &header::HeaderName,
    display: &'static str,
) -> Result<Option<TagList>, ApiError> {
    TagList::parse(parts.headers.get_all(name))
        .transpose()
        .map_err(|_| {
            ApiError::BadRequest(
                format!("{display} must be * or a list of entity tags such as \"3\"").into(),
            )
        })
}

pub static IDEMPOTENCY_KEY: header::HeaderName = header::HeaderName::from_static("idempotency-key");

/// `Idempotency-Key`, if sent: 400 unless it is one header of 1–255 visible ASCII
/// characters other than `"` (optionally in quotes).
pub struct IdempotencyKeyHeader(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let mut values = parts.headers.get_all(&IDEMPOTENCY_KEY).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return match parts.headers.contains_key(&IDEMPOTENCY_KEY) {
                false => Ok(Self(None)),
                true => Err(ApiError::BadRequest(
                    "Send one Idempotency-Key header, not several".into(),
                )),
            };
        };
        IdempotencyKey::parse(value)
            .map(|key| Self(Some(key)))
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "Idempotency-Key must be 1-255 visible ASCII characters other than '\"', optionally in quotes"
                        .into(),
                )
            })
    }
}

/// A JSON object body: 415 when not sent as JSON, 413 over the limit, 400 when not JSON,
/// 422 when JSON but not an object (or no body at all).
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let declared_json = req.headers().get(header::CONTENT_TYPE).map(is_json);
        if declared_json == Some(false) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
                _ => ApiError::BadRequest("Could not read the request body".into()),
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::validation(FieldError::missing(&["body"])));
        }
        if declared_json.is_none() {
            return Err(ApiError::UnsupportedMediaType);
        }
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::validation(FieldError::new(
                &["body"],
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from",
            ))),
            Err(e) => Err(ApiError::BadRequest(
                format!("Request body is not valid JSON: {e}").into(),
            )),
        }
    }
}

/// `application/json`, any parameters, or any `application/*+json`.
fn is_json(value: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// The percent-decoded bytes of one segment of the request path.
///
/// Read from the URI rather than through axum's `Path`, which refuses the whole request
/// when any parameter is not UTF-8 and so cannot keep the contract's check order.
pub fn path_segment(uri: &axum::http::Uri, index: usize) -> Option<Cow<'_, [u8]>> {
    uri.path()
        .split('/')
        .nth(index)
        .map(|s| percent_decode_str(s).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/xml",
            "json",
            "application/+json",
            "multipart/form-data",
        ] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        let uri: axum::http::Uri = "/api/a%2Fb%20c/tasks/7".parse().unwrap();
        assert_eq!(&*path_segment(&uri, USER_ID_SEGMENT).unwrap(), b"a/b c");
        assert_eq!(&*path_segment(&uri, TASK_ID_SEGMENT).unwrap(), b"7");
        let uri: axum::http::Uri = "/api/%FF/tasks".parse().unwrap();
        assert_eq!(&*path_segment(&uri, USER_ID_SEGMENT).unwrap(), &[0xff]);
    }
}
