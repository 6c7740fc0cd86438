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
//! one hash per business thread at a time whatever times out ([`password::Hashing`]), so
//! a password storm cannot starve the HTTP API nor grow threads and memory; a failure
//! back-off per address ([`backoff`]) stops a storm from costing hashes at all.
//!
//! `%u` in ACL rules is the name a provider authenticated, carried in the verdict's
//! [`ConnAcl`]: the password file's user, the JWT's `username_claim`, the name the
//! webhook confirmed, else the verified client certificate's CN when it is used as the
//! client id ([`session_acl`]). The CONNECT's username field alone is never trusted, and
//! an anonymous client has no `%u`.

pub mod backoff;
pub mod jwt;
pub mod password;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;

use crate::acl::{Acl, ConnAcl};
use crate::mailbox::{AuthDone, Mailboxes, ShardMsg};

/// `[auth]` of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub providers: Vec<ProviderKind>,
    pub anonymous: AnonymousPolicy,
    /// Failed password checks in a row from one address before its checks are refused
    /// without hashing; 0 = no back-off.
    pub failure_backoff_after: u32,
    /// Seconds an address stays backed off.
    pub failure_backoff_secs: u32,
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
        if self.failure_backoff_after > 0 && !(1..=86_400).contains(&self.failure_backoff_secs) {
            return Err((
                "auth.failure_backoff_secs".into(),
                format!(
                    "must be within 1..=86400 when failure_backoff_after > 0, got {}",
                    self.failure_backoff_secs
                ),
            ));
        }
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

/// The configured providers, built at start and shared by every shard. A config reload
/// (`src/reload.rs`) swaps the whole provider list ([`Authenticator::replace_providers`]):
/// a check already running finishes with the list it started with.
pub struct Authenticator {
    providers: std::sync::RwLock<Arc<[Provider]>>,
    /// Bounds concurrent argon2 hashes.
    hashing: Arc<password::Hashing>,
    backoff: Arc<backoff::Backoff>,
}

/// The providers `c` lists, reading the password file and key files now.
fn build_providers(c: &AuthConfig) -> Result<Arc<[Provider]>, String> {
    let mut providers = Vec::with_capacity(c.providers.len());
    for p in &c.providers {
        providers.push(match p {
            ProviderKind::Anonymous => Provider::Anonymous(c.anonymous),
            ProviderKind::PasswordFile => Provider::PasswordFile(Arc::new(
                password::PasswordFile::load(std::path::Path::new(&c.password_file.path))?,
            )),
            ProviderKind::Jwt => Provider::Jwt(Box::new(jwt::Jwt::from_config(&c.jwt)?)),
            ProviderKind::Http => Provider::Http(Box::new(webhook::Webhook::from_config(&c.http)?)),
        });
    }
    Ok(providers.into())
}

/// Providers built by [`Authenticator::prepare`], not yet in force.
pub struct Providers(Arc<[Provider]>);

/// A deadline that never comes, for checks nobody waits on with one.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

impl Authenticator {
    /// Builds the providers, reading the password file and key files now (at start, not
    /// on a shard). `hash_threads` bounds concurrent argon2 verifications.
    pub fn from_config(c: &AuthConfig, hash_threads: usize) -> Result<Authenticator, String> {
        Ok(Authenticator {
            providers: std::sync::RwLock::new(build_providers(c)?),
            hashing: password::Hashing::new(hash_threads),
            backoff: Arc::new(backoff::Backoff::new(
                c.failure_backoff_after,
                c.failure_backoff_secs,
            )),
        })
    }

    /// Builds the providers `c` lists (reading the password file and key files again)
    /// without putting them in place: a reload prepares everything before it changes
    /// anything ([`Authenticator::install`]).
    pub fn prepare(c: &AuthConfig) -> Result<Providers, String> {
        build_providers(c).map(Providers)
    }

    /// Puts `p` in place for the next check. The back-off and hashing bounds stay as
    /// they started.
    pub fn install(&self, p: Providers) {
        *self.providers.write().unwrap_or_else(|e| e.into_inner()) = p.0;
    }

