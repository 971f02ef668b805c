//! The OpenAPI 3.1 document: operations come from the handlers' `#[utoipa::path]`
//! annotations (registered together with their routes, so nothing can be routed and not
//! documented); request and error schemas are declared here.
//!
//! The body schemas restate the rules of `crate::tasks` as JSON Schema, so that clients
//! and property-based testers know them. The patterns spell out exactly the characters
//! `char::is_whitespace` treats as whitespace, because `\s` differs between regex dialects.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::error::FieldError;
use crate::sync::{Change, Feed};
use crate::tasks::{Task, TaskList};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Task API",
        description = "Tasks of a multi-user todo application. Every `/api` call needs a Better Auth JWT (or a token signed with the shared secret) whose user is the path's `user_id`.",
    ),
    components(schemas(Task, TaskList, Feed, Change, super::events::TicketBody, super::events::StreamReady, super::events::StreamTokenExpired, NewTaskBody, ReplaceTaskBody, PatchTaskBody, ErrorResponse, ValidationErrorResponse, FieldError, Health)),
    modifiers(&BearerAuth, &PatchNeedsAField),
    tags(
        (name = "tasks", description = "A user's tasks"),
        (name = "sync", description = "Catching up: what changed since a cursor"),
        (name = "events", description = "Live updates: the user's changes as server-sent events"),
        (name = "service", description = "Service status"),
    ),
)]
pub struct ApiDoc;

/// The `bearerAuth` security scheme the task operations require.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearerAuth",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "A Better Auth JWT, or an HS256 token signed with the shared secret",
                        ))
                        .build(),
                ),
            );
            components.add_security_scheme(
                "eventTicket",
                SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                    "ticket",
                    "A ticket from POST /api/{user_id}/events/tickets: opens one event stream, once, within 60 s",
                ))),
            );
        }
    }
}

/// A PATCH body must name at least one of its fields (else 400): stated as `anyOf` of
/// `required` sets, which JSON Schema validators and test generators understand. (Not
/// with `#[schema(min_properties)]`: utoipa-gen 5.5 emits that as `maxProperties`, and an
/// unknown field alone would satisfy it anyway.)
struct PatchNeedsAField;

impl Modify for PatchNeedsAField {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Schema};
        let Some(schemas) = openapi.components.as_mut().map(|c| &mut c.schemas) else {
            return;
        };
        let Some(RefOr::T(Schema::Object(fields))) = schemas.get("PatchTaskBody").cloned() else {
            return;
        };
        let one_of_the_fields = ["title", "description", "complete"]
            .into_iter()
            .fold(AnyOfBuilder::new(), |any, field| {
                any.item(ObjectBuilder::new().required(field))
            });
        let patch = AllOfBuilder::new()
            .description(fields.description.clone())
            .examples(fields.example.clone())
            .item(fields)
            .item(one_of_the_fields);
        schemas.insert(
            "PatchTaskBody".to_owned(),
            RefOr::T(Schema::AllOf(patch.build())),
        );
    }
}

/// `POST` body. Other fields are ignored.
#[derive(ToSchema)]
#[schema(example = json!({"title": "Buy milk", "description": "2 litres"}))]
pub struct NewTaskBody {
    /// 1–200 characters, not only whitespace, no NUL.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub title: String,
    /// At most 1000 characters, no NUL; stored exactly as sent.
    #[schema(max_length = 1000, pattern = r"^[^\u0000]*$")]
    pub description: Option<String>,
}

/// `PUT` body: a full replacement; a missing `description` becomes null.
#[derive(ToSchema)]
#[schema(example = json!({"title": "Buy oat milk", "description": null, "complete": true}))]
pub struct ReplaceTaskBody {
    /// 1–200 characters, not only whitespace, no NUL.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub title: String,
    /// At most 1000 characters, no NUL.
    #[schema(max_length = 1000, pattern = r"^[^\u0000]*$")]
    pub description: Option<String>,
    pub complete: bool,
}

/// `PATCH` body: at least one of the fields; absent ones stay as they are, and
/// `"description": null` clears the description.
#[derive(ToSchema)]
#[schema(example = json!({"complete": true}))]
pub struct PatchTaskBody {
    /// 1–200 characters, not only whitespace, no NUL; never null.
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub title: Option<String>,
    /// At most 1000 characters, no NUL; null clears it.
    #[schema(max_length = 1000, pattern = r"^[^\u0000]*$")]
    pub description: Option<String>,
    /// Never null.
    #[schema(nullable = false)]
    pub complete: Option<bool>,
}

