//! The parent role: check limits, start the children, drive a scenario's phases,
//! aggregate what the children report, sample the server, and print the summary.
//!
//! The parent holds no device sockets itself (only the HTTP client of `push` and the one
//! publisher of `fanout`), so all the connections live in children sized to the
//! open-files limit. It re-executes its own binary with the hidden `--child` flag and
//! talks to each child over stdin/stdout (see [`crate::proto`]). Children run in their
//! own process group so a Ctrl-C reaches only the parent, which then stops them cleanly
//! and still prints what was measured.

use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::cli::{Backoff, Command};
use crate::cost::{self, Sample};
use crate::limits::{self, Plan};
use crate::plot::{self, Point, RoundMark};
use crate::proto::{Control, DeviceCount, Event, FinalReport, RoundReport, Snapshot, WorkOrder};
use crate::report::{self, Progress};
use crate::stats::Histogram;
use crate::{fleet, publisher, pusher};

/// How long the parent waits for the children's final reports after `stop`.
const FINAL_WAIT: Duration = Duration::from_secs(30);
/// Pause before the `after` sample, so the server has seen every close.
const AFTER_PAUSE: Duration = Duration::from_secs(1);

pub fn run(cmd: Command) -> ExitCode {
    if let Err(msg) = cmd.validate() {
        eprintln!("loadgen: {msg}");
        return ExitCode::from(2);
    }
    let plan = match limits::plan(&cmd) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("loadgen: cannot run this: {msg}");
            return ExitCode::from(2);
        }
    };
    for w in &plan.warnings {
        eprintln!("loadgen: warning: {w}");
    }
    let threads = cmd
        .common()
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("loadgen")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json_only = cmd.common().json;
    let order = cmd.clone();
    let result = rt.block_on(async move {
        let mut run = Run::start(cmd, plan).await?;
        let summary = run.scenario().await;
        run.ui.bar.finish();
        let summary = summary?;
        run.plot(&summary)?;
        Ok::<Summary, String>(summary)
    });
    match result {
        Ok(summary) => {
            report::print(summary.fields(), json_only);
            for h in hints(&summary) {
                eprintln!("loadgen: hint: {h}");
            }
            match verdict(&order, &summary) {
                Some((code, why)) => {
                    eprintln!("loadgen: {why}");
                    ExitCode::from(code)
                }
                None => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}

/// The summary as ordered key/value pairs (the table keeps this order).
#[derive(Default)]
pub struct Summary {
    fields: Vec<(String, Value)>,
    /// The histogram to draw with `--plot`, and its label.
    plot_hist: Histogram,
    plot_label: String,
}

impl Summary {
    fn put(&mut self, k: &str, v: impl Into<Value>) {
        self.fields.push((k.to_string(), v.into()));
    }

    pub fn fields(&self) -> &[(String, Value)] {
        &self.fields
    }

    /// The unsigned integer under `key`, if the summary has one.
    fn u64(&self, key: &str) -> Option<u64> {
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
fn verdict(cmd: &Command, s: &Summary) -> Option<(u8, String)> {
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

#[derive(Default)]
struct KidState {
    last: Snapshot,
    ready: bool,
    fin: Option<FinalReport>,
    rounds: Vec<RoundReport>,
    exited: bool,
}

struct Kids {
    children: Vec<Child>,
    stdin: Vec<Option<ChildStdin>>,
    rx: mpsc::UnboundedReceiver<(usize, Option<Event>)>,
    st: Vec<KidState>,
    errors: Vec<String>,
}

impl Kids {
    async fn spawn(cmd: &Command, plan: &Plan) -> Result<Kids, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let units = cmd.units().max(1) as f64;
        let (rate, pending) = match cmd {
            Command::Connect(a) => (a.rate, a.mqtt.max_pending),
            Command::Push(a) => (a.connect_rate, a.mqtt.max_pending),
            Command::Fanout(a) => (a.connect_rate, a.mqtt.max_pending),
            Command::Churn(a) => (a.rate, a.concurrency as usize),
            Command::Storm(a) => (a.connect_rate, a.mqtt.max_pending),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdin = Vec::new();
        for (k, &(first, count)) in plan.slices.iter().enumerate() {
            let order = WorkOrder {
                command: cmd.clone(),
                first,
                count,
                rate: rate * count as f64 / units,
                max_pending: (pending / plan.procs).max(1),
            };
            let json = serde_json::to_string(&order).map_err(|e| e.to_string())?;
            let mut child = tokio::process::Command::new(&exe)
                .arg("--child")
                .arg(json)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting child {k}: {e}"))?;
            let out = child.stdout.take().expect("piped");
            stdin.push(child.stdin.take());
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            let _ = tx.send((k, Some(ev)));
                        }
                        Err(e) => {
                            let _ = tx.send((
                                k,
                                Some(Event::Error {
                                    message: format!("unreadable line {line:?}: {e}"),
                                }),
                            ));
                        }
                    }
                }
                let _ = tx.send((k, None));
            });
            children.push(child);
        }
        let st = (0..children.len()).map(|_| KidState::default()).collect();
        Ok(Kids {
            children,
            stdin,
            rx,
            st,
            errors: Vec::new(),
        })
    }

    fn apply(&mut self, k: usize, ev: Option<Event>) {
        let s = &mut self.st[k];
        match ev {
            None => s.exited = true,
            Some(Event::Progress(snap)) => s.last = snap,
            Some(Event::Ready(snap)) => {
                s.last = snap;
                s.ready = true;
            }
            Some(Event::Round(r)) => s.rounds.push(r),
            Some(Event::Final(f)) => {
                s.last = f.snapshot.clone();
                s.fin = Some(*f);
            }
            Some(Event::Error { message }) => self.errors.push(format!("child {k}: {message}")),
        }
    }

    fn total(&self) -> Snapshot {
        let mut t = Snapshot::default();
        for s in &self.st {
            t.add(&s.last);
        }
        t
    }

    fn all_ready(&self) -> bool {
        self.st.iter().all(|s| s.ready || s.exited)
    }

    fn all_final(&self) -> bool {
        self.st.iter().all(|s| s.fin.is_some() || s.exited)
    }

    fn all_exited(&self) -> bool {
        self.st.iter().all(|s| s.exited)
    }

    fn round_done(&self, round: u32) -> bool {
        self.st
            .iter()
            .all(|s| s.exited || s.rounds.iter().any(|r| r.round == round))
    }

    async fn send(&mut self, c: Control) {
        let mut line = serde_json::to_string(&c).expect("controls serialize");
        line.push('\n');
        for stdin in self.stdin.iter_mut().flatten() {
            let _ = stdin.write_all(line.as_bytes()).await;
            let _ = stdin.flush().await;
        }
    }

    fn merged_final(&self) -> FinalReport {
        let mut m = FinalReport::default();
        for f in self.st.iter().filter_map(|s| s.fin.as_ref()) {
            m.snapshot.add(&f.snapshot);
            for (k, v) in &f.failures {
                *m.failures.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &f.drops {
                *m.drops.entry(k.clone()).or_default() += v;
            }
            m.connect_hist.merge(&f.connect_hist);
            m.subscribe_hist.merge(&f.subscribe_hist);
            m.message_hist.merge(&f.message_hist);
            m.per_device.extend_from_slice(&f.per_device);
        }
        m.per_device.sort_by_key(|d| d.index);
        m
    }

    fn merged_round(&self, round: u32) -> RoundReport {
        let mut m = RoundReport {
            round,
            ..RoundReport::default()
        };
        for r in self
            .st
            .iter()
            .flat_map(|s| &s.rounds)
            .filter(|r| r.round == round)
        {
            m.dropped += r.dropped;
            m.back += r.back;
            m.attempts += r.attempts;
            m.refused += r.refused;
            m.last_back_us = m.last_back_us.max(r.last_back_us);
            m.back_hist.merge(&r.back_hist);
            for (k, v) in &r.causes {
                *m.causes.entry(k.clone()).or_default() += v;
            }
        }
        m
    }
}

/// Reads how many messages the pusher or publisher has sent so far.
type SentCounter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The progress bar and the timeline for `--plot`.
struct Ui {
    bar: Progress,
    start: Instant,
    timeline: Vec<Point>,
    /// Storm rounds, drawn over the timeline.
    rounds: Vec<RoundMark>,
    /// Messages sent, while a pusher or publisher runs.
    sent: Option<SentCounter>,
    /// `(when, connected)` at the previous tick, for the connect rate.
    prev: (Instant, u64),
    rate: f64,
}

impl Ui {
    /// Seconds since the start of the run.
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn tick(&mut self, t: &Snapshot) {
        let now = Instant::now();
        let dt = now.duration_since(self.prev.0).as_secs_f64();
        if dt >= 0.2 {
            let fresh = t.connected.saturating_sub(self.prev.1) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                fresh
            } else {
                0.5 * self.rate + 0.5 * fresh
            };
            self.prev = (now, t.connected);
        }
        let sent = self.sent.as_ref().map_or(0, |f| f());
        self.timeline.push(Point {
            t: self.now(),
            live: t.live as f64,
            failed: t.failed as f64,
            settled: t.settled as f64,
            sent: sent as f64,
            delivered: t.unique as f64,
        });
    }
}

