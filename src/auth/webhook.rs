//! The `http` provider: asks the backend over an HTTP webhook.
//!
//! `POST {url}` with `{"client_id", "username", "password", "peer"}` (`password` is the
//! UTF-8 text, or `password_base64` when the bytes are not UTF-8; absent fields are null).
//! The backend answers 200 with `{"result": "allow" | "deny" | "ignore"}` and, optionally,
//! `"acl": {"publish": [...], "subscribe": [...]}` (topic filters, `%c`/`%u` allowed) that
//! becomes the connection's ACL, and optionally `"username"`: the name `%u` stands for in
//! ACL rules. Without it, an "allow" confirms the username that was sent (the backend saw
//! it and let it in). Anything else — a timeout (`timeout_ms`, covering connect,
//! request and body), a refused connection, another status, unreadable JSON — is
//! "unavailable": the client gets CONNACK "server unavailable" and may retry later.
//!
//! Answers (allow, deny and ignore; never "unavailable") are cached for `cache_ttl_secs`,
//! up to `cache_entries`, keyed by client id, username and password (not by the peer's
//! address, which changes with every connection). A full cache drops its oldest entry.
//! So a reconnect storm of known devices does not become a storm on the backend.
//!
//! The client is the gateway's [`HttpsClient`] (hyper 1 with rustls, shared with the events
//! webhook): `http://` or `https://`, the server certificate checked against `ca_file` or
//! the system's roots. A certificate that does not check out is "unavailable" like any
//! other failed exchange (fails closed), and the reason logged with the client id names
//! it (e.g. `invalid peer certificate: UnknownIssuer`). It runs on the business runtime
//! only.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Uri;
use serde::Deserialize;

use super::{Answer, Request, Verdict};
use crate::acl::ConnAcl;
use crate::https_client::{HttpsClient, RequestError};

/// `[auth.http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// "" = not configured.
    pub url: String,
    pub timeout_ms: u32,
    /// 0 = no cache.
    pub cache_entries: u32,
    pub cache_ttl_secs: u32,
    /// PEM CA bundle trusted for an `https://` url; `None` = the system's roots.
    #[serde(deserialize_with = "crate::config::empty_path_as_none")]
    pub ca_file: Option<PathBuf>,
}