/// Every error except 422.
#[derive(ToSchema)]
#[schema(example = json!({"detail": "Task not found", "error_code": "NOT_FOUND", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
pub struct ErrorResponse {
    pub detail: String,
    #[schema(inline)]
    pub error_code: ErrorCode,
    #[schema(format = DateTime)]
    pub timestamp: String,
    pub request_id: String,
}

/// 422: `detail` lists every problem, in FastAPI's shape.
#[derive(ToSchema)]
#[schema(example = json!({"detail": [{"loc": ["body", "title"], "msg": "Field required", "type": "missing"}], "error_code": "VALIDATION_ERROR", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
pub struct ValidationErrorResponse {
    pub detail: Vec<FieldError>,
    /// Always `VALIDATION_ERROR`.
    #[schema(inline)]
    pub error_code: ErrorCode,
    #[schema(format = DateTime)]
    pub timestamp: String,
    pub request_id: String,
}

#[derive(ToSchema)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms, dead_code)]
pub enum ErrorCode {
    VALIDATION_ERROR,
    AUTH_MISSING,
    AUTH_INVALID,
    AUTH_FORBIDDEN,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    DATABASE_ERROR,
    INTERNAL_ERROR,
    SERVICE_UNAVAILABLE,
    PRECONDITION_FAILED,
    PRECONDITION_REQUIRED,
    IDEMPOTENCY_KEY_REUSED,
    IDEMPOTENCY_KEY_IN_USE,
    CURSOR_EXPIRED,
    RATE_LIMITED,
}

/// `/health` when the database answers.
#[derive(serde::Serialize, ToSchema)]
#[schema(example = json!({"status": "ok", "database": "postgres"}))]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// `postgres` or `sqlite`.
    pub database: String,
}

/// Errors every task operation can give.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum AccessErrors {
    /// No bearer token (`AUTH_MISSING`), or one that does not verify (`AUTH_INVALID`).
    #[response(status = 401, example = json!({"detail": "Token has expired", "error_code": "AUTH_INVALID", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}), headers(("WWW-Authenticate" = String, description = "Always `Bearer`")))]
    Unauthorized(ErrorResponse),
    /// The path's `user_id` is not the token's user, or the task is another user's.
    #[response(status = 403, example = json!({"detail": "Not allowed to access this resource", "error_code": "AUTH_FORBIDDEN", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    Forbidden(ErrorResponse),
    /// The database failed or is unreachable (`DATABASE_ERROR`).
    #[response(status = 500, example = json!({"detail": "The database is unavailable", "error_code": "DATABASE_ERROR", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}), headers(("Retry-After" = u32, description = "Seconds to wait")))]
    ServerError(ErrorResponse),
    /// Over a limit (`RATE_LIMITED`): the user's rate limit (`RateLimit` then says
    /// `r=0`), the client address's failed-authentication limit, or — opening an event
    /// stream — the user's open streams on this instance (`MAX_STREAMS_PER_USER`).
    /// Nothing was changed; retry after `Retry-After` seconds.
    #[response(status = 429, example = json!({"detail": "Too many requests for this user; retry after the time in Retry-After", "error_code": "RATE_LIMITED", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}), headers(("Retry-After" = u32, description = "Whole seconds to wait (at least 1)")))]
    TooMany(ErrorResponse),
    /// The signing keys are not available yet (`SERVICE_UNAVAILABLE`).
    #[response(status = 503, example = json!({"detail": "Signing keys are not available yet; try again", "error_code": "SERVICE_UNAVAILABLE", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}), headers(("Retry-After" = u32, description = "Seconds to wait")))]
    Unavailable(ErrorResponse),
}

/// Errors of a request body.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum BodyErrors {
    /// The body is not valid JSON; or a PATCH with none of its fields.
    #[response(status = 400, example = json!({"detail": "Request body is not valid JSON: expected value at line 1 column 1", "error_code": "VALIDATION_ERROR", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    BadRequest(ErrorResponse),
    /// The body is over 64 KiB.
    #[response(status = 413, example = json!({"detail": "Request body is larger than 64 KiB", "error_code": "PAYLOAD_TOO_LARGE", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    TooLarge(ErrorResponse),
    /// The body is not sent as `application/json`.
    #[response(status = 415, example = json!({"detail": "Request body must be sent as application/json", "error_code": "UNSUPPORTED_MEDIA_TYPE", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    UnsupportedMediaType(ErrorResponse),
}

/// 422: a path parameter, query parameter or body field of the wrong shape.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Invalid {
    /// Every problem, in FastAPI's shape.
    #[response(status = 422)]
    Invalid(ValidationErrorResponse),
}

