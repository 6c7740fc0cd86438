//! Config reload without a restart (SIGHUP, `POST /v1/admin/reload`).
//!
//! The gateway reads the config file it was started with again, validates it fully
//! (`Config::load`), and prepares everything a reload changes before it changes
//! anything: the TLS certificate, key and client CA (read and checked), the auth
//! providers (password file and JWT keys read again), and the `[acl]` rules (compiled
//! for every shard). Only when all of that succeeds are they put in place: the ACL goes
//! to every shard in one reserved round of mailbox messages (all shards or none), and
//! the reload waits until each shard has it in force; then the auth providers and the
//! TLS files are swapped. So when the reload answers, the new settings judge whatever a
//! client sends next. A reload that fails leaves the old settings in force and says
//! why, naming the key.
//!
//! New handshakes use the new certificate; connections already open keep theirs. Keys
//! that only a restart can change (listen addresses, shard count and every other
//! section) are named in the answer when the file differs from what runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::acl::Acl;
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::mailbox::{Mailboxes, ShardMsg};
use crate::tls::TlsReload;

/// How long a reload waits for room in every shard's mailbox.
const MAILBOX_WAIT: Duration = Duration::from_secs(5);

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    /// What was read again and is now in force.
    pub reloaded: Vec<&'static str>,
    /// Of those, what differs from before (a setting or a file's contents).
    pub changed: Vec<&'static str>,
    /// Keys (or sections) that differ in the file but need a restart to take effect.
    pub restart_required: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug)]
