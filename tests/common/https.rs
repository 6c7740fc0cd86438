//! An https server for the webhook tests (auth and events): a test CA, a certificate for
//! 127.0.0.1 signed by it, and an axum router served over rustls on a loopback listener.
//! Failed handshakes (a client that does not trust the CA) are flagged, not fatal.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A test CA and a server certificate for 127.0.0.1 signed by it.
pub struct TestCa {
    pub ca_pem: String,
    pub cert: rustls::pki_types::CertificateDer<'static>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

pub fn test_ca() -> TestCa {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    TestCa {
        ca_pem: ca.pem(),
        cert: cert.der().clone(),
        key: rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    }
}

/// A TLS listener for axum: TCP accept, then the rustls handshake (failed ones skipped).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes_failed: Arc<AtomicBool>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => return (tls, peer),
                Err(_) => self.handshakes_failed.store(true, Ordering::Relaxed),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Serves `app` over TLS with `ca`'s server certificate on `tcp`; returns the address
/// and a flag set on a failed handshake.
pub fn serve_tls(
    tcp: tokio::net::TcpListener,
    app: axum::Router,
    ca: &TestCa,
) -> (SocketAddr, Arc<AtomicBool>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ca.cert.clone()], ca.key.clone_key())
        .unwrap();
    let addr = tcp.local_addr().unwrap();
    let failed = Arc::new(AtomicBool::new(false));
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        handshakes_failed: failed.clone(),
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, failed)
}
