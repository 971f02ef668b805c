//! Configuration from environment variables (and `.env`, loaded by `main`).
//!
//! Every bad setting stops start-up with one line naming it: see [`ConfigError`].

use std::net::SocketAddr;

use axum::http::HeaderValue;
use secrecy::SecretString;
use url::Url;

pub use crate::auth::AuthConfig;
use crate::events::fanout::EventSettings;
use crate::limits::LimitSettings;
use crate::storage::{PoolSettings, Pooler};
use crate::tls::TlsFiles;

pub const DEFAULT_DATABASE_URL: &str = "sqlite://tasks.db";

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

impl ConfigError {
    fn new(setting: &'static str, message: impl Into<String>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No cross-origin access (the default).
    None,
    /// `CORS_ORIGINS=*`: any origin (tokens travel in a header, never in cookies).
    Any,
    List(Vec<HeaderValue>),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: SecretString,
    pub host: String,
    pub port: u16,
    pub auth: AuthConfig,
    pub cors_origins: CorsOrigins,
    pub log_format: LogFormat,
    pub environment: Environment,
    pub pool: PoolSettings,
    /// HTTPS served by the service itself (`TLS_CERT_FILE`, `TLS_KEY_FILE`).
    pub tls: Option<TlsFiles>,
    /// Where the Prometheus metrics are served (`METRICS_ADDR`); off when unset.
    pub metrics_addr: Option<SocketAddr>,
    /// Requests handled at once; the excess gets 503 at once (`MAX_CONCURRENT_REQUESTS`).
    pub max_concurrent_requests: usize,
    /// PUT, PATCH and DELETE without `If-Match` get 428 (`REQUIRE_IF_MATCH`).
    pub require_if_match: bool,
    /// How long an `Idempotency-Key` is remembered (`IDEMPOTENCY_TTL`, default 24 h).
    pub idempotency_ttl: std::time::Duration,
    /// How long a sync cursor stays valid and deletions are remembered (`SYNC_RETENTION`,
    /// default 30 days).
    pub sync_retention: std::time::Duration,
    /// The event stream's limits and heartbeat (`MAX_STREAMS_PER_USER`, `MAX_STREAMS`,
    /// `EVENTS_HEARTBEAT`) and the listener's own connection (`DATABASE_DIRECT_URL`).
    pub events: EventSettings,
    /// Rate limits (`RATE_LIMIT`, `RATE_LIMIT_WINDOW`, `AUTH_FAILURE_LIMIT`,
    /// `TRUSTED_PROXIES`, `REDIS_URL`, `REDIS_KEY_PREFIX`).
    pub limits: LimitSettings,
    /// How long requests are still served after SIGTERM while `/health` answers 503
    /// (`SHUTDOWN_DELAY`, default 0): set it to the load balancer's check interval.
    pub shutdown_delay: std::time::Duration,
}

/// Enough to keep the database pool busy several times over, few enough that waiting
/// requests cannot pile up without bound.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`; an empty value counts as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        let environment = match get("APP_ENV").as_deref() {
            None | Some("development") => Environment::Development,
            Some("production") => Environment::Production,
            Some(other) => {
                return Err(ConfigError::new(
                    "APP_ENV",
                    format!("expected development or production, got {other:?}"),
                ));
            }
        };

        let database_url = get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        if !["postgres://", "postgresql://", "sqlite:"]
            .iter()
            .any(|scheme| database_url.starts_with(scheme))
        {
            // The value may hold a password: name the setting, not its value.
            return Err(ConfigError::new(
                "DATABASE_URL",
                "expected a postgres://, postgresql:// or sqlite: URL",
            ));
        }

        let host = get("HOST").unwrap_or_else(|| "127.0.0.1".into());
        let port = match get("PORT") {
            None => 8000,
            Some(p) => p.trim().parse().map_err(|_| {
                ConfigError::new("PORT", format!("expected a port number, got {p:?}"))
            })?,
        };

        let max_connections = match get("DATABASE_MAX_CONNECTIONS") {
            None => PoolSettings::default().max_connections,
            Some(n) => match n.trim().parse::<u32>() {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => {
                    return Err(ConfigError::new(
                        "DATABASE_MAX_CONNECTIONS",
                        format!("expected a number from 1 to 1000, got {n:?}"),
                    ));
                }
            },
        };
        let pool = PoolSettings {
            max_connections,
            pooler: pooler_config(&get, &database_url)?,
            direct_url: get("DATABASE_DIRECT_URL").map(SecretString::from),
            ..PoolSettings::default()
        };
        let max_concurrent_requests = match get("MAX_CONCURRENT_REQUESTS") {
            None => DEFAULT_MAX_CONCURRENT_REQUESTS,
            Some(n) => match n.trim().parse::<usize>() {
                Ok(n) if (1..=100_000).contains(&n) => n,
                _ => {
                    return Err(ConfigError::new(
                        "MAX_CONCURRENT_REQUESTS",
                        format!("expected a number from 1 to 100000, got {n:?}"),
                    ));
                }
            },
        };

        let require_if_match = match get("REQUIRE_IF_MATCH").as_deref().map(str::trim) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(ConfigError::new(
                    "REQUIRE_IF_MATCH",
                    format!("expected true or false, got {other:?}"),
                ));
            }
        };
        let idempotency_ttl = match get("IDEMPOTENCY_TTL") {
            None => crate::idempotency::DEFAULT_TTL,
            Some(v) => parse_duration("IDEMPOTENCY_TTL", &v)?,
        };
        let sync_retention = match get("SYNC_RETENTION") {
            None => crate::sync::DEFAULT_RETENTION,
            Some(v) => parse_duration("SYNC_RETENTION", &v)?,
        };

        let events = events_config(&get)?;
        let limits = limits_config(&get)?;
        let shutdown_delay = match get("SHUTDOWN_DELAY") {
            None => std::time::Duration::ZERO,
            Some(v) => {
                // `0`/`0s` is the default (no delay).
                match seconds_or_duration(&v) {
                    Ok(d) if d <= std::time::Duration::from_secs(300) => d,
                    _ => {
                        return Err(ConfigError::new(
                            "SHUTDOWN_DELAY",
                            format!("expected a duration from 0s to 300s, such as 2s, got {v:?}"),
                        ));
                    }
                }
            }
        };

        let auth = auth_config(&get)?;
        if environment == Environment::Production && !auth.has_key() {
            return Err(ConfigError::new(
                "JWT_SECRET",
                "no key configured; APP_ENV=production needs JWT_SECRET (or BETTER_AUTH_SECRET) or BETTER_AUTH_URL",
            ));
        }

        let cors_origins = match get("CORS_ORIGINS") {
            None => CorsOrigins::None,
            Some(v) if v.trim() == "*" => CorsOrigins::Any,
            Some(v) => CorsOrigins::List(
                v.split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(parse_origin)
                    .collect::<Result<_, _>>()?,
            ),
        };

        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("expected json or pretty, got {other:?}"),
                ));
            }
        };

        let tls = match (get("TLS_CERT_FILE"), get("TLS_KEY_FILE")) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.trim().into(),
                key: key.trim().into(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "TLS_KEY_FILE",
                    "must be set with TLS_CERT_FILE",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "TLS_CERT_FILE",
                    "must be set with TLS_KEY_FILE",
                ));
            }
        };
        let metrics_addr = get("METRICS_ADDR")
            .map(|v| {
                v.trim().parse().map_err(|_| {
                    ConfigError::new(
                        "METRICS_ADDR",
                        format!("expected an address like 127.0.0.1:9100, got {v:?}"),
                    )
                })
            })
            .transpose()?;

        Ok(Self {
            database_url: database_url.into(),
            host,
            port,
            auth,
            cors_origins,
            log_format,
            environment,
            pool,
            tls,
            metrics_addr,
            max_concurrent_requests,
            require_if_match,
            idempotency_ttl,
            sync_retention,
            events,
            limits,
            shutdown_delay,
        })
    }
}

