//! The TLS handshake budget (`[limits] tls_handshakes_per_turn`, `shard/handshake.rs`) on
//! a real shard on a manual clock: six rustls clients' ClientHellos all wait in the
//! kernel when a turn starts, and each turn answers only as many as the budget allows;
//! the rest are deferred (counted) and answered in the next turns, and every handshake
//! completes. Loopback delivers within the sending syscall, so what each turn sees is
//! the same on every run: nothing here depends on the machine's speed.

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

use super::rig::manual_shard_tls;
use crate::config::Config;
use crate::metrics::TlsHandshake;

const CLIENTS: usize = 6;
const BUDGET: usize = 2;

/// The gateway's own server configuration (`tls::server_config`) with a self-signed
/// certificate for `localhost` written to `dir`, and a client configuration trusting it.
fn tls_pair(dir: &std::path::Path) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let mut m = Config::default().mqtt;
    m.tls_cert = Some(dir.join("cert.pem"));
    m.tls_key = Some(dir.join("key.pem"));
    let (server, _) = crate::tls::server_config(&m).unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .unwrap();
    let client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    (server, Arc::new(client))
}

/// Whether the server has answered `s` (bytes wait to be read).
fn answered(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.peek(&mut b), Ok(n) if n > 0)
}

#[test]
fn each_turn_runs_at_most_its_budget_of_handshakes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_rt = rt.enter();
    let mut config = Config::from_toml_str(&format!(
        "[limits]\ntls_handshakes_per_turn = {BUDGET}\nmax_connect_rate = 0\nmax_handshaking = 0\nmax_connections_per_ip = 0\n"
    ))
    .unwrap();
    config.acl.enabled = false;
    config.store.enabled = false;
    let dir = std::env::temp_dir().join(format!("tls-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (server, client) = tls_pair(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let (mut shard, mut rx, _, tls_addr) =
        manual_shard_tls(config, rt.handle().clone(), Some(server));
    let tls_addr = tls_addr.unwrap();
    let mut clients: Vec<(TcpStream, ClientConnection)> = (0..CLIENTS)
        .map(|_| {
            let s = TcpStream::connect(tls_addr).unwrap();
            s.set_nonblocking(true).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            (s, ClientConnection::new(client.clone(), name).unwrap())
        })
        .collect();
    for _ in 0..100 {
        if shard.admission.handshaking == CLIENTS {
            break;
        }
        shard.turn(&mut rx).unwrap();
    }
    assert_eq!(shard.admission.handshaking, CLIENTS, "all accepted");

    // Every ClientHello is in the shard's sockets before the next turn.
    for (s, c) in &mut clients {
        c.write_tls(s).unwrap();
    }
    let deferred = |shard: &super::super::Shard| {
        shard.services.metrics.tls_handshakes_deferred.load(Relaxed) as usize
    };
    let mut expect_deferred = 0;
    for turn in 1..=CLIENTS / BUDGET {
        shard.turn(&mut rx).unwrap();
        let done = clients.iter().filter(|(s, _)| answered(s)).count();
        assert_eq!(done, turn * BUDGET, "ServerHellos after turn {turn}");
        expect_deferred += CLIENTS - turn * BUDGET;
        assert_eq!(
            deferred(&shard),
            expect_deferred,
            "deferred after turn {turn}"
        );
    }

    // The clients finish; every handshake completes, the deferred ones too.
    for _ in 0..100 {
        for (s, c) in &mut clients {
            while c.wants_read() {
                match c.read_tls(s) {
                    Ok(0) => panic!("the shard closed a handshake"),
                    Ok(_) => {
                        c.process_new_packets().unwrap();
                    }
                    Err(_) => break,
                }
            }
            while c.wants_write() {
                c.write_tls(s).unwrap();
            }
            let _ = c.reader().read(&mut [0u8; 64]);
        }
        shard.turn(&mut rx).unwrap();
        let full = &shard.services.metrics.tls_handshakes[TlsHandshake::Full as usize];
        if full.load(Relaxed) as usize == CLIENTS {
            break;
        }
    }
    assert!(clients.iter().all(|(_, c)| !c.is_handshaking()));
    let full = &shard.services.metrics.tls_handshakes[TlsHandshake::Full as usize];
    assert_eq!(full.load(Relaxed) as usize, CLIENTS);
}
