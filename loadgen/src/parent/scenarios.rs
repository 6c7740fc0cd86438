//! The five scenarios as phases of a [`Run`]: what each starts, waits for and stops,
//! and the summary it builds from the children's final reports and the server samples.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::summary::{loss_per_subscriber, round1, round3, Summary};
use super::{Run, Status, AFTER_PAUSE};
use crate::cli::{Backoff, Command};
use crate::cost::{self, Sample};
use crate::plot::RoundMark;
use crate::proto::{Control, FinalReport, RoundReport, Snapshot};
use crate::{fleet, publisher, pusher};

/// What a message scenario has once its deliveries drained and the children stopped.
struct Drained {
    f: FinalReport,
    end_sample: Sample,
    after: Sample,
    live_at_end: u64,
}

impl Run {
    pub(super) async fn connect(&mut self, conns: u64, hold: u64) -> Result<Summary, String> {
        let before = self.sample().await;
        let ramp_secs = self.ramp("connect").await?;
        let ramped = self.kids.total();
        self.hold("hold", hold).await;
        let at_end = self.kids.total();
        let loaded = self.sample().await;
        let f = self.stop().await;
        tokio::time::sleep(AFTER_PAUSE).await;
        let after = self.sample().await;

        let mut s = Summary::default();
        self.head(&mut s);
        s.put("conns", conns);
        s.put("connected", f.snapshot.connected);
        s.put("failed", f.snapshot.failed);
        s.put("failures", json!(f.failures));
        s.put(
            "connect_rate",
            round1(ramped.connected as f64 / ramp_secs.max(1e-3)),
        );
        s.put("ramp_secs", round3(ramp_secs));
        s.put("latency_ms", f.connect_hist.summary_ms());
        s.put("subscribe_latency_ms", f.subscribe_hist.summary_ms());
        s.put("hold_secs", hold);
        s.put("live_at_end", at_end.live);
        s.put("dropped", f.snapshot.dropped);
        s.put("drops", json!(f.drops));
        s.put("pings", f.snapshot.pings);
        s.put("pongs", f.snapshot.pongs);
        s.put("pongs_missing", f.snapshot.pongs_missing);
        let server = cost::summarize(&self.source(), &before, &loaded, &after, at_end.live, None);
        self.tail(&mut s, Some(server));
        s.plot_hist = f.connect_hist;
        s.plot_label = "CONNACK latency".into();
        Ok(s)
    }

    pub(super) async fn push(&mut self) -> Result<Summary, String> {
        let Command::Push(a) = self.cmd.clone() else {
            unreachable!("push scenario")
        };
        let before = self.sample().await;
        let ramp_secs = self.ramp("connect").await?;
        let ramped = self.kids.total();
        let planned = (a.rate * a.duration as f64).round() as u64;
        let counters = Arc::new(pusher::PushCounters::default());
        let start_sample = self.sample().await;
        self.ui.bar.phase("push", planned);
        let c = counters.clone();
        let status = move |t: &Snapshot, _: f64| {
            (
                c.sent.load(Ordering::Relaxed),
                format!(
                    "{} accepted, {} delivered, {} dup",
                    c.accepted.load(Ordering::Relaxed),
                    t.unique,
                    t.duplicates
                ),
            )
        };
        let c = counters.clone();
        self.ui.sent = Some(Arc::new(move || c.sent.load(Ordering::Relaxed)));
        let result = self
            .send("push", pusher::run(&a, counters.clone()), &status)
            .await?;
        let d = self.drain(result.accepted, a.drain).await;
        let f = &d.f;
        let delivered = f.snapshot.unique;
        let mut s = Summary::default();
        self.head(&mut s);
        s.put("devices", a.conns);
        s.put("devices_connected", ramped.connected);
        s.put("device_failures", json!(f.failures));
        s.put(
            "connect_rate",
            round1(ramped.connected as f64 / ramp_secs.max(1e-3)),
        );
        s.put(
            "endpoint",
            if a.batch > 1 {
                "/v1/push/batch"
            } else {
                "/v1/push"
            },
        );
        s.put("batch", a.batch);
        s.put("qos", a.qos);
        s.put("sent", result.sent);
        s.put("accepted", result.accepted);
        s.put("statuses", json!(result.statuses));
        s.put("errors", json!(result.errors));
        s.put("retries_503", result.retries_503);
        s.put("delivered", delivered);
        s.put("lost", result.accepted.saturating_sub(delivered));
        s.put("duplicated", f.snapshot.duplicates);
        s.put(
            "unexpected",
            delivered.saturating_sub(result.accepted) + f.snapshot.foreign,
        );
        s.put("target_rate", a.rate);
        s.put(
            "push_rate",
            round1(result.sent as f64 / result.elapsed.as_secs_f64().max(1e-3)),
        );
        s.put("latency_ms", f.message_hist.summary_ms());
        s.put("http_latency_ms", result.http_hist.summary_ms());
        self.delivery_tail(
            s,
            d,
            (&before, &start_sample),
            "push latency (HTTP send to device receipt)",
        )
    }

