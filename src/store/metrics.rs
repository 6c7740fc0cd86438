//! The store's metrics (`StoreMetrics`): commits, fsync latency, batch sizes and the file
//! size, written by the writer alone and rendered for `/metrics`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The store's metrics, shared by the writer (only writer) and `/metrics`.
pub struct StoreMetrics {
    pub(super) path: PathBuf,
    pub(super) commits: Counter,
    pub(super) ops: Counter,
    pub(super) errors: Counter,
    pub(super) commit_seconds: Histogram,
    pub(super) batch_ops: Histogram,
    pub(super) compactions: Counter,
    /// Rows refused at start because their checksum failed or they did not decode.
    pub(super) corrupt_records: Counter,
    pub(super) file_bytes: AtomicU64,
    /// False from a failed commit until the reopened database took a commit again; read
    /// by the shards (pushes that need the store are refused meanwhile) and `/readyz`.
    up: AtomicBool,
    /// What every shard's batches handed over and not yet committed (or waiting for room)
    /// cost, and the most it has been.
    backlog_bytes: AtomicU64,
    backlog_peak_bytes: AtomicU64,
}

impl StoreMetrics {
    pub(super) fn new(path: PathBuf) -> Self {
        StoreMetrics {
            path,
            commits: Counter::default(),
            ops: Counter::default(),
            errors: Counter::default(),
            commit_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            batch_ops: Histogram::new([1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0]),
            compactions: Counter::default(),
            corrupt_records: Counter::default(),
            file_bytes: AtomicU64::new(0),
            up: AtomicBool::new(true),
            backlog_bytes: AtomicU64::new(0),
            backlog_peak_bytes: AtomicU64::new(0),
        }
    }

    pub(super) fn backlog_more(&self, bytes: u64) {
        let now = self.backlog_bytes.fetch_add(bytes, Relaxed) + bytes;
        self.backlog_peak_bytes.fetch_max(now, Relaxed);
    }

    pub(super) fn backlog_less(&self, bytes: u64) {
        self.backlog_bytes.fetch_sub(bytes, Relaxed);
    }

    /// Whether the store takes commits (false while the writer reopens it after a failure).
    pub fn up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub(super) fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
    }

    pub(super) fn refresh_size(&self) {
        if let Ok(m) = std::fs::metadata(&self.path) {
            self.file_bytes.store(m.len(), Relaxed);
        }
    }

    /// Appends the store families in the Prometheus text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        self.refresh_size();
        let mut r = Registry::default();
        let gauges = [
            (
                "gateway_store_bytes",
                "Size of the store file",
                self.file_bytes.load(Relaxed),
            ),
            (
                "gateway_store_up",
                "1 while the store takes commits; 0 from a failed commit until the writer has reopened it",
                u64::from(self.up()),
            ),
            (
                "gateway_store_backlog_bytes",
                "Changes the shards hold for the store writer (handed over and not yet committed, or waiting for room), by what they cost in memory",
                self.backlog_bytes.load(Relaxed),
            ),
            (
                "gateway_store_backlog_peak_bytes",
                "The most gateway_store_backlog_bytes has been since the start",
                self.backlog_peak_bytes.load(Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let g: Gauge = Gauge::default();
            g.set(value as i64);
            r.register(name, help, g);
        }
        r.register(
            crate::metrics::counter_family("gateway_store_commits_total"),
            "Store write transactions committed",
            self.commits.clone(),
        );
        r.register(
            crate::metrics::counter_family("gateway_store_ops_total"),
            "Store changes (session, subscription, message, retained) committed",
            self.ops.clone(),
        );
        r.register(
            crate::metrics::counter_family("gateway_store_errors_total"),
            "Store commits that failed",
            self.errors.clone(),
        );
        r.register(
            crate::metrics::counter_family("gateway_store_compactions_total"),
            "Store file compactions",
            self.compactions.clone(),
        );
        r.register(
            crate::metrics::counter_family("gateway_store_corrupt_records_total"),
            "Stored records refused (and deleted) at start: their checksum failed or they did not decode",
            self.corrupt_records.clone(),
        );
        r.register(
            "gateway_store_commit_seconds",
            "Time of one store commit including its fsync",
            self.commit_seconds.clone(),
        );
        r.register(
            "gateway_store_batch_ops",
            "Changes per store commit (group commit size)",
            self.batch_ops.clone(),
        );
        crate::metrics::encode_into(&r, out);
    }
}
