//! TLS for the MQTT listener: the rustls server configuration built at startup from
//! `[mqtt] tls_*` (its certificate and client CA swappable by a reload, [`TlsReload`]), and the client id a verified client certificate carries.
//!
//! The handshake runs on a TLS handshake thread ([`handshaker`]) at a lower priority
//! than the shards (or, with `tls_handshakes_on_shards`, on the shard); after it the
//! shard drives the connection (`shard/records.rs`): its bytes pass through the rustls
//! `ServerConnection` up to the CONNECT, under the connect timeout; once
//! its CONNECT is answered a connection (TLS 1.3 or 1.2) hands its keys to our own record
//! layer ([`record`]) and drops rustls.
//! The crypto provider is `ring`; TLS 1.2 and 1.3 are both enabled. Session tickets
//! (`tls_session_tickets`) let a reconnecting device resume; [`handshake_outcome`] says
//! how each handshake ended, for `gateway_tls_handshakes_total{kind}`.

pub mod handshaker;
pub mod record;
pub mod traffic_secret;

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::config::MqttConfig;
use crate::metrics::TlsHandshake;

fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} {}: {e}", path.display()),
    )
}

fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err("cannot read certificates from", path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("bad certificate in", path, e))?;
    if certs.is_empty() {
        return Err(err("no certificate in", path, "empty"));
    }
    Ok(certs)
}

/// What a reload can swap under a running TLS listener: the certificate chain and key
/// new handshakes are served, and the client-certificate verifier they are checked by.
/// Handshakes already done keep what they were made with; connections stay up.
#[derive(Debug)]
pub struct TlsReload {
    cert: RwLock<Arc<CertifiedKey>>,
    verifier: RwLock<Arc<dyn ClientCertVerifier>>,
}

/// The pieces read from `[mqtt] tls_*` (files read, checked, nothing installed yet).
pub struct TlsFiles {
    cert: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the certificate, key and client CA that `m` names.
pub(crate) fn read_files(m: &MqttConfig) -> io::Result<TlsFiles> {
    let missing =
        |key: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{key} is not set"));
    let cert_path = m
        .tls_cert
        .as_deref()
        .ok_or_else(|| missing("mqtt.tls_cert"))?;
    let key_path = m
        .tls_key
        .as_deref()
        .ok_or_else(|| missing("mqtt.tls_key"))?;
    let certs = load_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| err("cannot read a private key from", key_path, e))?;
    let provider = provider();
    let cert = CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| err("certificate and key do not fit:", cert_path, e))?;
    let verifier: Arc<dyn ClientCertVerifier> = match &m.tls_client_ca {
        None => Arc::new(rustls::server::NoClientAuth),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| err("bad CA certificate in", ca, e))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if m.tls_require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            v.build().map_err(|e| err("cannot use client CA", ca, e))?
        }
    };
    Ok(TlsFiles {
        cert: Arc::new(cert),
        verifier,
    })
}