type Status<'a> = &'a dyn Fn(&Snapshot, f64) -> (u64, String);

fn connect_status(t: &Snapshot, rate: f64) -> (u64, String) {
    (
        t.settled,
        format!(
            "{rate:.0} conn/s, {} up, {} failed, {} dropped",
            t.live, t.failed, t.dropped
        ),
    )
}

struct Run {
    cmd: Command,
    plan: Plan,
    kids: Kids,
    ui: Ui,
    probe: Option<cost::Probe>,
    interrupted: Arc<AtomicBool>,
    /// Set once the children were told to stop.
    stopping: bool,
}

impl Run {
    async fn start(cmd: Command, plan: Plan) -> Result<Run, String> {
        let common = cmd.common();
        let probe = cost::Probe::new(common.server_pid, common.metrics_url.clone());
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        tokio::spawn(async move {
            // The first Ctrl-C stops the run cleanly (summary included); a second one
            // exits at once, and the children stop when their stdin closes.
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let ui = Ui {
            bar: Progress::new(common.quiet),
            start: Instant::now(),
            timeline: Vec::new(),
            rounds: Vec::new(),
            sent: None,
            prev: (Instant::now(), 0),
            rate: 0.0,
        };
        // The children start in `scenario`, after the `before` sample.
        let kids = Kids {
            children: Vec::new(),
            stdin: Vec::new(),
            rx: mpsc::unbounded_channel().1,
            st: Vec::new(),
            errors: Vec::new(),
        };
        Ok(Run {
            cmd,
            plan,
            kids,
            ui,
            probe,
            interrupted,
            stopping: false,
        })
    }

    async fn sample(&self) -> Sample {
        match &self.probe {
            Some(p) => p.sample().await,
            None => Sample::default(),
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Processes child events and redraws until `until` holds, `deadline` passes, the
    /// user interrupts (except while stopping: the final reports are still wanted), or
    /// every child has exited.
    async fn pump(
        &mut self,
        until: impl Fn(&Kids) -> bool,
        deadline: Option<Instant>,
        status: Status<'_>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            if until(&self.kids)
                || deadline.is_some_and(|d| Instant::now() >= d)
                || (self.interrupted() && !self.stopping)
                || self.kids.all_exited()
            {
                return;
            }
            tokio::select! {
                ev = self.kids.rx.recv() => match ev {
                    Some((k, ev)) => self.kids.apply(k, ev),
                    None => return,
                },
                _ = tick.tick() => {
                    let t = self.kids.total();
                    self.ui.tick(&t);
                    let (pos, msg) = status(&t, self.ui.rate);
                    self.ui.bar.update(pos, msg);
                    for e in self.kids.errors.drain(..) {
                        self.ui.bar.println(&format!("loadgen: {e}"));
                    }
                }
            }
        }
    }

    /// Runs `fut` (the pusher or the publisher) while keeping the children's events and
    /// the progress bar flowing; a Ctrl-C abandons it.
    async fn pump_while<T>(
        &mut self,
        fut: impl std::future::Future<Output = Result<T, String>>,
        status: Status<'_>,
    ) -> Result<T, String> {
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                r = &mut fut => return r,
                ev = self.kids.rx.recv() => {
                    if let Some((k, ev)) = ev {
                        self.kids.apply(k, ev);
                    }
                }
                _ = tick.tick() => {
                    if self.interrupted() {
                        return Err("interrupted".into());
                    }
                    let t = self.kids.total();
                    self.ui.tick(&t);
                    let (pos, msg) = status(&t, self.ui.rate);
                    self.ui.bar.update(pos, msg);
                }
            }
        }
    }

    /// Starts the children and waits until every initial attempt has settled.
    async fn ramp(&mut self, what: &str) -> Result<f64, String> {
        self.kids = Kids::spawn(&self.cmd, &self.plan).await?;
        self.ui.start = Instant::now();
        self.ui.prev = (Instant::now(), 0);
        self.ui.bar.phase(what, self.cmd.units());
        let t0 = Instant::now();
        self.pump(|k| k.all_ready(), None, &connect_status).await;
        let measured = self.kids.total().ramp_us;
        let secs = if measured > 0 {
            measured as f64 / 1e6
        } else {
            t0.elapsed().as_secs_f64()
        };
        if !self.kids.all_ready() && !self.interrupted() {
            return Err(format!(
                "children exited during the ramp: {}",
                self.kids.errors.join("; ")
            ));
        }
        Ok(secs)
    }

    /// Tells the children to stop and collects their final reports.
    async fn stop(&mut self) -> FinalReport {
        self.stopping = true;
        self.kids.send(Control::Stop).await;
        self.ui.bar.phase("stopping", 0);
        let deadline = Some(Instant::now() + FINAL_WAIT);
        self.pump(|k| k.all_final(), deadline, &connect_status)
            .await;
        for c in &mut self.kids.children {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
        for e in self.kids.errors.drain(..) {
            eprintln!("loadgen: {e}");
        }
        self.kids.merged_final()
    }

    /// Holds for `secs` while keeping the bar alive.
    async fn hold(&mut self, what: &str, secs: u64) {
        self.ui.bar.phase(what, secs);
        let start = Instant::now();
        let status = move |t: &Snapshot, _: f64| {
            (
                start.elapsed().as_secs(),
                format!(
                    "{} up, {} dropped, {} pings, {} pongs",
                    t.live, t.dropped, t.pings, t.pongs
                ),
            )
        };
        self.pump(|_| false, Some(start + Duration::from_secs(secs)), &status)
            .await;
    }

    fn head(&self, s: &mut Summary) {
        let common = self.cmd.common();
        s.put("command", self.cmd.name());
        s.put("target", common.target.to_string());
        s.put("protocol", self.cmd.mqtt().protocol);
        s.put("procs", self.plan.procs as u64);
        s.put("source_addresses", self.plan.sources.len());
        s.put("fd_limit_per_proc", self.plan.fd_limit);
    }

    fn tail(&self, s: &mut Summary, server: Option<Value>) {
        if self.probe.is_some() {
            s.put("server", server.unwrap_or(Value::Null));
        }
        s.put(
            "elapsed_secs",
            round3(self.ui.start.elapsed().as_secs_f64()),
        );
        if self.interrupted() {
            s.put("interrupted", true);
        }
    }

    async fn scenario(&mut self) -> Result<Summary, String> {
        match self.cmd.clone() {
            Command::Connect(a) => self.connect(a.conns, a.hold).await,
            Command::Push(_) => self.push().await,
            Command::Fanout(_) => self.fanout().await,
            Command::Churn(_) => self.churn().await,
            Command::Storm(_) => self.storm().await,
        }
    }

    fn source(&self) -> String {
        self.probe.as_ref().map(|p| p.source()).unwrap_or_default()
    }

    async fn connect(&mut self, conns: u64, hold: u64) -> Result<Summary, String> {
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

    async fn push(&mut self) -> Result<Summary, String> {
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
        let result = if self.interrupted() {
            Err("interrupted".to_string())
        } else {
            let fut = pusher::run(&a, counters.clone());
            self.pump_while(fut, &status).await
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.stop().await;
                return Err(format!("push: {e}"));
            }
        };
        // Drain: wait for deliveries still on their way.
        self.ui.bar.phase("drain", result.accepted);
        let accepted = result.accepted;
        let drain_status = |t: &Snapshot, _: f64| (t.unique, format!("{} dup", t.duplicates));
        self.pump(
            move |k| k.total().unique >= accepted,
            Some(Instant::now() + Duration::from_secs(a.drain)),
            &drain_status,
        )
        .await;
        let end_sample = self.sample().await;
        let at_end = self.kids.total();
        let f = self.stop().await;
        tokio::time::sleep(AFTER_PAUSE).await;
        let after = self.sample().await;

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
        s.put("dropped", f.snapshot.dropped);
        s.put("drops", json!(f.drops));
        let server = cost::summarize(
            &self.source(),
            &before,
            &end_sample,
            &after,
            at_end.live,
            Some((delivered, &start_sample, &end_sample)),
        );
        self.tail(&mut s, Some(server));
        s.plot_hist = f.message_hist;
        s.plot_label = "push latency (HTTP send to device receipt)".into();
        Ok(s)
    }

    async fn fanout(&mut self) -> Result<Summary, String> {
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
        let result = if self.interrupted() {
            Err("interrupted".to_string())
        } else {
            let fut = publisher::run(&a, counters.clone());
            self.pump_while(fut, &status).await
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.stop().await;
                return Err(format!("fanout: {e}"));
            }
        };
        let expected = result.published * subscribed;
        self.ui.bar.phase("drain", expected);
        let drain_status = |t: &Snapshot, _: f64| (t.unique, format!("{} dup", t.duplicates));
        self.pump(
            move |k| k.total().unique >= expected,
            Some(Instant::now() + Duration::from_secs(a.drain)),
            &drain_status,
        )
        .await;
        let end_sample = self.sample().await;
        let at_end = self.kids.total();
        let f = self.stop().await;
        tokio::time::sleep(AFTER_PAUSE).await;
        let after = self.sample().await;

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
            loss_per_subscriber(result.published, &f.per_device, &a.mqtt.client_id),
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
        s.put("dropped", f.snapshot.dropped);
        s.put("drops", json!(f.drops));
        let server = cost::summarize(
            &self.source(),
            &before,
            &end_sample,
            &after,
            at_end.live,
            Some((delivered, &start_sample, &end_sample)),
        );
        self.tail(&mut s, Some(server));
        s.plot_hist = f.message_hist;
        s.plot_label = "fan-out latency (publish to receipt)".into();
        Ok(s)
    }

    async fn churn(&mut self) -> Result<Summary, String> {
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

    async fn storm(&mut self) -> Result<Summary, String> {
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

    fn plot(&self, s: &Summary) -> Result<(), String> {
        let Some(path) = &self.cmd.common().plot else {
            return Ok(());
        };
        let top = plot::panel(self.cmd.name(), &self.ui.timeline, &self.ui.rounds);
        plot::draw(path, &top, &s.plot_hist, &s.plot_label)
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

/// Loss per subscriber (`published` − what it received, duplicates apart): the spread,
/// how many lost anything, and the ten that lost most by client id.
fn loss_per_subscriber(published: u64, per_device: &[DeviceCount], client_id: &str) -> Value {
    let mut lost: Vec<(u64, u64)> = per_device
        .iter()
        .map(|d| (published.saturating_sub(d.unique), d.index))
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

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// What to change when failures point at a limit rather than at the server.
fn hints(s: &Summary) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cmd(args: &[&str]) -> Command {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(args);
        crate::cli::Cli::try_parse_from(argv)
            .unwrap()
            .command
            .unwrap()
    }

    fn summary(fields: &[(&str, u64)]) -> Summary {
        let mut s = Summary::default();
        for (k, v) in fields {
            s.put(k, *v);
        }
        s
    }

    #[test]
    fn a_run_that_measured_nothing_fails() {
        let connect = cmd(&["connect"]);
        let nothing = summary(&[("connected", 0), ("failed", 50)]);
        let (code, why) = verdict(&connect, &nothing).unwrap();
        assert_eq!(code, EXIT_MEASURED_NOTHING);
        assert!(why.contains("connected is 0"), "{why}");
        assert_eq!(verdict(&connect, &summary(&[("connected", 1)])), None);

        let fanout = cmd(&["fanout"]);
        let no_delivery = summary(&[("subscribed", 5), ("published", 10), ("delivered", 0)]);
        assert_eq!(
            verdict(&fanout, &no_delivery).unwrap().0,
            EXIT_MEASURED_NOTHING
        );
        let churn = cmd(&["churn"]);
        assert_eq!(
            verdict(&churn, &summary(&[("completed", 0)])).unwrap().0,
            EXIT_MEASURED_NOTHING
        );
    }

    #[test]
    fn loss_fails_only_when_no_loss_was_expected() {
        let lossy = summary(&[
            ("subscribed", 2),
            ("published", 10),
            ("expected", 20),
            ("delivered", 19),
            ("lost", 1),
        ]);
        assert_eq!(verdict(&cmd(&["fanout"]), &lossy), None);
        let (code, why) = verdict(&cmd(&["fanout", "--expect-no-loss"]), &lossy).unwrap();
        assert_eq!(code, EXIT_LOST);
        assert!(why.contains("1 of 20"), "{why}");
    }

    #[test]
    fn loss_is_reported_per_subscriber() {
        let d = |index, unique, duplicates| DeviceCount {
            index,
            unique,
            duplicates,
        };
        let v = loss_per_subscriber(10, &[d(0, 10, 0), d(1, 7, 2), d(2, 9, 0)], "s-{i}");
        assert_eq!(v["subscribers"], 3);
        assert_eq!((v["min"].as_u64(), v["max"].as_u64()), (Some(0), Some(3)));
        assert_eq!(v["mean"], 1.333);
        assert_eq!(v["with_loss"], 2);
        assert_eq!(v["with_duplicates"], 1);
        assert_eq!(v["worst"], json!({"s-1": 3, "s-2": 1}));
        assert!(loss_per_subscriber(10, &[], "s-{i}")["max"].is_null());
    }

    #[test]
    fn fanout_options_for_a_plain_mqtt_burst() {
        let Command::Fanout(a) = cmd(&[
            "fanout",
            "--qos",
            "1",
            "--sub-qos",
            "2",
            "--protocol",
            "5",
            "--sub-version",
            "4",
            "--window",
            "100",
            "--burst",
            "20000",
        ]) else {
            panic!()
        };
        assert_eq!((a.sub_qos(), a.sub_version(), a.window), (2, 4, 100));
        assert_eq!(a.planned(), 20000);
        let Command::Fanout(b) = cmd(&["fanout", "--rate", "50", "--duration", "3"]) else {
            panic!()
        };
        assert_eq!((b.sub_qos(), b.sub_version(), b.planned()), (0, 4, 150));
        let err = cmd(&["fanout", "--rate", "0"]).validate().unwrap_err();
        assert!(err.contains("--burst"), "{err}");
        assert!(cmd(&["fanout", "--rate", "0", "--burst", "5"])
            .validate()
            .is_ok());
    }
}
