//! The six task endpoints. Each is: extract (checks in contract order), one store call,
//! then the conditional-request rules that need the stored task.

use super::json::JsonBody;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{
    IdempotencyKeyHeader, IfMatch, IfNoneMatch, JsonObject, ListQuery, Owner, TaskId,
};
use super::openapi::{
    AccessErrors, BodyErrors, Conditional, CreateInvalid, Invalid, KeyInUse, NewTaskBody,
    NotModified, PatchTaskBody, ReplaceTaskBody, TaskNotFound, WritePreconditions,
};
use crate::error::ApiError;
use crate::idempotency::{KeyReused as Reused, Outcome, remembered_since};
use crate::storage::{self, StoreError, within_deadline};
use crate::tasks::{NewTask, Task, TaskList, TaskPatch, TaskReplace};
use crate::versions::{TagList, VersionGuard, list_etag, task_etag};

pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The task routes, each registered with its OpenAPI description.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, replace, update, remove))
}

const USER_ID: &str = "The owner's user id: the token's user (`user_id` claim, else `sub`)";
const TASK_ID: &str = "The task's id: an integer from 1 to 2^63−1";
const IF_MATCH: &str = "Write only if the task is at one of these versions (strong comparison: `\"3\"`), or exists (`*`); else 412. Required when the service runs with `REQUIRE_IF_MATCH=true` (else 428)";

/// List the user's tasks: a page, sorted, searched.
#[utoipa::path(get, path = "/api/{user_id}/tasks", tag = "tasks", operation_id = "list_tasks",
    security(("bearerAuth" = [])),
    params(
        ("user_id" = String, Path, description = USER_ID),
        ("complete" = Option<bool>, Query, description = "Only complete (`true`) or incomplete (`false`) tasks"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "At most this many tasks, and a `next_cursor` for the rest; without it, all"),
        ("offset" = Option<i64>, Query, minimum = 0, description = "Skip this many tasks first (not with `cursor`)"),
        ("sort" = Option<String>, Query, pattern = "^-?(id|created_at|updated_at|title)$", description = "Order by `id` (default), `created_at`, `updated_at` or `title` (by Unicode code point); `-` first for descending. Ties go by id, in the same direction"),
        ("q" = Option<String>, Query, min_length = 1, max_length = 200, description = "Only tasks whose title or description contains this, ignoring case: both sides are compared after Unicode full case folding, without normalization (`STRASSE` finds `straße`; `cafe` does not find `café`)"),
        ("cursor" = Option<String>, Query, description = "A `next_cursor` from an earlier page of this list (same `complete`, `sort` and `q`): the tasks after that page's last one, however many were created or deleted since. `limit` may differ"),
        ("If-None-Match" = Option<String>, Header, nullable = false, pattern = r#"^([*]|(W/)?"[!#-~]*"( *, *(W/)?"[!#-~]*")*)$"#, description = "The list's `ETag` from an earlier answer: 304 if none of the user's tasks was created, changed or deleted since (weak comparison; one tag for every list URL of the user)"),
    ),
    responses((status = 200, description = "The tasks and their count", body = TaskList,
        headers(("ETag" = String, description = "Weak tag of the user's tasks: changes whenever any of them is created, changed or deleted"),
                ("Link" = String, description = "With `limit`, when another page follows: `<url>; rel=\"next\"`, the URL of the next page (relative)"))),
        NotModified, Conditional, AccessErrors, Invalid))]
async fn list(
    State(app): State<AppState>,
    Owner(user): Owner,
    ListQuery(params): ListQuery,
    IfNoneMatch(if_none_match): IfNoneMatch,
    uri: Uri,
) -> Result<Response, ApiError> {
    let listing = params
        .open(&app.cursors, &user)
        .map_err(ApiError::validation)?;
    // Revalidation reads the user's change counter only, never the tasks.
    if let Some(tags) = &if_none_match {
        let marker = within_deadline(app.store.change_marker(&user)).await?;
        if tags.matches_list(marker) {
            return Ok(not_modified(list_etag(marker)));
        }
    }
    let page = within_deadline(app.store.list(&user, &listing)).await?;
    let next_cursor = match (listing.limit, page.tasks.last()) {
        (None, _) => None,
        (Some(_), Some(last)) if page.has_more => {
            Some(Some(listing.cursor_after(&app.cursors, &user, last)))
        }
        (Some(_), _) => Some(None),
    };
    let link = next_cursor
        .as_ref()
        .and_then(|c| c.as_deref())
        .map(|cursor| [(header::LINK, next_link(&uri, cursor))]);
    let body = TaskList {
        count: page.tasks.len(),
        tasks: page.tasks,
        next_cursor,
    };
    Ok((
        [(header::ETAG, list_etag(page.marker))],
        link,
        JsonBody(body),
    )
        .into_response())
}

