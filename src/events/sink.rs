//! What every sink does the same way: gather a batch from its queue (up to `batch_max`,
//! waiting `linger_ms` for more after the first), back off exponentially between failed
//! attempts (capped at `retry_max_backoff_ms`), and stop cleanly.
//!
//! A batch being retried has left the queue, so while the backend is down the queue keeps
//! taking new events up to its capacity and nothing is lost until it is full. On shutdown
//! a sink sends what is queued without lingering, makes one attempt per batch, and counts
//! what it could not deliver as dropped (`shutdown`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::Event;
use super::queue::SinkQueue;

/// The first retry waits this long; each further one twice as long, up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A sink's queue and its batching and stopping rules.
pub struct Batcher {
    /// The sink's name in logs and metrics.
    pub name: &'static str,
    pub queue: SinkQueue,
    pub max: usize,
    pub linger: Duration,
    pub max_backoff: Duration,
    pub stop: CancellationToken,
}

/// Whether a failed attempt is worth repeating.
#[derive(Debug)]
pub enum Failure {
    /// The backend may take it later (down, timeout, 5xx, 429).
    Retry(String),
    /// The backend will never take this batch (a 4xx): drop it.
    Reject(String),
}

impl Batcher {
    pub fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Replaces `batch` with the next events: waits for the first, then up to `linger`
    /// for more, up to `max`. Returns false (with an empty batch) only when stopping and
    /// the queue is empty.
    pub async fn next(&self, batch: &mut Vec<Arc<Event>>) -> bool {
        batch.clear();
        loop {
            self.queue.take(batch, self.max);
            if !batch.is_empty() || self.stopping() {
                break;
            }
            tokio::select! {
                _ = self.queue.notify.notified() => {}
                _ = self.stop.cancelled() => {}
            }
        }
        let deadline = Instant::now() + self.linger;
        while batch.len() < self.max && !batch.is_empty() && !self.stopping() {
            tokio::select! {
                _ = self.queue.notify.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.stop.cancelled() => {}
            }
            self.queue.take(batch, self.max);
        }
        self.queue.take(batch, self.max);
        !batch.is_empty()
    }

    /// Waits `backoff` (or until stopped) and doubles it up to the cap.
    pub async fn back_off(&self, backoff: &mut Duration) {
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {}
            _ = self.stop.cancelled() => {}
        }
        *backoff = (*backoff * 2).min(self.max_backoff);
    }

    /// The first backoff, within the cap.
    pub fn first_backoff(&self) -> Duration {
        FIRST_BACKOFF.min(self.max_backoff)
    }

    /// After a failed attempt at `n` events: logs it (once per outage) and waits the
    /// backoff, returning true to try again; when stopping, counts them dropped and
    /// returns false.
    pub async fn after_failure(
        &self,
        error: &str,
        n: usize,
        backoff: &mut Duration,
        log: &mut OutageLog,
    ) -> bool {
        log.failed(self.name, error);
        if self.stopping() {
            self.dropped("shutdown", n);
            return false;
        }
        self.queue.metrics.retried.inc_by(n as u64);
        self.back_off(backoff).await;
        true
    }

    /// Counts `n` events that failed for good (`reason`).
    pub fn dropped(&self, reason: &str, n: usize) {
        self.queue.metrics.dropped(reason, n as u64);
    }
}

/// Logs a delivery failure once per outage: the first failure warns, later ones are quiet
/// until a delivery succeeds again (which is logged with the number of failed attempts).
#[derive(Default)]
pub struct OutageLog {
    failures: u64,
}

impl OutageLog {
    pub fn failed(&mut self, sink: &str, error: &str) {
        if self.failures == 0 {
            tracing::warn!(sink, error, "event delivery failed; retrying with backoff");
        }
        self.failures += 1;
    }

    pub fn succeeded(&mut self, sink: &str) {
        if self.failures > 0 {
            tracing::info!(
                sink,
                failed_attempts = self.failures,
                "event delivery recovered"
            );
        }
        self.failures = 0;
    }
}
