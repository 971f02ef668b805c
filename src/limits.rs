//! Fair use: the per-user request limit and the per-address limit on failed
//! authentications, in memory or shared by every instance through Redis.
//!
//! The rule is GCRA ([`gcra`]); [`memory`] keeps it per instance, [`shared`] in Redis.
//! Redis failing or slow never fails a request: the request is served unlimited, the
//! failure counted in `task_api_redis_errors_total` and logged at most once per interval.

use std::cell::Cell;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{Extensions, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use moka::sync::Cache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use secrecy::{ExposeSecret, SecretString};

use crate::error::ApiError;
use crate::telemetry::Throttle;

pub mod gcra;
pub mod memory;
pub mod shared;

pub use gcra::{Decision, Policy};

pub static RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub static RATE_LIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The name of the per-user policy in the `RateLimit` headers.
const USER_POLICY: &str = "user";

/// The limits' settings (`RATE_LIMIT`, `RATE_LIMIT_WINDOW`, `AUTH_FAILURE_LIMIT`,
/// `TRUSTED_PROXIES`, `REDIS_URL`, `REDIS_KEY_PREFIX`).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Requests per user per window; `None`: off.
    pub user: Option<Policy>,
    /// Failed authentications per client address per minute; `None`: off.
    pub auth_failures: Option<Policy>,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<IpNet>,
    /// Shared limits; unset: each instance limits on its own.
    pub redis_url: Option<SecretString>,
    /// Prefix of every Redis key, so several services (or tests) can share one Redis.
    pub redis_prefix: String,
}

pub const DEFAULT_RATE_LIMIT: u32 = 1200;
pub const DEFAULT_RATE_LIMIT_WINDOW_SECS: u32 = 60;
pub const DEFAULT_AUTH_FAILURE_LIMIT: u32 = 120;
/// The failed-authentication limit's window.
pub const AUTH_FAILURE_WINDOW_SECS: u32 = 60;
pub const DEFAULT_REDIS_PREFIX: &str = "task_api:";

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            user: Policy::new(DEFAULT_RATE_LIMIT, DEFAULT_RATE_LIMIT_WINDOW_SECS),
            auth_failures: Policy::new(DEFAULT_AUTH_FAILURE_LIMIT, AUTH_FAILURE_WINDOW_SECS),
            trusted_proxies: Vec::new(),
            redis_url: None,
            redis_prefix: DEFAULT_REDIS_PREFIX.into(),
        }
    }
}

impl LimitSettings {
    /// Both limits off.
    pub fn off() -> Self {
        Self {
            user: None,
            auth_failures: None,
            ..Self::default()
        }
    }
}

/// What the limits count, exported as metrics.
#[derive(Clone, Default)]
pub struct LimitCounters {
    /// Requests answered 429, by `kind`: `user`, `auth_failures`, `streams`.
    pub limited: Family<KindLabels, Counter>,
    /// Redis calls that failed or ran over their budget (each request then served
    /// unlimited).
    pub redis_errors: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl LimitCounters {
    pub fn limited(&self, kind: &'static str) {
        self.limited.get_or_create(&KindLabels { kind }).inc();
    }
}

enum Store {
    Memory {
        users: Option<memory::MemoryLimiter>,
        failures: Option<memory::MemoryLimiter>,
    },
    Redis(shared::RedisLimiter),
}

pub struct Limits {
    settings: LimitSettings,
    store: Store,
    /// Addresses over the failed-authentication limit, until when. Checked before any
    /// signature work, so it is read from this instance's memory; it is filled by a
    /// failure this instance saw refused — counted here, or in Redis together with the
    /// failures every other instance saw.
    blocked: Cache<IpAddr, Instant>,
    /// When the last block ends (µs after `epoch`): until then `blocked` is looked up;
    /// after it, no address is blocked and the lookup is skipped.
    blocked_until: AtomicU64,
    epoch: Instant,
    /// `RateLimit-Policy`, the same on every answer.
    policy_header: Option<HeaderValue>,
    counters: LimitCounters,
    redis_failures: Throttle,
}

impl Limits {
    pub fn new(
        settings: LimitSettings,
        counters: LimitCounters,
    ) -> Result<Self, redis::RedisError> {
        let store = match &settings.redis_url {
            Some(url) => Store::Redis(shared::RedisLimiter::new(
                url.expose_secret(),
                &settings.redis_prefix,
            )?),
            None => Store::Memory {
                users: settings
                    .user
                    .map(|p| memory::MemoryLimiter::new(p, memory::MAX_KEYS)),
                failures: settings
                    .auth_failures
                    .map(|p| memory::MemoryLimiter::new(p, memory::MAX_KEYS)),
            },
        };
        let block_ttl = settings
            .auth_failures
            .map_or(Duration::from_secs(1), |p| p.idle_ttl());
        Ok(Self {
            store,
            blocked_until: AtomicU64::new(0),
            epoch: Instant::now(),
            policy_header: policy_header(&settings),
            blocked: Cache::builder()
                .max_capacity(memory::MAX_KEYS)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_live(block_ttl)
                .build(),
            settings,
            counters,
            redis_failures: Throttle::default(),
        })
    }