impl TlsReload {
    /// New handshakes from now on use `files`.
    pub(crate) fn install(&self, files: TlsFiles) {
        *self.cert.write().unwrap_or_else(|e| e.into_inner()) = files.cert;
        *self.verifier.write().unwrap_or_else(|e| e.into_inner()) = files.verifier;
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for TlsReload {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.cert.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Asks the verifier in force at each step. It names no acceptable CAs in its
/// CertificateRequest (the list would have to outlive a swap): clients send the
/// certificate they are configured with, as rustls and OpenSSL clients do anyway.
impl ClientCertVerifier for TlsReload {
    fn offer_client_auth(&self) -> bool {
        self.verifier().offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.verifier().client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// The rustls server configuration for `m` (which must have `tls_listen` set): the
/// certificate chain and key, and a client-certificate verifier when `tls_client_ca` is
/// set (mandatory certificates with `tls_require_client_cert`); both are served through
/// the returned [`TlsReload`], which a config reload swaps.
pub(crate) fn server_config(m: &MqttConfig) -> io::Result<(Arc<ServerConfig>, Arc<TlsReload>)> {
    let files = read_files(m)?;
    let reload = Arc::new(TlsReload {
        cert: RwLock::new(files.cert),
        verifier: RwLock::new(files.verifier),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .with_client_cert_verifier(reload.clone())
        .with_cert_resolver(reload.clone());
    // Past a TLS 1.3 handshake the shard takes the traffic keys and drops the rustls
    // connection (`tls/record.rs`, `shard/records.rs`).
    config.enable_secret_extraction = true;
    // ...and the traffic secrets, to follow a KeyUpdate (`tls/traffic_secret.rs`).
    config.key_log = Arc::new(traffic_secret::SecretLog);
    // MQTT has no ALPN requirement; devices that send "mqtt" still connect.
    config.alpn_protocols = Vec::new();
    // Resumption without server state: stateless tickets (keys rotate every 6 hours)
    // let a reconnecting device skip the full handshake, and no session cache is shared
    // (and locked) between shards or grows with the number of devices. One ticketer for
    // every shard (the config is shared), so a device resumes whichever shard takes it.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if m.tls_session_tickets {
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| io::Error::other(format!("cannot create TLS ticketer: {e}")))?;
    } else {
        // rustls' default ticketer issues none; no TLS 1.3 tickets are sent either.
        config.send_tls13_tickets = 0;
    }
    Ok((Arc::new(config), reload))
}

/// How the handshake of `conn` ended, if it ended in the step that found it
/// `was_handshaking` (`failed`: that step's records were refused). `None` while it goes
/// on, and for records after it.
pub(crate) fn handshake_outcome(
    was_handshaking: bool,
    conn: &rustls::ServerConnection,
    failed: bool,
) -> Option<TlsHandshake> {
    if !was_handshaking {
        return None;
    }
    if failed {
        return Some(TlsHandshake::Failed);
    }
    match conn.handshake_kind() {
        _ if conn.is_handshaking() => None,
        Some(rustls::HandshakeKind::Resumed) => Some(TlsHandshake::Resumed),
        _ => Some(TlsHandshake::Full),
    }
}

/// The subject Common Name of a DER X.509 certificate (the first CN if there are
/// several), or `None` if it has none or the DER is not a certificate. Only reached for
/// certificates rustls has already verified against `tls_client_ca`.
pub(crate) fn subject_cn(cert: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity, subject, ... }, ... }
    let (cert_body, _) = der_take(cert, 0x30)?;
    let (tbs, _) = der_take(cert_body, 0x30)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der_skip(rest)?;
    }
    for _ in 0..4 {
        // serialNumber, signature, issuer, validity
        rest = der_skip(rest)?;
    }
    let (mut subject, _) = der_take(rest, 0x30)?;
    // Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue)
    const CN_OID: [u8; 3] = [0x55, 0x04, 0x03];
    while !subject.is_empty() {
        let (mut set, after) = der_take(subject, 0x31)?;
        subject = after;
        while !set.is_empty() {
            let (atv, after) = der_take(set, 0x30)?;
            set = after;
            let (oid, value) = der_take(atv, 0x06)?;
            if oid == CN_OID {
                let (tag, body, _) = der_any(value)?;
                // UTF8String, PrintableString, IA5String, TeletexString (as Latin-1 bytes).
                return match tag {
                    0x0c | 0x13 | 0x16 | 0x14 => std::str::from_utf8(body).ok().map(str::to_owned),
                    _ => None,
                };
            }
        }
    }
    None
}

/// One DER element: (tag, contents, bytes after it).
fn der_any(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *buf.first()?;
    let first = *buf.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*buf.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    if end > buf.len() {
        return None;
    }
    Some((tag, &buf[header..end], &buf[end..]))
}

fn der_take(buf: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, body, rest) = der_any(buf)?;
    (tag == want).then_some((body, rest))
}

fn der_skip(buf: &[u8]) -> Option<&[u8]> {
    der_any(buf).map(|(_, _, rest)| rest)
}

/// A fresh self-signed certificate for `localhost` and its key (unit tests).
#[cfg(test)]
pub(crate) fn localhost_cert() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    (der, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cn_of_generated_certificates() {
        let mut params = rcgen::CertificateParams::new(vec!["device.local".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "device-0042");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_cn(cert.der()).as_deref(), Some("device-0042"));

        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "NoCn");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_cn(cert.der()), None);
    }

    #[test]
    fn garbage_is_no_cn() {
        assert_eq!(subject_cn(&[]), None);
        assert_eq!(subject_cn(&[0x30, 0x82, 0xff]), None);
        assert_eq!(subject_cn(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}
