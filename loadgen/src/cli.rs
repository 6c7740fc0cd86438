//! The command line: one subcommand per scenario, with the options they share.
//!
//! The parsed [`Command`] is also the work order a child process gets (serialized as JSON
//! after the hidden `--child` flag), so every option type here is serde-able and the
//! child never re-derives anything from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

pub use crate::ws::Transport;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for the gateway and any MQTT 3.1.1/5 broker",
    long_about = "Ramps MQTT connections, pushes through the gateway's HTTP API, fans out, \
                  probes and storms, spreading sockets over 127.0.0.0/8 source addresses \
                  and over child processes so neither ephemeral ports nor the open-files \
                  limit run out. Prints a Markdown table and a one-line JSON summary.",
    args_conflicts_with_subcommands = true,
    subcommand_required = false
)]
pub struct Cli {
    /// Internal: run as a child process with this JSON work order.
    #[arg(long, hide = true)]
    pub child: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Ramp N MQTT connections at a rate, subscribe each to its own topic, hold them
    /// (answering keep-alive) and report connect rate and CONNACK latency.
    Connect(ConnectArgs),
    /// Connect and subscribe N devices, push to them through the gateway's HTTP API at a
    /// rate, and report delivery, loss, duplicates and end-to-end latency.
    Push(PushArgs),
    /// One MQTT publisher to S subscribers of one topic (any broker).
    Fanout(FanoutArgs),
    /// Load-balancer-style probes: TCP connect-then-close and CONNECT-then-abrupt-close.
    Churn(ChurnArgs),
    /// N connected devices all drop at once and reconnect, without and with jittered
    /// backoff; reports the time until all are back and the refused connects.
    Storm(StormArgs),
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Connect(_) => "connect",
            Command::Push(_) => "push",
            Command::Fanout(_) => "fanout",
            Command::Churn(_) => "churn",
            Command::Storm(_) => "storm",
        }
    }

    pub fn common(&self) -> &Common {
        match self {
            Command::Connect(a) => &a.common,
            Command::Push(a) => &a.common,
            Command::Fanout(a) => &a.common,
            Command::Churn(a) => &a.common,
            Command::Storm(a) => &a.common,
        }
    }

    pub fn mqtt(&self) -> &MqttOpts {
        match self {
            Command::Connect(a) => &a.mqtt,
            Command::Push(a) => &a.mqtt,
            Command::Fanout(a) => &a.mqtt,
            Command::Churn(a) => &a.mqtt,
            Command::Storm(a) => &a.mqtt,
        }
    }

    /// Checks what clap cannot: combinations of options.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Command::Fanout(a) if a.burst.is_none() && a.rate <= 0.0 => {
                Err("--rate must be above 0 (or send as fast as possible with --burst N)".into())
            }
            Command::Fanout(a) if a.burst == Some(0) => Err("--burst must be at least 1".into()),
            _ => Ok(()),
        }
    }

    /// How many sockets the children hold at once, at most (what the limits must allow).
    pub fn sockets(&self) -> u64 {
        match self {
            Command::Connect(a) => a.conns,
            Command::Push(a) => a.conns,
            Command::Fanout(a) => a.subscribers,
            Command::Churn(a) => a.concurrency.min(a.count),
            Command::Storm(a) => a.conns,
        }
    }

    /// How many connection slots are split over the children (devices or probes).
    pub fn units(&self) -> u64 {
        match self {
            Command::Churn(a) => a.count,
            _ => self.sockets(),
        }
    }
}

/// Where to connect from and to, how to spread the load, and what to report.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct Common {
    /// MQTT address of the broker under test.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub target: SocketAddr,

    /// MQTT addresses of several nodes of one fleet, comma-separated: device `i` connects
    /// to address `i mod N` (round-robin by device index), and the summary counts the
    /// devices connected to each (`devices_per_node`). Default: --target alone. A fan-out's
    /// publisher still connects to --target (or --publisher-target).
    #[arg(long, value_delimiter = ',', value_name = "ADDR,ADDR,...")]
    #[serde(default)]
    pub targets: Vec<SocketAddr>,

    /// Source addresses to bind before connecting, round-robin: `FIRST-LAST` (IPv4,
    /// inclusive) or `none` to let the kernel choose. Each address gives its own range of
    /// ephemeral ports, so 253 addresses hold millions of connections to one port.
    #[arg(long, default_value = "127.0.0.2-127.0.0.254")]
    pub source_range: String,

    /// Child processes holding the sockets (default: as few as RLIMIT_NOFILE allows).
    #[arg(long)]
    pub procs: Option<usize>,

    /// Runtime threads per process (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Print only the JSON summary line on stdout (no Markdown table).
    #[arg(long)]
    pub json: bool,

    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,

    /// Draw connections over time and the latency distribution to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Sample this server process's RSS, CPU time and open files before and after.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Prometheus endpoint of the server (e.g. http://127.0.0.1:8080/metrics): RSS, CPU
    /// and connection count when --server-pid is not given, connection count always.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,

    /// Allow a target outside 127.0.0.0/8 (loadgen refuses by default, so a typo never
    /// load-tests someone else's machine).
    #[arg(long)]
    pub allow_remote: bool,
}

