//! `push`: the backend's side, sending pushes through the gateway's HTTP API at a rate.
//!
//! Messages go round-robin over the devices, one per `/v1/push` request or `--batch` per
//! `/v1/push/batch` request, with at most `--concurrency` requests in flight (if the
//! server is slower than the rate, the achieved rate says so), in turn to each `--http`
//! URL when several are given (the nodes of a fleet). Every payload starts with
//! `"<seq>:<send ns>"`; the devices parse it, so latency is measured send-to-receipt
//! across processes on one clock. A 503 is retried after its `Retry-After`, up to
//! `--max-retries` times, and counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::cli::{expand, PushArgs};
use crate::codec::stamp;
use crate::fleet::now_ns;
use crate::stats::Histogram;

/// Live counters, read by the progress bar.
#[derive(Default)]
pub struct PushCounters {
    /// Messages handed to the API (each once, retries not counted).
    pub sent: AtomicU64,
    /// Messages the API answered `sent`, `acked` or `queued`.
    pub accepted: AtomicU64,
}

#[derive(Default, Debug)]
pub struct PushResult {
    pub sent: u64,
    pub accepted: u64,
    /// Answers per status (`sent`, `queued`, `offline`, ...).
    pub statuses: BTreeMap<String, u64>,
    /// Messages that got no status: HTTP errors by code, per-item error codes, network.
    pub errors: BTreeMap<String, u64>,
    pub retries_503: u64,
    /// Request round trips, microseconds.
    pub http_hist: Histogram,
    pub elapsed: Duration,
}

/// Pushes for `args.duration` seconds to devices `0..args.conns`.
pub async fn run(args: &PushArgs, counters: Arc<PushCounters>) -> Result<PushResult, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let path = match args.batch > 1 {
        true => "/v1/push/batch",
        false => "/v1/push",
    };
    let urls: Vec<String> = args
        .http
        .split(',')
        .map(|base| format!("{}{path}", base.trim().trim_end_matches('/')))
        .collect();
    let ctx = Arc::new(Ctx {
        client,
        urls,
        token: args.token.clone(),
        batch: args.batch > 1,
        max_retries: args.max_retries,
        result: Mutex::new(PushResult::default()),
        counters,
    });
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let devices = args.conns.max(1);
    let planned = (args.rate * args.duration as f64).round() as u64;
    let batch = args.batch.max(1);
    let start = Instant::now();
    let mut seq = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut iv = tokio::time::interval(Duration::from_millis(2));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while seq < planned {
        iv.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due = ((elapsed * args.rate) as u64 + 1).min(planned);
        let last_call = due == planned;
        while seq < due && (due - seq >= batch || last_call) {
            let n = batch.min(due - seq);
            let permit = sem.clone().acquire_owned().await.expect("never closed");
            let messages: Vec<Value> = (seq..seq + n)
                .map(|s| {
                    let i = s % devices;
                    let id = expand(&args.mqtt.client_id, i, "");
                    json!({
                        "client_id": id,
                        "topic": expand(&args.topic, i, &id),
                        "payload": stamp(s, now_ns(), args.size),
                        "qos": args.qos,
                    })
                })
                .collect();
            let url = ctx.urls[(seq / batch) as usize % ctx.urls.len()].clone();
            seq += n;
            ctx.counters.sent.fetch_add(n, Ordering::Relaxed);
            let ctx = ctx.clone();
            tasks.spawn(async move {
                ctx.request(&url, messages).await;
                drop(permit);
            });
        }
        // Reap finished requests so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut result = std::mem::take(&mut *ctx.result.lock().unwrap());
    result.sent = seq;
    result.accepted = ctx.counters.accepted.load(Ordering::Relaxed);
    result.elapsed = start.elapsed();
    Ok(result)
}

struct Ctx {
    client: reqwest::Client,
    /// The push endpoint on each `--http` base URL, taken in turn per request.
    urls: Vec<String>,
    token: Option<String>,
    batch: bool,
    max_retries: u32,
    result: Mutex<PushResult>,
    counters: Arc<PushCounters>,
}

impl Ctx {
    async fn request(&self, url: &str, messages: Vec<Value>) {
        let n = messages.len() as u64;
        let body = if self.batch {
            json!({ "messages": messages })
        } else {
            messages.into_iter().next().unwrap_or(Value::Null)
        };
        let mut attempt = 0;
        loop {
            let t0 = Instant::now();
            let mut req = self.client.post(url).json(&body);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await;
            let us = t0.elapsed().as_micros() as u64;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    let what = if e.is_timeout() {
                        "http_timeout"
                    } else if e.is_connect() {
                        "http_connect"
                    } else {
                        "http_error"
                    };
                    self.error(what, n);
                    return;
                }
            };
            let code = resp.status().as_u16();
            if code == 503 {
                let wait = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(30);
                self.result.lock().unwrap().retries_503 += 1;
                if attempt >= self.max_retries {
                    self.error("http_503", n);
                    return;
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            let text = resp.text().await.unwrap_or_default();
            self.result.lock().unwrap().http_hist.record(us);
            if !(200..300).contains(&code) {
                self.error(&format!("http_{code}"), n);
                return;
            }
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                self.error("bad_json_answer", n);
                return;
            };
            if self.batch {
                match v.get("results").and_then(Value::as_array) {
                    Some(items) => {
                        for item in items {
                            self.item(item);
                        }
                        let missing = n.saturating_sub(items.len() as u64);
                        if missing > 0 {
                            self.error("missing_result", missing);
                        }
                    }
                    None => self.error("bad_json_answer", n),
                }
            } else {
                self.item(&v);
            }
            return;
        }
    }

    fn item(&self, v: &Value) {
        if let Some(status) = v.get("status").and_then(Value::as_str) {
            if matches!(status, "sent" | "acked" | "queued") {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            *self
                .result
                .lock()
                .unwrap()
                .statuses
                .entry(status.to_string())
                .or_default() += 1;
        } else {
            let code = v
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            self.error(&format!("item_{code}"), 1);
        }
    }

    fn error(&self, what: &str, n: u64) {
        *self
            .result
            .lock()
            .unwrap()
            .errors
            .entry(what.to_string())
            .or_default() += n;
    }
}
