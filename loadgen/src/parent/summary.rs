//! The summary of a run (ordered key/value pairs), the verdict that sets the exit
//! status, and the derived figures and hints that go in it or beside it.

use serde_json::{json, Value};

use crate::cli::Command;
use crate::proto::DeviceCount;
use crate::stats::Histogram;

/// The summary as ordered key/value pairs (the table keeps this order).
#[derive(Default)]
pub struct Summary {
    pub(super) fields: Vec<(String, Value)>,
    /// The histogram to draw with `--plot`, and its label.
    pub(super) plot_hist: Histogram,
    pub(super) plot_label: String,
}

impl Summary {
    pub(super) fn put(&mut self, k: &str, v: impl Into<Value>) {
        self.fields.push((k.to_string(), v.into()));
    }

    pub fn fields(&self) -> &[(String, Value)] {
        &self.fields
    }

    /// The unsigned integer under `key`, if the summary has one.
    pub(super) fn u64(&self, key: &str) -> Option<u64> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_u64())
    }
}

/// Exit status when the run measured nothing it was asked to (no connection, no
/// subscriber, no delivery): its figures would describe nothing.
pub const EXIT_MEASURED_NOTHING: u8 = 3;
/// Exit status of a `fanout --expect-no-loss` run that lost messages.
pub const EXIT_LOST: u8 = 4;

/// Why a finished run failed its purpose, as `(exit status, reason)`; `None` if it did
/// not. The summary is printed either way.
pub(super) fn verdict(cmd: &Command, s: &Summary) -> Option<(u8, String)> {
    let must_not_be_zero: &[&str] = match cmd {
        Command::Connect(_) | Command::Storm(_) => &["connected"],
        Command::Push(_) => &["devices_connected", "accepted", "delivered"],
        Command::Fanout(_) => &["subscribed", "published", "delivered"],
        Command::Churn(_) => &["completed"],
    };
    if let Some(k) = must_not_be_zero.iter().find(|k| s.u64(k) == Some(0)) {
        return Some((
            EXIT_MEASURED_NOTHING,
            format!("measured nothing: {k} is 0 (see the failures in the summary)"),
        ));
    }
    let lost = s.u64("lost").unwrap_or(0);
    match cmd {
        Command::Fanout(a) if a.expect_no_loss && lost > 0 => Some((
            EXIT_LOST,
            format!(
                "--expect-no-loss: {lost} of {} deliveries lost",
                s.u64("expected").unwrap_or(0)
            ),
        )),
        _ => None,
    }
}

/// Loss per subscriber (what it should have received, `expected(index)`, − what it
/// received, duplicates apart): the spread, how many lost anything, and the ten that lost
/// most by client id.
pub(super) fn loss_per_subscriber(
    expected: impl Fn(u64) -> u64,
    per_device: &[DeviceCount],
    client_id: &str,
) -> Value {
    let mut lost: Vec<(u64, u64)> = per_device
        .iter()
        .map(|d| (expected(d.index).saturating_sub(d.unique), d.index))
        .collect();
    lost.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let worst: serde_json::Map<String, Value> = lost
        .iter()
        .filter(|(n, _)| *n > 0)
        .take(10)
        .map(|&(n, i)| (crate::cli::expand(client_id, i, ""), n.into()))
        .collect();
    let total: u64 = lost.iter().map(|l| l.0).sum();
    json!({
        "subscribers": lost.len(),
        "min": lost.last().map(|l| l.0),
        "max": lost.first().map(|l| l.0),
        "mean": (!lost.is_empty()).then(|| round3(total as f64 / lost.len() as f64)),
        "with_loss": lost.iter().filter(|l| l.0 > 0).count(),
        "with_duplicates": per_device.iter().filter(|d| d.duplicates > 0).count(),
        "worst": worst,
    })
}

pub(super) fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub(super) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// What to change when failures point at a limit rather than at the server.
pub(super) fn hints(s: &Summary) -> Vec<String> {
    let mut causes: Vec<String> = Vec::new();
    for (k, v) in s.fields() {
        if k.ends_with("failures") || k == "drops" {
            if let Value::Object(m) = v {
                causes.extend(m.keys().cloned());
            }
        }
    }
    let any = |needle: &str| causes.iter().any(|c| c.contains(needle));
    let mut out = Vec::new();
    if any("too_many_open_files") {
        out.push(
            "a process ran out of file descriptors: use more --procs, or raise RLIMIT_NOFILE \
             (ulimit -n); on the server side see `gateway doctor`"
                .to_string(),
        );
    }
    if any("addr_not_available") {
        out.push(
            "ephemeral ports ran out: widen --source-range or net.ipv4.ip_local_port_range"
                .to_string(),
        );
    }
    if any("timeout") {
        out.push(
            "handshakes timed out: lower --rate or --max-pending, raise --connect-timeout, or \
             raise the server's listen backlog (net.core.somaxconn, [tcp] backlog)"
                .to_string(),
        );
    }
    out
}