    /// Limits off, in memory (for tools and tests).
    pub fn off() -> Self {
        Self {
            settings: LimitSettings::off(),
            store: Store::Memory {
                users: None,
                failures: None,
            },
            blocked: Cache::new(1),
            blocked_until: AtomicU64::new(0),
            epoch: Instant::now(),
            policy_header: None,
            counters: LimitCounters::default(),
            redis_failures: Throttle::default(),
        }
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    pub fn counters(&self) -> &LimitCounters {
        &self.counters
    }

    /// The client's address: the peer's, or the last `X-Forwarded-For` hop when the peer
    /// is a trusted proxy. IPv6 clients are counted per /64 (what one host is usually
    /// given). `None` when the connection's peer is unknown (an in-process call).
    pub fn client_address(&self, extensions: &Extensions, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = extensions
            .get::<ConnectInfo<SocketAddr>>()?
            .0
            .ip()
            .to_canonical();
        let client = if self
            .settings
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer))
        {
            last_forwarded_hop(headers).unwrap_or(peer)
        } else {
            peer
        };
        Some(match client {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        })
    }

    /// 429 while `address` is over the failed-authentication limit.
    pub fn check_address(&self, address: Option<IpAddr>) -> Result<(), ApiError> {
        let (Some(address), Some(_)) = (address, self.settings.auth_failures) else {
            return Ok(());
        };
        if self.micros_since_epoch(Instant::now()) >= self.blocked_until.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.blocked.get(&address) {
            Some(until) if until > Instant::now() => {
                self.counters.limited("auth_failures");
                Err(auth_limited(
                    until.saturating_duration_since(Instant::now()),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication from `address`; 429 when it is one too many (the
    /// address is then refused before any signature work until it is back under).
    pub async fn failed_authentication(&self, address: Option<IpAddr>) -> Result<(), ApiError> {
        let (Some(address), Some(policy)) = (address, self.settings.auth_failures) else {
            return Ok(());
        };
        let key = address.to_string();
        let decision = match &self.store {
            Store::Memory { failures, .. } => failures.as_ref().map(|l| l.hit(&key)),
            Store::Redis(redis) => self.shared(redis.hit("auth", &key, &policy).await),
        };
        match decision {
            Some(d) if !d.allowed => {
                let wait = d.wait;
                let until = Instant::now() + wait;
                self.blocked.insert(address, until);
                self.blocked_until
                    .fetch_max(self.micros_since_epoch(until), Ordering::Relaxed);
                self.counters.limited("auth_failures");
                Err(auth_limited(wait))
            }
            _ => Ok(()),
        }
    }

    fn micros_since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Counts one request of `user`. Its answer is kept for the response's `RateLimit`
    /// headers (see [`headers`]); 429 when over the limit.
    pub async fn admit(&self, user: &str) -> Result<(), ApiError> {
        let Some(policy) = self.settings.user else {
            return Ok(());
        };
        let decision = match &self.store {
            Store::Memory { users, .. } => users.as_ref().map(|l| l.hit(user)),
            Store::Redis(redis) => self.shared(redis.hit("user", user, &policy).await),
        };
        match decision {
            Some(decision) => {
                keep(Answer::Counted(decision));
                if decision.allowed {
                    Ok(())
                } else {
                    self.counters.limited(USER_POLICY);
                    Err(ApiError::RateLimited {
                        detail: "Too many requests for this user; retry after the time in Retry-After",
                        retry_after_secs: decision.retry_after_secs,
                    })
                }
            }
            None => {
                keep(Answer::Uncounted(policy));
                Ok(())
            }
        }
    }

    fn shared(&self, answer: Result<Decision, shared::SharedError>) -> Option<Decision> {
        answer
            .inspect_err(|error| {
                self.counters.redis_errors.inc();
                self.redis_failures.warn(
                    || tracing::warn!(%error, "rate limits: Redis unavailable; serving unlimited"),
                );
            })
            .ok()
    }
}

fn auth_limited(wait: Duration) -> ApiError {
    ApiError::RateLimited {
        detail: "Too many failed authentications from this address; retry after the time in Retry-After",
        retry_after_secs: wait.as_secs_f64().ceil() as u64,
    }
}

/// The last hop of the last `X-Forwarded-For` header: the address the trusted proxy saw.
fn last_forwarded_hop(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all(&X_FORWARDED_FOR).iter().next_back()?;
    let hop = last.to_str().ok()?.rsplit(',').next()?.trim();
    // Some proxies write `ip:port` or `[v6]:port`.
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

fn policy_header(settings: &LimitSettings) -> Option<HeaderValue> {
    let policy = settings.user?;
    HeaderValue::try_from(policy.header(USER_POLICY)).ok()
}

#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Counted(Decision),
    /// The shared store did not answer: served unlimited, and the count is unknown.
    Uncounted(Policy),
}

tokio::task_local! {
    /// The limit's answer for the request this task is serving, for its response headers.
    /// A task-local rather than a request extension: nothing to allocate per request.
    static ANSWER: Cell<Option<Answer>>;
}

fn keep(answer: Answer) {
    // Outside the `/api` layer (a tool calling the store directly) there is no response.
    let _ = ANSWER.try_with(|slot| slot.set(Some(answer)));
}

/// The layer that writes `RateLimit-Policy` and `RateLimit` into the response of every
/// request whose token verified (429s included). When Redis did not answer, the request
/// was served unlimited, and `RateLimit` says the whole quota is left.
///
/// A plain service rather than `axum::middleware::from_fn`, which would box the service
/// below it and the future on every request.
#[derive(Clone)]
pub struct RateLimitHeadersLayer(pub Arc<Limits>);

impl<S> tower::Layer<S> for RateLimitHeadersLayer {
    type Service = RateLimitHeaders<S>;

    fn layer(&self, inner: S) -> RateLimitHeaders<S> {
        RateLimitHeaders {
            inner,
            limits: self.0.clone(),
        }
    }
}

/// See [`RateLimitHeadersLayer`].
#[derive(Clone)]
pub struct RateLimitHeaders<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for RateLimitHeaders<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::response::Response>,
{
    type Response = axum::response::Response;
    type Error = S::Error;
    type Future =
        tokio::task::futures::TaskLocalFuture<Cell<Option<Answer>>, WithHeaders<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        // The future runs in the answer's scope: the limit, deep in the handler's
        // extractors, leaves its answer there.
        ANSWER.scope(
            Cell::new(None),
            WithHeaders {
                inner: self.inner.call(request),
                policy: self.limits.policy_header.clone(),
            },
        )
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RateLimitHeaders`], inside the answer's scope.
    pub struct WithHeaders<F> {
        #[pin]
        inner: F,
        policy: Option<HeaderValue>,
    }
}

impl<F, E> Future for WithHeaders<F>
where
    F: Future<Output = Result<axum::response::Response, E>>,
{
    type Output = Result<axum::response::Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(policy) = this.policy.take()
            && let Some(answer) = ANSWER.try_with(Cell::get).ok().flatten()
        {
            let headers = response.headers_mut();
            headers.insert(RATE_LIMIT_POLICY.clone(), policy);
            let current = match answer {
                Answer::Counted(decision) => decision.header(USER_POLICY),
                // Served unlimited: the whole quota is there to be spent.
                Answer::Uncounted(policy) => {
                    format!("\"{USER_POLICY}\";r={};t=0", policy.quota)
                }
            };
            if let Ok(value) = HeaderValue::try_from(current) {
                headers.insert(RATE_LIMIT.clone(), value);
            }
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(trusted: &[&str]) -> Limits {
        let settings = LimitSettings {
            trusted_proxies: trusted.iter().map(|n| n.parse().unwrap()).collect(),
            ..LimitSettings::default()
        };
        Limits::new(settings, LimitCounters::default()).unwrap()
    }

    fn request(peer: &str, forwarded: &[&str]) -> (Extensions, HeaderMap) {
        let mut extensions = Extensions::new();
        extensions.insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        let mut headers = HeaderMap::new();
        for f in forwarded {
            headers.append(&X_FORWARDED_FOR, HeaderValue::from_str(f).unwrap());
        }
        (extensions, headers)
    }

    #[test]
    fn the_client_address_trusts_only_listed_proxies() {
        let l = limits(&["10.0.0.0/8", "::1/128"]);
        let addr = |peer, fwd: &[&str]| {
            let (e, h) = request(peer, fwd);
            l.client_address(&e, &h).unwrap().to_string()
        };
        // An untrusted peer's header is ignored: it could say anything.
        assert_eq!(addr("192.0.2.7:5000", &["203.0.113.9"]), "192.0.2.7");
        // A trusted proxy: the last hop of the last header, whatever came before it.
        assert_eq!(
            addr("10.1.2.3:5000", &["1.1.1.1, 203.0.113.9"]),
            "203.0.113.9"
        );
        assert_eq!(
            addr("10.1.2.3:5000", &["1.1.1.1", "203.0.113.10"]),
            "203.0.113.10"
        );
        assert_eq!(
            addr("10.1.2.3:5000", &["203.0.113.11:4711"]),
            "203.0.113.11"
        );
        // Missing or garbage: the proxy itself.
        assert_eq!(addr("10.1.2.3:5000", &[]), "10.1.2.3");
        assert_eq!(addr("10.1.2.3:5000", &["unknown"]), "10.1.2.3");
        // IPv4-mapped peers are IPv4; IPv6 counts per /64.
        assert_eq!(addr("[::ffff:192.0.2.8]:1", &[]), "192.0.2.8");
        assert_eq!(addr("[2001:db8:1:2:3:4:5:6]:1", &[]), "2001:db8:1:2::");
        assert_eq!(addr("[::1]:1", &["2001:db8::9"]), "2001:db8::");
        assert!(
            l.client_address(&Extensions::new(), &HeaderMap::new())
                .is_none()
        );
    }

    #[tokio::test]
    async fn failures_over_the_limit_block_the_address_before_any_work() {
        let settings = LimitSettings {
            auth_failures: Policy::new(3, 60),
            ..LimitSettings::default()
        };
        let counters = LimitCounters::default();
        let l = Limits::new(settings, counters.clone()).unwrap();
        let (a, b) = (
            Some("192.0.2.1".parse().unwrap()),
            Some("192.0.2.2".parse().unwrap()),
        );
        for _ in 0..3 {
            l.check_address(a).unwrap();
            l.failed_authentication(a).await.unwrap();
        }
        assert!(matches!(
            l.failed_authentication(a).await,
            Err(ApiError::RateLimited {
                retry_after_secs: 20,
                ..
            })
        ));
        assert!(l.check_address(a).is_err());
        l.check_address(b).unwrap();
        // Unknown peers are never limited.
        l.check_address(None).unwrap();
        l.failed_authentication(None).await.unwrap();
        assert_eq!(
            counters
                .limited
                .get_or_create(&KindLabels {
                    kind: "auth_failures"
                })
                .get(),
            2
        );
    }
}