/// 404: no such task.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum TaskNotFound {
    /// No task with this id.
    #[response(status = 404, example = json!({"detail": "Task not found", "error_code": "NOT_FOUND", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    NotFound(ErrorResponse),
}

/// 422 of a create: a body of the wrong shape, or an `Idempotency-Key` reused.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum CreateInvalid {
    /// `VALIDATION_ERROR`: every problem of the body, in FastAPI's shape; or
    /// `IDEMPOTENCY_KEY_REUSED`: the key was first used with another title or description
    /// (`loc: ["header", "Idempotency-Key"]`).
    #[response(status = 422, example = json!({"detail": [{"loc": ["header", "Idempotency-Key"], "msg": "This Idempotency-Key was used with a different request", "type": "idempotency_key_reused"}], "error_code": "IDEMPOTENCY_KEY_REUSED", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    Invalid(ValidationErrorResponse),
}

/// 409 of a create with an `Idempotency-Key`.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum KeyInUse {
    /// Other requests with the same key are being claimed and expired at this moment
    /// (`IDEMPOTENCY_KEY_IN_USE`); a concurrent repeat otherwise waits for the first and
    /// gets its replay.
    #[response(status = 409, example = json!({"detail": "Other requests with this Idempotency-Key are in progress; retry shortly", "error_code": "IDEMPOTENCY_KEY_IN_USE", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}), headers(("Retry-After" = u32, description = "Seconds to wait")))]
    InUse(ErrorResponse),
}

/// 304 of a conditional GET.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum NotModified {
    /// `If-None-Match` matched: no body.
    #[response(status = 304, headers(("ETag" = String, description = "The current entity tag")))]
    NotModified,
}

/// 400 of a malformed conditional header.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Conditional {
    /// `If-Match` or `If-None-Match` is not `*` or a list of entity tags (`VALIDATION_ERROR`).
    #[response(status = 400, example = json!({"detail": "If-None-Match must be * or a list of entity tags such as \"3\"", "error_code": "VALIDATION_ERROR", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    BadRequest(ErrorResponse),
}

/// Preconditions of a write (PUT, PATCH, DELETE).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum WritePreconditions {
    /// `If-Match` names no current version of the task (`PRECONDITION_FAILED`); nothing
    /// was changed.
    #[response(status = 412, example = json!({"detail": "If-Match does not name the task's current version (see ETag)", "error_code": "PRECONDITION_FAILED", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}), headers(("ETag" = String, description = "The task's current version")))]
    Failed(ErrorResponse),
    /// The service runs with `REQUIRE_IF_MATCH=true` and the request has no `If-Match`
    /// (`PRECONDITION_REQUIRED`).
    #[response(status = 428, example = json!({"detail": "This service requires If-Match on PUT, PATCH and DELETE", "error_code": "PRECONDITION_REQUIRED", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    Required(ErrorResponse),
}

/// 410 of the change feed.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum CursorExpired {
    /// The cursor was issued more than `SYNC_RETENTION` ago, or deletions it may need
    /// have since been purged, or it is from before the database was restored from a
    /// backup: start again with a full sync, without `cursor` (`CURSOR_EXPIRED`).
    #[response(status = 410, example = json!({"detail": "This cursor has expired: start again with a full sync (no cursor)", "error_code": "CURSOR_EXPIRED", "timestamp": "2026-01-01T00:00:00Z", "request_id": "0f8e2c1a-6d3b-4c5e-9a7f-1b2c3d4e5f60"}))]
    Expired(ErrorResponse),
}

/// Adds the rate-limit headers to every response of every `/api` operation (run on the
/// merged document: the operations come from the routes).
pub fn add_rate_limit_headers(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let header = |description: &str, example: &str| {
        HeaderBuilder::new()
            .schema(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .examples([serde_json::json!(example)]),
            )
            .description(Some(description))
            .build()
    };
    let policy = header(
        "The user's quota while `RATE_LIMIT` is on: `\"user\";q=<requests>;w=<window in seconds>` (IETF rate-limit headers). On every answer to a token that verified",
        "\"user\";q=1200;w=60",
    );
    let current = header(
        "Where the user stands: `\"user\";r=<requests left>;t=<seconds until r is back at q>`. On every answer to a token that verified, unless the shared limit store (Redis) did not answer",
        "\"user\";r=1187;t=1",
    );
    for (path, item) in openapi.paths.paths.iter_mut() {
        if !path.starts_with("/api/") {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.patch,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            for response in operation.responses.responses.values_mut() {
                if let RefOr::T(response) = response {
                    response
                        .headers
                        .insert("RateLimit-Policy".into(), policy.clone());
                    response.headers.insert("RateLimit".into(), current.clone());
                }
            }
        }
    }
}
