//! TLS test kit: a throwaway PKI (CA, server certificate for `localhost`, client
//! certificates) written where the gateway reads it, rustls client configurations, and a
//! blocking MQTT 3.1.1 client over rustls speaking raw frames.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::{tempdir, Raw};

/// A throwaway CA, a server certificate for `localhost` and the files the gateway reads.
pub struct Pki {
    pub dir: tempdir::Dir,
    pub ca: rcgen::Certificate,
    pub ca_key: rcgen::KeyPair,
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub fn params(cn: &str, sans: Vec<String>) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(sans).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempdir::Dir::new("tls");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = params("Test Device CA", vec![]);
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = params("gateway", vec!["localhost".into()])
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        let ca_path = dir.0.join("ca.pem");
        let cert_path = dir.0.join("server.pem");
        let key_path = dir.0.join("server.key");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        std::fs::write(&cert_path, server.pem()).unwrap();
        std::fs::write(&key_path, server_key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca,
            ca_key,
            ca_path,
            cert_path,
            key_path,
        }
    }

    /// The `[mqtt]` TLS keys for this PKI (plus `more` keys).
    pub fn toml(&self, more: &str) -> String {
        format!(
            "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n{more}\n",
            self.cert_path.display().to_string(),
            self.key_path.display().to_string()
        )
    }

    pub fn ca_toml(&self) -> String {
        format!("tls_client_ca = {:?}", self.ca_path.display().to_string())
    }

    /// A client certificate with subject CN `cn`, signed by this CA; also written as
    /// `<cn>.pem` / `<cn>.key` for command-line clients.
    pub fn client(&self, cn: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params(cn, vec![])
            .signed_by(&key, &self.ca, &self.ca_key)
            .unwrap();
        std::fs::write(self.dir.0.join(format!("{cn}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.0.join(format!("{cn}.key")), key.serialize_pem()).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A TCP connection to `addr` that sent half a ClientHello: a handshake that stalls.
    pub fn stalled_handshake(&self, addr: SocketAddr) -> std::net::TcpStream {
        let mut hello = Vec::new();
        let cfg = self.client_config(None, false);
        let mut probe =
            ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
        probe.write_tls(&mut hello).unwrap();
        assert!(hello.len() > 100);
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(&hello[..hello.len() / 2]).unwrap();
        s
    }

    pub fn client_config(
        &self,
        cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
        tls12_only: bool,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let b =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots);
        Arc::new(match cert {
            Some((c, k)) => b.with_client_auth_cert(vec![c], k).unwrap(),
            None => b.with_no_client_auth(),
        })
    }
}

/// A blocking MQTT-over-TLS client speaking raw frames.
pub struct TlsClient {
    pub s: StreamOwned<ClientConnection, std::net::TcpStream>,
    pub buf: BytesMut,
}

impl TlsClient {
    /// Connects, writes `prefix` in the clear (a PROXY header), and runs the handshake.
    pub fn connect(
        addr: SocketAddr,
        cfg: Arc<ClientConfig>,
        prefix: &[u8],
    ) -> std::io::Result<TlsClient> {
        let mut sock = std::net::TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        sock.write_all(prefix)?;
        let mut conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap())
            .map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(TlsClient {
            s: StreamOwned::new(conn, sock),
            buf: BytesMut::new(),
        })
    }

    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.s.conn.protocol_version()
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()
    }

    /// The next MQTT 3.1.1 packet, or why there is none ("closed", "timeout", an error).
    pub fn recv(&mut self, timeout: Duration) -> Result<mqttbytes::v4::Packet, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match mqttbytes::v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("undecodable: {e:?}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timeout".into());
            }
            self.s
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut tmp = [0u8; 4096];
            match self.s.read(&mut tmp) {
                Ok(0) => return Err("closed".into()),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err("timeout".into())
                }
                Err(e) => return Err(format!("error: {e}")),
            }
        }
    }

    /// CONNECT as `id`; returns the CONNACK return code.
    pub fn mqtt_connect(&mut self, id: &str) -> Result<u8, String> {
        self.send(&Raw::connect_v4(id, 60, true))
            .map_err(|e| e.to_string())?;
        match self.recv(Duration::from_secs(10))? {
            mqttbytes::v4::Packet::ConnAck(a) => Ok(a.code as u8),
            other => Err(format!("expected CONNACK, got {other:?}")),
        }
    }

    pub fn expect_publish(&mut self, timeout: Duration) -> Result<mqttbytes::v4::Publish, String> {
        loop {
            match self.recv(timeout)? {
                mqttbytes::v4::Packet::Publish(p) => return Ok(p),
                _ => continue,
            }
        }
    }
}

pub fn suback(c: &mut TlsClient) {
    loop {
        match c.recv(Duration::from_secs(10)) {
            Ok(mqttbytes::v4::Packet::SubAck(_)) => return,
            Ok(_) => continue,
            Err(e) => panic!("no SUBACK: {e}"),
        }
    }
}

/// One connected MQTT client left idle, kept open by the returned value: over TLS to
/// `tls` with `cfg` when given, else plain TCP to `mqtt`.
pub fn idle_client(
    mqtt: SocketAddr,
    tls: Option<(SocketAddr, &Arc<ClientConfig>)>,
    id: &str,
) -> Box<dyn std::any::Any> {
    if let Some((addr, cfg)) = tls {
        let mut c = TlsClient::connect(addr, cfg.clone(), b"").unwrap();
        assert_eq!(c.mqtt_connect(id), Ok(0));
        return Box::new(c);
    }
    let mut s = std::net::TcpStream::connect(mqtt).unwrap();
    s.write_all(&Raw::connect_v4(id, 600, true)).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[0], 0x20);
    Box::new(s)
}