fn limits_config(get: &impl Fn(&str) -> Option<String>) -> Result<LimitSettings, ConfigError> {
    let count = |setting: &'static str, default: u32| match get(setting) {
        None => Ok(default),
        Some(n) => n
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= 1_000_000)
            .ok_or_else(|| {
                ConfigError::new(
                    setting,
                    format!("expected a number from 0 (off) to 1000000, got {n:?}"),
                )
            }),
    };
    let quota = count("RATE_LIMIT", crate::limits::DEFAULT_RATE_LIMIT)?;
    let window = match get("RATE_LIMIT_WINDOW") {
        None => crate::limits::DEFAULT_RATE_LIMIT_WINDOW_SECS,
        Some(v) => match seconds_or_duration(&v) {
            Ok(d) if d.subsec_nanos() == 0 && (1..=86_400).contains(&d.as_secs()) => {
                d.as_secs() as u32
            }
            _ => {
                return Err(ConfigError::new(
                    "RATE_LIMIT_WINDOW",
                    format!("expected whole seconds from 1s to 24h, such as 60s or 1m, got {v:?}"),
                ));
            }
        },
    };
    let auth_failures = count(
        "AUTH_FAILURE_LIMIT",
        crate::limits::DEFAULT_AUTH_FAILURE_LIMIT,
    )?;
    let trusted_proxies = match get("TRUSTED_PROXIES") {
        None => Vec::new(),
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        ConfigError::new(
                            "TRUSTED_PROXIES",
                            format!("expected addresses or networks such as 10.0.0.0/8, got {p:?}"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let redis_url = get("REDIS_URL").map(|v| v.trim().to_owned());
    if let Some(url) = &redis_url {
        // The value may hold a password: name the setting, not its value.
        if !url.starts_with("redis://") || redis::Client::open(url.as_str()).is_err() {
            return Err(ConfigError::new(
                "REDIS_URL",
                "expected a redis:// URL, such as redis://127.0.0.1:6379/0",
            ));
        }
    }
    Ok(LimitSettings {
        user: crate::limits::Policy::new(quota, window),
        auth_failures: crate::limits::Policy::new(
            auth_failures,
            crate::limits::AUTH_FAILURE_WINDOW_SECS,
        ),
        trusted_proxies,
        redis_url: redis_url.map(SecretString::from),
        redis_prefix: get("REDIS_KEY_PREFIX")
            .map(|p| p.trim().to_owned())
            .unwrap_or_else(|| crate::limits::DEFAULT_REDIS_PREFIX.into()),
    })
}

/// `DATABASE_POOLER`: `none` (the default) or `transaction`, for a transaction-mode pooler
/// such as PgBouncer's or Neon's `-pooler` endpoint. On PostgreSQL that mode needs
/// `DATABASE_DIRECT_URL` as well: the migrations hold a session-level lock and the event
/// fan-out LISTENs, and a transaction pooler keeps neither (the lock would stay on a
/// server connection other clients share, and notifications would reach whichever client
/// has it next).
fn pooler_config(
    get: &impl Fn(&str) -> Option<String>,
    database_url: &str,
) -> Result<Pooler, ConfigError> {
    let pooler = match get("DATABASE_POOLER").as_deref().map(str::trim) {
        None | Some("none") => Pooler::None,
        Some("transaction") => Pooler::Transaction,
        Some(other) => {
            return Err(ConfigError::new(
                "DATABASE_POOLER",
                format!("expected none or transaction, got {other:?}"),
            ));
        }
    };
    if pooler == Pooler::Transaction
        && !database_url.starts_with("sqlite:")
        && get("DATABASE_DIRECT_URL").is_none()
    {
        return Err(ConfigError::new(
            "DATABASE_DIRECT_URL",
            "DATABASE_POOLER=transaction needs a direct (unpooled) postgres:// URL as well, \
             for the migrations and the event fan-out",
        ));
    }
    Ok(pooler)
}

fn events_config(get: &impl Fn(&str) -> Option<String>) -> Result<EventSettings, ConfigError> {
    let count = |setting: &'static str, default: usize, max: usize| match get(setting) {
        None => Ok(default),
        Some(n) => match n.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                setting,
                format!("expected a number from 1 to {max}, got {n:?}"),
            )),
        },
    };
    let defaults = EventSettings::default();
    let heartbeat = match get("EVENTS_HEARTBEAT") {
        None => defaults.heartbeat,
        Some(v) => match parse_duration("EVENTS_HEARTBEAT", &v)? {
            d if d <= std::time::Duration::from_secs(30) => d,
            _ => {
                return Err(ConfigError::new(
                    "EVENTS_HEARTBEAT",
                    format!("at most 30s (proxies close idle streams), got {v:?}"),
                ));
            }
        },
    };
    let listener_url = get("DATABASE_DIRECT_URL");
    if let Some(url) = &listener_url
        && !url.starts_with("postgres://")
        && !url.starts_with("postgresql://")
    {
        return Err(ConfigError::new(
            "DATABASE_DIRECT_URL",
            "expected a postgres:// or postgresql:// URL",
        ));
    }
    Ok(EventSettings {
        max_streams_per_user: count(
            "MAX_STREAMS_PER_USER",
            defaults.max_streams_per_user,
            100_000,
        )?,
        max_streams: count("MAX_STREAMS", defaults.max_streams, 1_000_000)?,
        heartbeat,
        listener_url: listener_url.map(SecretString::from),
        ..defaults
    })
}

