//! The six task endpoints. Each is: extract (checks in contract order), one store call.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{JsonObject, ListQuery, Owner, TaskId};
use super::openapi::{
    AccessErrors, BodyErrors, Invalid, NewTaskBody, PatchTaskBody, ReplaceTaskBody, TaskNotFound,
};
use crate::error::ApiError;
use crate::storage::{self, within_deadline};
use crate::tasks::{NewTask, Task, TaskList, TaskPatch, TaskReplace};

/// The task routes, each registered with its OpenAPI description.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, replace, update, remove))
}

const USER_ID: &str = "The owner's user id: the token's user (`user_id` claim, else `sub`)";

/// List the user's tasks, oldest first.
#[utoipa::path(get, path = "/api/{user_id}/tasks", tag = "tasks", operation_id = "list_tasks",
    security(("bearerAuth" = [])),
    params(
        ("user_id" = String, Path, description = USER_ID),
        ("complete" = Option<bool>, Query, description = "Only complete (`true`) or incomplete (`false`) tasks"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "At most this many tasks; without it, all"),
        ("offset" = Option<i64>, Query, minimum = 0, description = "Skip this many tasks first"),
    ),
    responses((status = 200, description = "The tasks and their count", body = TaskList), AccessErrors, Invalid))]
async fn list(
    State(app): State<AppState>,
    Owner(user): Owner,
    ListQuery(filter): ListQuery,
) -> Result<Json<TaskList>, ApiError> {
    Ok(Json(
        within_deadline(app.store.list(&user, &filter))
            .await?
            .into(),
    ))
}

/// Create a task.
#[utoipa::path(post, path = "/api/{user_id}/tasks", tag = "tasks", operation_id = "create_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID)),
    request_body(content = NewTaskBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The created task", body = Task,
         headers(("Location" = String, description = "The task's URL"))),
        AccessErrors, BodyErrors, Invalid))]
async fn create(
    State(app): State<AppState>,
    Owner(user): Owner,
    JsonObject(body): JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let new = NewTask::from_json(body)?;
    let task = within_deadline(app.store.create(&user, &new, storage::now())).await?;
    let location = [(header::LOCATION, location(&task))];
    Ok((StatusCode::CREATED, location, Json(task)))
}

/// Get one task.
#[utoipa::path(get, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "get_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = "The task's id: an integer from 1 to 2^63−1")),
    responses((status = 200, description = "The task", body = Task), AccessErrors, TaskNotFound, Invalid))]
async fn show(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(within_deadline(app.store.get(&user, id)).await?))
}

/// Replace a task: `title` and `complete` are required, a missing `description` becomes null.
#[utoipa::path(put, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "replace_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = "The task's id: an integer from 1 to 2^63−1")),
    request_body(content = ReplaceTaskBody, content_type = "application/json"),
    responses((status = 200, description = "The task as replaced", body = Task),
        AccessErrors, BodyErrors, TaskNotFound, Invalid))]
async fn replace(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    JsonObject(body): JsonObject,
) -> Result<Json<Task>, ApiError> {
    let replacement = TaskReplace::from_json(body)?;
    Ok(Json(
        within_deadline(app.store.replace(&user, id, &replacement, storage::now())).await?,
    ))
}

/// Change some fields of a task; absent fields stay as they are.
#[utoipa::path(patch, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "update_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = "The task's id: an integer from 1 to 2^63−1")),
    request_body(content = PatchTaskBody, content_type = "application/json"),
    responses((status = 200, description = "The task as updated", body = Task),
        AccessErrors, BodyErrors, TaskNotFound, Invalid))]
async fn update(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    JsonObject(body): JsonObject,
) -> Result<Json<Task>, ApiError> {
    let patch = TaskPatch::from_json(body)?;
    Ok(Json(
        within_deadline(app.store.patch(&user, id, &patch, storage::now())).await?,
    ))
}

/// Delete a task.
#[utoipa::path(delete, path = "/api/{user_id}/tasks/{task_id}", tag = "tasks", operation_id = "delete_task",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = USER_ID), ("task_id" = i64, Path, minimum = 1, description = "The task's id: an integer from 1 to 2^63−1")),
    responses((status = 204, description = "Deleted; no body"), AccessErrors, TaskNotFound, Invalid))]
async fn remove(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
) -> Result<StatusCode, ApiError> {
    within_deadline(app.store.delete(&user, id)).await?;
    Ok(StatusCode::NO_CONTENT)
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