    /// The providers in force now.
    fn current(&self) -> Arc<[Provider]> {
        self.providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Decides on the shard if the cheap providers ahead of any slow one decide, or if
    /// there is no slow one at all. `None`: call [`Authenticator::check`] off the shard.
    pub fn fast(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        peer: SocketAddr,
    ) -> Option<Verdict> {
        for p in self.current().iter() {
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
        self.check_until(req, far_future()).await
    }

    /// Asks every provider in order; a password hash not started by `deadline` is not
    /// started at all (the verdict is then "unavailable", for nobody).
    pub async fn check_until(&self, req: Request, deadline: Instant) -> Verdict {
        let providers = self.current();
        let mut unknown_user = None;
        for p in providers.iter() {
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
                        unknown_user = Some(f);
                        continue;
                    }
                    return self.password_check(f, &req, deadline, true).await;
                }
                Provider::Jwt(j) => j.check(&req.client_id, req.password.as_deref()),
                Provider::Http(w) => w.check(&req).await,
            };
            if let Answer::Decided(v) = answer {
                return v;
            }
        }
        if let Some(f) = unknown_user {
            // Nobody knows this username: take the time a wrong password takes.
            return self.password_check(f, &req, deadline, false).await;
        }
        no_provider()
    }

    /// Verifies the password of `req`'s user under the hashing bound and the back-off:
    /// against the user's hash when the file knows the user (`known`), else against the
    /// dummy hash, then refused (an unknown user costs what a wrong password costs).
    async fn password_check(
        &self,
        f: &Arc<password::PasswordFile>,
        req: &Request,
        deadline: Instant,
        known: bool,
    ) -> Verdict {
        let ip = req.peer.ip().to_canonical();
        if self.backoff.blocked(ip) {
            return backed_off(ip);
        }
        let (f, user) = (f.clone(), req.username.clone().unwrap_or_default());
        let pw = req.password.clone().unwrap_or_default();
        // Checked again when its turn comes: the address may have backed off meanwhile.
        let backoff = self.backoff.clone();
        let work = move |mem: &mut _| {
            if backoff.blocked(ip) {
                return None;
            }
            if !known {
                f.verify_unknown(&pw, mem);
                return Some(no_provider());
            }
            match f.verify(&user, &pw, mem) {
                Answer::Decided(v) => Some(v),
                Answer::Ignore => Some(no_provider()),
            }
        };
        let verdict = match self.hashing.run(deadline, work).await {
            Ok(Some(Some(v))) => v,
            Ok(Some(None)) => return backed_off(ip),
            Ok(None) => return too_late(),
            Err(e) => return Verdict::Unavailable(e),
        };
        self.backoff
            .record(ip, matches!(verdict, Verdict::Allow(_)));
        verdict
    }
}

fn backed_off(ip: std::net::IpAddr) -> Verdict {
    Verdict::Deny(format!(
        "too many failed password checks from {ip}: backing off (auth.failure_backoff_secs)"
    ))
}

fn too_late() -> Verdict {
    Verdict::Unavailable("the connect timeout passed before the password check started".into())
}

/// The per-connection ACL state a session keeps: the verdict's `granted` lists and
/// authenticated username, else — when the provider named nobody — `cert_cn`, the CN of
/// a verified client certificate used as the client id. Never the CONNECT's own
/// username. Kept only when the connection has lists or a `%u` rule needs the name.
pub fn session_acl(
    acl: &Acl,
    granted: Option<Box<ConnAcl>>,
    cert_cn: Option<String>,
) -> Option<Box<ConnAcl>> {
    let mut granted = granted;
    if let Some(cn) = cert_cn {
        if granted.as_ref().is_none_or(|g| g.username.is_none()) {
            granted.get_or_insert_with(Default::default).username = Some(cn.into());
        }
    }
    granted.filter(|g| g.has_lists() || (acl.enabled() && acl.uses_username()))
}

/// Runs [`Authenticator::check`] on the business runtime and posts the verdict to
/// connection `conn` (authentication `token`) of `shard` as `ShardMsg::AuthDone`. A full
/// mailbox is retried every few milliseconds (this is a business task, not the shard)
/// until `deadline`, the connection's connect timeout. With `fleet`, an allowed client's
/// session is then read from (or, on a clean start, purged in) the fleet's JetStream
/// (`crate::cluster::restore`); a failure there makes the verdict `Unavailable`.
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
    fleet: Option<crate::cluster::restore::FleetStep>,
) {
    business.spawn(async move {
        // Past `deadline` the connect timeout has closed the connection: drop the work
        // (a queued argon2 hash included) instead of doing it for nobody. Under a
        // reconnect storm that keeps the hashing queue made of live connections only.
        // A hash already running keeps its permit until it ends (password::Hashing).
        let check = auth.check_until(req, deadline);
        let Ok(verdict) = tokio::time::timeout_at(deadline.into(), check).await else {
            return;
        };
        let (verdict, session) = match fleet {
            Some(step) => step.after(verdict, deadline).await,
            None => (verdict, None),
        };
        let mut msg = ShardMsg::AuthDone(Box::new(AuthDone {
            conn,
            token,
            verdict,
            session,
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
            ("[auth]\nfailure_backoff_secs = 0\n", "auth.failure_backoff_secs"),
            (
                "[auth]\nproviders = [\"http\"]\n[auth.http]\nurl = \"ftp://x/a\"\n",
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