/// `Link: <…>; rel="next"`: this request's URL with `cursor` set (and no `offset`).
fn next_link(uri: &Uri, cursor: &str) -> HeaderValue {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if key != "cursor" && key != "offset" {
            query.append_pair(&key, &value);
        }
    }
    query.append_pair("cursor", cursor);
    let link = format!("<{}?{}>; rel=\"next\"", uri.path(), query.finish());
    // The path came in as a valid URI and the query is percent-encoded: visible ASCII.
    HeaderValue::from_str(&link).unwrap_or_else(|_| HeaderValue::from_static("</>; rel=\"next\""))
}

/// Create a task.
#[utoipa::path(post, path = "/api/{user_id}/tasks", tag = "tasks", operation_id = "create_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = r#"^[!#-~]{1,255}$|^"[!#-~]{1,255}"$"#, description = "1–255 visible ASCII characters other than `\"` (a quoted string counts as its content). A repeat of the same request with the same key within `IDEMPOTENCY_TTL` (default 24 h) creates nothing and gets the first answer again, with `Idempotent-Replayed: true`; a concurrent repeat waits for the first to finish")),
    request_body(content = NewTaskBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The created task (or, for a repeated key, the task as it was created)", body = Task,
         headers(("Location" = String, description = "The task's URL"),
                 ("ETag" = String, description = "The task's version as a strong tag: `\"1\"`"),
                 ("Idempotent-Replayed" = String, description = "`true` when this answers a repeated `Idempotency-Key`"))),
        AccessErrors, BodyErrors, KeyInUse, CreateInvalid))]
async fn create(
    State(app): State<AppState>,
    Owner(user): Owner,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let new = NewTask::from_json(body)?;
    let now = storage::now();
    let outcome = match key {
        None => Outcome::Created(within_deadline(app.store.create(&user, &new, now)).await?),
        Some(key) => {
            let since = remembered_since(now, app.idempotency_ttl);
            within_deadline(app.store.create_with_key(&user, &key, &new, now, since))
                .await?
                .answer(&user, &new)
                .map_err(|Reused| ApiError::IdempotencyKeyReused)?
        }
    };
    let (task, replayed) = match outcome {
        Outcome::Created(task) => (task, None),
        Outcome::Replayed(task) => (
            task,
            Some((
                IDEMPOTENT_REPLAYED.clone(),
                HeaderValue::from_static("true"),
            )),
        ),
    };
    let headers = [
        (header::LOCATION, location(&task)),
        (header::ETAG, task_etag(task.version)),
    ];
    Ok((
        StatusCode::CREATED,
        headers,
        replayed.map(|h| [h]),
        JsonBody(task),
    )
        .into_response())
}

/// Get one task.
#[utoipa::path(get, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "get_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = TASK_ID),
        ("If-None-Match" = Option<String>, Header, nullable = false, pattern = r#"^([*]|(W/)?"[!#-~]*"( *, *(W/)?"[!#-~]*")*)$"#, description = "304 if the task is still at one of these versions (weak comparison), or exists (`*`)")),
    responses((status = 200, description = "The task", body = Task,
        headers(("ETag" = String, description = "The task's version as a strong tag"))),
        NotModified, Conditional, AccessErrors, TaskNotFound, Invalid))]
async fn show(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    IfNoneMatch(if_none_match): IfNoneMatch,
) -> Result<Response, ApiError> {
    let task = within_deadline(app.store.get(&user, id)).await?;
    if if_none_match.is_some_and(|tags| tags.matches_version(task.version)) {
        return Ok(not_modified(task_etag(task.version)));
    }
    Ok(tagged(task))
}

