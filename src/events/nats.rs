//! The NATS sink: each event published as JSON on
//! `<prefix>.events.<kind>.<client id, token-escaped>`, and with `jetstream = true` into a
//! JetStream stream (created if missing, capturing `<prefix>.events.>`).
//!
//! Core NATS is at-most-once: an event counts as sent once the client flushed it to the
//! server. With JetStream an event counts as sent only once the stream acknowledged it
//! (at-least-once); events without an acknowledgement are published again with backoff,
//! under the same `Nats-Msg-Id` (`<node>:<client id>:<seq>`), so the stream's duplicate
//! window drops a repeat whose first acknowledgement was lost. The client (async-nats)
//! reconnects by itself; while it is away, batches wait and the queue fills.

use std::sync::Arc;

use async_nats::jetstream::{self, context::Context};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;

use super::model::Event;
use super::sink::{Batcher, Failure, OutageLog};

/// Events whose acknowledgements are awaited before the next are published: async-nats
/// lets at most 5,000 publishes of a context wait for their acks, and a publish past
/// that waits for one of them, so a whole `batch_max` (up to 10,000) published before
/// any ack was awaited would wait for good.
const ACK_CHUNK: usize = 1024;

/// The sink's connection and naming.
pub struct NatsSink {
    pub urls: Vec<String>,
    pub prefix: String,
    /// `Some(stream name)` with `jetstream = true`.
    pub stream: Option<String>,
    pub node: Arc<str>,
    /// TLS to NATS (`[events] nats_ca_file`, `nats_cert_file`, `nats_key_file`).
    pub tls: Arc<rustls::ClientConfig>,
}

/// Escapes a client id into one subject token: bytes other than ASCII letters, digits,
/// `-` and `_` become `%XX` (so `.`, `*`, `>` and spaces cannot split or widen a subject,
/// and the escape is reversible).
pub fn escape_token(s: &str) -> String {
    let mut out = escape(s, '%');
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// `s` with every byte other than an ASCII letter, digit, `-` or `_` written as `marker`
/// and two hex digits (the marker itself included, so the escape is reversible).
pub fn escape(s: &str, marker: char) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("{marker}{b:02X}"));
        }
    }
    out
}

/// The string [`escape`] made with `marker`; `None` if `s` is not one.
pub fn unescape(s: &str, marker: u8) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == marker {
            out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl NatsSink {
    fn subject(&self, e: &Event) -> String {
        format!(
            "{}.events.{}.{}",
            self.prefix,
            e.kind.name(),
            escape_token(&e.client_id)
        )
    }

    /// Connects (retrying in the background), makes sure the stream exists, then delivers
    /// batches until stopped and the queue is empty.
    pub async fn run(self, batcher: Batcher) {
        let client = match async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .name("gateway-events")
            .tls_client_config((*self.tls).clone())
            .connect(self.urls.clone())
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(sink = "nats", error = %e, "cannot start the NATS client; events to NATS are dropped");
                return;
            }
        };
        let js = match &self.stream {
            Some(name) => match self.ensure_stream(&client, name, &batcher).await {
                Some(js) => Some(js),
                None => return,
            },
            None => None,
        };
        let (mut batch, mut log) = (Vec::new(), OutageLog::default());
        while batcher.next(&mut batch).await {
            self.deliver(&client, js.as_ref(), &batcher, &mut batch, &mut log)
                .await;
        }
    }

    /// Creates the stream if missing, retrying with backoff; `None` if stopped first.
    async fn ensure_stream(&self, client: &Client, name: &str, b: &Batcher) -> Option<Context> {
        let js = jetstream::new(client.clone());
        let config = jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{}.events.>", self.prefix)],
            ..Default::default()
        };
        let mut backoff = b.first_backoff();
        let mut log = OutageLog::default();
        loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(_) => {
                    log.succeeded("nats");
                    return Some(js);
                }
                Err(e) => log.failed("nats", &format!("stream {name}: {e}")),
            }
            if b.stopping() {
                b.dropped("shutdown", b.queue.ring.len());
                return None;
            }
            b.back_off(&mut backoff).await;
        }
    }

    /// Delivers `batch`, retrying what failed with backoff until all is delivered or the
    /// sink stops. `batch` is left holding what could not be delivered.
    async fn deliver(
        &self,
        client: &Client,
        js: Option<&Context>,
        b: &Batcher,
        batch: &mut Vec<Arc<Event>>,
        log: &mut OutageLog,
    ) {
        let mut backoff = b.first_backoff();
        loop {
            let result = match js {
                Some(js) => self.publish_acked(js, b, batch).await,
                None => self.publish_core(client, batch).await.map(|()| {
                    b.queue.metrics.delivered(batch);
                }),
            };
            match result {
                Ok(()) => {
                    log.succeeded("nats");
                    return;
                }
                Err(Failure::Retry(error) | Failure::Reject(error)) => {
                    if !b
                        .after_failure(&error, batch.len(), &mut backoff, log)
                        .await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Core NATS: publish all, then flush; on failure the whole batch is sent again.
    async fn publish_core(&self, client: &Client, batch: &[Arc<Event>]) -> Result<(), Failure> {
        for e in batch {
            let payload = Bytes::from(e.to_json(&self.node));
            client
                .publish(self.subject(e), payload)
                .await
                .map_err(|err| Failure::Retry(err.to_string()))?;
        }
        client
            .flush()
            .await
            .map_err(|err| Failure::Retry(err.to_string()))
    }

    /// JetStream: publish, then await the acknowledgements, [`ACK_CHUNK`] events at a
    /// time; `batch` keeps only the events that were not acknowledged.
    async fn publish_acked(
        &self,
        js: &Context,
        b: &Batcher,
        batch: &mut Vec<Arc<Event>>,
    ) -> Result<(), Failure> {
        let mut error = None;
        let mut unacked = Vec::new();
        let mut acked = Vec::new();
        let events = std::mem::take(batch);
        for chunk in events.chunks(ACK_CHUNK) {
            let mut pending = Vec::with_capacity(chunk.len());
            for e in chunk {
                let mut headers = HeaderMap::new();
                let id = format!("{}:{}:{}", self.node, e.client_id, e.seq);
                headers.insert("Nats-Msg-Id", id.as_str());
                let payload = Bytes::from(e.to_json(&self.node));
                pending.push(
                    js.publish_with_headers(self.subject(e), headers, payload)
                        .await,
                );
            }
            // Awaited together: each ack's timeout starts when it is awaited, so after a
            // disconnect one at a time would take the chunk's length times the timeout.
            let acks = pending.into_iter().map(|publish| async move {
                match publish {
                    Ok(fut) => fut.await.map(|_| ()),
                    Err(err) => Err(err),
                }
            });
            let acks = futures_util::future::join_all(acks).await;
            for (e, ack) in chunk.iter().zip(acks) {
                match ack {
                    Ok(()) => acked.push(e.clone()),
                    Err(err) => {
                        error.get_or_insert_with(|| err.to_string());
                        unacked.push(e.clone());
                    }
                }
            }
        }
        b.queue.metrics.delivered(&acked);
        *batch = unacked;
        match error {
            None => Ok(()),
            Some(e) => Err(Failure::Retry(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape_token;

    #[test]
    fn client_ids_become_one_safe_token() {
        assert_eq!(escape_token("dev-1_a"), "dev-1_a");
        assert_eq!(escape_token("a.b *>"), "a%2Eb%20%2A%3E");
        assert_eq!(escape_token("%"), "%25");
        assert_eq!(escape_token(""), "%00");
    }
}
