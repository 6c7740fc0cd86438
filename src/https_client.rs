//! An HTTP/1.1 client for the gateway's outbound webhooks, speaking `http://` and
//! `https://` (rustls with ring, the provider the MQTT listener uses).
//!
//! Server certificates are checked against the system's roots, or only against a
//! configured PEM CA bundle (a private CA, or a test CA). hyper-util's pooled client keeps
//! connections alive between requests. Built once at start; runs on the business pool.
//! The events webhook and the auth webhook use it.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// Largest answer body read, in bytes; the rest is not waited for.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A pooled client for `http://` and `https://` URLs.
#[derive(Clone)]
pub struct HttpsClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum RequestError {
    /// No answer within the timeout (connect, request and body).
    Timeout,
    /// Connecting, the TLS handshake, or the exchange failed.
    Failed(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Timeout => f.write_str("timed out"),
            RequestError::Failed(e) => f.write_str(e),
        }
    }
}

/// The trusted roots: the PEM certificates in `ca_file`, or the system's.
pub(crate) fn roots(ca_file: Option<&Path>) -> io::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = match ca_file {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot read CA certificates from {}: {e}", path.display()),
                )
            })?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if let (0, Some(path)) = (added, ca_file) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no usable CA certificate in {}", path.display()),
        ));
    }
    Ok(roots)
}

/// Checks that `ca_file` holds at least one usable PEM CA certificate (for
/// `gateway check-config`: the error says what is wrong with the file).
pub(crate) fn check_ca_file(ca_file: &Path) -> io::Result<()> {
    roots(Some(ca_file)).map(drop)
}

impl HttpsClient {
    /// A client trusting `ca_file` (PEM) or, when `None`, the system's roots.
    pub fn new(ca_file: Option<&Path>) -> io::Result<HttpsClient> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots(ca_file)?)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(HttpsClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends `req` and reads the answer's status and (at most 64 KiB of) body, all
    /// within `timeout`.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), RequestError> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| RequestError::Failed(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| RequestError::Failed(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(RequestError::Timeout))
    }
}

/// An error and its sources, `a: b: c` (hyper's own message is often just "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