/// Replace a task: `title` and `complete` are required, a missing `description` becomes null.
#[utoipa::path(put, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "replace_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = TASK_ID),
        ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^([*]|(W/)?"[!#-~]*"( *, *(W/)?"[!#-~]*")*)$"#, description = IF_MATCH)),
    request_body(content = ReplaceTaskBody, content_type = "application/json"),
    responses((status = 200, description = "The task as replaced", body = Task,
        headers(("ETag" = String, description = "The task's new version as a strong tag"))),
        AccessErrors, BodyErrors, TaskNotFound, WritePreconditions, Invalid))]
async fn replace(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    IfMatch(if_match): IfMatch,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let replacement = TaskReplace::from_json(body)?;
    let (guard, missing) = write_guard(if_match.as_ref(), app.require_if_match);
    let task = within_deadline(
        app.store
            .replace(&user, id, &replacement, &guard, storage::now()),
    )
    .await
    .map_err(|e| refusal(e, missing))?;
    Ok(tagged(task))
}

/// Change some fields of a task; absent fields stay as they are.
#[utoipa::path(patch, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "update_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = TASK_ID),
        ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^([*]|(W/)?"[!#-~]*"( *, *(W/)?"[!#-~]*")*)$"#, description = IF_MATCH)),
    request_body(content = PatchTaskBody, content_type = "application/json"),
    responses((status = 200, description = "The task as updated", body = Task,
        headers(("ETag" = String, description = "The task's new version as a strong tag"))),
        AccessErrors, BodyErrors, TaskNotFound, WritePreconditions, Invalid))]
async fn update(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    IfMatch(if_match): IfMatch,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let patch = TaskPatch::from_json(body)?;
    let (guard, missing) = write_guard(if_match.as_ref(), app.require_if_match);
    let task = within_deadline(app.store.patch(&user, id, &patch, &guard, storage::now()))
        .await
        .map_err(|e| refusal(e, missing))?;
    Ok(tagged(task))
}

/// Delete a task.
#[utoipa::path(delete, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "delete_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = TASK_ID),
        ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^([*]|(W/)?"[!#-~]*"( *, *(W/)?"[!#-~]*")*)$"#, description = IF_MATCH)),
    responses((status = 204, description = "Deleted; no body"), AccessErrors, Conditional, TaskNotFound, WritePreconditions, Invalid))]
async fn remove(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    IfMatch(if_match): IfMatch,
) -> Result<StatusCode, ApiError> {
    let (guard, missing) = write_guard(if_match.as_ref(), app.require_if_match);
    within_deadline(app.store.delete(&user, id, &guard))
        .await
        .map_err(|e| refusal(e, missing))?;
    Ok(StatusCode::NO_CONTENT)
}

/// The versions a write may apply to, and whether `If-Match` is missing where required.
/// A required but missing `If-Match` matches no version, so the store still answers 404
/// and 403 first, and only a write that would otherwise succeed gets 428.
fn write_guard(if_match: Option<&TagList>, required: bool) -> (VersionGuard, bool) {
    match if_match {
        Some(tags) => (tags.accepted_versions(), false),
        None if required => (VersionGuard::OneOf(Vec::new()), true),
        None => (VersionGuard::Any, false),
    }
}

/// A write's failure: a version mismatch is 412, or 428 when `If-Match` was missing.
fn refusal(error: StoreError, if_match_missing: bool) -> ApiError {
    match error {
        StoreError::VersionMismatch { .. } if if_match_missing => ApiError::PreconditionRequired,
        other => other.into(),
    }
}

/// 200 with the task and its `ETag`.
fn tagged(task: Task) -> Response {
    ([(header::ETAG, task_etag(task.version))], JsonBody(task)).into_response()
}

/// 304: no body, the current `ETag`.
fn not_modified(etag: HeaderValue) -> Response {
    (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response()
}

/// Characters kept as they are in a path segment (RFC 3986 unreserved).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The URL of a task, for the `Location` header.
fn location(task: &Task) -> HeaderValue {
    let url = format!(
        "/api/{}/tasks/{}",
        utf8_percent_encode(&task.user_id, PATH_SEGMENT),
        task.id
    );
    // Percent-encoding leaves only visible ASCII, always a valid header value.
    HeaderValue::from_str(&url).unwrap_or_else(|_| HeaderValue::from_static("/"))
}