impl Common {
    /// The addresses devices connect to: --targets, or --target alone.
    pub fn device_targets(&self) -> Vec<SocketAddr> {
        match self.targets.is_empty() {
            true => vec![self.target],
            false => self.targets.clone(),
        }
    }
}

/// What every simulated device says in its CONNECT and SUBSCRIBE.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct MqttOpts {
    /// MQTT protocol level: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub protocol: u8,

    /// Client id pattern; `{i}` is the device's index (0-based, unique across processes).
    #[arg(long, default_value = "lg-{i}")]
    pub client_id: String,

    /// Keep-alive in seconds; devices send PINGREQ every 3/4 of it (0 = never).
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,

    #[arg(long)]
    pub username: Option<String>,

    #[arg(long)]
    pub password: Option<String>,

    /// Ask for a persistent session (clean session 0 / MQTT 5 Session Expiry).
    #[arg(long)]
    pub persistent: bool,

    /// Give each device a will on this topic pattern (`{id}`: the client id), QoS 1,
    /// payload `offline`.
    #[arg(long)]
    #[serde(default)]
    pub will_topic: Option<String>,

    /// Seconds a device waits for CONNACK (and for SUBACK) before counting a failure.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,

    /// Connection handshakes in flight per process at most (keeps the SYN queue sane).
    #[arg(long, default_value_t = 512)]
    pub max_pending: usize,

    /// How devices reach --target: MQTT over TCP, MQTT over TLS (`tls`), or MQTT over
    /// WebSocket (`ws`: an HTTP upgrade on --ws-path with the subprotocol `mqtt`, then
    /// masked binary frames; `wss`: the same over TLS).
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,

    /// Shorthand for --transport tls: MQTT over TLS to --target (the broker's TLS port).
    #[arg(long, conflicts_with = "transport")]
    #[serde(default)]
    pub tls: bool,

    /// The HTTP path of the WebSocket upgrade (with --transport ws or wss).
    #[arg(long, default_value = "/mqtt")]
    pub ws_path: String,

    /// PEM CA bundle to verify the server's certificate with (--tls, --transport wss);
    /// without it the certificate is not checked. The name checked is --target's address.
    #[arg(long, visible_alias = "ca")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate (chain) each device presents, for mutual TLS; with
    /// --tls-key.
    #[arg(long, requires = "tls_key")]
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    #[serde(default)]
    pub tls_key: Option<PathBuf>,

    /// TLS session resumption: `on`, each device keeps the session tickets it got and
    /// resumes with one when it reconnects (a storm's reconnects, churn); `off`, every
    /// handshake is full.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    #[serde(default)]
    pub tls_resume: OnOff,

    /// The TLS versions devices offer: `any` (1.3 and 1.2, so 1.3 with a server that
    /// has it), `1.3` or `1.2` only.
    #[arg(long, value_enum, default_value_t = TlsVersion::Any)]
    #[serde(default)]
    pub tls_version: TlsVersion,
}

/// `--tls-version`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[default]
    Any,
    #[value(name = "1.3")]
    Tls13,
    #[value(name = "1.2")]
    Tls12,
}

/// A switch given as `on` or `off`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnOff {
    #[default]
    On,
    Off,
}

