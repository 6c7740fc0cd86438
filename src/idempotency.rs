//! The push API's idempotency keys: who owns a key, and what its push has come to.
//!
//! A key is scoped to its target (a client id, or the topic of a topic push), so two
//! devices' pushes never share an answer. The first request with a key becomes its
//! owner; its push runs to its outcome whether or not that request's caller stays, and
//! publishes its progress on a `watch` channel that every request repeating the key
//! reads. Reusing a key for a different push of the same target is a [`Claim::Mismatch`].
//! The entry lives for `idempotency_window_secs`, unless its owner releases it because
//! nothing was sent (then a retry sends afresh).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use tokio::sync::watch;

/// Keys remembered at most (oldest forgotten first beyond this).
const MAX_ENTRIES: usize = 1_000_000;

/// A key's progress channel, shared by its owner and the cache.
pub(crate) type Progress<V> = Arc<watch::Sender<V>>;

/// What a request holding a key is to do.
pub(crate) enum Claim<V> {
    /// The key is new: push, and publish the progress here.
    Owner(Progress<V>),
    /// The key is taken by the same push: follow its progress.
    Follower(watch::Receiver<V>),
    /// The key is taken by a different push of the same target.
    Mismatch,
}

struct Entry<V> {
    at: Instant,
    fingerprint: u64,
    progress: Progress<V>,
}

/// Keys for `window`, by [`scoped`] key.
pub(crate) struct Keys<V> {
    map: HashMap<String, Entry<V>>,
    order: VecDeque<(Instant, String)>,
}

impl<V> Default for Keys<V> {
    fn default() -> Self {
        Keys {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

/// The cache key of `key` for one target: `kind` ("client" or "topic") and its name.
pub(crate) fn scoped(kind: &str, target: &str, key: &str) -> String {
    // The target's length keeps ("a:b", "c") and ("a", "b:c") apart.
    format!("{kind}:{}:{target}:{key}", target.len())
}

impl<V> Keys<V> {
    /// Claims `key` for a push whose fields hash to `fingerprint`.
    pub(crate) fn claim(
        &mut self,
        key: String,
        fingerprint: u64,
        window: Duration,
        initial: impl FnOnce() -> V,
    ) -> Claim<V> {
        let now = Instant::now();
        self.expire(now, window);
        if let Some(e) = self.map.get(&key) {
            return if e.fingerprint == fingerprint {
                Claim::Follower(e.progress.subscribe())
            } else {
                Claim::Mismatch
            };
        }
        let progress = Arc::new(watch::channel(initial()).0);
        let entry = Entry {
            at: now,
            fingerprint,
            progress: progress.clone(),
        };
        self.map.insert(key.clone(), entry);
        self.order.push_back((now, key));
        Claim::Owner(progress)
    }

    /// Forgets `key` if `progress` still holds it (its push sent nothing).
    pub(crate) fn release(&mut self, key: &str, progress: &Progress<V>) {
        if self
            .map
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(&e.progress, progress))
        {
            self.map.remove(key);
        }
    }

    /// Forgets expired keys, oldest first; also bounds the memory.
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < window && self.order.len() < MAX_ENTRIES {
                break;
            }
            if let Some((at, k)) = self.order.pop_front() {
                if self.map.get(&k).is_some_and(|e| e.at == at) {
                    self.map.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    #[test]
    fn the_first_claim_owns_and_a_repeat_follows() {
        let mut k = Keys::default();
        assert!(matches!(k.claim("a".into(), 1, W, || 0), Claim::Owner(_)));
        assert!(matches!(
            k.claim("a".into(), 1, W, || 0),
            Claim::Follower(_)
        ));
        assert!(matches!(k.claim("a".into(), 2, W, || 0), Claim::Mismatch));
    }

    #[test]
    fn keys_are_forgotten_after_the_window_or_on_release() {
        let mut k = Keys::default();
        assert!(matches!(
            k.claim("a".into(), 1, Duration::ZERO, || 0),
            Claim::Owner(_)
        ));
        assert!(matches!(
            k.claim("a".into(), 2, Duration::ZERO, || 0),
            Claim::Owner(_)
        ));
        let Claim::Owner(p) = k.claim("b".into(), 1, W, || 0) else {
            panic!("new key")
        };
        k.release("b", &p);
        assert!(matches!(k.claim("b".into(), 2, W, || 0), Claim::Owner(_)));
    }

    #[test]
    fn scopes_do_not_collide() {
        assert_ne!(scoped("client", "a:b", "c"), scoped("client", "a", "b:c"));
        assert_ne!(scoped("client", "x", "k"), scoped("topic", "x", "k"));
    }
}
