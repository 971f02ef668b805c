//! The change feed endpoint: open the cursor, one store call, the answer.

use super::json::JsonBody;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{ChangesQuery, Owner};
use super::openapi::{AccessErrors, CursorExpired, Invalid};
use crate::error::ApiError;
use crate::storage::{self, within_deadline};
use crate::sync::{self, Feed, Position, Refused};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(changes))
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Malformed => ApiError::validation(sync::malformed_cursor()),
            Refused::Expired => ApiError::CursorExpired,
        }
    }
}

/// What changed in the user's tasks since a cursor (without one: every task).
#[utoipa::path(get, path = "/api/{user_id}/changes", tag = "sync", operation_id = "list_changes",
    security(("bearerAuth" = [])),
    params(
        ("user_id" = String, Path, description = "The owner's user id: the token's user (`user_id` claim, else `sub`)"),
        ("cursor" = Option<String>, Query, description = "The `cursor` of an earlier answer (or an event id): the changes after it. Without it, a full sync: every task, as `upsert`. Valid for `SYNC_RETENTION` (default 30 days) after it was issued; 410 when older, or when deletions it may need have been purged"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "At most this many changes (default 500); `has_more` says whether more wait"),
    ),
    responses(
        (status = 200, description = "The changes, in order, each task at most once and in its latest state", body = Feed),
        CursorExpired, AccessErrors, Invalid))]
async fn changes(
    State(app): State<AppState>,
    Owner(user): Owner,
    ChangesQuery(params): ChangesQuery,
) -> Result<JsonBody<Feed>, ApiError> {
    let now = storage::now();
    let from = params
        .cursor
        .map(|cursor| Position::open(&app.cursors, &user, &cursor, now, app.sync_retention))
        .transpose()?;
    // A full sync's first page holds the user's tasks only: deletions before it are of
    // tasks the client cannot hold.
    let since = from.map_or(0, |from| from.counter);
    let page = within_deadline(
        app.store
            .changes(&user, since, from.is_some(), params.limit),
    )
    .await?;
    Ok(JsonBody(sync::answer(
        page,
        from,
        now,
        &app.cursors,
        &user,
    )?))
}
