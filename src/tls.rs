//! HTTPS served by the service itself (`TLS_CERT_FILE`, `TLS_KEY_FILE`): rustls with
//! TLS 1.2 and 1.3 only (rustls has no older versions), HTTP/2 and HTTP/1.1 by ALPN, and
//! certificates reloaded from disk without a restart — on SIGHUP, and whenever the files
//! change — so renewal drops no connection. A renewal that does not load (a half-written
//! file, a key that does not match) is logged and the current certificate stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How often the certificate files are checked for changes.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Where the certificate chain and its private key are (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the certificate could not be loaded; names the setting to fix.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct TlsError {
    pub setting: &'static str,
    pub message: String,
}

fn error(setting: &'static str, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        setting,
        message: message.to_string(),
    }
}

/// Builds the rustls configuration from the PEM files.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error("TLS_CERT_FILE", format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(error(
            "TLS_CERT_FILE",
            format!("{}: no certificate in the file", files.cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| error("TLS_KEY_FILE", format!("{}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error("TLS_CERT_FILE", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| error("TLS_KEY_FILE", format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The live TLS configuration, and what reloads it.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    config: RustlsConfig,
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = RustlsConfig::from_config(Arc::new(server_config(&files)?));
        Ok(Self { files, config })
    }

    pub fn rustls_config(&self) -> RustlsConfig {
        self.config.clone()
    }

    /// Loads the files again; on failure the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        self.config.reload_from_config(Arc::new(config));
        tracing::info!("TLS certificate reloaded");
        Ok(())
    }

    /// Reloads on SIGHUP, and when either file's modification time changes (checked every
    /// `interval`). Runs until the process ends.
    pub fn spawn_reloader(&self, interval: Duration) {
        let tls = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut seen = tls.modified();
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup_signal = async {
                    match hangup.as_mut() {
                        Some(signal) => {
                            signal.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup_signal = std::future::pending::<()>();
                tokio::select! {
                    () = hangup_signal => {}
                    _ = ticks.tick() => {
                        let now = tls.modified();
                        if now == seen {
                            continue;
                        }
                        seen = now;
                    }
                }
                if let Err(e) = tls.reload() {
                    tracing::error!(error = %e, "TLS certificate reload failed; keeping the current one");
                }
            }
        });
    }

    fn modified(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let at = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        (at(&self.files.cert), at(&self.files.key))
    }
}