impl MqttOpts {
    /// The transport, `--tls` resolved.
    pub fn transport(&self) -> Transport {
        if self.tls {
            Transport::Tls
        } else {
            self.transport
        }
    }
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub mqtt: MqttOpts,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub conns: u64,
    /// New connections per second (all processes together).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds to hold the connections once all are up.
    #[arg(long, default_value_t = 10)]
    pub hold: u64,
    /// Topic pattern each device subscribes to (`{id}` client id, `{i}` index); empty:
    /// do not subscribe.
    #[arg(long, default_value = "devices/{id}/cmd")]
    pub topic: String,
    /// QoS of the subscriptions.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub sub_qos: u8,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct PushArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub mqtt: MqttOpts,
    /// Devices to connect and subscribe before pushing.
    #[arg(long, default_value_t = 1000)]
    pub conns: u64,
    /// Device connections per second while ramping.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Pushes per second (messages, whatever the batch size).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of pushing.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Base URL of the gateway's HTTP API; several (comma-separated, e.g. one per node
    /// of a fleet) take the requests in turn: request `k` goes to URL `k mod N`. With
    /// --batch 1 and --targets naming the same nodes in the same order, each push goes
    /// to the node holding its device; in another order (e.g. reversed for two nodes),
    /// to another node.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub http: String,
    /// Bearer token for the API.
    #[arg(long)]
    pub token: Option<String>,
    /// Messages per request: 1 uses /v1/push, more uses /v1/push/batch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub batch: u64,
    /// QoS of the pushes (and of the device subscriptions).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// HTTP requests in flight at most.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Payload size in bytes (at least the timestamp).
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Seconds to wait after the last push for deliveries still on their way.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
    /// Retries of a request answered 503 (each after its Retry-After).
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
    /// Topic pattern of each device (`{id}` client id, `{i}` index).
    #[arg(long, default_value = "devices/{id}/cmd")]
    pub topic: String,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub mqtt: MqttOpts,
    /// Subscribers of the topic.
    #[arg(long, default_value_t = 100)]
    pub subscribers: u64,
    /// MQTT/TCP address of the publisher (default: --target). The publisher always speaks
    /// MQTT over TCP, so with --transport ws (subscribers over WebSocket) this names the
    /// broker's TCP listener.
    #[arg(long)]
    pub publisher_target: Option<SocketAddr>,
    /// Subscriber connections per second while ramping.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Messages the publisher sends per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// The one topic. With `{i}` or `{id}` in it, each subscriber subscribes to its own
    /// topic and the publisher sends round robin to them: message n goes to subscriber
    /// n mod --subscribers only (a device command channel, not a fan-out).
    #[arg(long, default_value = "loadgen/fanout")]
    pub topic: String,
    /// QoS of the publisher (and of the subscriptions unless --sub-qos is given).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// QoS of the subscriptions (default: --qos); 2 makes each subscriber answer PUBREC
    /// and PUBCOMP.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub sub_qos: Option<u8>,
    /// MQTT protocol level of the subscribers, 4 (3.1.1) or 5 (default: --protocol,
    /// which the publisher uses).
    #[arg(long, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub sub_version: Option<u8>,
    /// QoS 1/2 PUBLISHes the publisher keeps unacknowledged at most; it sends the next
    /// only when a PUBACK (QoS 2: PUBCOMP) returns a slot.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65535))]
    pub window: u64,
    /// Send this many messages as fast as the broker takes them (within --window at
    /// QoS 1), instead of --rate messages a second for --duration seconds.
    #[arg(long, value_name = "N")]
    pub burst: Option<u64>,
    /// Exit with status 4 if any subscriber lost a message.
    #[arg(long)]
    pub expect_no_loss: bool,
    /// Payload size in bytes (at least the timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds to wait after the last publish for deliveries still on their way.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
}

impl FanoutArgs {
    /// Messages the publisher sends in all.
    pub fn planned(&self) -> u64 {
        self.burst
            .unwrap_or_else(|| (self.rate * self.duration as f64).round() as u64)
    }

    pub fn sub_qos(&self) -> u8 {
        self.sub_qos.unwrap_or(self.qos)
    }

    /// Whether each subscriber has its own topic (`{i}` / `{id}` in --topic).
    pub fn per_subscriber(&self) -> bool {
        self.topic.contains("{i}") || self.topic.contains("{id}")
    }

