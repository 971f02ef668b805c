//! The layer every request passes: request id, the contract's error body, safe headers,
//! and one log line.

use std::time::Instant;

use axum::body::Body;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::X_REQUEST_ID;
use crate::error::ErrorReport;
use crate::metrics::Metrics;

/// Longest client-supplied request id that is echoed; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Request headers larger than this in total get 431 before any handler runs. Well
/// above any token the service reads (8 KiB), so an oversized token is still a 401.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

pub async fn request_context(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = client_request_id(req.headers())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    // The route template, never the concrete path: it holds user ids.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = req.method().clone();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        method = %method,
        route,
        request_id = %request_id,
        user_id = tracing::field::Empty,
    );

    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let mut response = if header_bytes > MAX_HEADER_BYTES {
        let mut response = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.into_response();
        response.extensions_mut().insert(ErrorReport::message(
            "VALIDATION_ERROR",
            "Request headers are larger than 32 KiB",
        ));
        response
    } else {
        next.run(req).instrument(span.clone()).await
    };

    let error_code = (response.status().is_client_error() || response.status().is_server_error())
        .then(|| render_error(&mut response, &request_id));
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(X_REQUEST_ID.clone(), value);
    }
    // Tasks are private: no shared cache may keep a response.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );

    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    metrics.observe(method.as_str(), route, status, seconds, error_code);
    let duration_ms = seconds * 1000.0;
    span.in_scope(|| tracing::info!(status, duration_ms, "request"));
    response
}

/// Writes the contract's error JSON, for our errors (which carry an [`ErrorReport`]) and
/// for the framework's own (405, …), keeping their headers such as `Allow`. Returns the
/// error code.
fn render_error(response: &mut Response, request_id: &str) -> &'static str {
    let report = response
        .extensions_mut()
        .remove::<ErrorReport>()
        .unwrap_or_else(|| ErrorReport::for_status(response.status()));
    let body = report.to_json(request_id);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.remove(header::CONTENT_LENGTH);
    *response.body_mut() = Body::from(body);
    report.code
}

/// A client's `X-Request-Id`, if it is safe to echo and log: 1–128 visible ASCII characters.
fn client_request_id(headers: &HeaderMap) -> Option<&str> {
    let id = headers.get(&X_REQUEST_ID)?.to_str().ok()?;
    (!id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(id)
}
