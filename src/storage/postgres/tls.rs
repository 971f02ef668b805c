//! How a `DATABASE_URL` is read for the request connections, TLS included, with libpq's
//! meaning of `sslmode`.
//!
//! tokio-postgres knows `sslmode` only as `disable`, `prefer` and `require`, and leaves
//! checking the server's certificate to the TLS connector it is given. libpq's modes are
//! kept here, by the verifier the rustls configuration gets:
//! - `disable`: no TLS; `allow`, `prefer`: TLS when the server offers it; `require`: TLS
//!   or no connection. None of them checks the certificate (libpq does not either),
//!   except that `require` with an `sslrootcert` acts as `verify-ca`, as in libpq.
//! - `verify-ca`: the certificate must chain to `sslrootcert` (default: the public web
//!   roots, bundled); `verify-full`: and name the host.

use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::storage::StoreError;

/// The request connections' settings and their TLS connector, from a `DATABASE_URL`.
pub fn connection_settings(
    url: &str,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
    let mut parsed =
        url::Url::parse(url).map_err(|_| StoreError::database("DATABASE_URL is not a URL"))?;
    let (mut mode, mut root_cert) = (String::from("prefer"), None);
    let rest: Vec<(String, String)> = parsed
        .query_pairs()
        .filter_map(|(key, value)| match &*key {
            "sslmode" => {
                mode = value.into_owned();
                None
            }
            "sslrootcert" => {
                root_cert = Some(value.into_owned());
                None
            }
            _ => Some((key.into_owned(), value.into_owned())),
        })
        .collect();
    // Percent-encoded (tokio-postgres reads no `+` as a space).
    let encode = |text: &str| {
        percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let query: Vec<String> = rest
        .iter()
        .map(|(key, value)| format!("{}={}", encode(key), encode(value)))
        .collect();
    parsed.set_query((!query.is_empty()).then(|| query.join("&")).as_deref());
    let mut config = tokio_postgres::Config::from_str(parsed.as_str())?;
    let (ssl_mode, check) = match (mode.as_str(), &root_cert) {
        ("disable", _) => (SslMode::Disable, Check::Nothing),
        ("allow" | "prefer", _) => (SslMode::Prefer, Check::Nothing),
        ("require", None) => (SslMode::Require, Check::Nothing),
        ("require" | "verify-ca", _) => (SslMode::Require, Check::Chain),
        ("verify-full", _) => (SslMode::Require, Check::ChainAndName),
        _ => return Err(StoreError::database("unknown sslmode in DATABASE_URL")),
    };
    config.ssl_mode(ssl_mode);
    let tls = client_config(check, root_cert.as_deref())?;
    Ok((config, MakeRustlsConnect::new(tls)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

fn client_config(check: Check, root_cert: Option<&str>) -> Result<ClientConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|_| StoreError::database("TLS set-up failed"))?;
    let config = if check == Check::Nothing {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|_| StoreError::database("sslrootcert cannot be read"))?;
                for cert in certs {
                    let cert = cert.map_err(|_| StoreError::database("sslrootcert is not PEM"))?;
                    roots
                        .add(cert)
                        .map_err(|_| StoreError::database("sslrootcert holds a bad certificate"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|_| StoreError::database("sslrootcert holds no usable certificate"))?;
        let verifier: Arc<dyn ServerCertVerifier> = if check == Check::Chain {
            Arc::new(AnyName(webpki))
        } else {
            webpki
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    };
    Ok(config)
}

/// Encrypts without checking who answers (`sslmode` `prefer`, `require`), as libpq does;
/// the handshake's signatures are still checked.
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain must reach a trusted root; the name in it may be any.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_as_libpq_reads_it() {
        let mode = |url: &str| connection_settings(url).map(|(c, _)| c.get_ssl_mode());
        let base = "postgres://u:p@db.example/tasks";
        assert!(matches!(mode(base), Ok(SslMode::Prefer)));
        assert!(matches!(
            mode(&format!("{base}?sslmode=disable")),
            Ok(SslMode::Disable)
        ));
        assert!(matches!(
            mode(&format!("{base}?sslmode=allow")),
            Ok(SslMode::Prefer)
        ));
        for strict in ["require", "verify-ca", "verify-full"] {
            assert!(matches!(
                mode(&format!("{base}?sslmode={strict}")),
                Ok(SslMode::Require)
            ));
        }
        assert!(mode(&format!("{base}?sslmode=sometimes")).is_err());
        assert!(
            mode(&format!(
                "{base}?sslmode=verify-full&sslrootcert=/nonexistent"
            ))
            .is_err()
        );
    }

    #[test]
    fn the_other_parameters_reach_the_connection() {
        let (config, _) = connection_settings(
            "postgres://alice:secret@db.example:6543/tasks?sslmode=require&application_name=x&options=-c%20search_path%3Dt1",
        )
        .unwrap();
        assert_eq!(config.get_user(), Some("alice"));
        assert_eq!(config.get_password(), Some(&b"secret"[..]));
        assert_eq!(config.get_dbname(), Some("tasks"));
        assert_eq!(config.get_ports(), &[6543]);
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(config.get_options(), Some("-c search_path=t1"));
    }

    #[test]
    fn which_check_each_mode_makes() {
        // `Chain` and `ChainAndName` build a verifier over the bundled roots.
        for check in [Check::Nothing, Check::Chain, Check::ChainAndName] {
            assert!(client_config(check, None).is_ok());
        }
        assert!(client_config(Check::Chain, Some("/nonexistent")).is_err());
    }
}