    pub(super) async fn fanout(&mut self) -> Result<Summary, String> {
        let Command::Fanout(a) = self.cmd.clone() else {
            unreachable!("fanout scenario")
        };
        let before = self.sample().await;
        let ramp_secs = self.ramp("subscribe").await?;
        let ramped = self.kids.total();
        let subscribed = ramped.live;
        let planned = a.planned();
        let counters = Arc::new(publisher::PubCounters::default());
        let c = counters.clone();
        self.ui.sent = Some(Arc::new(move || c.published.load(Ordering::Relaxed)));
        let start_sample = self.sample().await;
        self.ui.bar.phase("publish", planned);
        let c = counters.clone();
        let status = move |t: &Snapshot, _: f64| {
            (
                c.published.load(Ordering::Relaxed),
                format!("{} delivered, {} dup", t.unique, t.duplicates),
            )
        };
        let publish_start_ns = fleet::now_ns();
        let result = self
            .send("fanout", publisher::run(&a, counters.clone()), &status)
            .await?;
        let expected = if a.per_subscriber() {
            // Each message goes to its one subscriber (one that failed to subscribe counts
            // its messages as lost, and shows in subscriber_failures).
            (0..a.subscribers)
                .map(|i| a.expected_by(i, result.published))
                .sum()
        } else {
            result.published * subscribed
        };
        let d = self.drain(expected, a.drain).await;
        let f = &d.f;
        let delivered = f.snapshot.unique;
        let mut s = Summary::default();
        self.head(&mut s);
        s.put("topic", a.topic.clone());
        s.put("qos", a.qos);
        s.put("sub_qos", a.sub_qos());
        s.put("sub_protocol", a.sub_version());
        if a.qos > 0 {
            s.put("window", a.window);
        }
        if let Some(n) = a.burst {
            s.put("burst", n);
        }
        s.put("subscribers", a.subscribers);
        s.put("subscribed", subscribed);
        s.put("subscriber_failures", json!(f.failures));
        s.put(
            "connect_rate",
            round1(ramped.connected as f64 / ramp_secs.max(1e-3)),
        );
        s.put("published", result.published);
        if a.qos > 0 {
            s.put("publish_acked", result.acked);
        }
        s.put(
            "publish_rate",
            round1(result.published as f64 / result.elapsed.as_secs_f64().max(1e-3)),
        );
        s.put("expected", expected);
        s.put("delivered", delivered);
        s.put("lost", expected.saturating_sub(delivered));
        s.put("duplicated", f.snapshot.duplicates);
        s.put(
            "lost_per_subscriber",
            loss_per_subscriber(
                |i| a.expected_by(i, result.published),
                &f.per_device,
                &a.mqtt.client_id,
            ),
        );
        // Over the time the deliveries took (first publish to last receipt), not the
        // time publishing took: a broker that buffers finishes delivering later.
        let delivery_secs = f.snapshot.last_rx_ns.saturating_sub(publish_start_ns) as f64 / 1e9;
        s.put("delivery_secs", round3(delivery_secs));
        s.put(
            "delivery_rate",
            round1(delivered as f64 / delivery_secs.max(1e-3)),
        );
        s.put("latency_ms", f.message_hist.summary_ms());
        self.delivery_tail(
            s,
            d,
            (&before, &start_sample),
            "fan-out latency (publish to receipt)",
        )
    }

    /// Runs the pusher or publisher (`what`) while the children report; on failure or
    /// Ctrl-C the children are stopped and the error says which sender failed.
    async fn send<T>(
        &mut self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, String>>,
        status: Status<'_>,
    ) -> Result<T, String> {
        let result = if self.interrupted() {
            Err("interrupted".to_string())
        } else {
            self.pump_while(fut, status).await
        };
        if result.is_err() {
            self.stop().await;
        }
        result.map_err(|e| format!("{what}: {e}"))
    }

    /// Waits up to `drain_secs` for `expected` distinct deliveries, then stops the
    /// children and samples the server at the end and after.
    async fn drain(&mut self, expected: u64, drain_secs: u64) -> Drained {
        self.ui.bar.phase("drain", expected);
        let drain_status = |t: &Snapshot, _: f64| (t.unique, format!("{} dup", t.duplicates));
        self.pump(
            move |k| k.total().unique >= expected,
            Some(Instant::now() + Duration::from_secs(drain_secs)),
            &drain_status,
        )
        .await;
        let end_sample = self.sample().await;
        let live_at_end = self.kids.total().live;
        let f = self.stop().await;
        tokio::time::sleep(AFTER_PAUSE).await;
        let after = self.sample().await;
        Drained {
            f,
            end_sample,
            after,
            live_at_end,
        }
    }

    /// The end of a message scenario's summary: drops, the server's cost per message
    /// delivered, and the latency histogram to plot.
    fn delivery_tail(
        &self,
        mut s: Summary,
        d: Drained,
        (before, start_sample): (&Sample, &Sample),
        label: &str,
    ) -> Result<Summary, String> {
        s.put("dropped", d.f.snapshot.dropped);
        s.put("drops", json!(d.f.drops));
        let server = cost::summarize(
            &self.source(),
            before,
            &d.end_sample,
            &d.after,
            d.live_at_end,
            Some((d.f.snapshot.unique, start_sample, &d.end_sample)),
        );
        self.tail(&mut s, Some(server));
        s.plot_hist = d.f.message_hist;
        s.plot_label = label.into();
        Ok(s)
    }

