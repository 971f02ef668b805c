//! The task API: a multi-user todo backend that verifies Better Auth JWTs and stores tasks
//! in PostgreSQL or an embedded SQLite file.
//!
//! `main.rs` only parses the command line; everything it runs lives here so that tests
//! drive the same code.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;

pub mod allocator;
pub mod auth;
pub mod config;
pub mod cursors;
pub mod error;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod limits;
pub mod lists;
pub mod metrics;
pub mod storage;
pub mod sync;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod versions;

use config::Config;

/// How long in-flight requests may run after a shutdown signal before the process exits.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// User and lifetime of the token printed in development mode.
const DEV_USER: &str = "dev-user";
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Runs the service until SIGTERM or Ctrl-C.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    telemetry::init(config.log_format);
    tracing::debug!(purge_delay_ms = allocator::purge_delay_ms(), "allocator");

    let development_secret = if config.auth.has_key() {
        None
    } else {
        let secret = auth::random_secret();
        config.auth.secret = Some(secret.clone());
        Some(secret)
    };

    let tls = config
        .tls
        .clone()
        .map(tls::Tls::load)
        .transpose()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let store = storage::connect(config.database_url.expose_secret(), &config.pool)
        .await
        .context("DATABASE_URL: cannot open the database")?;
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| {
            format!(
                "HOST/PORT: cannot listen on {}:{}",
                config.host, config.port
            )
        })?;
    // From here on a SIGTERM or Ctrl-C is a graceful shutdown, even one that comes while
    // the rest starts or before the accept loop first looks.
    let mut signals = ShutdownSignals::listen();
    let address = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%address, scheme, database = store.backend(), "listening");

    if let Some(secret) = &development_secret {
        print_development_banner(secret, &config, &format!("{scheme}://{address}"))?;
    }

    let verifier = auth::Verifier::new(&config.auth);
    // Until the first fetch succeeds, JWKS-signed tokens get 503; /health is unaffected.
    verifier.spawn_jwks_refresh();
    let upkeep = storage::upkeep::Upkeep {
        idempotency_ttl: config.idempotency_ttl,
        sync_retention: config.sync_retention,
    };
    tokio::spawn(storage::upkeep::run_forever(store.clone(), upkeep));
    let cursors = storage::cursor_key(store.as_ref())
        .await
        .context("cannot read or store the cursor signing key")?;
    let state = http::AppState::new(store, verifier, cursors);

    if let Some(metrics_addr) = config.metrics_addr {
        let metrics_listener = TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("METRICS_ADDR: cannot listen on {metrics_addr}"))?;
        // The bound address: with port 0 the system picked one.
        let address = metrics_listener.local_addr()?;
        tracing::info!(%address, "metrics at /metrics");
        let metrics = metrics::router(state.metrics.clone());
        tokio::spawn(async move { axum::serve(metrics_listener, metrics).await });
    }

    let options = http::HttpOptions {
        cors: config.cors_origins.clone(),
        max_concurrent_requests: config.max_concurrent_requests,
        require_if_match: config.require_if_match,
        idempotency_ttl: config.idempotency_ttl,
        sync_retention: config.sync_retention,
        events: config.events.clone(),
        closing: tokio_util::sync::CancellationToken::new(),
        limits: config.limits.clone(),
        draining: http::Draining::default(),
    };
    let (closing, draining) = (options.closing.clone(), options.draining.clone());
    let app = http::app(state, &options);
    let delay = config.shutdown_delay;
    let shutdown = async move {
        signals.recv().await;
        // First the balancer is told (`/health` 503) while requests are still served;
        // then open event streams end at once, so the drain waits only for ordinary
        // requests.
        draining.begin();
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutting down: /health answers 503; still serving for SHUTDOWN_DELAY"
            );
            // A second signal cuts the delay short.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = signals.recv() => {}
            }
        }
        closing.cancel();
    };
    match tls {
        Some(tls) => {
            tls.spawn_reloader(tls::RELOAD_CHECK_INTERVAL);
            serve_tls(listener, http::with_hsts(app), &tls, shutdown).await?;
        }
        None => serve(listener, app, shutdown).await?,
    }
    tracing::info!("stopped");
    Ok(())
}

