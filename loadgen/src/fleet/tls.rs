//! The TLS handshake of a device (`--tls`, `--transport wss`): under the connect
//! deadline, with the device's own copy of the client settings when `--tls-resume on`
//! (so the tickets it got on its last connection are its own to resume with: a shared
//! session cache keeps only a few tickets per server, and a TLS 1.3 ticket is used once),
//! counting full and resumed handshakes for the summary.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;

use super::{inc, io_cause, Fleet};
use crate::ws::Wire;

/// The devices' TLS sessions and the handshakes counted.
#[derive(Default)]
pub(super) struct TlsDevices {
    /// Each device's settings and session cache, by device index (`--tls-resume on`).
    own: Mutex<HashMap<u64, Arc<ClientConfig>>>,
    pub(super) full: AtomicU64,
    pub(super) resumed: AtomicU64,
}

impl Fleet {
    /// TLS over `stream` for device `i`, handshake done within `deadline`.
    pub(super) async fn tls_connect(
        &self,
        i: u64,
        base: &Arc<ClientConfig>,
        stream: TcpStream,
        deadline: u64,
    ) -> Result<Wire, String> {
        let config = match self.cfg.tls_resume {
            true => self.device_tls(i, base),
            false => base.clone(),
        };
        let name = ServerName::IpAddress(self.cfg.target(i).ip().into());
        let wire = self
            .timed(deadline, "tls_timeout", async {
                Wire::tls(stream, config, name)
                    .await
                    .map_err(|e| io_cause("tls", &e))
            })
            .await?;
        match wire.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => inc(&self.tls.resumed),
            _ => inc(&self.tls.full),
        }
        Ok(wire)
    }

    /// Device `i`'s own settings (made on its first connection).
    fn device_tls(&self, i: u64, base: &ClientConfig) -> Arc<ClientConfig> {
        let mut own = self.tls.own.lock().unwrap();
        own.entry(i)
            .or_insert_with(|| crate::ws::per_device(base))
            .clone()
    }
}