/// Whole seconds (`60`) or any humantime duration (`60s`, `1m`, `1500ms`), zero included.
fn seconds_or_duration(value: &str) -> Result<std::time::Duration, humantime::DurationError> {
    let trimmed = value.trim();
    match trimmed.parse::<u64>() {
        Ok(seconds) => Ok(std::time::Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(trimmed),
    }
}

/// A duration as the contract writes them: `30d`, `24h`, `60s`, `500ms` (any
/// humantime form), more than zero.
fn parse_duration(setting: &'static str, value: &str) -> Result<std::time::Duration, ConfigError> {
    match humantime::parse_duration(value.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::new(
            setting,
            format!("expected a duration such as 24h, 60s or 500ms, got {value:?}"),
        )),
    }
}

fn auth_config(get: &impl Fn(&str) -> Option<String>) -> Result<AuthConfig, ConfigError> {
    let secret = match (get("JWT_SECRET"), get("BETTER_AUTH_SECRET")) {
        (Some(a), Some(b)) if a != b => {
            return Err(ConfigError::new(
                "JWT_SECRET",
                "JWT_SECRET and BETTER_AUTH_SECRET are both set and differ; set one",
            ));
        }
        (Some(s), _) | (None, Some(s)) => Some(s),
        (None, None) => None,
    };
    let better_auth_url = get("BETTER_AUTH_URL").map(|v| v.trim().to_owned());
    let base = better_auth_url
        .as_deref()
        .map(|v| parse_http_url("BETTER_AUTH_URL", v))
        .transpose()?;
    let jwks_url = match get("JWKS_URL") {
        Some(v) => Some(parse_http_url("JWKS_URL", &v)?),
        None => base.map(|mut url| {
            let path = format!("{}/api/auth/jwks", url.path().trim_end_matches('/'));
            url.set_path(&path);
            url
        }),
    };
    let audience = get("JWT_AUDIENCE")
        .map(|v| {
            v.split(',')
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(AuthConfig {
        secret: secret.map(SecretString::from),
        better_auth_url,
        jwks_url,
        issuer: get("JWT_ISSUER"),
        audience,
    })
}

fn parse_http_url(setting: &'static str, value: &str) -> Result<Url, ConfigError> {
    match Url::parse(value.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(url),
        _ => Err(ConfigError::new(
            setting,
            format!("expected an http(s) URL, got {value:?}"),
        )),
    }
}

fn parse_origin(origin: &str) -> Result<HeaderValue, ConfigError> {
    let url = parse_http_url("CORS_ORIGINS", origin)?;
    let canonical = url.origin().ascii_serialization();
    if canonical != origin.trim_end_matches('/') {
        return Err(ConfigError::new(
            "CORS_ORIGINS",
            format!("expected origins like https://app.example.com, got {origin:?}"),
        ));
    }
    HeaderValue::from_str(&canonical)
        .map_err(|_| ConfigError::new("CORS_ORIGINS", format!("invalid origin {origin:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::claims::ClaimRules;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_nothing() {
        let c = load(&[]).unwrap();
        assert_eq!(c.database_url.expose_secret(), DEFAULT_DATABASE_URL);
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8000));
        assert_eq!(c.environment, Environment::Development);
        assert_eq!(c.log_format, LogFormat::Pretty);
        assert_eq!(c.cors_origins, CorsOrigins::None);
        assert!(!c.auth.has_key());
        assert_eq!((c.tls, c.metrics_addr), (None, None));
        assert!(!c.require_if_match);
        assert_eq!(c.idempotency_ttl, std::time::Duration::from_secs(24 * 3600));
        assert_eq!(
            c.sync_retention,
            std::time::Duration::from_secs(30 * 86_400)
        );
    }

    #[test]
    fn write_settings() {
        let c = load(&[
            ("REQUIRE_IF_MATCH", "true"),
            ("IDEMPOTENCY_TTL", "30d"),
            ("SYNC_RETENTION", "7d"),
        ])
        .unwrap();
        assert_eq!(c.sync_retention, std::time::Duration::from_secs(7 * 86_400));
        assert!(c.require_if_match);
        assert_eq!(
            c.idempotency_ttl,
            std::time::Duration::from_secs(30 * 86_400)
        );
        for (value, ms) in [("500ms", 500), ("60s", 60_000), ("24h", 86_400_000)] {
            let c = load(&[("IDEMPOTENCY_TTL", value)]).unwrap();
            assert_eq!(c.idempotency_ttl.as_millis(), ms);
        }
        assert!(
            !load(&[("REQUIRE_IF_MATCH", "false")])
                .unwrap()
                .require_if_match
        );
    }

    #[test]
    fn tls_and_metrics_settings() {
        let c = load(&[
            ("TLS_CERT_FILE", "/etc/tls/cert.pem"),
            ("TLS_KEY_FILE", "/etc/tls/key.pem"),
            ("METRICS_ADDR", "127.0.0.1:9100"),
        ])
        .unwrap();
        assert_eq!(
            c.tls,
            Some(TlsFiles {
                cert: "/etc/tls/cert.pem".into(),
                key: "/etc/tls/key.pem".into()
            })
        );
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn each_bad_setting_is_named() {
        for (vars, setting) in [
            (vec![("PORT", "eighty")], "PORT"),
            (vec![("PORT", "70000")], "PORT"),
            (vec![("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
            (vec![("APP_ENV", "staging")], "APP_ENV"),
            (vec![("LOG_FORMAT", "xml")], "LOG_FORMAT"),
            (vec![("CORS_ORIGINS", "not a url")], "CORS_ORIGINS"),
            (
                vec![("CORS_ORIGINS", "https://a.example/path")],
                "CORS_ORIGINS",
            ),
            (vec![("BETTER_AUTH_URL", "ftp://x")], "BETTER_AUTH_URL"),
            (vec![("JWKS_URL", "nope")], "JWKS_URL"),
            (vec![("TLS_CERT_FILE", "cert.pem")], "TLS_KEY_FILE"),
            (vec![("TLS_KEY_FILE", "key.pem")], "TLS_CERT_FILE"),
            (vec![("METRICS_ADDR", "9100")], "METRICS_ADDR"),
            (
                vec![("MAX_CONCURRENT_REQUESTS", "0")],
                "MAX_CONCURRENT_REQUESTS",
            ),
            (
                vec![("DATABASE_MAX_CONNECTIONS", "0")],
                "DATABASE_MAX_CONNECTIONS",
            ),
            (vec![("REQUIRE_IF_MATCH", "1")], "REQUIRE_IF_MATCH"),
            (vec![("IDEMPOTENCY_TTL", "forever")], "IDEMPOTENCY_TTL"),
            (vec![("IDEMPOTENCY_TTL", "0s")], "IDEMPOTENCY_TTL"),
            (vec![("SYNC_RETENTION", "0s")], "SYNC_RETENTION"),
            (vec![("SYNC_RETENTION", "a month")], "SYNC_RETENTION"),
            (vec![("APP_ENV", "production")], "JWT_SECRET"),
            (
                vec![("JWT_SECRET", "a"), ("BETTER_AUTH_SECRET", "b")],
                "JWT_SECRET",
            ),
        ] {
            let err = load(&vars).unwrap_err();
            assert_eq!(err.setting, setting, "{vars:?}");
            assert!(err.to_string().contains(setting));
        }
    }

    #[test]
    fn limit_settings() {
        let c = load(&[]).unwrap();
        assert_eq!(c.limits.user, crate::limits::Policy::new(1200, 60));
        assert_eq!(c.limits.auth_failures, crate::limits::Policy::new(120, 60));
        assert!(c.limits.redis_url.is_none() && c.limits.trusted_proxies.is_empty());
        assert_eq!(c.shutdown_delay, std::time::Duration::ZERO);
        let c = load(&[
            ("RATE_LIMIT", "30"),
            ("RATE_LIMIT_WINDOW", "1m"),
            ("AUTH_FAILURE_LIMIT", "0"),
            ("TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1,::1"),
            ("REDIS_URL", "redis://:pw@127.0.0.1:6379/2"),
            ("REDIS_KEY_PREFIX", "app1:"),
            ("SHUTDOWN_DELAY", "2s"),
        ])
        .unwrap();
        assert_eq!(c.limits.user, crate::limits::Policy::new(30, 60));
        assert_eq!(c.limits.auth_failures, None);
        assert_eq!(c.limits.trusted_proxies.len(), 3);
        assert!(
            c.limits.trusted_proxies[1].contains(&"192.0.2.1".parse::<std::net::IpAddr>().unwrap())
        );
        assert_eq!(c.limits.redis_prefix, "app1:");
        assert_eq!(c.shutdown_delay, std::time::Duration::from_secs(2));
        for (value, ms) in [("0", 0), ("0s", 0), ("5", 5000), ("1500ms", 1500)] {
            let c = load(&[("SHUTDOWN_DELAY", value)]).unwrap();
            assert_eq!(c.shutdown_delay.as_millis(), ms, "{value}");
        }
        assert!(!format!("{c:?}").contains(":pw@"));
        assert_eq!(load(&[("RATE_LIMIT", "0")]).unwrap().limits.user, None);
        assert_eq!(
            load(&[("RATE_LIMIT_WINDOW", "90")]).unwrap().limits.user,
            crate::limits::Policy::new(1200, 90)
        );
        for (name, value) in [
            ("RATE_LIMIT", "-1"),
            ("RATE_LIMIT", "lots"),
            ("RATE_LIMIT_WINDOW", "1500ms"),
            ("RATE_LIMIT_WINDOW", "0s"),
            ("RATE_LIMIT_WINDOW", "2d"),
            ("AUTH_FAILURE_LIMIT", "x"),
            ("TRUSTED_PROXIES", "10.0.0.0/33"),
            ("TRUSTED_PROXIES", "proxy.local"),
            ("REDIS_URL", "http://:secret@127.0.0.1"),
            ("SHUTDOWN_DELAY", "soon"),
            ("SHUTDOWN_DELAY", "1h"),
        ] {
            let err = load(&[(name, value)]).unwrap_err();
            assert_eq!(err.setting, name, "{value}");
            assert!(!err.to_string().contains("secret"));
        }
    }

    #[test]
    fn database_pooler_settings() {
        const PG: (&str, &str) = ("DATABASE_URL", "postgres://u@pooler/db");
        const DIRECT: (&str, &str) = ("DATABASE_DIRECT_URL", "postgres://u@direct/db");
        let c = load(&[PG]).unwrap();
        assert_eq!(c.pool.pooler, Pooler::None);
        assert!(c.pool.direct_url.is_none());
        let c = load(&[PG, ("DATABASE_POOLER", "none")]).unwrap();
        assert_eq!(c.pool.pooler, Pooler::None);
        let c = load(&[PG, ("DATABASE_POOLER", "transaction"), DIRECT]).unwrap();
        assert_eq!(c.pool.pooler, Pooler::Transaction);
        assert_eq!(
            c.pool.direct_url.as_ref().map(|u| u.expose_secret()),
            Some(DIRECT.1)
        );
        // The migrations use the direct URL whenever it is set.
        let c = load(&[PG, DIRECT]).unwrap();
        assert_eq!(
            c.pool.direct_url.as_ref().map(|u| u.expose_secret()),
            Some(DIRECT.1)
        );
        // SQLite has no pooler to speak of.
        let c = load(&[("DATABASE_POOLER", "transaction")]).unwrap();
        assert_eq!(c.pool.pooler, Pooler::Transaction);
        for (vars, setting) in [
            (vec![PG, ("DATABASE_POOLER", "session")], "DATABASE_POOLER"),
            (vec![PG, ("DATABASE_POOLER", "yes")], "DATABASE_POOLER"),
            (
                vec![PG, ("DATABASE_POOLER", "transaction")],
                "DATABASE_DIRECT_URL",
            ),
        ] {
            let err = load(&vars).unwrap_err();
            assert_eq!(err.setting, setting, "{vars:?}");
            assert!(err.to_string().contains(setting));
        }
    }

    #[test]
    fn database_url_errors_never_echo_the_value() {
        let err = load(&[("DATABASE_URL", "mysql://u:hunter2@h/db")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn secret_alias_and_redacted_debug() {
        let c = load(&[("BETTER_AUTH_SECRET", "s3cret-value")]).unwrap();
        assert_eq!(
            c.auth.secret.as_ref().unwrap().expose_secret(),
            "s3cret-value"
        );
        assert!(!format!("{c:?}").contains("s3cret-value"));
        let c = load(&[("JWT_SECRET", "x"), ("BETTER_AUTH_SECRET", "x")]).unwrap();
        assert!(c.auth.has_key());
    }

    #[test]
    fn jwks_url_derives_from_better_auth_url() {
        let c = load(&[("BETTER_AUTH_URL", "https://auth.example.com/")]).unwrap();
        assert!(c.auth.has_key());
        assert_eq!(
            c.auth.jwks_url.unwrap().as_str(),
            "https://auth.example.com/api/auth/jwks"
        );
        let c = load(&[
            ("BETTER_AUTH_URL", "https://auth.example.com"),
            ("JWKS_URL", "https://keys.example.com/jwks.json"),
        ])
        .unwrap();
        assert_eq!(
            c.auth.jwks_url.unwrap().as_str(),
            "https://keys.example.com/jwks.json"
        );
    }

    #[test]
    fn jwks_tokens_default_to_better_auth_url_for_iss_and_aud() {
        let c = load(&[("BETTER_AUTH_URL", "http://localhost:3000")]).unwrap();
        let both = vec![
            "http://localhost:3000".to_owned(),
            "http://localhost:3000/".to_owned(),
        ];
        assert_eq!(
            c.auth.jwks_rules(),
            ClaimRules {
                issuers: both.clone(),
                audiences: both
            }
        );
        // Better Auth signs with the origin of its base URL.
        let c = load(&[("BETTER_AUTH_URL", "https://Auth.Example.com:443/api/auth")]).unwrap();
        let issuers = c.auth.jwks_rules().issuers;
        assert_eq!(issuers[0], "https://auth.example.com");
        assert!(issuers.contains(&"https://Auth.Example.com:443/api/auth".to_owned()));
        // Shared-secret tokens are held only to what is set explicitly.
        assert_eq!(c.auth.secret_rules(), ClaimRules::default());
        let c = load(&[
            ("BETTER_AUTH_URL", "http://localhost:3000"),
            ("JWT_ISSUER", "issuer"),
            ("JWT_AUDIENCE", "a,b"),
        ])
        .unwrap();
        let rules = ClaimRules {
            issuers: vec!["issuer".into()],
            audiences: vec!["a".into(), "b".into()],
        };
        assert_eq!(c.auth.jwks_rules(), rules);
        assert_eq!(c.auth.secret_rules(), rules);
    }

    #[test]
    fn lists_are_comma_separated() {
        let c = load(&[
            ("CORS_ORIGINS", "https://a.example, http://localhost:3000"),
            ("JWT_AUDIENCE", "api, web"),
            ("LOG_FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(
            c.cors_origins,
            CorsOrigins::List(vec![
                HeaderValue::from_static("https://a.example"),
                HeaderValue::from_static("http://localhost:3000")
            ])
        );
        assert_eq!(c.auth.audience, vec!["api", "web"]);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            load(&[("CORS_ORIGINS", "*")]).unwrap().cors_origins,
            CorsOrigins::Any
        );
    }
}