    /// The topic of message `seq`: the one topic, or subscriber `seq mod subscribers`'s.
    pub fn topic_of(&self, seq: u64) -> std::borrow::Cow<'_, str> {
        if !self.per_subscriber() {
            return std::borrow::Cow::Borrowed(&self.topic);
        }
        let i = seq % self.subscribers.max(1);
        let id = expand(&self.mqtt.client_id, i, "");
        std::borrow::Cow::Owned(expand(&self.topic, i, &id))
    }

    /// How many of `published` messages subscriber `index` should receive.
    pub fn expected_by(&self, index: u64, published: u64) -> u64 {
        if !self.per_subscriber() {
            return published;
        }
        let n = self.subscribers.max(1);
        published / n + u64::from(index < published % n)
    }

    pub fn sub_version(&self) -> u8 {
        self.sub_version.unwrap_or(self.mqtt.protocol)
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeMode {
    /// TCP connect, then close (FIN), like a load balancer health check.
    Tcp,
    /// TCP connect, send CONNECT, then close abruptly (RST) without DISCONNECT.
    Mqtt,
    /// Alternate the two.
    Both,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub mqtt: MqttOpts,
    /// Probes in total.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Probes per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, value_enum, default_value_t = ProbeMode::Both)]
    pub mode: ProbeMode,
    /// In mqtt mode, read the CONNACK before the abrupt close.
    #[arg(long)]
    pub wait_connack: bool,
    /// Probes in flight at most (all processes together).
    #[arg(long, default_value_t = 256)]
    pub concurrency: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backoff {
    /// Reconnect at once, and retry at once after a failure.
    None,
    /// Full-jitter exponential backoff: a random delay in [0, min(max, base * 2^attempt)].
    Jitter,
    /// One round of each, `none` first.
    Both,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub mqtt: MqttOpts,
    /// Devices to connect before the storm.
    #[arg(long, default_value_t = 1000)]
    pub conns: u64,
    /// Initial connections per second.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    #[arg(long, value_enum, default_value_t = Backoff::Both)]
    pub backoff: Backoff,
    /// First backoff ceiling in milliseconds (jitter).
    #[arg(long, default_value_t = 100)]
    pub backoff_base_ms: u64,
    /// Largest backoff in milliseconds (jitter).
    #[arg(long, default_value_t = 5000)]
    pub backoff_max_ms: u64,
    /// Seconds a round may take before the devices still down give up.
    #[arg(long, default_value_t = 60)]
    pub round_timeout: u64,
    /// Seconds to hold between the ramp and the first drop, and between rounds.
    #[arg(long, default_value_t = 1)]
    pub settle: u64,
    /// Topic pattern each device subscribes to again after reconnecting; empty: none.
    #[arg(long, default_value = "devices/{id}/cmd")]
    pub topic: String,
}

/// `pattern` with `{i}` replaced by the index and `{id}` by the client id.
pub fn expand(pattern: &str, i: u64, client_id: &str) -> String {
    pattern
        .replace("{i}", &i.to_string())
        .replace("{id}", client_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn per_subscriber_topics_go_round_robin() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "fanout",
            "--subscribers",
            "3",
            "--topic",
            "dev/{id}/cmd",
            "--client-id",
            "d-{i}",
        ])
        .expect("parses");
        let Some(Command::Fanout(a)) = cli.command else {
            panic!("fanout")
        };
        assert!(a.per_subscriber());
        assert_eq!(a.topic_of(4), "dev/d-1/cmd");
        assert_eq!(a.topic_of(5), "dev/d-2/cmd");
        let expected: Vec<u64> = (0..3).map(|i| a.expected_by(i, 10)).collect();
        assert_eq!(expected, [4, 3, 3]);
    }

    #[test]
    fn targets_default_to_target_and_parse_as_a_list() {
        let common = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).expect("parses");
            cli.command.unwrap().common().device_targets()
        };
        let one = common(&["loadgen", "connect", "--target", "127.0.0.1:1"]);
        assert_eq!(one, ["127.0.0.1:1".parse().unwrap()]);
        let two = common(&["loadgen", "storm", "--targets", "127.0.0.1:1,127.0.0.1:2"]);
        let want: Vec<SocketAddr> = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        assert_eq!(two, want);
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn patterns_expand() {
        assert_eq!(expand("lg-{i}", 7, ""), "lg-7");
        assert_eq!(expand("devices/{id}/cmd", 7, "lg-7"), "devices/lg-7/cmd");
    }

    #[test]
    fn work_order_roundtrips() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "connect",
            "--conns",
            "5",
            "--protocol",
            "5",
            "--rate",
            "10",
        ])
        .unwrap();
        let cmd = cli.command.unwrap();
        let text = serde_json::to_string(&cmd).unwrap();
        let back: Command = serde_json::from_str(&text).unwrap();
        let Command::Connect(a) = back else { panic!() };
        assert_eq!((a.conns, a.mqtt.protocol), (5, 5));
    }
}