pub enum ReloadError {
    /// The gateway was started without `--config`: there is no file to read again.
    NoFile,
    /// The file, or a file it names, is invalid; `key` names the setting when known.
    Invalid {
        key: Option<String>,
        message: String,
    },
    /// A shard's mailbox stayed full: the ACL could not reach every shard.
    Busy(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::NoFile => write!(f, "the gateway was started without --config"),
            ReloadError::Invalid { message, .. } => write!(f, "{message}"),
            ReloadError::Busy(m) => write!(f, "{m}"),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ReloadError {
    ReloadError::Invalid {
        key: Some(key.into()),
        message: message.into(),
    }
}

impl From<ConfigError> for ReloadError {
    fn from(e: ConfigError) -> Self {
        let key = match &e {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => {
                Some(key.clone())
            }
            _ => None,
        };
        ReloadError::Invalid {
            key,
            message: e.to_string(),
        }
    }
}

/// `gateway_config_reloads_total{result}`.
#[derive(Default)]
pub struct ReloadMetrics {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ReloadMetrics {
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP gateway_config_reloads_total Config reloads (SIGHUP, POST /v1/admin/reload) by result.\n# TYPE gateway_config_reloads_total counter\ngateway_config_reloads_total{{result=\"ok\"}} {}\ngateway_config_reloads_total{{result=\"failed\"}} {}",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        );
    }
}

/// Everything a reload swaps, and the config in force.
pub struct Reloader {
    path: Option<PathBuf>,
    auth: Arc<Authenticator>,
    tls: Option<Arc<TlsReload>>,
    mailboxes: Mailboxes,
    pub metrics: Arc<ReloadMetrics>,
    /// The config last applied and its fingerprints; one reload at a time.
    current: tokio::sync::Mutex<Applied>,
}

/// The config in force and the fingerprints of its reloadable parts when it was applied.
struct Applied {
    config: Arc<Config>,
    fingerprints: BTreeMap<&'static str, u64>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        config: Arc<Config>,
        auth: Arc<Authenticator>,
        tls: Option<Arc<TlsReload>>,
        mailboxes: Mailboxes,
    ) -> Reloader {
        Reloader {
            path,
            auth,
            tls,
            mailboxes,
            metrics: Arc::default(),
            current: tokio::sync::Mutex::new(Applied {
                fingerprints: fingerprints(&config),
                config,
            }),
        }
    }

    /// Reads the config file again and applies what can change without a restart, or
    /// nothing. Logs the outcome once and counts it.
    pub async fn reload(&self, origin: &'static str) -> Result<ReloadReport, ReloadError> {
        let result = self.reload_inner().await;
        match &result {
            Ok(r) => {
                self.metrics.ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(origin, changed = ?r.changed, restart_required = ?r.restart_required, "config reloaded");
            }
            Err(e) => {
                self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                let key = match e {
                    ReloadError::Invalid { key, .. } => key.as_deref(),
                    _ => None,
                };
                tracing::warn!(origin, key, error = %e, "config reload failed: the old settings stay");
            }
        }
        result
    }

    async fn reload_inner(&self) -> Result<ReloadReport, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let mut current = self.current.lock().await;
        let new = Config::load(path)?;
        // Everything is read and checked before anything changes.
        let tls = match &self.tls {
            Some(_) => Some(crate::tls::read_files(&new.mqtt).map_err(|e| {
                invalid(tls_key(&e.to_string()), format!("config error: TLS: {e}"))
            })?),
            None => None,
        };
        let providers = Authenticator::prepare(&new.auth)
            .map_err(|e| invalid(auth_key(&new, &e), format!("config error: {e}")))?;
        let acls = (0..self.mailboxes.len())
            .map(|_| Acl::from_config(&new.acl).map(Some))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("acl.rules", format!("config error: {e}")))?;
        self.send_acls(acls).await?;
        self.auth.install(providers);
        let mut reloaded = vec!["auth", "acl"];
        if let (Some(t), Some(files)) = (&self.tls, tls) {
            t.install(files);
            reloaded.insert(0, "mqtt.tls");
        }
        let before = &current.fingerprints;
        let after = fingerprints(&new);
        let changed = reloaded
            .iter()
            .copied()
            .filter(|k| before.get(k) != after.get(k))
            .collect();
        let report = ReloadReport {
            reloaded,
            changed,
            restart_required: restart_required(&current.config, &new),
        };
        // What runs now: the reloaded sections from the file, the rest as started.
        let mut applied = (*current.config).clone();
        applied.auth.providers = new.auth.providers.clone();
        applied.auth.anonymous = new.auth.anonymous;
        applied.auth.password_file = new.auth.password_file.clone();
        applied.auth.jwt = new.auth.jwt.clone();
        applied.auth.http = new.auth.http.clone();
        applied.acl = new.acl.clone();
        copy_tls(&mut applied.mqtt, &new.mqtt);
        *current = Applied {
            config: Arc::new(applied),
            fingerprints: after,
        };
        Ok(report)
    }

    /// Sends every shard its compiled ACL, all or none, waiting a while for room, then
    /// until every shard has put it in force. A shard reads its sockets before its
    /// mailbox in a loop turn: without that wait, a PUBLISH a client sends right after
    /// the reload's answer could still be judged by the old rules.
    async fn send_acls(&self, mut acls: Vec<Option<Acl>>) -> Result<(), ReloadError> {
        let deadline = Instant::now() + MAILBOX_WAIT;
        let mut applied = Vec::with_capacity(acls.len());
        loop {
            let sent = self.mailboxes.try_send_all(|shard| {
                let (tx, rx) = oneshot::channel();
                applied.push(rx);
                ShardMsg::Acl {
                    acl: Box::new(acls[shard].take().expect("one ACL per shard")),
                    applied: tx,
                }
            });
            match sent {
                Ok(()) => {
                    wait_applied(applied).await;
                    return Ok(());
                }
                Err(shard) if Instant::now() >= deadline => {
                    return Err(ReloadError::Busy(format!(
                        "shard {shard}'s mailbox stayed full for {}s; nothing was changed, try again",
                        MAILBOX_WAIT.as_secs()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

/// Waits until every shard has said its new ACL is in force. A shard that stopped
/// meanwhile has nothing to judge; one still silent after [`MAILBOX_WAIT`] (it cannot
/// be: a shard never blocks) has the rules in its mailbox and takes them next.
async fn wait_applied(applied: Vec<oneshot::Receiver<()>>) {
    let deadline = tokio::time::Instant::now() + MAILBOX_WAIT;
    for (shard, rx) in applied.into_iter().enumerate() {
        if tokio::time::timeout_at(deadline, rx).await.is_err() {
            tracing::warn!(
                shard,
                "config reload: the shard has not put the new ACL in force yet; it takes it from its mailbox"
            );
        }
    }
}

/// The TLS key an error message is about.
fn tls_key(message: &str) -> &'static str {
    if message.contains("mqtt.tls_key") || message.contains("private key") {
        "mqtt.tls_key"
    } else if message.contains("client CA") || message.contains("CA certificate") {
        "mqtt.tls_client_ca"
    } else {
        "mqtt.tls_cert"
    }
}

/// The `[auth]` key an error building the providers is about.
fn auth_key(c: &Config, message: &str) -> &'static str {
    if !c.auth.password_file.path.is_empty() && message.contains(&c.auth.password_file.path) {
        "auth.password_file.path"
    } else if message.contains("jwt") || message.contains("JWT") {
        "auth.jwt"
    } else if message.contains("http") || message.contains("webhook") {
        "auth.http"
    } else {
        "auth"
    }
}

fn copy_tls(to: &mut crate::config::MqttConfig, from: &crate::config::MqttConfig) {
    to.tls_cert = from.tls_cert.clone();
    to.tls_key = from.tls_key.clone();
    to.tls_client_ca = from.tls_client_ca.clone();
    to.tls_require_client_cert = from.tls_require_client_cert;
}

fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

fn file_bytes(path: Option<&std::path::Path>) -> Vec<u8> {
    path.and_then(|p| std::fs::read(p).ok()).unwrap_or_default()
}

/// A fingerprint of each reloadable part: its settings and the contents of the files
/// it names.
fn fingerprints(c: &Config) -> BTreeMap<&'static str, u64> {
    let m = &c.mqtt;
    let tls = format!(
        "{:?}{:?}{:?}{}",
        m.tls_cert, m.tls_key, m.tls_client_ca, m.tls_require_client_cert
    );
    let tls_files = [
        file_bytes(m.tls_cert.as_deref()),
        file_bytes(m.tls_key.as_deref()),
        file_bytes(m.tls_client_ca.as_deref()),
    ];
    let a = &c.auth;
    let auth = format!(
        "{:?}{:?}{:?}{:?}{:?}",
        a.providers, a.anonymous, a.password_file, a.jwt, a.http
    );
    let auth_files = [
        file_bytes(Some(std::path::Path::new(&a.password_file.path))),
        file_bytes(Some(std::path::Path::new(&a.jwt.public_key_file))),
    ];
    BTreeMap::from([
        (
            "mqtt.tls",
            hash_of(&[tls.as_bytes(), &tls_files[0], &tls_files[1], &tls_files[2]]),
        ),
        (
            "auth",
            hash_of(&[auth.as_bytes(), &auth_files[0], &auth_files[1]]),
        ),
        ("acl", hash_of(&[format!("{:?}", c.acl).as_bytes()])),
    ])
}

/// The keys that differ between what runs and the file but need a restart.
fn restart_required(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut key = |name: &str, differs: bool| {
        if differs {
            out.push(name.to_string());
        }
    };
    key("mqtt.listen", old.mqtt.listen != new.mqtt.listen);
    key(
        "mqtt.tls_listen",
        old.mqtt.tls_listen != new.mqtt.tls_listen,
    );
    key("mqtt.ws_listen", old.mqtt.ws_listen != new.mqtt.ws_listen);
    key(
        "mqtt.wss_listen",
        old.mqtt.wss_listen != new.mqtt.wss_listen,
    );
    key("http.listen", old.http.listen != new.http.listen);
    key("shards.count", old.shards.count != new.shards.count);
    key(
        "auth.failure_backoff_after",
        old.auth.failure_backoff_after != new.auth.failure_backoff_after,
    );
    key(
        "auth.failure_backoff_secs",
        old.auth.failure_backoff_secs != new.auth.failure_backoff_secs,
    );
    // Any other setting: named by its section.
    let mut rest_old = old.clone();
    let mut rest_new = new.clone();
    for c in [&mut rest_old, &mut rest_new] {
        c.mqtt.listen = old.mqtt.listen;
        c.mqtt.tls_listen = old.mqtt.tls_listen;
        c.mqtt.ws_listen = old.mqtt.ws_listen;
        c.mqtt.wss_listen = old.mqtt.wss_listen;
        copy_tls(&mut c.mqtt, &old.mqtt);
        c.http.listen = old.http.listen;
        c.shards.count = old.shards.count;
    }
    let sections: [(&str, String, String); 9] = [
        ("mqtt", dbg(&rest_old.mqtt), dbg(&rest_new.mqtt)),
        ("limits", dbg(&old.limits), dbg(&new.limits)),
        ("tcp", dbg(&old.tcp), dbg(&new.tcp)),
        ("shards", dbg(&rest_old.shards), dbg(&rest_new.shards)),
        ("buffers", dbg(&old.buffers), dbg(&new.buffers)),
        ("http", dbg(&rest_old.http), dbg(&rest_new.http)),
        ("log", dbg(&old.log), dbg(&new.log)),
        ("store", dbg(&old.store), dbg(&new.store)),
        ("events", dbg(&old.events), dbg(&new.events)),
    ];
    for (name, a, b) in sections {
        if a != b {
            out.push(format!("[{name}]"));
        }
    }
    if dbg(&old.cluster) != dbg(&new.cluster) {
        out.push("[cluster]".into());
    }
    out
}

fn dbg(v: &impl std::fmt::Debug) -> String {
    format!("{v:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reloader for two shards whose config file holds an `[acl]` section, and the
    /// shards' mailboxes (no shard runs: the test answers for them).
    fn reloader(tag: &str) -> (Arc<Reloader>, Vec<tokio::sync::mpsc::Receiver<ShardMsg>>) {
        let dir = std::env::temp_dir().join(format!("gateway-reload-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            "[acl]\nenabled = true\nno_match = \"allow\"\n\
             rules = [{ permission = \"deny\", action = \"publish\", topic = \"locked/#\" }]\n",
        )
        .unwrap();
        let config = Arc::new(Config::default());
        let auth = Arc::new(Authenticator::from_config(&config.auth, 1).unwrap());
        let (mailboxes, rx) = Mailboxes::new(2, 4);
        let r = Reloader::new(Some(path), config, auth, None, mailboxes);
        (Arc::new(r), rx)
    }

    /// The shard's side of an ACL message: what tells the reload it is in force.
    fn applied(msg: Option<ShardMsg>) -> oneshot::Sender<()> {
        match msg {
            Some(ShardMsg::Acl { applied, .. }) => applied,
            _ => panic!("expected the reloaded ACL"),
        }
    }

    /// The reload answers only once every shard has the new rules in force: a shard
    /// reads its sockets before its mailbox, so a PUBLISH sent right after an earlier
    /// answer could be judged by the old rules.
    #[tokio::test]
    async fn a_reload_answers_once_every_shard_has_the_new_acl_in_force() {
        let (r, mut rx) = reloader("acl");
        let reload = tokio::spawn({
            let r = r.clone();
            async move { r.reload("test").await }
        });
        let first = applied(rx[0].recv().await);
        let second = applied(rx[1].recv().await);
        let _ = first.send(());
        // (A wait that cannot fail the fix: the reload waits for the second shard.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !reload.is_finished(),
            "answered before shard 1 had the new ACL in force"
        );
        let _ = second.send(());
        let report = tokio::time::timeout(Duration::from_secs(10), reload)
            .await
            .expect("answered once both shards have it")
            .unwrap()
            .expect("reloaded");
        assert!(report.reloaded.contains(&"acl"), "{report:?}");
        assert_eq!(r.metrics.ok.load(Ordering::Relaxed), 1);
        let dir = r.path.as_ref().and_then(|p| p.parent()).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
