//! Authentication: who may connect.
//!
//! `[auth] providers` lists the providers in the order they are asked. Each one answers
//! allow, deny, or "not mine" (ignore); the first that decides wins, and a CONNECT that no
//! provider decides is refused. The providers:
//!
//! - `anonymous`: allows a CONNECT that carries no username and no password, according to
//!   `[auth] anonymous`: `"loopback"` (the default: only from 127.0.0.0/8 and ::1, so the
//!   default config is safe to expose), `"always"`, or `"never"`.
//! - `password_file`: username and argon2 password hash from a file ([`password`]).
//! - `jwt`: a signed token in the password field ([`jwt`]).
//! - `http`: a webhook to the backend ([`webhook`]).
//!
//! Anonymous is a few comparisons and runs on the shard ([`Authenticator::fast`]); a
//! config of only cheap providers never leaves it. The others may be slow (argon2 is slow
//! on purpose, a webhook waits on the network), so the shard hands them to the business
//! runtime ([`Authenticator::check`]) and the answer comes back through its mailbox
//! (`ShardMsg::AuthDone`). Argon2 runs on the runtime's blocking threads, at most
//! one hash per business thread at a time, so a password storm cannot starve the HTTP API.

pub mod jwt;
pub mod password;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;

use crate::acl::ConnAcl;
use crate::mailbox::{AuthDone, Mailboxes, ShardMsg};

/// `[auth]` of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub providers: Vec<ProviderKind>,
    pub anonymous: AnonymousPolicy,
    pub password_file: password::PasswordFileConfig,
    pub jwt: jwt::JwtConfig,
    pub http: webhook::WebhookConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Anonymous,
    PasswordFile,
    Jwt,
    Http,
}

/// When the `anonymous` provider lets a client without credentials in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousPolicy {
    /// Only from a loopback address (127.0.0.0/8, ::1).
    Loopback,
    Always,
    Never,
}

impl AuthConfig {
    /// The rules serde cannot express; `Config::validate` calls this.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, p) in self.providers.iter().enumerate() {
            if self.providers[..i].contains(p) {
                return Err((
                    format!("auth.providers[{i}]"),
                    format!("{p:?} is listed twice"),
                ));
            }
            match p {
                ProviderKind::PasswordFile if self.password_file.path.is_empty() => {
                    return Err((
                        "auth.password_file.path".into(),
                        "the password_file provider needs a path".into(),
                    ))
                }
                ProviderKind::Jwt => self.jwt.validate()?,
                ProviderKind::Http => self.http.validate()?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The credentials of one CONNECT.
#[derive(Debug, Clone)]
pub struct Request {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub peer: SocketAddr,
}

/// The outcome of authentication.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let in, with the connection's own ACL lists if the provider gave some.
    Allow(Option<Box<ConnAcl>>),
    /// Bad or missing credentials (CONNACK 0x05 / 0x86), and why (for the log).
    Deny(String),
    /// The provider could not answer (CONNACK 0x03 / 0x88), and why.
    Unavailable(String),
}

/// One provider's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Decided(Verdict),
    /// Not this provider's client: ask the next one.
    Ignore,
}

enum Provider {
    Anonymous(AnonymousPolicy),
    PasswordFile(Arc<password::PasswordFile>),
    Jwt(Box<jwt::Jwt>),
    Http(Box<webhook::Webhook>),
}

/// The configured providers, built once at start and shared by every shard.
pub struct Authenticator {
    providers: Vec<Provider>,
    /// Bounds concurrent argon2 hashes.
    hashing: Arc<tokio::sync::Semaphore>,
}

impl Authenticator {
    /// Builds the providers, reading the password file and key files now (at start, not
    /// on a shard). `hash_threads` bounds concurrent argon2 verifications.
    pub fn from_config(c: &AuthConfig, hash_threads: usize) -> Result<Authenticator, String> {
        let mut providers = Vec::with_capacity(c.providers.len());
        for p in &c.providers {
            providers.push(match p {
                ProviderKind::Anonymous => Provider::Anonymous(c.anonymous),
                ProviderKind::PasswordFile => Provider::PasswordFile(Arc::new(
                    password::PasswordFile::load(std::path::Path::new(&c.password_file.path))?,
                )),
                ProviderKind::Jwt => Provider::Jwt(Box::new(jwt::Jwt::from_config(&c.jwt)?)),
                ProviderKind::Http => {
                    Provider::Http(Box::new(webhook::Webhook::from_config(&c.http)?))
                }
            });
        }
        Ok(Authenticator {
            providers,
            hashing: Arc::new(tokio::sync::Semaphore::new(hash_threads.max(1))),
        })
    }

