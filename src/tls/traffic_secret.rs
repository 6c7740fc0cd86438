//! TLS 1.3 application traffic secrets (RFC 8446 §7.1), kept beside a record-layer
//! connection's keys so that it can follow a KeyUpdate (§4.6.3): the client's secret
//! when the client moves its sending key on, ours when the client asks us to, or when
//! our sending key nears its record limit.
//!
//! rustls' buffered `ServerConnection` hands over the traffic keys but not the secrets
//! the next generation derives from, so they are taken from its key log during the
//! handshake: [`SecretLog`] is the `ServerConfig`'s `key_log`. rustls calls it from
//! inside `process_new_packets`, on the thread driving that one connection; it keeps the
//! two application secrets in a thread-local slot, and the caller takes them
//! ([`take_logged`]) right after the call, into that connection's state. A secret is
//! used only once the key and IV derived from it equal the ones rustls hands over
//! ([`TrafficSecret::derives`]), so a secret that reached the wrong connection would be
//! dropped, never used.
//!
//! Invariants: a secret is 32 bytes (SHA-256 suites) or 48 (SHA-384), or unknown
//! (`len == 0`). A `TrafficSecret` is wiped when dropped; that is best effort, as for
//! the keys: copies a move leaves behind, and ring's HMAC key built from it for a
//! derivation, are not.

use std::cell::RefCell;

use ring::hkdf;

/// The longest traffic secret (the SHA-384 suites').
const MAX_SECRET: usize = 48;
const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

/// One direction's current application traffic secret, or none known.
#[derive(Clone)]
pub struct TrafficSecret {
    bytes: [u8; MAX_SECRET],
    len: u8,
}

impl Default for TrafficSecret {
    /// None known.
    fn default() -> Self {
        TrafficSecret {
            bytes: [0; MAX_SECRET],
            len: 0,
        }
    }
}

impl TrafficSecret {
    /// A secret of a TLS 1.3 hash's length (32 or 48 bytes); `None` otherwise.
    pub fn new(secret: &[u8]) -> Option<Self> {
        if secret.len() != 32 && secret.len() != MAX_SECRET {
            return None;
        }
        let mut s = TrafficSecret {
            len: secret.len() as u8,
            ..Default::default()
        };
        s.bytes[..secret.len()].copy_from_slice(secret);
        Some(s)
    }

    /// Whether a secret is known (a KeyUpdate can be followed).
    pub fn is_known(&self) -> bool {
        self.len > 0
    }

    /// The next generation (RFC 8446 §7.2): HKDF-Expand-Label(secret, "traffic upd",
    /// "", Hash.length). Unknown stays unknown.
    pub fn next(&self) -> Self {
        let mut next = TrafficSecret {
            len: self.len,
            ..Default::default()
        };
        if self.is_known() {
            let len = usize::from(self.len);
            self.expand_label(b"traffic upd", &mut next.bytes[..len]);
        }
        next
    }

    /// Fills `key` (its length is the AEAD's) and `iv` with the traffic key and IV this
    /// secret derives (RFC 8446 §7.3). Nothing for an unknown secret.
    pub fn derive(&self, key: &mut [u8], iv: &mut [u8; 12]) {
        if self.is_known() {
            self.expand_label(b"key", key);
            self.expand_label(b"iv", iv);
        }
    }

    /// Whether this secret derives exactly `key` and `iv`.
    pub fn derives(&self, key: &[u8], iv: &[u8]) -> bool {
        let (mut k, mut i) = ([0u8; 32], [0u8; 12]);
        if !self.is_known() || key.len() > k.len() {
            return false;
        }
        self.derive(&mut k[..key.len()], &mut i);
        let same = k[..key.len()] == *key && i[..] == *iv;
        wipe(&mut k);
        wipe(&mut i);
        same
    }

    /// HKDF-Expand-Label(secret, `label`, "", `out.len()`) (RFC 8446 §7.1).
    fn expand_label(&self, label: &[u8], out: &mut [u8]) {
        let algorithm = match self.len {
            32 => hkdf::HKDF_SHA256,
            _ => hkdf::HKDF_SHA384,
        };
        let prk = hkdf::Prk::new_less_safe(algorithm, &self.bytes[..usize::from(self.len)]);
        let out_len = (out.len() as u16).to_be_bytes();
        let label_len = [(b"tls13 ".len() + label.len()) as u8];
        let info: [&[u8]; 5] = [&out_len, &label_len, b"tls13 ", label, &[0]];
        // Lengths of a key, an IV or a hash are far below HKDF's 255 blocks.
        prk.expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .expect("HKDF output of a TLS key's length");
    }
}

