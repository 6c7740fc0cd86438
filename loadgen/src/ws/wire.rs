//! The bytes under a device's MQTT: TCP, or TLS over TCP for `--tls` and
//! `--transport wss` (with a client certificate for mutual TLS, and session resumption
//! on or off).
//!
//! rustls is driven by hand over the tokio socket (ciphertext in and out of the
//! `ClientConnection`), so the device's read path keeps its shape: wait for readiness,
//! one non-blocking read, all the plaintext it brought. Without `--tls-ca` the server's
//! certificate is not checked: loadgen measures brokers, it carries no secrets.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::cli::TlsVersion;

/// Ciphertext read per socket read.
const CIPHER_CHUNK: usize = 16 * 1024;

/// The TLS options of a run (`--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-resume`).
#[derive(Debug, Clone, Default)]
pub struct TlsOpts {
    pub ca: Option<PathBuf>,
    /// Client certificate chain and its key (PEM), for mutual TLS.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Keep session tickets and resume with them.
    pub resume: bool,
    /// The versions offered (`--tls-version`).
    pub version: TlsVersion,
}

/// The TLS client settings of a `tls` or `wss` run: verify against the PEM CA bundle
/// `ca`, or (without one) accept any server certificate; present the client certificate
/// if given; resumption as asked (a device that resumes needs its own copy, see
/// [`per_device`]).
pub fn client_config(o: &TlsOpts) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match o.version {
        TlsVersion::Any => rustls::DEFAULT_VERSIONS,
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
        TlsVersion::Tls12 => &[&rustls::version::TLS12],
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &o.ca {
        Some(path) => builder.with_root_certificates(roots(path)?),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider))),
    };
    let mut config = match &o.cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = pem_certs("--tls-cert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--tls-cert: {e}"))?
        }
    };
    if !o.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// A device's own copy of `config` with its own session cache, so the tickets it gets
/// are its own to resume with (a shared cache keeps only a few tickets per server, and a
/// TLS 1.3 ticket is used once).
pub fn per_device(config: &ClientConfig) -> Arc<ClientConfig> {
    let mut own = config.clone();
    own.resumption = rustls::client::Resumption::in_memory_sessions(1);
    Arc::new(own)
}

fn pem_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{flag} {}: no certificate", path.display()));
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certs("--tls-ca", path)? {
        roots
            .add(cert)
            .map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Accepts any certificate, but still checks the handshake signatures with it.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A TCP stream, with a TLS session over it or not.
#[derive(Debug)]
pub struct Wire {
    pub stream: TcpStream,
    tls: Option<Box<ClientConnection>>,
}

impl Wire {
    pub fn tcp(stream: TcpStream) -> Wire {
        Wire { stream, tls: None }
    }

    /// TLS over `stream`, handshake done.
    pub async fn tls(
        stream: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Wire> {
        let conn = ClientConnection::new(config, name).map_err(tls_error)?;
        let mut wire = Wire {
            stream,
            tls: Some(Box::new(conn)),
        };
        wire.handshake().await?;
        Ok(wire)
    }

    async fn handshake(&mut self) -> io::Result<()> {
        let mut cipher = vec![0u8; CIPHER_CHUNK];
        loop {
            self.flush_tls().await?;
            let Some(tls) = self.tls.as_mut() else {
                return Ok(());
            };
            if !tls.is_handshaking() {
                return Ok(());
            }
            self.stream.readable().await?;
            match self.stream.try_read(&mut cipher) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => feed(tls, &cipher[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// How the TLS handshake went (`None` without TLS).
    pub fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.tls.as_ref().and_then(|t| t.handshake_kind())
    }

    /// Writes what rustls has for the peer.
    async fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut out)?;
        }
        self.stream.write_all(&out).await
    }

    /// Sends plaintext bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.tls.as_mut() {
            None => self.stream.write_all(bytes).await,
            Some(tls) => {
                tls.writer().write_all(bytes)?;
                self.flush_tls().await
            }
        }
    }

    /// One non-blocking read; the plaintext it brought goes to `into` (with at least
    /// `reserve` bytes of room). `Ok(0)` is the end; `WouldBlock` when no plaintext came.
    pub fn try_recv(&mut self, into: &mut BytesMut, reserve: usize) -> io::Result<usize> {
        let stream = &self.stream;
        let Some(tls) = self.tls.as_mut() else {
            into.reserve(reserve);
            let room = into.capacity() - into.len();
            return read_drained(stream, room, || stream.try_read_buf(into));
        };
        let mut cipher = [0u8; CIPHER_CHUNK];
        let n = read_drained(stream, CIPHER_CHUNK, || stream.try_read(&mut cipher))?;
        if n == 0 {
            return Ok(0);
        }
        feed(tls, &cipher[..n])?;
        read_plain(tls, into)
    }

    /// Waits for plaintext and reads it into `into`; `Ok(0)` is the end.
    pub async fn recv(&mut self, into: &mut BytesMut) -> io::Result<usize> {
        loop {
            self.stream.readable().await?;
            match self.try_recv(into, CIPHER_CHUNK) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
    }

    /// Ends the TLS session (close_notify) and the TCP stream (FIN).
    pub async fn shutdown(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.flush_tls().await;
        }
        let _ = self.stream.shutdown().await;
    }
}

/// One non-blocking `read` of `stream` that had `room` bytes to fill. A read that
/// filled less found the socket drained: tokio's read readiness is cleared with it, so
/// the device next waits for new data instead of making a second read only to learn it
/// would block (one system call per message instead of two, when each read brings
/// one). Data arriving meanwhile is not missed: its readiness event comes after the
/// read, and tokio keeps readiness that changed since it was observed.
fn read_drained(
    stream: &TcpStream,
    room: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut got = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = read()?;
        got = Some(n);
        match n > 0 && n < room {
            true => Err(io::ErrorKind::WouldBlock.into()),
            false => Ok(n),
        }
    });
    match (r, got) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (r, _) => r,
    }
}

/// Hands ciphertext to rustls and lets it process the records.
fn feed(tls: &mut ClientConnection, mut cipher: &[u8]) -> io::Result<()> {
    while !cipher.is_empty() {
        tls.read_tls(&mut cipher)?;
        tls.process_new_packets().map_err(tls_error)?;
    }
    Ok(())
}

/// All the plaintext rustls holds, into `into`. `Ok(0)`: the server ended the session.
fn read_plain(tls: &mut ClientConnection, into: &mut BytesMut) -> io::Result<usize> {
    let mut total = 0;
    let mut chunk = [0u8; 4096];
    loop {
        match tls.reader().read(&mut chunk) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                into.extend_from_slice(&chunk[..n]);
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && total == 0 => return Err(e),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}