    /// Decides on the shard if the cheap providers ahead of any slow one decide, or if
    /// there is no slow one at all. `None`: call [`Authenticator::check`] off the shard.
    pub fn fast(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        peer: SocketAddr,
    ) -> Option<Verdict> {
        for p in &self.providers {
            match p {
                Provider::Anonymous(policy) => {
                    if let Answer::Decided(v) = anonymous(*policy, username, password, peer) {
                        return Some(v);
                    }
                }
                _ => return None,
            }
        }
        Some(no_provider())
    }

    /// Asks every provider in order (on the business runtime).
    pub async fn check(&self, req: Request) -> Verdict {
        for p in &self.providers {
            let answer = match p {
                Provider::Anonymous(policy) => anonymous(
                    *policy,
                    req.username.as_deref(),
                    req.password.as_deref(),
                    req.peer,
                ),
                Provider::PasswordFile(f) => {
                    let Some(user) = req.username.as_deref() else {
                        continue;
                    };
                    if !f.knows(user) {
                        continue;
                    }
                    let Ok(_permit) = self.hashing.acquire().await else {
                        return Verdict::Unavailable("shutting down".into());
                    };
                    let f = f.clone();
                    let user = user.to_owned();
                    let pw = req.password.clone().unwrap_or_default();
                    match tokio::task::spawn_blocking(move || f.verify(&user, &pw)).await {
                        Ok(a) => a,
                        Err(e) => Answer::Decided(Verdict::Unavailable(format!(
                            "password check failed: {e}"
                        ))),
                    }
                }
                Provider::Jwt(j) => j.check(&req.client_id, req.password.as_deref()),
                Provider::Http(w) => w.check(&req).await,
            };
            if let Answer::Decided(v) = answer {
                return v;
            }
        }
        no_provider()
    }
}