/// Serves HTTPS until `shutdown` resolves, then lets requests in flight finish for up to
/// [`SHUTDOWN_GRACE`].
pub async fn serve_tls(
    listener: TcpListener,
    app: axum::Router,
    tls: &tls::Tls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing requests in flight");
        stopper.graceful_shutdown(Some(SHUTDOWN_GRACE));
    });
    axum_server::from_tcp_rustls(listener.into_std()?, tls.rustls_config())?
        .handle(handle)
        .serve(app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .await
}

/// Serves HTTP/1.1 until `shutdown` resolves, then lets requests in flight finish for up
/// to [`SHUTDOWN_GRACE`].
///
/// The accept loop is hyper's own HTTP/1 connection rather than `axum::serve`, which
/// sniffs every connection for HTTP/2 first: the few bytes of that sniff make hyper's
/// read buffer grow to 16 KiB on every connection, which an open event stream then holds
/// for its whole life (8 KiB per stream; 10,000 streams are 80 MiB more). Cleartext
/// HTTP/2 (prior knowledge) is therefore not offered; HTTPS negotiates HTTP/2 by ALPN.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new());
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Each answer goes out as soon as it is written, never held back for an earlier
        // segment's acknowledgement (Nagle's algorithm).
        let _ = stream.set_nodelay(true);
        // The peer's address, for the failed-authentication limit.
        let peer = axum::extract::ConnectInfo(stream.peer_addr().ok());
        let service = TowerToHyperService::new(app.clone().map_request(
            move |req: axum::http::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                if let axum::extract::ConnectInfo(Some(addr)) = peer {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(addr));
                }
                req
            },
        ));
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that goes away mid-request is not the service's error.
            let _ = connection.await;
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing requests in flight");
    tokio::select! {
        () = connections.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("requests still running {SHUTDOWN_GRACE:?} after shutdown began; exiting");
        }
    }
    Ok(())
}

/// SIGTERM (how platforms stop a service) and Ctrl-C, caught from the moment this is
/// made. (`tokio::signal::ctrl_c()` and a signal stream made inside the shutdown future
/// would be set up only once that future is first polled, and a signal before that would
/// kill the process outright.)
struct ShutdownSignals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Starts catching the signals; needs the async runtime.
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                terminate: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for the next signal (one that came since the last call counts).
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.terminate) => {},
                () = next(&mut self.interrupt) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Development mode: say loudly that a throwaway secret is in use and show a first call.
/// Printed to the terminal, never to the log: it holds a token.
fn print_development_banner(
    secret: &SecretString,
    config: &Config,
    base: &str,
) -> anyhow::Result<()> {
    tracing::warn!(
        "DEVELOPMENT MODE: no JWT_SECRET, BETTER_AUTH_SECRET or BETTER_AUTH_URL set; tokens are signed with a random secret made for this run"
    );
    let token = auth::mint(secret, &config.auth, DEV_USER, DEV_TOKEN_TTL)?;
    println!(
        "
==============================================================================
 DEVELOPMENT MODE — no key is configured, so this run signs tokens with a
 random secret that dies with the process. Set JWT_SECRET (or BETTER_AUTH_SECRET)
 for tokens that outlive a restart; APP_ENV=production refuses to start without one.

 A token for user \"{DEV_USER}\", valid 24 hours:

   export TOKEN={token}

 Try it:

   curl -X POST {base}/api/{DEV_USER}/tasks -H \"Authorization: Bearer $TOKEN\" \\
        -H 'Content-Type: application/json' -d '{{\"title\": \"My first task\"}}'
   curl -H \"Authorization: Bearer $TOKEN\" {base}/api/{DEV_USER}/tasks

 Or in the browser: {base}/docs (Authorize, paste the token, try every call).
==============================================================================
"
    );
    Ok(())
}