impl Drop for TrafficSecret {
    fn drop(&mut self) {
        wipe(&mut self.bytes);
    }
}

/// Overwrites `bytes` with zeros in a way the compiler keeps.
pub(super) fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to one byte.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Both application traffic secrets of one handshake, as rustls logged them.
#[derive(Clone, Default)]
pub struct LoggedSecrets {
    /// The client's: what the server opens with.
    pub client: TrafficSecret,
    /// The server's: what the server seals with.
    pub server: TrafficSecret,
}

thread_local! {
    static LOGGED: RefCell<Option<Box<LoggedSecrets>>> = const { RefCell::new(None) };
}

/// The `ServerConfig::key_log` that keeps the application traffic secrets of the
/// handshake this thread is processing (see the module doc); nothing is written out.
#[derive(Debug)]
pub struct SecretLog;

impl rustls::KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        // rustls logs TLS 1.2's master secret without asking `will_log`.
        if !self.will_log(label) {
            return;
        }
        let Some(secret) = TrafficSecret::new(secret) else {
            return;
        };
        LOGGED.with(|slot| {
            let mut slot = slot.borrow_mut();
            let logged = slot.get_or_insert_with(Default::default);
            match label {
                CLIENT_SECRET => logged.client = secret,
                SERVER_SECRET => logged.server = secret,
                _ => {}
            }
        });
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }
}

/// Has rustls queue for sending the KeyUpdate it owes the client, if any. rustls answers a
/// client's update_requested by moving its sending key on at once but keeps our
/// KeyUpdate aside until it next sends something (`wants_write` says nothing of it); a
/// hand-over without it would leave the client on the old key. An empty write makes
/// rustls put it out and sends nothing else.
pub fn release_owed_key_update(conn: &mut rustls::ServerConnection) {
    use std::io::Write;
    let _ = conn.writer().write(&[]);
}

/// What [`SecretLog`] kept on this thread since the last call: the secrets of the
/// handshake step just processed, if it derived them.
pub fn take_logged() -> Option<Box<LoggedSecrets>> {
    LOGGED.with(|slot| slot.borrow_mut().take())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8448 §3 (simple 1-RTT handshake, TLS_AES_128_GCM_SHA256): the server's
    /// application traffic secret and the write key and IV it derives.
    #[test]
    fn derives_rfc8448_keys() {
        let secret = TrafficSecret::new(&hex(
            "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643",
        ))
        .unwrap();
        let (mut key, mut iv) = ([0u8; 16], [0u8; 12]);
        secret.derive(&mut key, &mut iv);
        assert_eq!(key.to_vec(), hex("9f02283b6c9c07efc26bb9f2ac92e356"));
        assert_eq!(iv.to_vec(), hex("cf782b88dd83549aadf1e984"));
        assert!(secret.derives(&key, &iv));
        assert!(!secret.next().derives(&key, &iv));
        key[0] ^= 1;
        assert!(!secret.derives(&key, &iv));
    }

    #[test]
    fn only_tls13_hash_lengths_are_secrets() {
        assert!(TrafficSecret::new(&[7; 31]).is_none());
        assert!(TrafficSecret::new(&[7; 64]).is_none());
        assert!(TrafficSecret::new(&[7; 48]).unwrap().is_known());
        let unknown = TrafficSecret::default();
        assert!(!unknown.next().is_known());
        assert!(!unknown.derives(&[0; 16], &[0; 12]));
    }

    /// A generation differs from the last and is a function of it alone.
    #[test]
    fn generations_are_deterministic_and_distinct() {
        for len in [32, 48] {
            let s0 = TrafficSecret::new(&vec![9; len]).unwrap();
            let (s1, again) = (s0.next(), s0.next());
            assert_eq!(s1.bytes, again.bytes);
            assert_ne!(s1.bytes[..len], s0.bytes[..len]);
            assert_eq!(s1.len, s0.len);
        }
    }
}
