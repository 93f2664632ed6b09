//! TLS with rustls: the broker's acceptor and the client's connector, from PEM files.

use std::path::Path;
use std::sync::Arc;

use queue_core::QueueError;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn tls_error(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::InvalidRequest(format!("{what}: {e}"))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, QueueError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(&format!("reading certificates from {}", path.display()), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(&format!("reading certificates from {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(tls_error("no certificate found", path.display()));
    }
    Ok(certs)
}

/// The broker's TLS acceptor from a certificate chain and a private key, both PEM.
///
/// # Errors
/// When the files cannot be read or do not hold a matching certificate and key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, QueueError> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_error(
            &format!("reading the private key from {}", key.display()),
            e,
        )
    })?;
    let config = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_error("tls setup", e))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| tls_error("the certificate and key do not fit", e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client connector trusting the certificates in `ca` (PEM).
///
/// # Errors
/// When the file cannot be read.
pub fn connector(ca: &Path) -> Result<TlsConnector, QueueError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots
            .add(cert)
            .map_err(|e| tls_error("adding a trusted certificate", e))?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_error("tls setup", e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name a client checks the broker's certificate against: the host of `host:port`.
///
/// # Errors
/// When the host is not a valid DNS name or IP address.
pub fn server_name(address: &str) -> Result<ServerName<'static>, QueueError> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| tls_error(&format!("invalid server name `{host}`"), e))
}
