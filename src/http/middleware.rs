//! The layer every request passes: request id, the contract's error body, safe headers,
//! one log line and the request's metrics; and the marker that tells it which route
//! answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use std::convert::Infallible;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::{Draining, X_REQUEST_ID};
use crate::error::ErrorReport;
use crate::metrics::Metrics;

/// Longest client-supplied request id that is echoed; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Request headers larger than this in total get 431 before any handler runs. Well
/// above any token the service reads (8 KiB), so an oversized token is still a 401.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// What the request context needs: the metrics it records into, and whether the
/// service is shutting down.
#[derive(Clone)]
pub struct ContextState {
    pub metrics: Arc<Metrics>,
    pub draining: Draining,
}

/// The request context as a layer: the outermost, around routing, so it runs once per
/// request whatever the route. Which route answered it learns from the response (see
/// [`RecordRoute`]).
///
/// A plain service with its own future rather than `axum::middleware::from_fn`, which
/// would box the whole service below it, and the future, on every request.
#[derive(Clone)]
pub struct RequestContextLayer(pub ContextState);

impl<S> tower::Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> RequestContext<S> {
        RequestContext {
            inner,
            context: self.0.clone(),
        }
    }
}

/// See [`RequestContextLayer`].
#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
    context: ContextState,
}

/// What the request context keeps from the request for its response.
struct Pending {
    started: Instant,
    request_id: String,
    method: axum::http::Method,
    http1: bool,
    span: tracing::Span,
    context: ContextState,
    /// The answer when the request never reaches the service below (431).
    refused: Option<Response>,
}

impl<S> tower::Service<Request> for RequestContext<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = RequestContextFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let request_id = client_request_id(req.headers())
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let method = req.method().clone();
        let http1 = req.version() <= Version::HTTP_11;
        // `route` is recorded once the response says which route answered.
        let span = tracing::info_span!(
            "request",
            method = %method,
            route = tracing::field::Empty,
            request_id = %request_id,
            user_id = tracing::field::Empty,
        );
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        let (inner, refused) = if header_bytes > MAX_HEADER_BYTES {
            let mut response = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.into_response();
            response.extensions_mut().insert(ErrorReport::message(
                "VALIDATION_ERROR",
                "Request headers are larger than 32 KiB",
            ));
            (None, Some(response))
        } else {
            (Some(self.inner.call(req).instrument(span.clone())), None)
        };
        RequestContextFuture {
            inner,
            pending: Some(Pending {
                started,
                request_id,
                method,
                http1,
                span,
                context: self.context.clone(),
                refused,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RequestContext`].
    pub struct RequestContextFuture<F> {
        #[pin]
        inner: Option<tracing::instrument::Instrumented<F>>,
        pending: Option<Pending>,
    }
}

impl<F> Future for RequestContextFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answered = match this.inner.as_pin_mut() {
            Some(inner) => Some(std::task::ready!(inner.poll(cx))?),
            None => None,
        };
        let Some(mut pending) = this.pending.take() else {
            // Polled again after it finished: a caller's bug, answered rather than hung.
            return Poll::Ready(Ok(StatusCode::INTERNAL_SERVER_ERROR.into_response()));
        };
        let response = answered
            .or_else(|| pending.refused.take())
            .unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        Poll::Ready(Ok(finish(pending, response)))
    }
}

/// The request context's work on the response: the error body, the headers, the log
/// line and the metrics.
fn finish(pending: Pending, mut response: Response) -> Response {
    let Pending {
        started,
        request_id,
        method,
        http1,
        span,
        context,
        refused: _,
    } = pending;
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
    // Keep-alive connections would keep a draining instance in use after the balancer
    // has moved on: ask clients to reconnect (through the balancer).
    if http1 && context.draining.is_set() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }

    // The route template, never the concrete path: it holds user ids.
    let route = response
        .extensions_mut()
        .remove::<MatchedRoute>()
        .map(|MatchedRoute(route)| route);
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    span.record("route", route);
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    context
        .metrics
        .observe(method.as_str(), route, status, seconds, error_code);
    let duration_ms = seconds * 1000.0;
    span.in_scope(|| tracing::info!(status, duration_ms, "request"));
    response
}

/// The route template that answered, if the response came from one (and not from the
/// fallback): for layers outside routing, which see only the response.
pub fn matched_route(response: &Response) -> Option<&str> {
    response
        .extensions()
        .get::<MatchedRoute>()
        .map(|MatchedRoute(route)| route.as_str())
}

/// The route template that answered, carried on the response out to [`request_context`].
#[derive(Clone)]
struct MatchedRoute(MatchedPath);

/// Puts the matched route template on the response. Applied with `Router::layer`, it is
/// the one layer inside routing: every other layer wraps the router once, because a
/// layer inside routing costs a boxed service clone per request for each route it
/// wraps. (`axum::middleware::from_fn` would box the inner service and the future on
/// every request; this is a plain service with its own future.)
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordRouteLayer;

impl<S> tower::Layer<S> for RecordRouteLayer {
    type Service = RecordRoute<S>;

    fn layer(&self, inner: S) -> RecordRoute<S> {
        RecordRoute(inner)
    }
}

/// See [`RecordRouteLayer`].
#[derive(Clone, Debug)]
pub struct RecordRoute<S>(S);

impl<S, B> tower::Service<axum::http::Request<B>> for RecordRoute<S>
where
    S: tower::Service<axum::http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = RecordRouteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        RecordRouteFuture {
            route: request.extensions().get::<MatchedPath>().cloned(),
            inner: self.0.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RecordRoute`].
    pub struct RecordRouteFuture<F> {
        #[pin]
        inner: F,
        route: Option<MatchedPath>,
    }
}

impl<F, E> Future for RecordRouteFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(route) = this.route.take() {
            response.extensions_mut().insert(MatchedRoute(route));
        }
        Poll::Ready(Ok(response))
    }
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