/// Runs [`Authenticator::check`] on the business runtime and posts the verdict to
/// connection `conn` (authentication `token`) of `shard` as `ShardMsg::AuthDone`. A full
/// mailbox is retried every few milliseconds (this is a business task, not the shard)
/// until `deadline`, the connection's connect timeout.
#[allow(clippy::too_many_arguments)]
pub fn check_in_background(
    auth: Arc<Authenticator>,
    business: &tokio::runtime::Handle,
    req: Request,
    mailboxes: Mailboxes,
    shard: usize,
    conn: usize,
    token: u64,
    deadline: Instant,
) {
    business.spawn(async move {
        // Past `deadline` the connect timeout has closed the connection: drop the work
        // (a queued argon2 hash included) instead of doing it for nobody. Under a
        // reconnect storm that keeps the hashing queue made of live connections only.
        let Ok(verdict) = tokio::time::timeout_at(deadline.into(), auth.check(req)).await else {
            return;
        };
        let mut msg = ShardMsg::AuthDone(Box::new(AuthDone {
            conn,
            token,
            verdict,
        }));
        while let Err(m) = mailboxes.try_send(shard, msg) {
            if Instant::now() > deadline {
                return;
            }
            msg = m;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

fn no_provider() -> Verdict {
    Verdict::Deny("no authentication provider accepted the client".into())
}

/// The `anonymous` provider: decides only for a CONNECT without username and password.
pub fn anonymous(
    policy: AnonymousPolicy,
    username: Option<&str>,
    password: Option<&[u8]>,
    peer: SocketAddr,
) -> Answer {
    if username.is_some() || password.is_some() {
        return Answer::Ignore;
    }
    let allowed = match policy {
        AnonymousPolicy::Always => true,
        AnonymousPolicy::Never => false,
        AnonymousPolicy::Loopback => peer.ip().to_canonical().is_loopback(),
    };
    if allowed {
        Answer::Decided(Verdict::Allow(None))
    } else {
        Answer::Ignore
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn anonymous_loopback_only_from_loopback() {
        let allow = Answer::Decided(Verdict::Allow(None));
        let l = AnonymousPolicy::Loopback;
        for a in [
            "127.0.0.1:5",
            "127.9.8.7:5",
            "[::1]:5",
            "[::ffff:127.0.0.1]:5",
        ] {
            assert_eq!(anonymous(l, None, None, addr(a)), allow, "{a}");
        }
        for a in [
            "10.0.0.1:5",
            "192.168.1.2:5",
            "[2001:db8::1]:5",
            "[::ffff:10.0.0.1]:5",
        ] {
            assert_eq!(anonymous(l, None, None, addr(a)), Answer::Ignore, "{a}");
        }
        let remote = addr("203.0.113.9:1");
        assert_eq!(
            anonymous(AnonymousPolicy::Always, None, None, remote),
            allow
        );
        assert_eq!(
            anonymous(AnonymousPolicy::Never, None, None, addr("127.0.0.1:1")),
            Answer::Ignore
        );
        // Credentials are never anonymous's to judge.
        let lo = addr("127.0.0.1:1");
        assert_eq!(
            anonymous(AnonymousPolicy::Always, Some("u"), None, lo),
            Answer::Ignore
        );
        assert_eq!(
            anonymous(AnonymousPolicy::Always, None, Some(b"t"), lo),
            Answer::Ignore
        );
    }

    #[test]
    fn the_default_config_refuses_remote_anonymous_clients() {
        let c = crate::config::Config::default();
        let a = Authenticator::from_config(&c.auth, 1).unwrap();
        assert_eq!(
            a.fast(None, None, addr("127.0.0.1:9")),
            Some(Verdict::Allow(None))
        );
        assert!(matches!(
            a.fast(None, None, addr("198.51.100.4:9")),
            Some(Verdict::Deny(_))
        ));
        assert!(matches!(
            a.fast(Some("dev"), Some(b"pw"), addr("127.0.0.1:9")),
            Some(Verdict::Deny(_))
        ));
    }

    #[test]
    fn config_mistakes_name_their_key() {
        use crate::config::{Config, ConfigError};
        let cases = [
            ("[auth]\nproviders = [\"http\"]\n", "auth.http.url"),
            ("[auth]\nproviders = [\"password_file\"]\n", "auth.password_file.path"),
            ("[auth]\nproviders = [\"jwt\"]\n", "auth.jwt.secret"),
            (
                "[auth]\nproviders = [\"jwt\"]\n[auth.jwt]\nalgorithm = \"RS256\"\n",
                "auth.jwt.public_key_file",
            ),
            ("[auth]\nproviders = [\"anonymous\", \"anonymous\"]\n", "auth.providers[1]"),
            (
                "[auth]\nproviders = [\"http\"]\n[auth.http]\nurl = \"https://x/a\"\n",
                "auth.http.url",
            ),
            (
                "[auth]\nproviders = [\"http\"]\n[auth.http]\nurl = \"http://x/a\"\ntimeout_ms = 0\n",
                "auth.http.timeout_ms",
            ),
            (
                "[mqtt]\nconnect_timeout_secs = 2\n[auth]\nproviders = [\"http\"]\n[auth.http]\nurl = \"http://x/a\"\ntimeout_ms = 2000\n",
                "auth.http.timeout_ms",
            ),
            ("[acl]\nrules = [{ permission = \"allow\", action = \"all\", topic = \"a/#/b\" }]\n", "acl.rules"),
        ];
        for (toml, key) in cases {
            match Config::from_toml_str(toml) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
                other => panic!("{toml}: expected an error at {key}, got {other:?}"),
            }
        }
        assert!(Config::from_toml_str("[auth]\nproviders = [\"ldap\"]\n").is_err());
    }

    #[test]
    fn slow_providers_leave_the_shard() {
        let mut c = crate::config::Config::default().auth;
        c.providers = vec![ProviderKind::Anonymous, ProviderKind::Jwt];
        c.jwt.secret = "s".into();
        let a = Authenticator::from_config(&c, 1).unwrap();
        assert_eq!(
            a.fast(None, None, addr("127.0.0.1:9")),
            Some(Verdict::Allow(None))
        );
        assert_eq!(a.fast(None, Some(b"token"), addr("127.0.0.1:9")), None);
    }
}
