//! The `password_file` provider and the `gateway passwd` command that maintains its file.
//!
//! The file has one `username:hash` per line, the hash an argon2 PHC string
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`); blank lines and lines starting with `#`
//! are ignored. It is read once at start; a bad line stops the start with its file and
//! line number. A username that is not in the file is not this provider's: the next
//! provider is asked. Verification is argon2 and deliberately slow, so it runs on the
//! business runtime's blocking threads, never on a shard, at most [`Hashing`]'s bound at
//! once, each in a reused memory area (so a password storm costs bounded threads and
//! memory). An unknown username is hashed against a dummy hash made with the file's
//! parameters ([`PasswordFile::verify_unknown`]), so that it takes as long as a known
//! one with a wrong password: the timing does not tell which usernames exist.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::Deserialize;

use super::{Answer, Verdict};
use crate::acl::ConnAcl;

/// `[auth.password_file]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordFileConfig {
    /// The file of `username:argon2-hash` lines; "" = not configured.
    pub path: String,
}

/// The users of a password file: username → PHC hash string (checked at load).
pub struct PasswordFile {
    users: HashMap<String, String>,
    /// A hash of a random password with the parameters of the file's first user, checked
    /// for unknown usernames so that they cost what a known one costs.
    dummy: String,
}

/// The argon2 hasher a PHC hash was made with (algorithm, version, parameters).
fn hasher_for(h: &PasswordHash) -> Result<Argon2<'static>, String> {
    let algorithm = Algorithm::try_from(h.algorithm).map_err(|e| e.to_string())?;
    let version = h
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let params = Params::try_from(h).map_err(|e| e.to_string())?;
    Ok(Argon2::new(algorithm, version, params))
}

/// A hash of a random password made like `model` (argon2's defaults without one).
fn dummy_hash(model: Option<&str>) -> Result<String, String> {
    let argon = match model.map(PasswordHash::new) {
        Some(Ok(h)) => hasher_for(&h)?,
        _ => Argon2::default(),
    };
    let mut password = [0u8; 32];
    OsRng.fill_bytes(&mut password);
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(&password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot make the dummy hash: {e}"))
}

/// Whether `password` matches the PHC string `hash`, computed in `memory` (grown to the
/// hash's memory cost if needed, and meant to be reused). The comparison of the outputs
/// is constant-time.
fn matches(hash: &str, password: &[u8], memory: &mut Vec<Block>) -> Result<bool, String> {
    let h = PasswordHash::new(hash).map_err(|e| e.to_string())?;
    let argon = hasher_for(&h)?;
    let expected = h.hash.ok_or("the hash has no output")?;
    let mut salt = [0u8; 64];
    let salt = h
        .salt
        .ok_or("the hash has no salt")?
        .decode_b64(&mut salt)
        .map_err(|e| e.to_string())?;
    let blocks = argon.params().block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    argon
        .hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
        .map_err(|e| e.to_string())?;
    Ok(Output::new(out).map_err(|e| e.to_string())? == expected)
}

/// The bound on argon2 work: at most `permits` hashes at once, whatever the callers do.
///
/// A permit is taken before a hash starts and released only when the hash itself ends,
/// on the blocking thread that ran it. A caller that stops waiting (its connection's
/// connect deadline passed) leaves the permit with the running hash, so the next check
/// cannot start another one beside it; a check whose deadline passed while it queued
/// for a permit does not hash at all. Each running hash uses one of at most `permits`
/// memory areas that are kept and reused (argon2's `m` KiB each), so a storm costs
/// `permits` threads and `permits × m` KiB, and no allocator churn that would leave
/// freed memory stuck in per-thread arenas.
pub struct Hashing {
    permits: Arc<tokio::sync::Semaphore>,
    memory: Mutex<Vec<Vec<Block>>>,
}

impl Hashing {
    pub fn new(permits: usize) -> Arc<Hashing> {
        Arc::new(Hashing {
            permits: Arc::new(tokio::sync::Semaphore::new(permits.max(1))),
            memory: Mutex::new(Vec::new()),
        })
    }

    /// Runs `work` on a blocking thread under a permit with a memory area. `Ok(None)`:
    /// `deadline` passed before it could start (nothing was hashed).
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        deadline: Instant,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<Option<T>, String> {
        let permit =
            match tokio::time::timeout_at(deadline.into(), self.permits.clone().acquire_owned())
                .await
            {
                Err(_) => return Ok(None),
                Ok(Err(_)) => return Err("shutting down".into()),
                Ok(Ok(p)) => p,
            };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if Instant::now() >= deadline {
                return None;
            }
            let mut memory = this.take_memory();
            let out = work(&mut memory);
            this.memory
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(memory);
            Some(out)
        })
        .await
        .map_err(|e| format!("password check failed: {e}"))
    }

    fn take_memory(&self) -> Vec<Block> {
        let mut pool = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }
}

/// A username that fits the file format.
fn check_username(user: &str) -> Result<(), String> {
    if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
        return Err(format!(
            "invalid username {user:?}: it must be non-empty, without ':' or control characters"
        ));
    }
    Ok(())
}

