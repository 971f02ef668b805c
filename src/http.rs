//! The HTTP interface: routes, shared state, and the layers every request passes.

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, Method, header};
use axum::response::IntoResponse;
use axum::{Json, Router};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{Layer, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::OpenApi;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::Verifier;
use crate::config::CorsOrigins;
use crate::cursors::CursorKey;
use crate::error::ApiError;
use crate::events::fanout::{EventSettings, Fanout};
use crate::limits::{LimitSettings, Limits};
use crate::metrics::Metrics;
use crate::storage::{StoreError, TaskStore};
use crate::tasks::BodyError;
use tokio_util::sync::CancellationToken;

mod changes;
mod events;
pub mod extract;
mod json;
pub mod middleware;
pub mod openapi;
mod tasks;

/// Largest accepted request body (contract: over 64 KiB → 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// `/health` answers within this time even when the database does not.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach, behind one `Arc`: axum clones the state for every
/// request (each `State` extractor and middleware), so a clone is one reference count.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<dyn TaskStore>,
    pub verifier: Arc<Verifier>,
    pub metrics: Arc<Metrics>,
    /// PUT, PATCH and DELETE without `If-Match` get 428 (`REQUIRE_IF_MATCH`).
    pub require_if_match: bool,
    /// How long an `Idempotency-Key` is remembered after its create (`IDEMPOTENCY_TTL`).
    pub idempotency_ttl: Duration,
    /// Signs and opens list and feed cursors.
    pub cursors: Arc<CursorKey>,
    /// How long a feed cursor stays valid (`SYNC_RETENTION`).
    pub sync_retention: Duration,
    /// Live updates: the streams open on this instance and their hubs.
    pub events: Arc<Fanout>,
    /// The per-user and failed-authentication limits.
    pub limits: Arc<Limits>,
    /// Set once a shutdown has begun.
    pub draining: Draining,
}

/// Whether the service is shutting down: from the signal on, `/health` answers 503 (load
/// balancers stop routing here) while requests are still served for `SHUTDOWN_DELAY`.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<std::sync::atomic::AtomicBool>);

impl Draining {
    pub fn begin(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl AppState {
    /// The state for a store, a verifier and the cursor key, with metrics over the first
    /// two.
    pub fn new(store: Arc<dyn TaskStore>, verifier: Verifier, cursors: CursorKey) -> Self {
        let metrics = Metrics::new(Some(store.clone()), verifier.jwks_fetches());
        let events = Fanout::new(
            store.clone(),
            &cursors,
            EventSettings::default(),
            metrics.open_streams(),
            CancellationToken::new(),
        );
        Self(Arc::new(Shared {
            store,
            verifier: Arc::new(verifier),
            metrics: Arc::new(metrics),
            require_if_match: false,
            idempotency_ttl: crate::idempotency::DEFAULT_TTL,
            cursors: Arc::new(cursors),
            sync_retention: crate::sync::DEFAULT_RETENTION,
            events,
            limits: Arc::new(Limits::off()),
            draining: Draining::default(),
        }))
    }
}

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub cors: CorsOrigins,
    /// Requests handled at once; the excess is answered 503 at once, never queued.
    pub max_concurrent_requests: usize,
    /// PUT, PATCH and DELETE without `If-Match` get 428.
    pub require_if_match: bool,
    /// How long an `Idempotency-Key` is remembered after its create.
    pub idempotency_ttl: Duration,
    /// How long a feed cursor stays valid.
    pub sync_retention: Duration,
    /// Limits and timings of the event stream.
    pub events: EventSettings,
    /// Cancelled when the service begins to shut down: open event streams end at once.
    pub closing: CancellationToken,
    /// Rate limits (`RATE_LIMIT`, `AUTH_FAILURE_LIMIT`, `REDIS_URL`, …).
    pub limits: LimitSettings,
    /// Set when a shutdown has begun: `/health` answers 503 so that load balancers stop
    /// sending requests, and responses ask clients to close their connections.
    pub draining: Draining,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            cors: CorsOrigins::None,
            max_concurrent_requests: crate::config::DEFAULT_MAX_CONCURRENT_REQUESTS,
            require_if_match: false,
            idempotency_ttl: crate::idempotency::DEFAULT_TTL,
            sync_retention: crate::sync::DEFAULT_RETENTION,
            events: EventSettings::default(),
            closing: CancellationToken::new(),
            limits: LimitSettings::default(),
            draining: Draining::default(),
        }
    }
}

/// How the store's answers map to the contract's errors.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => Self::NotFound("Task not found"),
            StoreError::NotOwner => Self::Forbidden,
            StoreError::Database(e) => Self::Database(e),
            StoreError::Timeout => Self::DatabaseTimeout,
            StoreError::VersionMismatch { current } => Self::PreconditionFailed { current },
            StoreError::KeyContended => Self::IdempotencyKeyInUse,
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::Invalid(errors) => Self::Validation(errors),
            BodyError::EmptyPatch => {
                Self::BadRequest("PATCH needs at least one of title, description, complete".into())
            }
        }
    }
}

