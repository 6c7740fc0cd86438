//! TLS to NATS: the rustls client configuration of the gateway's NATS connections, from
//! a section's `nats_ca_file`, `nats_cert_file` and `nats_key_file` (`[cluster]`, for the
//! fleet; `[events]`, for the events sink).
//!
//! In the fleet one configuration serves both kinds of its NATS connection — the
//! async-nats client (registry, sessions, handover, retained key-value, sweep) and the
//! routing connections of `crate::cluster::routing::proto` — so they trust the same roots
//! and present the same client certificate.
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

/// A section's TLS files for NATS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TlsFiles<'a> {
    /// `cluster` or `events`: the keys are `<section>.nats_ca_file` and so on.
    pub(crate) section: &'static str,
    pub(crate) ca: Option<&'a Path>,
    pub(crate) cert: Option<&'a Path>,
    pub(crate) key: Option<&'a Path>,
}

/// What is wrong with the TLS settings: the config key concerned and why.
#[derive(Debug)]
pub(crate) struct TlsError {
    pub(crate) key: String,
    pub(crate) message: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl TlsFiles<'_> {
    fn error(&self, key: &str, message: String) -> TlsError {
        TlsError {
            key: format!("{}.{key}", self.section),
            message,
        }
    }

    /// The client configuration for this section's NATS connections.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = crate::https_client::roots(self.ca)
            .map_err(|e| self.error("nats_ca_file", e.to_string()))?;
        self.build(roots).map(Arc::new)
    }

    /// Checks the files without loading the system's roots: the CA file holds a usable
    /// certificate, the client certificate and key are given together, readable and usable.
    pub(crate) fn check(&self) -> Result<(), TlsError> {
        if let Some(ca) = self.ca {
            crate::https_client::check_ca_file(ca)
                .map_err(|e| self.error("nats_ca_file", e.to_string()))?;
        }
        self.build(RootCertStore::empty()).map(drop)
    }

    fn build(&self, roots: RootCertStore) -> Result<ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| self.error("nats_ca_file", e.to_string()))?
            .with_root_certificates(roots);
        match (self.cert, self.key) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(_), None) => Err(self.error(
                "nats_key_file",
                "is needed with nats_cert_file (mutual TLS takes both)".into(),
            )),
            (None, Some(_)) => Err(self.error(
                "nats_cert_file",
                "is needed with nats_key_file (mutual TLS takes both)".into(),
            )),
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(self.cert_chain(cert)?, self.private_key(key)?)
                .map_err(|e| self.error("nats_key_file", format!("{}: {e}", key.display()))),
        }
    }

    fn cert_chain(&self, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| self.error("nats_cert_file", format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(self.error(
                "nats_cert_file",
                format!("{}: no PEM certificate in it", path.display()),
            ));
        }
        Ok(certs)
    }

    fn private_key(&self, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_file(path)
            .map_err(|e| self.error("nats_key_file", format!("{}: {e}", path.display())))
    }
}