/// Splits a line into (user, hash), or None for a blank or comment line.
fn parse_line(line: &str) -> Option<Result<(&str, &str), String>> {
    let trimmed = line.trim_end_matches('\r');
    if trimmed.trim().is_empty() || trimmed.starts_with('#') {
        return None;
    }
    Some(match trimmed.split_once(':') {
        None => Err("expected `username:$argon2id$...`".into()),
        Some((user, hash)) => check_username(user).and_then(|()| {
            let parsed = PasswordHash::new(hash)
                .map_err(|e| format!("the hash of {user:?} is not a PHC string: {e}"))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(format!(
                    "the hash of {user:?} uses {}, not argon2",
                    parsed.algorithm
                ));
            }
            Ok((user, hash))
        }),
    })
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "auth.password_file.path: cannot read {}: {e}",
                path.display()
            )
        })?;
        Self::parse(&text).map_err(|(line, e)| format!("{}:{line}: {e}", path.display()))
    }

    /// Parses file text; an error carries its 1-based line number.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        let mut first = None;
        for (i, line) in text.lines().enumerate() {
            match parse_line(line) {
                None => {}
                Some(Err(e)) => return Err((i + 1, e)),
                Some(Ok((user, _))) if users.contains_key(user) => {
                    return Err((i + 1, format!("user {user:?} is listed twice")));
                }
                Some(Ok((user, hash))) => {
                    first.get_or_insert(i + 1);
                    users.insert(user.to_owned(), hash.to_owned());
                }
            }
        }
        let model = first.and_then(|line| text.lines().nth(line - 1));
        let model = model.and_then(|l| l.trim_end_matches('\r').split_once(':'));
        let dummy = dummy_hash(model.map(|(_, h)| h)).map_err(|e| (first.unwrap_or(0), e))?;
        Ok(PasswordFile { users, dummy })
    }

    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Argon2 verification in `memory` (see [`Hashing`]): slow on purpose; call it off
    /// the shards. An allowed user's name is the connection's authenticated username.
    pub fn verify(&self, user: &str, password: &[u8], memory: &mut Vec<Block>) -> Answer {
        let Some(hash) = self.users.get(user) else {
            return Answer::Ignore;
        };
        match matches(hash, password, memory) {
            Ok(true) => Answer::Decided(Verdict::Allow(Some(Box::new(ConnAcl::named(user))))),
            Ok(false) => {
                Answer::Decided(Verdict::Deny(format!("wrong password for user {user:?}")))
            }
            Err(e) => Answer::Decided(Verdict::Deny(format!("unusable hash for {user:?}: {e}"))),
        }
    }

    /// Spends on an unknown username the time a known one costs (the dummy hash).
    pub fn verify_unknown(&self, password: &[u8], memory: &mut Vec<Block>) {
        let _ = matches(&self.dummy, password, memory);
    }
}

/// An argon2id PHC hash of `password` with a fresh random salt and the argon2 crate's
/// default cost (19 MiB, 2 passes: the OWASP recommendation).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// `gateway passwd FILE USER`: adds `user` or changes its password, keeping every other
/// line as it was. The file is replaced atomically (a temporary file in the same
/// directory, fsynced, then renamed over it), so a reader never sees half a file.
pub fn set_password(path: &Path, user: &str, password: &[u8]) -> Result<(), String> {
    check_username(user)?;
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    // Refuse to rewrite a file we could not load: the gateway would not start with it.
    PasswordFile::parse(&old).map_err(|(line, e)| format!("{}:{line}: {e}", path.display()))?;
    let entry = format!("{user}:{}", hash_password(password)?);
    let mut out = String::with_capacity(old.len() + entry.len() + 1);
    let mut replaced = false;
    for line in old.lines() {
        match parse_line(line) {
            Some(Ok((u, _))) if u == user => {
                out.push_str(&entry);
                replaced = true;
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    if !replaced {
        out.push_str(&entry);
        out.push('\n');
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(out.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(f: &PasswordFile, user: &str, password: &[u8]) -> Answer {
        f.verify(user, password, &mut Vec::new())
    }

    fn allowed(user: &str) -> Answer {
        Answer::Decided(Verdict::Allow(Some(Box::new(ConnAcl::named(user)))))
    }

    #[test]
    fn verify_allows_the_right_password_only() {
        let text = format!("# users\n\nalice:{}\n", hash_password(b"secret").unwrap());
        let f = PasswordFile::parse(&text).unwrap();
        assert!(f.knows("alice"));
        assert_eq!(verify(&f, "alice", b"secret"), allowed("alice"));
        assert!(matches!(
            verify(&f, "alice", b"wrong"),
            Answer::Decided(Verdict::Deny(_))
        ));
        assert_eq!(verify(&f, "bob", b"secret"), Answer::Ignore);
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let good = hash_password(b"x").unwrap();
        let cases = [
            ("alice\n", 1),
            (&*format!("a:{good}\nb:notahash\n"), 2),
            (&*format!("a:{good}\na:{good}\n"), 2),
            ("#c\n\n:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA\n", 3),
            ("a:$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA\n", 1),
        ];
        for (text, line) in cases {
            match PasswordFile::parse(text) {
                Err((l, _)) => assert_eq!(l, line, "{text}"),
                Ok(_) => panic!("accepted {text:?}"),
            }
        }
    }

    #[test]
    fn set_password_adds_and_replaces_keeping_other_lines() {
        let dir = std::env::temp_dir().join(format!("gw-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users");
        let _ = std::fs::remove_file(&path);
        set_password(&path, "alice", b"one").unwrap();
        set_password(&path, "bob", b"two").unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        set_password(&path, "alice", b"three").unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert_eq!(before.lines().nth(1), after.lines().nth(1), "bob kept");
        let f = PasswordFile::load(&path).unwrap();
        assert_eq!(verify(&f, "alice", b"three"), allowed("alice"));
        assert_eq!(verify(&f, "bob", b"two"), allowed("bob"));
        assert!(set_password(&path, "a:b", b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
