//! The parent-child protocol: one JSON object per line each way.
//!
//! The parent starts each child as `loadgen --child '<WorkOrder JSON>'`. The child writes
//! [`Event`] lines to its stdout (cumulative counter snapshots a few times a second,
//! `ready` once every initial connection attempt has settled, `round` after each storm
//! round, `final` with its histograms just before it exits) and reads [`Control`] lines
//! from its stdin. End of stdin means the parent is gone: the child stops at once, so no
//! child outlives its parent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cli::Command;
use crate::stats::Histogram;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkOrder {
    pub command: Command,
    /// This child's slice: units `first..first + count` (device or probe indices).
    pub first: u64,
    pub count: u64,
    /// This child's share of the connect (or probe) rate, per second.
    pub rate: f64,
    /// This child's share of the in-flight limit.
    pub max_pending: usize,
}

/// Cumulative counters of one child (the parent sums them over children).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Initial connection (or probe) attempts started.
    pub attempted: u64,
    /// Initial attempts that ended, whatever the outcome.
    pub settled: u64,
    /// Connections that got a successful CONNACK (and SUBACK) on their first attempt, or
    /// probes that completed.
    pub connected: u64,
    /// Initial attempts that failed.
    pub failed: u64,
    /// Connections up right now.
    pub live: u64,
    /// Connections lost after they were up, other than by a storm drop or a stop.
    pub dropped: u64,
    pub pings: u64,
    pub pongs: u64,
    /// PINGREQs whose PINGRESP had not come by the next PINGREQ.
    pub pongs_missing: u64,
    /// PUBLISH packets received (duplicates included).
    pub received: u64,
    /// Distinct messages received (by sequence number per device).
    pub unique: u64,
    pub duplicates: u64,
    /// Received payloads without a loadgen timestamp.
    pub foreign: u64,
    /// Microseconds from the first initial attempt to the last one settling (0 until
    /// then); the parent takes the longest over children.
    pub ramp_us: u64,
    /// When the last stamped message arrived (ns since the UNIX epoch, 0 = none yet);
    /// the parent takes the latest over children.
    #[serde(default)]
    pub last_rx_ns: u64,
    /// TLS handshakes that were full, and that resumed a session (`--tls`, `wss`).
    #[serde(default)]
    pub tls_full: u64,
    #[serde(default)]
    pub tls_resumed: u64,
}

impl Snapshot {
    pub fn add(&mut self, o: &Snapshot) {
        self.attempted += o.attempted;
        self.settled += o.settled;
        self.connected += o.connected;
        self.failed += o.failed;
        self.live += o.live;
        self.dropped += o.dropped;
        self.pings += o.pings;
        self.pongs += o.pongs;
        self.pongs_missing += o.pongs_missing;
        self.received += o.received;
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.foreign += o.foreign;
        self.tls_full += o.tls_full;
        self.tls_resumed += o.tls_resumed;
        self.ramp_us = self.ramp_us.max(o.ramp_us);
        self.last_rx_ns = self.last_rx_ns.max(o.last_rx_ns);
    }
}

/// One storm round as one child saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    /// Devices that were up and dropped their connection.
    pub dropped: u64,
    /// Devices connected again before the round timed out.
    pub back: u64,
    /// Connection attempts, successful or not.
    pub attempts: u64,
    /// Failed attempts (refused by TCP or by CONNACK, timeouts, resets).
    pub refused: u64,
    pub causes: BTreeMap<String, u64>,
    /// Microseconds from the drop to the last device's CONNACK (or SUBACK).
    pub last_back_us: u64,
    /// Drop-to-back time per device, microseconds.
    pub back_hist: Histogram,
}

/// What one subscriber received (`fanout`): the parent derives its loss from these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCount {
    /// The device's index (its `{i}`).
    pub index: u64,
    /// Distinct messages (by sequence number).
    pub unique: u64,
    pub duplicates: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FinalReport {
    pub snapshot: Snapshot,
    /// Initial-attempt failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// Losses of established connections by cause.
    pub drops: BTreeMap<String, u64>,
    /// Start of TCP connect to CONNACK, microseconds.
    pub connect_hist: Histogram,
    /// CONNACK to SUBACK, microseconds.
    pub subscribe_hist: Histogram,
    /// Send timestamp in the payload to receipt, microseconds.
    pub message_hist: Histogram,
    /// Per subscriber that got its SUBACK (`fanout` only; empty otherwise).
    #[serde(default)]
    pub per_device: Vec<DeviceCount>,
    /// Devices connected on their first attempt, per `--targets` address (in its order).
    #[serde(default)]
    pub per_node: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Progress(Snapshot),
    Ready(Snapshot),
    Round(RoundReport),
    Final(Box<FinalReport>),
    /// A fatal problem in the child; it exits after sending this.
    Error {
        message: String,
    },
}

/// Parent-to-child commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Control {
    /// Disconnect cleanly, send `final` and exit.
    Stop,
    /// Storm: drop every live connection now and reconnect.
    Drop {
        round: u32,
        jitter: bool,
        base_ms: u64,
        max_ms: u64,
        timeout_secs: u64,
    },
}
