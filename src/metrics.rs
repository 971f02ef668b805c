//! Prometheus metrics, served on their own listener (`METRICS_ADDR`) so that they are
//! never exposed on the public port by accident.
//!
//! Labels are route templates, methods, statuses and error codes only — never a user id
//! or task id, which would make the number of series unbounded. The registry belongs to
//! the app (no global recorder), so every app, and every test, counts only its own.

use std::sync::Arc;

use crate::limits::LimitCounters;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::storage::TaskStore;

// Labels are static strings (no allocation per request): methods outside the standard
// set are counted as "OTHER", routes outside the service's own templates as "unmatched".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: &'static str,
}

/// Every route template the service has; anything else is "unmatched" (or a /docs asset).
const ROUTES: [&str; 10] = [
    "/api/{user_id}/tasks",
    "/api/{user_id}/tasks/{task_id}",
    "/api/{user_id}/changes",
    "/api/{user_id}/events",
    "/api/{user_id}/events/tickets",
    "/health",
    "/openapi.json",
    "/docs",
    "/docs/",
    "/docs/{*rest}",
];

fn route_label(route: &str) -> &'static str {
    ROUTES
        .into_iter()
        .find(|r| *r == route)
        .unwrap_or("unmatched")
}

fn method_label(method: &str) -> &'static str {
    const METHODS: [&str; 9] = [
        "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    METHODS
        .into_iter()
        .find(|m| *m == method)
        .unwrap_or("OTHER")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// JWKS fetches by outcome (`ok`, `error`).
pub type FetchCounter = Family<OutcomeLabels, Counter>;

/// Request latency buckets: 0.5 ms to about 8 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    errors: Family<ErrorLabels, Counter>,
    pool_size: Gauge,
    pool_idle: Gauge,
    open_streams: Gauge,
    limits: LimitCounters,
    store: Option<Arc<dyn TaskStore>>,
}

impl Metrics {
    /// Metrics of the HTTP layer, plus the store's pool and the JWKS fetches when given.
    pub fn new(store: Option<Arc<dyn TaskStore>>, jwks_fetches: Option<FetchCounter>) -> Self {
        let mut registry = Registry::with_prefix("task_api");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route template and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method and route template",
            latency.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "http_errors",
            "Error responses by the contract's error_code",
            errors.clone(),
        );
        let (pool_size, pool_idle) = (Gauge::default(), Gauge::default());
        if let Some(store) = &store {
            registry.register(
                "db_pool_connections",
                "Open database connections",
                pool_size.clone(),
            );
            registry.register(
                "db_pool_idle_connections",
                "Idle database connections",
                pool_idle.clone(),
            );
            registry.register(
                "db_pool_acquire_wait_seconds",
                "Time requests waited for a database connection",
                store.acquire_wait(),
            );
        }
        if let Some(fetches) = jwks_fetches {
            registry.register("jwks_fetches", "JWKS fetches by outcome", fetches);
        }
        let open_streams = Gauge::default();
        registry.register(
            "event_streams_open",
            "Event streams open on this instance",
            open_streams.clone(),
        );
        let limits = LimitCounters::default();
        registry.register(
            "rate_limited_requests",
            "Requests refused by a limit (429), by kind: user, auth_failures, streams",
            limits.limited.clone(),
        );
        registry.register(
            "redis_errors",
            "Rate-limit calls to Redis that failed or ran over 50 ms (served unlimited)",
            limits.redis_errors.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running version", build);
        Self {
            registry,
            requests,
            latency,
            errors,
            pool_size,
            pool_idle,
            open_streams,
            limits,
            store,
        }
    }

    /// The gauge of open event streams (kept by the fan-out).
    pub fn open_streams(&self) -> Gauge {
        self.open_streams.clone()
    }

    /// The counters of the rate limits.
    pub fn limit_counters(&self) -> LimitCounters {
        self.limits.clone()
    }

    /// Records one answered request.
    pub fn observe(
        &self,
        method: &str,
        route: &str,
        status: u16,
        seconds: f64,
        error_code: Option<&'static str>,
    ) {
        let (method, route) = (method_label(method), route_label(route));
        self.latency
            .get_or_create(&RouteLabels { method, route })
            .observe(seconds);
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route,
                status,
            })
            .inc();
        if let Some(error_code) = error_code {
            self.errors.get_or_create(&ErrorLabels { error_code }).inc();
        }
    }

    /// The OpenMetrics text exposition, with the pool gauges read now.
    pub fn render(&self) -> String {
        if let Some(store) = &self.store {
            let pool = store.pool_status();
            self.pool_size.set(i64::from(pool.size));
            self.pool_idle.set(pool.idle as i64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The metrics listener's router: `GET /metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}