/// The whole service as one router: the API, its OpenAPI document at `/openapi.json`
/// and Swagger UI at `/docs` (assets served from the binary).
pub fn app(state: AppState, options: &HttpOptions) -> Router {
    let mut state = Arc::unwrap_or_clone(state.0);
    state.require_if_match = options.require_if_match;
    state.idempotency_ttl = options.idempotency_ttl;
    state.sync_retention = options.sync_retention;
    state.events = Fanout::new(
        state.store.clone(),
        &state.cursors,
        options.events.clone(),
        state.metrics.open_streams(),
        options.closing.child_token(),
    );
    state.limits = Arc::new(
        Limits::new(options.limits.clone(), state.metrics.limit_counters()).unwrap_or_else(
            |error| {
                // REDIS_URL was checked when the configuration was read; should the client
                // still refuse it, limit each instance on its own rather than not at all.
                tracing::error!(%error, "REDIS_URL: cannot use Redis; limits are per instance");
                let settings = LimitSettings {
                    redis_url: None,
                    ..options.limits.clone()
                };
                Limits::new(settings, state.metrics.limit_counters())
                    .unwrap_or_else(|_| Limits::off())
            },
        ),
    );
    state.draining = options.draining.clone();
    let state = AppState(Arc::new(state));
    let (api, document) = tasks::router()
        .merge(changes::router())
        .merge(events::router())
        .routes(routes!(health))
        .split_for_parts();
    let mut document = openapi::ApiDoc::openapi().merge_from(document);
    openapi::add_rate_limit_headers(&mut document);
    let router = api
        .merge(SwaggerUi::new("/docs").url("/openapi.json", document))
        .fallback(not_found)
        .layer(middleware::RecordRouteLayer)
        .with_state(state.clone());
    let context = middleware::ContextState {
        metrics: state.metrics.clone(),
        draining: options.draining.clone(),
    };
    let router = events::AnnounceWritesLayer(state.events.clone()).layer(router);
    around(router, options, context, state.limits.clone())
}

/// The layers every request passes, outermost first: the request context (request id,
/// error body, headers, log line, metrics, `Connection: close` while draining), CORS,
/// the concurrency cap, panic catching, the body limit and the rate-limit headers (the
/// announcement of writes is the service's own, just outside routing).
///
/// They wrap the router once, as one service, rather than each route: `Router::layer`
/// puts every layer around every route, and each such layer costs a boxed clone of the
/// service below it on every request.
fn around<S>(
    router: S,
    options: &HttpOptions,
    context: middleware::ContextState,
    limits: Arc<Limits>,
) -> Router
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let service = ServiceBuilder::new()
        .layer(middleware::RequestContextLayer(context))
        .option_layer(cors_layer(&options.cors))
        // One semaphore for the whole service; the excess is answered 503 at once.
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::Unavailable("The service is busy; retry shortly")
        }))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(
            options.max_concurrent_requests,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(crate::limits::RateLimitHeadersLayer(limits))
        .service(router);
    Router::new().fallback_service(service)
}

/// `Strict-Transport-Security` on every response, for a service that serves HTTPS itself.
pub fn with_hsts(router: Router) -> Router {
    let hsts = SetResponseHeaderLayer::overriding(
        header::STRICT_TRANSPORT_SECURITY,
        axum::http::HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    Router::new().fallback_service(hsts.layer(router))
}

/// A panic is a bug: answer 500 `INTERNAL_ERROR` (rendered by the request context) rather
/// than dropping the connection, and log it without its message, which could hold input.
fn panic_response(_: Box<dyn std::any::Any + Send>) -> axum::response::Response {
    tracing::error!("request handler panicked");
    axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// Whether the service and its database answer.
#[utoipa::path(get, path = "/health", tag = "service", operation_id = "health",
    responses(
        (status = 200, description = "The database answers", body = openapi::Health),
        (status = 503, description = "The database does not answer within 2 s, or the service is shutting down (`SERVICE_UNAVAILABLE`)",
         body = openapi::ErrorResponse, headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ))]
async fn health(State(app): State<AppState>) -> Result<Json<openapi::Health>, ApiError> {
    if app.draining.is_set() {
        return Err(ApiError::Unavailable("Shutting down"));
    }
    match tokio::time::timeout(HEALTH_TIMEOUT, app.store.ping()).await {
        Ok(Ok(())) => Ok(Json(openapi::Health {
            status: "ok".into(),
            database: app.store.backend().into(),
        })),
        Ok(Err(error)) => {
            tracing::warn!(%error, "health check: database unavailable");
            Err(ApiError::Unavailable("Database unavailable"))
        }
        Err(_) => {
            tracing::warn!("health check: database did not answer in time");
            Err(ApiError::Unavailable("Database unavailable"))
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Not Found")
}

fn cors_layer(origins: &CorsOrigins) -> Option<CorsLayer> {
    let allow = match origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(list.iter().cloned()),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                X_REQUEST_ID.clone(),
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                extract::IDEMPOTENCY_KEY.clone(),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                X_REQUEST_ID.clone(),
                header::RETRY_AFTER,
                tasks::IDEMPOTENT_REPLAYED.clone(),
                header::LINK,
                HeaderName::from_static("ratelimit"),
                HeaderName::from_static("ratelimit-policy"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panic_becomes_a_contract_500_that_reveals_nothing() {
        async fn boom() -> &'static str {
            panic!("secret detail")
        }
        let context = middleware::ContextState {
            metrics: Arc::new(Metrics::new(None, None)),
            draining: Draining::default(),
        };
        let router = around(
            Router::new().route("/boom", get(boom)),
            &HttpOptions::default(),
            context,
            Arc::new(Limits::off()),
        );
        let request = axum::http::Request::get("/boom")
            .body(Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error_code"], "INTERNAL_ERROR");
        assert!(!String::from_utf8_lossy(&body).contains("secret detail"));
    }
}