    pub(super) async fn churn(&mut self) -> Result<Summary, String> {
        let Command::Churn(a) = self.cmd.clone() else {
            unreachable!("churn scenario")
        };
        let before = self.sample().await;
        let secs = self.ramp("probes").await?;
        let f = self.stop().await;
        tokio::time::sleep(AFTER_PAUSE).await;
        let after = self.sample().await;

        let mut s = Summary::default();
        self.head(&mut s);
        s.put("mode", format!("{:?}", a.mode).to_lowercase());
        s.put("probes", a.count);
        s.put("completed", f.snapshot.connected);
        s.put("failed", f.snapshot.failed);
        s.put("failures", json!(f.failures));
        s.put(
            "probe_rate",
            round1(f.snapshot.settled as f64 / secs.max(1e-3)),
        );
        s.put("latency_ms", f.connect_hist.summary_ms());
        let server = cost::summarize(&self.source(), &before, &after, &after, 0, None);
        self.tail(&mut s, Some(server));
        s.plot_hist = f.connect_hist;
        s.plot_label = "probe latency (connect start to close)".into();
        Ok(s)
    }

    pub(super) async fn storm(&mut self) -> Result<Summary, String> {
        let Command::Storm(a) = self.cmd.clone() else {
            unreachable!("storm scenario")
        };
        let before = self.sample().await;
        let ramp_secs = self.ramp("connect").await?;
        let ramped = self.kids.total();
        let loaded = self.sample().await;
        let modes: &[bool] = match a.backoff {
            Backoff::None => &[false],
            Backoff::Jitter => &[true],
            Backoff::Both => &[false, true],
        };
        let mut rounds = Vec::new();
        for (n, &jitter) in modes.iter().enumerate() {
            if self.interrupted() {
                break;
            }
            self.hold("settle", a.settle).await;
            let round = n as u32 + 1;
            let dropped_at = self.ui.now();
            self.kids
                .send(Control::Drop {
                    round,
                    jitter,
                    base_ms: a.backoff_base_ms,
                    max_ms: a.backoff_max_ms,
                    timeout_secs: a.round_timeout,
                })
                .await;
            self.ui.bar.phase(&format!("storm {round}"), ramped.live);
            let status = |t: &Snapshot, _: f64| (t.live, format!("{} up", t.live));
            let deadline = Instant::now() + Duration::from_secs(a.round_timeout + 10);
            self.pump(move |k| k.round_done(round), Some(deadline), &status)
                .await;
            let r = self.kids.merged_round(round);
            let all_back = r.back == r.dropped && self.kids.round_done(round);
            self.ui
                .rounds
                .push(round_mark(round, dropped_at, &r, all_back));
            rounds.push(json!({
                "backoff": if jitter { "jitter" } else { "none" },
                "dropped": r.dropped,
                "back": r.back,
                "all_back": all_back,
                "time_to_all_back_ms": all_back.then(|| round3(r.last_back_us as f64 / 1000.0)),
                "attempts": r.attempts,
                "refused": r.refused,
                "refusals": r.causes,
                "reconnect_ms": r.back_hist.summary_ms(),
            }));
        }
        let f = self.stop().await;
        tokio::time::sleep(AFTER_PAUSE).await;
        let after = self.sample().await;

        let mut s = Summary::default();
        self.head(&mut s);
        s.put("conns", a.conns);
        s.put("connected", ramped.connected);
        s.put("failed", ramped.failed);
        s.put("failures", json!(f.failures));
        s.put(
            "connect_rate",
            round1(ramped.connected as f64 / ramp_secs.max(1e-3)),
        );
        s.put("rounds", Value::Array(rounds));
        s.put("latency_ms", f.connect_hist.summary_ms());
        s.put("dropped", f.snapshot.dropped);
        s.put("drops", json!(f.drops));
        let server = cost::summarize(&self.source(), &before, &loaded, &after, ramped.live, None);
        self.tail(&mut s, Some(server));
        s.plot_hist = f.connect_hist;
        s.plot_label = "CONNACK latency (initial and reconnects)".into();
        Ok(s)
    }
}

/// A storm round for the plot: its drop time and every reconnect after it.
fn round_mark(round: u32, dropped_at: f64, r: &RoundReport, all_back: bool) -> RoundMark {
    let mut back = vec![(dropped_at, 0.0)];
    let mut n = 0u64;
    for (_, up_us, c) in r.back_hist.buckets() {
        n += c;
        back.push((dropped_at + up_us as f64 / 1e6, n as f64));
    }
    RoundMark {
        round,
        dropped_at,
        back,
        all_back_at: all_back.then(|| dropped_at + r.last_back_us as f64 / 1e6),
    }
}
