//! The webhook sink: batches of events POSTed as a JSON array to `webhook_url`.
//!
//! Each body is signed: `X-Gateway-Signature: sha256=<hex HMAC-SHA256 of the body>` with
//! `webhook_secret`, so the backend can check the sender (compare in constant time). A
//! 2xx answer delivers the batch; a timeout, a failed connection, 408, 429 or a 5xx is
//! retried with backoff (the backend is down or busy); any other 4xx means the backend
//! will never take this body, and the batch is dropped (`rejected`) and logged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::{Request, StatusCode};
use sha2::Sha256;

use super::model::{batch_json, Event};
use super::sink::{Batcher, Failure, OutageLog};
use crate::https_client::HttpsClient;

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "x-gateway-signature";

/// `sha256=<hex>` of `body` keyed with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length; new_from_slice cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Where and how to POST.
pub struct Webhook {
    pub client: HttpsClient,
    pub url: String,
    /// Empty = no signature header.
    pub secret: Vec<u8>,
    pub timeout: Duration,
    pub node: Arc<str>,
}

impl Webhook {
    async fn post(&self, body: Bytes) -> Result<(), Failure> {
        let mut req = Request::post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("gateway/", env!("CARGO_PKG_VERSION")));
        if !self.secret.is_empty() {
            req = req.header(SIGNATURE_HEADER, signature(&self.secret, &body));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| Failure::Reject(e.to_string()))?;
        match self.client.send(req, self.timeout).await {
            Ok((status, _)) if status.is_success() => Ok(()),
            Ok((status, _)) if retryable(status) => Err(Failure::Retry(format!("HTTP {status}"))),
            Ok((status, body)) => Err(Failure::Reject(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))),
            Err(e) => Err(Failure::Retry(e.to_string())),
        }
    }

    /// Delivers batches until stopped and the queue is empty.
    pub async fn run(self, batcher: Batcher) {
        let (mut batch, mut log) = (Vec::new(), OutageLog::default());
        while batcher.next(&mut batch).await {
            self.deliver(&batcher, &batch, &mut log).await;
        }
    }

    /// Posts one batch, retrying with backoff until it is delivered, rejected, or the
    /// sink stops.
    async fn deliver(&self, batcher: &Batcher, batch: &[Arc<Event>], log: &mut OutageLog) {
        let body = Bytes::from(batch_json(batch, &self.node));
        let mut backoff = batcher.first_backoff();
        loop {
            match self.post(body.clone()).await {
                Ok(()) => {
                    log.succeeded("webhook");
                    batcher.queue.metrics.delivered(batch);
                    return;
                }
                Err(Failure::Reject(error)) => {
                    tracing::warn!(
                        sink = "webhook",
                        events = batch.len(),
                        error,
                        "the webhook rejected a batch of events; dropped"
                    );
                    batcher.dropped("rejected", batch.len());
                    return;
                }
                Err(Failure::Retry(error)) => {
                    let n = batch.len();
                    if !batcher.after_failure(&error, n, &mut backoff, log).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Whether a status means "try again later".
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
