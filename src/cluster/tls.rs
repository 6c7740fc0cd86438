//! TLS to NATS for the fleet (`[cluster] nats_ca_file`, `nats_cert_file`,
//! `nats_key_file`): the one rustls client configuration both of the fleet's kinds of
//! NATS connection use — the async-nats client (registry, sessions, handover, retained
//! key-value, sweep) and the routing connections of [`super::routing::proto`] — so they
//! trust the same roots and present the same client certificate.
//!
//! The server's certificate is checked against the CA file, or the system's roots when
//! none is given (as `[auth.http] ca_file` does). A client certificate and key, given
//! together, are presented to a NATS server that verifies clients (mutual TLS). A
//! connection goes TLS when its URL is `tls://` or the server's INFO says TLS is
//! required. Built once at start (and by `check-config`, which reports a bad file under
//! its key); nothing here runs on an IO shard.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::ClusterConfig;

/// What is wrong with the TLS settings: the config key concerned and why.
#[derive(Debug)]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn error(key: &'static str, message: String) -> TlsError {
    TlsError { key, message }
}

/// The client configuration for `config`'s NATS connections.
pub fn client_config(config: &ClusterConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = crate::https_client::roots(config.nats_ca_file.as_deref())
        .map_err(|e| error("cluster.nats_ca_file", e.to_string()))?;
    build(config, roots).map(Arc::new)
}

/// Checks the TLS files without loading the system's roots: the CA file holds a usable
/// certificate, the client certificate and key are given together, readable and usable.
pub fn check(config: &ClusterConfig) -> Result<(), TlsError> {
    if let Some(ca) = &config.nats_ca_file {
        crate::https_client::check_ca_file(ca)
            .map_err(|e| error("cluster.nats_ca_file", e.to_string()))?;
    }
    build(config, RootCertStore::empty()).map(drop)
}

fn build(config: &ClusterConfig, roots: RootCertStore) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error("cluster.nats_ca_file", e.to_string()))?
        .with_root_certificates(roots);
    match (&config.nats_cert_file, &config.nats_key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err(error(
            "cluster.nats_key_file",
            "is needed with nats_cert_file (mutual TLS takes both)".into(),
        )),
        (None, Some(_)) => Err(error(
            "cluster.nats_cert_file",
            "is needed with nats_key_file (mutual TLS takes both)".into(),
        )),
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(cert_chain(cert)?, private_key(key)?)
            .map_err(|e| error("cluster.nats_key_file", format!("{}: {e}", key.display()))),
    }
}

fn cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| error("cluster.nats_cert_file", format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(error(
            "cluster.nats_cert_file",
            format!("{}: no PEM certificate in it", path.display()),
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| error("cluster.nats_key_file", format!("{}: {e}", path.display())))
}
