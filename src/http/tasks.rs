//! The six task endpoints. Each is: extract (checks in contract order), one store call.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::AppState;
use super::extract::{JsonObject, ListQuery, Owner, TaskId};
use crate::error::ApiError;
use crate::storage;
use crate::tasks::{NewTask, Task, TaskList, TaskPatch, TaskReplace};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/{user_id}/tasks", get(list).post(create))
        .route(
            "/api/{user_id}/tasks/{task_id}",
            get(show).put(replace).patch(update).delete(remove),
        )
}

async fn list(
    State(app): State<AppState>,
    Owner(user): Owner,
    ListQuery(filter): ListQuery,
) -> Result<Json<TaskList>, ApiError> {
    Ok(Json(app.store.list(&user, &filter).await?.into()))
}

async fn create(
    State(app): State<AppState>,
    Owner(user): Owner,
    JsonObject(body): JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let new = NewTask::from_json(body)?;
    let task = app.store.create(&user, &new, storage::now()).await?;
    let location = [(header::LOCATION, location(&task))];
    Ok((StatusCode::CREATED, location, Json(task)))
}

async fn show(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(app.store.get(&user, id).await?))
}

async fn replace(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    JsonObject(body): JsonObject,
) -> Result<Json<Task>, ApiError> {
    let replacement = TaskReplace::from_json(body)?;
    Ok(Json(
        app.store
            .replace(&user, id, &replacement, storage::now())
            .await?,
    ))
}

async fn update(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
    JsonObject(body): JsonObject,
) -> Result<Json<Task>, ApiError> {
    let patch = TaskPatch::from_json(body)?;
    Ok(Json(
        app.store.patch(&user, id, &patch, storage::now()).await?,
    ))
}

async fn remove(
    State(app): State<AppState>,
    Owner(user): Owner,
    TaskId(id): TaskId,
) -> Result<StatusCode, ApiError> {
    app.store.delete(&user, id).await?;
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
