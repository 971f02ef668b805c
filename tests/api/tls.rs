//! HTTPS served by the service: certificates made here at test time (a CA and leaves),
//! TLS 1.2 and 1.3 accepted, 1.0 and 1.1 refused, HTTP/2, reload without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use task_api::tls::{Tls, TlsFiles};
use tokio::net::TcpListener;

use crate::support::{TestApp, tool};

/// A test CA that signs leaves for `localhost`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "task-api test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    /// A new leaf (its own key) written to `dir`; returns its DER.
    fn issue(&self, dir: &Path, name: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    fn client(&self, address: SocketAddr) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap())
            .resolve("localhost", address)
            .tls_info(true)
            .pool_max_idle_per_host(0)
    }
}

fn files(dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}

struct HttpsServer {
    address: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve_https(app: &TestApp, tls: &Tls) -> HttpsServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (router, tls) = (task_api::http::with_hsts(app.router.clone()), tls.clone());
    tokio::spawn(async move {
        task_api::serve_tls(listener, router, &tls, async {
            let _ = stopped.await;
        })
        .await
    });
    HttpsServer {
        address,
        _stop: stop,
    }
}

fn url(server: &HttpsServer, path: &str) -> String {
    format!("https://localhost:{}{path}", server.address.port())
}

/// Waits (up to 5 s) until new connections are given `expected`; returns what was seen.
async fn wait_until_presented(pki: &Pki, server: &HttpsServer, expected: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = presented(pki, server).await;
        if seen == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

/// The certificate the server presented on a fresh connection.
async fn presented(pki: &Pki, server: &HttpsServer) -> Vec<u8> {
    let response = pki
        .client(server.address)
        .build()
        .unwrap()
        .get(url(server, "/health"))
        .send()
        .await
        .unwrap();
    let info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .unwrap();
    info.peer_certificate().unwrap().to_vec()
}

async fn https_with_tls_1_2_and_1_3_and_http_2(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.issue(dir.path(), "leaf");
    let tls = Tls::load(files(dir.path())).unwrap();
    let server = serve_https(&app, &tls).await;
    let token = app.token("alice");

    for version in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        let client = pki
            .client(server.address)
            .min_tls_version(version)
            .max_tls_version(version)
            .build()
            .unwrap();
        let response = client
            .get(url(&server, "/api/alice/tasks"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert_eq!(response.status(), 200, "{version:?}");
        let headers = response.headers();
        assert_eq!(
            headers["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
        assert_eq!(headers["cache-control"], "no-store");
        assert!(headers.get("server").is_none());
    }

    // HTTP/2 by ALPN, and HTTP/1.1 for clients that only speak that.
    let h2 = pki
        .client(server.address)
        .build()
        .unwrap()
        .get(url(&server, "/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    let h1 = pki
        .client(server.address)
        .http1_only()
        .build()
        .unwrap()
        .get(url(&server, "/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);

    // Plain HTTP (behind a TLS-terminating proxy) carries no HSTS.
    let plain = app
        .call(axum::http::Method::GET, "/api/alice/tasks", "alice", None)
        .await;
    assert!(plain.header("strict-transport-security").is_none());
}

async fn tls_1_0_and_1_1_are_refused(app: TestApp) {
    let Some(openssl) = tool("/usr/bin/openssl".into(), "apt-get install openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.issue(dir.path(), "leaf");
    let server = serve_https(&app, &Tls::load(files(dir.path())).unwrap()).await;
    let connect = format!("127.0.0.1:{}", server.address.port());
    let handshake = |version: &'static str| {
        let (openssl, connect) = (openssl.clone(), connect.clone());
        tokio::task::spawn_blocking(move || {
            // SECLEVEL=0 lets this client offer the old versions at all.
            std::process::Command::new(openssl)
                .args([
                    "s_client",
                    "-connect",
                    &connect,
                    version,
                    "-cipher",
                    "DEFAULT:@SECLEVEL=0",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
    };
    let modern = handshake("-tls1_2").await.unwrap();
    let transcript = String::from_utf8_lossy(&modern.stdout);
    assert!(
        transcript.contains("TLSv1.2"),
        "the client can handshake at all: {transcript}"
    );
    for old in ["-tls1", "-tls1_1"] {
        let out = handshake(old).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{old} was accepted");
        // Refused by the server (an alert in answer to the client's hello), not by a
        // client that could not offer the version.
        assert!(
            stderr.contains("alert protocol version") || stderr.contains("alert handshake failure"),
            "{old}: {stderr}"
        );
        assert!(
            !stderr.contains("no protocols available"),
            "{old}: {stderr}"
        );
    }
}

async fn certificates_reload_without_a_restart(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = pki.issue(dir.path(), "first");
    let tls = Tls::load(files(dir.path())).unwrap();
    tls.spawn_reloader(Duration::from_millis(100));
    let server = serve_https(&app, &tls).await;
    assert_eq!(presented(&pki, &server).await, first);

    // Renewal: new files on disk are picked up by the watcher.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a distinct modification time
    let second = pki.issue(dir.path(), "second");
    let seen = wait_until_presented(&pki, &server, &second).await;
    assert_eq!(seen, second, "the renewed certificate is served");

    // A broken renewal (half-written file) keeps the current certificate.
    std::fs::write(
        dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\ngarbage",
    )
    .unwrap();
    assert!(tls.reload().is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(presented(&pki, &server).await, second);
}

async fn sighup_reloads_the_certificate(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = pki.issue(dir.path(), "first");
    let tls = Tls::load(files(dir.path())).unwrap();
    // Watching disabled in effect: only the signal can reload.
    tls.spawn_reloader(Duration::from_secs(3600));
    let server = serve_https(&app, &tls).await;
    assert_eq!(presented(&pki, &server).await, first);
    tokio::time::sleep(Duration::from_millis(100)).await; // the signal handler is installed
    let second = pki.issue(dir.path(), "second");
    let pid = std::process::id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let seen = wait_until_presented(&pki, &server, &second).await;
    assert_eq!(seen, second);
}

async fn bad_certificate_files_are_named(app: TestApp) {
    drop(app);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let missing = TlsFiles {
        cert: dir.path().join("none.pem"),
        key: dir.path().join("none.key"),
    };
    assert_eq!(Tls::load(missing).err().unwrap().setting, "TLS_CERT_FILE");
    pki.issue(dir.path(), "leaf");
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    // The key of another certificate.
    let other = tempfile::tempdir().unwrap();
    pki.issue(other.path(), "other");
    let mismatched = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: other.path().join("key.pem"),
    };
    assert_eq!(Tls::load(mismatched).err().unwrap().setting, "TLS_KEY_FILE");
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let empty = TlsFiles {
        cert: dir.path().join("empty.pem"),
        key: dir.path().join("key.pem"),
    };
    assert_eq!(Tls::load(empty).err().unwrap().setting, "TLS_CERT_FILE");
    std::fs::write(dir.path().join("cert-as-key.pem"), &cert).unwrap();
    let no_key = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("cert-as-key.pem"),
    };
    assert_eq!(Tls::load(no_key).err().unwrap().setting, "TLS_KEY_FILE");
}

crate::on_both_databases!(
    https_with_tls_1_2_and_1_3_and_http_2,
    tls_1_0_and_1_1_are_refused,
    certificates_reload_without_a_restart,
    sighup_reloads_the_certificate,
    bad_certificate_files_are_named,
);
