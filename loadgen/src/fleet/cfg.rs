//! What every device of one child does, fixed by its work order: where it connects from
//! and to, what it says in CONNECT and SUBSCRIBE, and how often it pings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{expand, Command, MqttOpts, OnOff, Transport};
use crate::codec::Protocol;
use crate::limits::Sources;
use crate::proto::WorkOrder;
use crate::ticker::Ticker;

/// What every device of this process does, fixed by the work order.
pub struct DeviceCfg {
    /// The nodes' MQTT addresses; device `i` connects to `targets[i mod N]`.
    pub targets: Vec<SocketAddr>,
    pub sources: Sources,
    pub protocol: Protocol,
    pub keepalive: u16,
    pub clean: bool,
    /// A will topic pattern (`{id}`), for `--will-topic`.
    pub will_topic: Option<String>,
    pub login: Option<(String, String)>,
    pub client_id: String,
    /// Topic pattern to subscribe to (`{id}`, `{i}`), or `None` for no SUBSCRIBE.
    pub topic: Option<String>,
    pub sub_qos: u8,
    pub connect_timeout: Duration,
    /// Whether messages to one device arrive in publish order (one publisher), so the
    /// highest sequence seen is enough to spot duplicates.
    pub ordered: bool,
    pub transport: Transport,
    /// The WebSocket upgrade's path (with `Transport::Ws` and `Wss`).
    pub ws_path: String,
    /// The TLS client settings (with `Transport::Tls` and `Wss`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `--tls-resume on`: each device keeps its tickets and resumes with them.
    pub tls_resume: bool,
}

/// The TLS options `m` gives.
fn tls_opts(m: &MqttOpts) -> crate::ws::TlsOpts {
    crate::ws::TlsOpts {
        ca: m.tls_ca.clone(),
        cert: m.tls_cert.clone().zip(m.tls_key.clone()),
        resume: m.tls_resume == OnOff::On,
        version: m.tls_version,
    }
}

impl DeviceCfg {
    pub fn from_order(order: &WorkOrder) -> Result<DeviceCfg, String> {
        let cmd = &order.command;
        let m = cmd.mqtt();
        let common = cmd.common();
        let (topic, sub_qos, ordered) = match cmd {
            Command::Connect(a) => (a.topic.clone(), a.sub_qos, false),
            Command::Push(a) => (a.topic.clone(), a.qos, false),
            Command::Fanout(a) => (a.topic.clone(), a.sub_qos(), true),
            Command::Storm(a) => (a.topic.clone(), 1, false),
            Command::Churn(_) => (String::new(), 0, false),
        };
        // A fan-out's subscribers may speak another version than its publisher.
        let protocol = match cmd {
            Command::Fanout(a) => a.sub_version(),
            _ => m.protocol,
        };
        let login = match (&m.username, &m.password) {
            (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
            (None, Some(_)) => return Err("--password needs --username".into()),
            (None, None) => None,
        };
        Ok(DeviceCfg {
            targets: common.device_targets(),
            sources: Sources::parse(&common.source_range)?,
            protocol: Protocol::from_level(protocol).ok_or("--protocol must be 4 or 5")?,
            keepalive: m.keepalive,
            clean: !m.persistent,
            will_topic: m.will_topic.clone(),
            login,
            client_id: m.client_id.clone(),
            topic: (!topic.is_empty()).then_some(topic),
            sub_qos,
            connect_timeout: Duration::from_secs(m.connect_timeout.max(1)),
            ordered,
            transport: m.transport(),
            ws_path: m.ws_path.clone(),
            tls: match m.transport().is_tls() {
                true => Some(crate::ws::client_config(&tls_opts(m))?),
                false => None,
            },
            tls_resume: m.tls_resume == OnOff::On,
        })
    }

    /// Which of the targets device `i` connects to (round-robin by index).
    pub fn node_of(&self, i: u64) -> usize {
        (i % self.targets.len().max(1) as u64) as usize
    }

    /// The MQTT address device `i` connects to.
    pub fn target(&self, i: u64) -> SocketAddr {
        self.targets[self.node_of(i)]
    }

    pub fn client_id(&self, i: u64) -> String {
        expand(&self.client_id, i, "")
    }

    /// Ticks between PINGREQs: 3/4 of the keep-alive, so one late tick never matters.
    pub(super) fn ping_period(&self, ticker: &Ticker) -> Option<u64> {
        (self.keepalive > 0).then(|| {
            let ms = u64::from(self.keepalive) * 750;
            ticker.after(Duration::from_millis(ms)) - ticker.now()
        })
    }
}