impl WebhookConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let uri: Uri = self.url.parse().map_err(|e| {
            (
                "auth.http.url".to_string(),
                format!("{:?} is not a URL: {e}", self.url),
            )
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err((
                "auth.http.url".into(),
                format!(
                    "{:?} must be an http:// or https:// URL with a host",
                    self.url
                ),
            ));
        }
        if let Some(ca) = &self.ca_file {
            crate::https_client::check_ca_file(ca)
                .map_err(|e| ("auth.http.ca_file".to_string(), e.to_string()))?;
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err((
                "auth.http.timeout_ms".into(),
                format!("must be within 1..=60000, got {}", self.timeout_ms),
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Result_ {
    Allow,
    Deny,
    Ignore,
}

#[derive(Deserialize)]
struct Reply {
    result: Result_,
    #[serde(default)]
    acl: Option<AclLists>,
    /// The authenticated name, when the backend maps credentials to one.
    #[serde(default)]
    username: Option<String>,
}

#[derive(Deserialize)]
struct AclLists {
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    subscribe: Option<Vec<String>>,
}

/// A cacheable answer.
#[derive(Clone)]
enum Cached {
    Allow(Option<ConnAcl>),
    Deny(String),
    Ignore,
}

impl Cached {
    fn answer(self) -> Answer {
        match self {
            Cached::Allow(acl) => Answer::Decided(Verdict::Allow(acl.map(Box::new))),
            Cached::Deny(why) => Answer::Decided(Verdict::Deny(why)),
            Cached::Ignore => Answer::Ignore,
        }
    }
}

type Key = (String, Option<String>, Option<Bytes>);

/// Answers by credentials, oldest first in `order`.
struct Cache {
    map: HashMap<Key, (Cached, Instant)>,
    order: VecDeque<Key>,
}

pub struct Webhook {
    url: Uri,
    timeout: Duration,
    client: HttpsClient,
    cache: Mutex<Cache>,
    cache_entries: usize,
    ttl: Duration,
}

impl Webhook {
    pub fn from_config(c: &WebhookConfig) -> Result<Webhook, String> {
        c.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        let client = HttpsClient::new(c.ca_file.as_deref())
            .map_err(|e| format!("auth.http.ca_file: {e}"))?;
        Ok(Webhook {
            url: c.url.parse().map_err(|e| format!("auth.http.url: {e}"))?,
            timeout: Duration::from_millis(c.timeout_ms.into()),
            client,
            cache: Mutex::new(Cache {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            cache_entries: c.cache_entries as usize,
            ttl: Duration::from_secs(c.cache_ttl_secs.into()),
        })
    }

    pub async fn check(&self, req: &Request) -> Answer {
        let key: Key = (
            req.client_id.clone(),
            req.username.clone(),
            req.password.clone(),
        );
        if let Some(hit) = self.cached(&key) {
            return hit.answer();
        }
        let answer = match self.ask(req).await {
            Ok(a) => a,
            Err(why) => return Answer::Decided(Verdict::Unavailable(why)),
        };
        self.remember(key, answer.clone());
        answer.answer()
    }

    fn cached(&self, key: &Key) -> Option<Cached> {
        if self.cache_entries == 0 {
            return None;
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .map
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(c, _)| c.clone())
    }

    fn remember(&self, key: Key, answer: Cached) {
        if self.cache_entries == 0 {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if cache.map.insert(key.clone(), (answer, now)).is_some() {
            // Refreshed: its old place in the order is stale; drop that one.
            if let Some(i) = cache.order.iter().position(|k| *k == key) {
                cache.order.remove(i);
            }
        }
        cache.order.push_back(key);
        while cache.map.len() > self.cache_entries {
            match cache.order.pop_front() {
                Some(old) => {
                    cache.map.remove(&old);
                }
                None => break,
            }
        }
    }

    async fn ask(&self, req: &Request) -> Result<Cached, String> {
        let mut body = serde_json::json!({
            "client_id": req.client_id,
            "username": req.username,
            "peer": req.peer.to_string(),
            "password": null,
        });
        if let Some(pw) = &req.password {
            match std::str::from_utf8(pw) {
                Ok(text) => body["password"] = text.into(),
                Err(_) => {
                    use base64::Engine;
                    body["password_base64"] =
                        base64::engine::general_purpose::STANDARD.encode(pw).into();
                }
            }
        }
        let request = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("cannot build the webhook request: {e}"))?;
        let (status, bytes) = match self.client.send(request, self.timeout).await {
            Ok(answer) => answer,
            Err(RequestError::Timeout) => {
                return Err(format!(
                    "auth webhook did not answer within {} ms",
                    self.timeout.as_millis()
                ))
            }
            Err(RequestError::Failed(e)) => return Err(format!("auth webhook unreachable: {e}")),
        };
        if status != hyper::StatusCode::OK {
            return Err(format!("auth webhook answered HTTP {status}"));
        }
        let reply: Reply = serde_json::from_slice(&bytes)
            .map_err(|e| format!("unreadable webhook answer: {e}"))?;
        Ok(match reply.result {
            Result_::Deny => Cached::Deny("denied by the auth webhook".into()),
            Result_::Ignore => Cached::Ignore,
            Result_::Allow => {
                let acl = match reply.acl {
                    None => ConnAcl::default(),
                    Some(l) => ConnAcl::from_lists(l.publish, l.subscribe)
                        .map_err(|e| format!("bad ACL in the webhook answer: {e}"))?,
                };
                let name = reply.username.as_deref().or(req.username.as_deref());
                let acl = acl.with_username(name);
                Cached::Allow((acl.has_lists() || acl.username.is_some()).then_some(acl))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, ca_file: Option<&str>) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            timeout_ms: 1000,
            cache_entries: 0,
            cache_ttl_secs: 1,
            ca_file: ca_file.map(PathBuf::from),
        }
    }

    #[test]
    fn http_and_https_urls_are_accepted_others_named() {
        assert!(config("http://127.0.0.1:1/a", None).validate().is_ok());
        assert!(config("https://backend.example/a", None).validate().is_ok());
        let (key, _) = config("ftp://backend.example/a", None)
            .validate()
            .unwrap_err();
        assert_eq!(key, "auth.http.url");
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let (key, why) = config("https://b.example/", Some("/nonexistent/ca.pem"))
            .validate()
            .unwrap_err();
        assert_eq!(key, "auth.http.ca_file");
        assert!(why.contains("/nonexistent/ca.pem"), "{why}");
        let empty = std::env::temp_dir().join(format!("empty-ca-{}.pem", std::process::id()));
        std::fs::write(&empty, "").unwrap();
        let (key, why) = config("https://b.example/", empty.to_str())
            .validate()
            .unwrap_err();
        let _ = std::fs::remove_file(&empty);
        assert_eq!(key, "auth.http.ca_file");
        assert!(why.contains("no usable CA certificate"), "{why}");
    }
}
