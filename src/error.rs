//! The one error type of the HTTP layer, and its rendering as the contract's error JSON.
//!
//! Handlers and extractors return [`ApiError`]. Its `IntoResponse` does not write the body
//! itself: it attaches an [`ErrorReport`] to the response, and the request middleware
//! (`http::middleware`) renders every error — ours and the framework's (405, unknown route)
//! — in one place, where the request id is known.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;

/// Seconds a client should wait before retrying after a database failure or load shedding.
pub const RETRY_AFTER_SECS: &str = "1";

/// One problem in a 422 response, in the shape FastAPI clients already parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"loc": ["body", "title"], "msg": "String should have at least 1 character", "type": "string_too_short"}))]
pub struct FieldError {
    /// Where the problem is: `["body", "title"]`, `["path", "task_id"]`, `["query", "limit"]`.
    #[schema(value_type = Vec<String>)]
    pub loc: &'static [&'static str],
    #[schema(value_type = String)]
    pub msg: Cow<'static, str>,
    /// The kind of problem, e.g. `missing`, `string_type`, `string_too_long`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
}

impl FieldError {
    pub fn new(
        loc: &'static [&'static str],
        kind: &'static str,
        msg: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            loc,
            msg: msg.into(),
            kind,
        }
    }

    pub fn missing(loc: &'static [&'static str]) -> Self {
        Self::new(loc, "missing", "Field required")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON, or a PATCH names none of its fields.
    #[error("{0}")]
    BadRequest(Cow<'static, str>),
    /// 401: no `Authorization: Bearer` header.
    #[error("missing bearer token")]
    AuthMissing,
    /// 401: a token was sent but does not verify; the reason is safe to show.
    #[error("invalid token: {0}")]
    AuthInvalid(&'static str),
    /// 403: the path or the task belongs to someone else.
    #[error("forbidden")]
    Forbidden,
    /// 404: no such task, or no such route.
    #[error("{0}")]
    NotFound(&'static str),
    /// 413: the body is over the limit.
    #[error("payload too large")]
    PayloadTooLarge,
    /// 415: a body that is not `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 422: JSON, path or query of the wrong shape.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 500: the database failed or is unreachable. The cause is logged, never shown.
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// 500: the database did not answer within the deadline.
    #[error("database deadline exceeded")]
    DatabaseTimeout,
    /// 503: the service cannot take the request in time (health check, load shedding).
    #[error("{0}")]
    Unavailable(&'static str),
    /// 412: `If-Match` named no current version; carries the task's current version.
    #[error("precondition failed")]
    PreconditionFailed { current: i64 },
    /// 428: `REQUIRE_IF_MATCH` is on and the write has no `If-Match`.
    #[error("precondition required")]
    PreconditionRequired,
    /// 422: the `Idempotency-Key` was first used with another request.
    #[error("idempotency key reused")]
    IdempotencyKeyReused,
    /// 409: other requests with the same `Idempotency-Key` are in flight.
    #[error("idempotency key in use")]
    IdempotencyKeyInUse,
    /// 410: a sync cursor older than `SYNC_RETENTION`, from before purged deletions, or
    /// from before a restore.
    #[error("cursor expired")]
    CursorExpired,
    /// 429: over a rate limit, or the per-user stream limit; retry after this many
    /// seconds.
    #[error("rate limited")]
    RateLimited {
        detail: &'static str,
        retry_after_secs: u64,
    },
}

impl ApiError {
    pub fn validation(error: FieldError) -> Self {
        Self::Validation(vec![error])
    }
}

/// What an error response says; rendered to JSON by the request middleware.
#[derive(Debug, Clone)]
pub struct ErrorReport {
    pub code: &'static str,
    pub detail: ErrorDetail,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ErrorDetail {
    Message(Cow<'static, str>),
    Fields(Vec<FieldError>),
}

impl ErrorReport {
    pub fn message(code: &'static str, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            detail: ErrorDetail::Message(detail.into()),
        }
    }

    /// The report for an error response the framework produced itself (unknown route,
    /// wrong method, …), so that it too follows the contract.
    pub fn for_status(status: StatusCode) -> Self {
        let code = match status {
            StatusCode::UNAUTHORIZED => "AUTH_INVALID",
            StatusCode::FORBIDDEN => "AUTH_FORBIDDEN",
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
            StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UNSUPPORTED_MEDIA_TYPE",
            StatusCode::SERVICE_UNAVAILABLE => "SERVICE_UNAVAILABLE",
            s if s.is_client_error() => "VALIDATION_ERROR",
            _ => "INTERNAL_ERROR",
        };
        let detail = if status.is_server_error() {
            "Internal server error"
        } else {
            status.canonical_reason().unwrap_or("Request failed")
        };
        Self::message(code, detail)
    }

    /// The contract's error body.
    pub fn to_json(&self, request_id: &str) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            detail: &'a ErrorDetail,
            error_code: &'static str,
            timestamp: String,
            request_id: &'a str,
        }
        let body = Body {
            detail: &self.detail,
            error_code: self.code,
            timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
            request_id,
        };
        // Serializing plain strings and static slices cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, report) = match self {
            Self::BadRequest(detail) => (
                StatusCode::BAD_REQUEST,
                ErrorReport::message("VALIDATION_ERROR", detail),
            ),
            Self::AuthMissing => (
                StatusCode::UNAUTHORIZED,
                ErrorReport::message("AUTH_MISSING", "Missing bearer token"),
            ),
            Self::AuthInvalid(reason) => (
                StatusCode::UNAUTHORIZED,
                ErrorReport::message("AUTH_INVALID", reason),
            ),
            Self::Forbidden => (
                StatusCode::FORBIDDEN,
                ErrorReport::message("AUTH_FORBIDDEN", "Not allowed to access this resource"),
            ),
            Self::NotFound(detail) => (
                StatusCode::NOT_FOUND,
                ErrorReport::message("NOT_FOUND", detail),
            ),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorReport::message("PAYLOAD_TOO_LARGE", "Request body is larger than 64 KiB"),
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorReport::message(
                    "UNSUPPORTED_MEDIA_TYPE",
                    "Request body must be sent as application/json",
                ),
            ),
            Self::Validation(errors) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorReport {
                    code: "VALIDATION_ERROR",
                    detail: ErrorDetail::Fields(errors),
                },
            ),
            Self::Database(error) => {
                // The cause goes to the log (inside the request's span), never to the client.
                tracing::error!(error = %error, "database error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorReport::message("DATABASE_ERROR", "The database is unavailable"),
                )
            }
            Self::DatabaseTimeout => {
                tracing::error!("database error: no answer within the deadline");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorReport::message("DATABASE_ERROR", "The database is unavailable"),
                )
            }
            Self::Unavailable(detail) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorReport::message("SERVICE_UNAVAILABLE", detail),
            ),
            Self::PreconditionFailed { current } => {
                let mut response = (
                    StatusCode::PRECONDITION_FAILED,
                    [(header::ETAG, crate::versions::task_etag(current))],
                )
                    .into_response();
                response.extensions_mut().insert(ErrorReport::message(
                    "PRECONDITION_FAILED",
                    "If-Match does not name the task's current version (see ETag)",
                ));
                return response;
            }
            Self::CursorExpired => (
                StatusCode::GONE,
                ErrorReport::message(
                    "CURSOR_EXPIRED",
                    "This cursor has expired: start again with a full sync (no cursor)",
                ),
            ),
            Self::PreconditionRequired => (
                StatusCode::PRECONDITION_REQUIRED,
                ErrorReport::message(
                    "PRECONDITION_REQUIRED",
                    "This service requires If-Match on PUT, PATCH and DELETE",
                ),
            ),
            Self::RateLimited {
                detail,
                retry_after_secs,
            } => {
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, retry_after_secs.max(1).to_string())],
                )
                    .into_response();
                response
                    .extensions_mut()
                    .insert(ErrorReport::message("RATE_LIMITED", detail));
                return response;
            }
            Self::IdempotencyKeyInUse => (
                StatusCode::CONFLICT,
                ErrorReport::message(
                    "IDEMPOTENCY_KEY_IN_USE",
                    "Other requests with this Idempotency-Key are in progress; retry shortly",
                ),
            ),
            Self::IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorReport {
                    code: "IDEMPOTENCY_KEY_REUSED",
                    detail: ErrorDetail::Fields(vec![FieldError::new(
                        &["header", "Idempotency-Key"],
                        "idempotency_key_reused",
                        "This Idempotency-Key was used with a different request",
                    )]),
                },
            ),
        };
        let mut response = status.into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3.
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(
            report.code,
            "DATABASE_ERROR" | "SERVICE_UNAVAILABLE" | "IDEMPOTENCY_KEY_IN_USE"
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response.extensions_mut().insert(report);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_contract_fields() {
        let report = ErrorReport::message("NOT_FOUND", "Task not found");
        let body: serde_json::Value = serde_json::from_slice(&report.to_json("abc")).unwrap();
        assert_eq!(body["detail"], "Task not found");
        assert_eq!(body["error_code"], "NOT_FOUND");
        assert_eq!(body["request_id"], "abc");
        let ts = body["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z'), "{ts}");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok());
    }

    #[test]
    fn validation_detail_is_a_list_in_fastapi_shape() {
        let report = ErrorReport {
            code: "VALIDATION_ERROR",
            detail: ErrorDetail::Fields(vec![FieldError::missing(&["body", "title"])]),
        };
        let body: serde_json::Value = serde_json::from_slice(&report.to_json("r")).unwrap();
        assert_eq!(
            body["detail"],
            serde_json::json!([{"loc": ["body", "title"], "msg": "Field required", "type": "missing"}])
        );
    }

    #[test]
    fn write_refusals_carry_their_headers() {
        let failed = ApiError::PreconditionFailed { current: 4 }.into_response();
        assert_eq!(failed.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(failed.headers()[header::ETAG], "\"4\"");
        let in_use = ApiError::IdempotencyKeyInUse.into_response();
        assert_eq!(in_use.status(), StatusCode::CONFLICT);
        assert_eq!(in_use.headers()[header::RETRY_AFTER], RETRY_AFTER_SECS);
        let report = in_use.extensions().get::<ErrorReport>().unwrap();
        assert_eq!(report.code, "IDEMPOTENCY_KEY_IN_USE");
    }

    #[test]
    fn framework_statuses_map_to_contract_codes() {
        assert_eq!(
            ErrorReport::for_status(StatusCode::METHOD_NOT_ALLOWED).code,
            "METHOD_NOT_ALLOWED"
        );
        assert_eq!(
            ErrorReport::for_status(StatusCode::NOT_FOUND).code,
            "NOT_FOUND"
        );
        assert_eq!(
            ErrorReport::for_status(StatusCode::PAYLOAD_TOO_LARGE).code,
            "PAYLOAD_TOO_LARGE"
        );
        let internal = ErrorReport::for_status(StatusCode::BAD_GATEWAY);
        assert_eq!(internal.code, "INTERNAL_ERROR");
        assert!(
            matches!(internal.detail, ErrorDetail::Message(ref m) if m == "Internal server error")
        );
    }
}
