//! The TLS 1.3 and TLS 1.2 record layer a connection uses once rustls has finished its
//! handshake.
//!
//! rustls' buffered `ServerConnection` keeps ~7.4 KB of heap per connection for its whole
//! life (its receive buffer, its send queue, the key schedule). An idle MQTT device sends
//! a PINGREQ every minute or so; it should cost what a plain connection costs. So rustls
//! runs the handshake (certificates, mTLS, tickets, reload all stay its business), and at
//! its end the shard takes the traffic keys out of it (`extract`) and drops it. From then
//! on this module protects and opens the application records itself:
//!
//! - per direction one [`DirectionKeys`]: the AEAD key, the 12-byte IV, the sequence
//!   number and the protocol version, 56 bytes; and for TLS 1.3, out of line, both
//!   traffic secrets ([`KeyUpdates`], 112 bytes of heap);
//! - TLS 1.3 (RFC 8446 §5): nonce = IV xor the sequence number (big-endian,
//!   left-padded); AAD = the 5-byte record header; inner plaintext = data ‖ content type
//!   ‖ zero padding; the outer type is always application data;
//! - TLS 1.2 (RFC 5246 §6.2.3.3): AAD = sequence number ‖ type ‖ version ‖ plaintext
//!   length; AES-GCM (RFC 5288) sends an 8-byte explicit nonce before the ciphertext
//!   (ours: the last 8 bytes of IV xor the sequence number, as rustls does; the peer's is
//!   read from its record, behind the 4-byte salt), ChaCha20-Poly1305 (RFC 7905) none
//!   (nonce as in TLS 1.3); the header carries the real content type;
//! - at most 2^14 plaintext bytes per record, 2^14 + 256 ciphertext bytes (a TLS 1.2
//!   AEAD record never needs more);
//! - the ring `LessSafeKey` (AES round keys and GHASH tables, ~0.5 KB) is built per
//!   read or write batch ([`RecordKeys::opener`], [`RecordKeys::sealer`]) and dropped
//!   with it, so nothing key-schedule-sized stays with an idle connection.
//!
//! Invariants: a sequence number is used once per key (it only grows; a record that fails
//! to open ends the connection, so no number is retried); records are opened in place
//! (the caller's buffer holds exactly one whole record, see [`record_len`]); nothing here
//! keeps a buffer. What it refuses, [`RecordError`] names, with the alert to send.
//!
//! KeyUpdate (TLS 1.3, RFC 8446 §4.6.3): the traffic secrets come from rustls' key log
//! (`tls/traffic_secret.rs`; its buffered connection gives out keys, not secrets). A
//! client's KeyUpdate, alone in its record, moves the receiving key to the next
//! generation for the records after it; if it asks for ours (update_requested), our
//! KeyUpdate goes out before our next record (`KeyUpdates::owed`), and the sending key moves
//! on after it. Our sending key also moves on by itself one record before the AES-GCM
//! confidentiality limit (2^24.5 records, RFC 8446 §5.5). A connection whose secrets are
//! unknown refuses a KeyUpdate with an alert, and closes at the limit, as one without
//! this support would; KeyUpdates rustls followed before the hand-over are caught up
//! with (up to 32 generations). More than 32 KeyUpdates without application data
//! between them close the connection (each costs key derivations; rustls allows 32).
//!
//! Not supported, and refused with an alert (the connection closes and the device
//! reconnects): a TLS 1.2 renegotiation request (rustls answers the first with a
//! no_renegotiation warning and goes on; closing is stricter and a device just
//! reconnects); and sending past the AES-GCM limit of TLS 1.2 (2^24 records, as rustls
//! keeps), which has no KeyUpdate. Receiving has no limit of ours.

use std::fmt;
use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

use super::traffic_secret::{wipe, LoggedSecrets, TrafficSecret};

/// The record header: type, legacy version (2 bytes), length (2 bytes).
pub const HEADER_LEN: usize = 5;
/// The most plaintext one record carries.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The most ciphertext one TLS 1.3 record may carry (RFC 8446 §5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;
const KEY_UPDATE: u8 = 24;
/// Our KeyUpdate: the message type, its 3-byte length (1), update_not_requested.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// Records one AES-GCM key may send in TLS 1.3 (2^24.5, RFC 8446 §5.5).
const AES_GCM_RECORD_LIMIT: u64 = 23_726_566;
/// Records one AES-GCM key may send in TLS 1.2, where no KeyUpdate exists (2^24, the
/// limit rustls applies to its own TLS 1.2 connections).
const AES_GCM_TLS12_RECORD_LIMIT: u64 = 1 << 24;

/// The protocol version a connection negotiated: it decides the record format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

/// The AEAD a connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    /// Bytes of explicit nonce a TLS 1.2 record of this suite carries before its
    /// ciphertext (RFC 5288 §3; none for ChaCha20-Poly1305, RFC 7905 §2).
    fn explicit_nonce_len(self) -> usize {
        match self {
            Suite::Chacha20Poly1305 => 0,
            _ => 8,
        }
    }

    /// Records one key may send in `version` (receiving has no limit but the sequence
    /// number's own: the sender keeps to its limit).
    fn send_limit(self, version: Version) -> u64 {
        match (self, version) {
            (Suite::Chacha20Poly1305, _) => u64::MAX,
            (_, Version::Tls13) => AES_GCM_RECORD_LIMIT,
            (_, Version::Tls12) => AES_GCM_TLS12_RECORD_LIMIT,
        }
    }
}

/// Why a record was refused (or could not be sent); the connection ends with
/// [`RecordError::alert`] sent to the peer, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// A record failed authentication (tampered, or not from this session).
    BadRecordMac,
    /// A record longer than TLS 1.3 allows.
    RecordOverflow,
    /// A record or message this layer does not accept after the handshake.
    UnexpectedMessage(&'static str),
    /// The client sent a KeyUpdate on a connection whose traffic secret is unknown.
    KeyUpdate,
    /// A field with a value the protocol does not define.
    IllegalParameter(&'static str),
    /// The peer sent a fatal alert (its description code).
    PeerAlert(u8),
    /// The sending key reached its record limit.
    KeyExhausted,
    /// rustls negotiated something this layer does not handle.
    Unsupported(&'static str),
}

impl RecordError {
    /// The alert description to send the peer before closing (none after its own alert).
    pub fn alert(&self) -> Option<u8> {
        match self {
            RecordError::BadRecordMac => Some(BAD_RECORD_MAC),
            RecordError::RecordOverflow => Some(RECORD_OVERFLOW),
            RecordError::UnexpectedMessage(_) | RecordError::KeyUpdate => Some(UNEXPECTED_MESSAGE),
            RecordError::IllegalParameter(_) => Some(ILLEGAL_PARAMETER),
            RecordError::PeerAlert(_) => None,
            RecordError::KeyExhausted | RecordError::Unsupported(_) => Some(INTERNAL_ERROR),
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::BadRecordMac => f.write_str("TLS record failed authentication"),
            RecordError::RecordOverflow => f.write_str("TLS record too long"),
            RecordError::UnexpectedMessage(what) => write!(f, "unexpected TLS {what}"),
            RecordError::KeyUpdate => {
                f.write_str("TLS KeyUpdate from the client, whose traffic secret is unknown")
            }
            RecordError::IllegalParameter(what) => write!(f, "illegal TLS {what}"),
            RecordError::PeerAlert(d) => write!(f, "peer sent TLS alert {d}"),
            RecordError::KeyExhausted => f.write_str("TLS sending key used up"),
            RecordError::Unsupported(what) => write!(f, "unsupported TLS {what}"),
        }
    }
}

impl std::error::Error for RecordError {}

/// The length of the whole record at the front of `buf` (header included), once all of
/// it is there; `Ok(None)` while it is not. Refuses a length TLS 1.3 does not allow.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::RecordOverflow);
    }
    let total = HEADER_LEN + len;
    Ok((buf.len() >= total).then_some(total))
}

/// Where in its record a stream of ciphertext ends: the bytes of a record header seen so
/// far, or the body bytes still to come. The shard keeps one per connection while rustls
/// runs, to know when rustls holds no partial record (then it may be dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    header: [u8; HEADER_LEN],
    have: u8,
    left: u16,
}

impl Cursor {
    /// `bytes` more of the stream went by.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let take = bytes.len().min(usize::from(self.left));
                self.left -= take as u16;
                bytes = &bytes[take..];
                continue;
            }
            let have = usize::from(self.have);
            let take = bytes.len().min(HEADER_LEN - have);
            self.header[have..have + take].copy_from_slice(&bytes[..take]);
            self.have += take as u8;
            bytes = &bytes[take..];
            if usize::from(self.have) == HEADER_LEN {
                self.have = 0;
                self.left = u16::from_be_bytes([self.header[3], self.header[4]]);
            }
        }
    }

    /// The stream so far ends with a whole record (or is empty).
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// One direction's traffic key, IV, next sequence number and record format (56 bytes).
pub struct DirectionKeys {
    key: [u8; 32],
    iv: [u8; NONCE_LEN],
    seq: u64,
    key_len: u8,
    suite: Suite,
    version: Version,
}

impl DirectionKeys {
    fn new(
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
        version: Version,
    ) -> Result<Self, RecordError> {
        let (suite, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Suite::Chacha20Poly1305, key, iv)
            }
            _ => return Err(RecordError::Unsupported("cipher suite")),
        };
        let (key, iv) = (key.as_ref(), iv.as_ref());
        if key.len() != suite.algorithm().key_len() || iv.len() != NONCE_LEN {
            return Err(RecordError::Unsupported("key or IV length"));
        }
        let mut d = DirectionKeys {
            key: [0; 32],
            iv: [0; NONCE_LEN],
            seq,
            key_len: key.len() as u8,
            suite,
            version,
        };
        d.key[..key.len()].copy_from_slice(key);
        d.iv.copy_from_slice(iv);
        Ok(d)
    }

    /// The generation of `secret` (TLS 1.3) that derives exactly this key and IV: the
    /// logged one, or a later one if rustls followed KeyUpdates before the hand-over.
    fn current(&self, secret: &TrafficSecret) -> Option<TrafficSecret> {
        if self.version != Version::Tls13 {
            return None;
        }
        let key = &self.key[..usize::from(self.key_len)];
        let mut s = secret.clone();
        for _ in 0..=GENERATIONS_BEHIND {
            if s.derives(key, &self.iv) {
                return Some(s);
            }
            s = s.next();
        }
        None
    }

    /// Moves to the next generation of keys (a KeyUpdate), `secret` with it, numbering
    /// from 0 again.
    fn update(&mut self, secret: &mut TrafficSecret) {
        *secret = secret.next();
        let len = usize::from(self.key_len);
        secret.derive(&mut self.key[..len], &mut self.iv);
        self.seq = 0;
    }

    /// One record is left under the sending limit (for our KeyUpdate).
    fn at_last_record(&self) -> bool {
        self.seq + 1 >= self.suite.send_limit(self.version)
    }

    /// The ring key for one batch of records.
    fn less_safe_key(&self) -> LessSafeKey {
        let key = &self.key[..usize::from(self.key_len)];
        // The length matched the algorithm when rustls derived it.
        let unbound = UnboundKey::new(self.suite.algorithm(), key)
            .expect("a traffic key of its suite's length");
        LessSafeKey::new(unbound)
    }

    /// Takes the next sequence number, below `limit`: it, and IV xor it (the nonce of
    /// every record but a received TLS 1.2 AES-GCM one).
    fn next(&mut self, limit: u64) -> Result<(u64, [u8; NONCE_LEN]), RecordError> {
        if self.seq >= limit.min(u64::MAX - 1) {
            return Err(RecordError::KeyExhausted);
        }
        let seq = self.seq;
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok((seq, nonce))
    }
}

impl DirectionKeys {
    /// The next number of a record to open.
    fn next_in(&mut self) -> Result<(u64, [u8; NONCE_LEN]), RecordError> {
        self.next(u64::MAX)
    }

    /// The next number of a record to seal, within the key's sending limit.
    fn next_out(&mut self) -> Result<(u64, [u8; NONCE_LEN]), RecordError> {
        self.next(self.suite.send_limit(self.version))
    }
}

impl Drop for DirectionKeys {
    fn drop(&mut self) {
        // Best effort: this copy of the key and IV is wiped (volatile writes, which the
        // compiler keeps; the secret wipes itself). Copies a map left behind when it
        // moved or grew are not.
        wipe(&mut self.key);
        wipe(&mut self.iv);
    }
}

/// Both directions of one connection's record protection.
pub struct RecordKeys {
    rx: DirectionKeys,
    tx: DirectionKeys,
    /// What following KeyUpdates takes: TLS 1.3 with both secrets known.
    updates: Option<Box<KeyUpdates>>,
}

/// A TLS 1.3 connection's traffic secrets, out of line: an idle TLS 1.2 connection, or
/// one whose secrets are unknown, pays one pointer for them.
struct KeyUpdates {
    /// The client's: the receiving key derives from it.
    rx: TrafficSecret,
    /// Ours: the sending key derives from it.
    tx: TrafficSecret,
    /// The client asked for our KeyUpdate; it goes before our next record.
    owed: bool,
    /// The client's KeyUpdates since its last non-empty application data.
    in_a_row: u8,
}

/// The most KeyUpdates a client may send without application data between them.
const KEY_UPDATES_IN_A_ROW: u8 = 32;

/// How many generations a secret may have moved on before the hand-over (KeyUpdates
/// rustls followed while it still ran the connection).
const GENERATIONS_BEHIND: usize = 32;

/// What an opened record carried.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: these bytes of the record buffer (possibly none).
    Data(Range<usize>),
    /// The peer's close_notify: the end of its stream.
    CloseNotify,
    /// Nothing for the application (a user_canceled warning).
    Nothing,
}

impl RecordKeys {
    /// The keys and sequence numbers rustls hands over at the end of a handshake that
    /// negotiated `version`, with the traffic secrets its key log gave (TLS 1.3), each
    /// kept only if it derives its direction's key.
    pub fn from_secrets(
        s: &rustls::ExtractedSecrets,
        version: Version,
        logged: Option<&LoggedSecrets>,
    ) -> Result<Self, RecordError> {
        let rx = DirectionKeys::new(s.rx.0, &s.rx.1, version)?;
        let tx = DirectionKeys::new(s.tx.0, &s.tx.1, version)?;
        let updates = logged.and_then(|l| {
            Some(Box::new(KeyUpdates {
                rx: rx.current(&l.client)?,
                tx: tx.current(&l.server)?,
                owed: false,
                in_a_row: 0,
            }))
        });
        Ok(RecordKeys { rx, tx, updates })
    }

    /// Whether KeyUpdates can be followed (TLS 1.3 with known secrets).
    pub fn follows_key_updates(&self) -> bool {
        self.updates.is_some()
    }

    /// The suite both directions use.
    pub fn suite(&self) -> Suite {
        self.tx.suite
    }

    /// Opens the records of one read batch.
    pub fn opener(&mut self) -> Opener<'_> {
        Opener {
            key: self.rx.less_safe_key(),
            dir: &mut self.rx,
            updates: self.updates.as_deref_mut(),
        }
    }

    /// Seals the records of one write batch.
    pub fn sealer(&mut self) -> Sealer<'_> {
        Sealer {
            key: self.tx.less_safe_key(),
            dir: &mut self.tx,
            updates: self.updates.as_deref_mut(),
        }
    }
}

/// The receiving key of one read batch.
pub struct Opener<'a> {
    key: LessSafeKey,
    dir: &'a mut DirectionKeys,
    updates: Option<&'a mut KeyUpdates>,
}

impl Opener<'_> {
    /// Opens one whole record (`record` is exactly it, see [`record_len`]) in place.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        match record[0] {
            CHANGE_CIPHER_SPEC => Err(RecordError::UnexpectedMessage("change_cipher_spec")),
            _ if self.dir.version == Version::Tls12 => self.open12(record),
            APPLICATION_DATA => self.open13(record),
            _ => Err(RecordError::UnexpectedMessage("plaintext record")),
        }
    }

    /// A TLS 1.3 record: the real content type is inside.
    fn open13(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let (header, body) = record.split_at_mut(HEADER_LEN);
        if body.len() < TAG_LEN + 1 {
            return Err(RecordError::BadRecordMac);
        }
        let (_, nonce) = self.dir.next_in()?;
        let aad = Aad::from([header[0], header[1], header[2], header[3], header[4]]);
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), aad, body)
            .map_err(|_| RecordError::BadRecordMac)?;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::UnexpectedMessage(
                "record without content type",
            ));
        };
        if end > MAX_PLAINTEXT {
            return Err(RecordError::RecordOverflow);
        }
        let data = HEADER_LEN..HEADER_LEN + end;
        match plain[end] {
            APPLICATION_DATA => {
                if let (Some(u), true) = (self.updates.as_deref_mut(), end > 0) {
                    u.in_a_row = 0;
                }
                Ok(Opened::Data(data))
            }
            ALERT => alert(&plain[..end], Version::Tls13),
            HANDSHAKE => self.key_update(&plain[..end]),
            _ => Err(RecordError::UnexpectedMessage("content type")),
        }
    }

    /// A TLS 1.2 record: the header's type is the content type; a handshake message
    /// now would be a renegotiation, refused unread.
    fn open12(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let typ = header[0];
        match typ {
            APPLICATION_DATA | ALERT => {}
            HANDSHAKE => return Err(RecordError::UnexpectedMessage("renegotiation")),
            _ => return Err(RecordError::UnexpectedMessage("content type")),
        }
        let explicit = self.dir.suite.explicit_nonce_len();
        if body.len() < explicit + TAG_LEN {
            return Err(RecordError::BadRecordMac);
        }
        let plain_len = body.len() - explicit - TAG_LEN;
        if plain_len > MAX_PLAINTEXT {
            return Err(RecordError::RecordOverflow);
        }
        let (seq, mut nonce) = self.dir.next_in()?;
        if explicit > 0 {
            // AES-GCM: the salt (the IV's first 4 bytes), then the sender's explicit part.
            nonce[..4].copy_from_slice(&self.dir.iv[..4]);
            nonce[4..].copy_from_slice(&body[..explicit]);
        }
        let aad = tls12_aad(seq, typ, [header[1], header[2]], plain_len);
        let nonce = Nonce::assume_unique_for_key(nonce);
        let plain = self
            .key
            .open_within(nonce, aad, body, explicit..)
            .map_err(|_| RecordError::BadRecordMac)?;
        if typ == ALERT {
            return alert(plain, Version::Tls12);
        }
        Ok(Opened::Data(HEADER_LEN..HEADER_LEN + plain_len))
    }

    /// A handshake message after the handshake: only a KeyUpdate (RFC 8446 §4.6.3), the
    /// whole of its record (a key change must end its record, §5.1). The records after
    /// it open with the next generation's key; an update_requested owes ours.
    fn key_update(&mut self, msg: &[u8]) -> Result<Opened, RecordError> {
        let requested = match msg {
            [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => *request == 1,
            [KEY_UPDATE, 0, 0, 1, _] => return Err(RecordError::IllegalParameter("KeyUpdate")),
            [KEY_UPDATE, ..] => {
                return Err(RecordError::UnexpectedMessage(
                    "KeyUpdate not alone in its record",
                ))
            }
            _ => {
                return Err(RecordError::UnexpectedMessage(
                    "handshake message after the handshake",
                ))
            }
        };
        let Some(updates) = self.updates.as_deref_mut() else {
            return Err(RecordError::KeyUpdate);
        };
        // Each costs three key derivations and a new AES key schedule: a client sending
        // nothing else must not keep the shard busy with them (rustls allows 32 too).
        updates.in_a_row += 1;
        if updates.in_a_row > KEY_UPDATES_IN_A_ROW {
            return Err(RecordError::UnexpectedMessage(
                "KeyUpdates without application data",
            ));
        }
        self.dir.update(&mut updates.rx);
        updates.owed |= requested;
        self.key = self.dir.less_safe_key();
        Ok(Opened::Nothing)
    }
}

/// The TLS 1.2 additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], len: usize) -> Aad<[u8; 13]> {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    Aad::from(aad)
}

/// What [`Opener::open_many`] did with a buffer of records.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    /// The application bytes of the opened records, now at the front of the buffer.
    pub plain: usize,
    /// The bytes of whole records consumed; a partial record from here on is left.
    pub used: usize,
    /// Why it stopped before the end: the peer's close_notify, or a refused record.
    pub end: Option<Result<(), RecordError>>,
}

impl Opener<'_> {
    /// Opens the whole records at the front of `buf` in place and moves their
    /// application bytes to its front, in order; stops at a partial record, at the
    /// peer's close_notify or at the first refused record.
    pub fn open_many(&mut self, buf: &mut [u8]) -> Batch {
        let (mut plain, mut used) = (0, 0);
        let end = loop {
            let len = match record_len(&buf[used..]) {
                Ok(Some(len)) => len,
                Ok(None) => break None,
                Err(e) => break Some(Err(e)),
            };
            let record = &mut buf[used..used + len];
            match self.open(record) {
                Ok(Opened::Data(r)) => {
                    let n = r.len();
                    buf.copy_within(used + r.start..used + r.end, plain);
                    plain += n;
                }
                Ok(Opened::Nothing) => {}
                Ok(Opened::CloseNotify) => break Some(Ok(())),
                Err(e) => break Some(Err(e)),
            }
            used += len;
        };
        Batch { plain, used, end }
    }
}

/// An alert from the peer: its close_notify ends the stream, a user_canceled warning is
/// nothing (a close_notify follows), anything else ends the connection. TLS 1.3 ignores
/// the level (RFC 8446 §6); TLS 1.2 ends on a fatal user_canceled and refuses a level
/// that is neither warning (1) nor fatal (2).
fn alert(body: &[u8], version: Version) -> Result<Opened, RecordError> {
    const WARNING: u8 = 1;
    const FATAL: u8 = 2;
    match (version, body) {
        (_, [_, CLOSE_NOTIFY]) => Ok(Opened::CloseNotify),
        (Version::Tls13, [_, USER_CANCELED]) | (Version::Tls12, [WARNING, USER_CANCELED]) => {
            Ok(Opened::Nothing)
        }
        (Version::Tls12, [level, _]) if *level != WARNING && *level != FATAL => {
            Err(RecordError::UnexpectedMessage("alert level"))
        }
        (_, [_, d]) => Err(RecordError::PeerAlert(*d)),
        _ => Err(RecordError::UnexpectedMessage("alert length")),
    }
}

/// The sending key of one write batch.
pub struct Sealer<'a> {
    key: LessSafeKey,
    dir: &'a mut DirectionKeys,
    updates: Option<&'a mut KeyUpdates>,
}

impl Sealer<'_> {
    /// Appends `data` to `out` as application-data records of at most 2^14 bytes each.
    pub fn seal_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.seal(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends a close_notify alert record to `out`.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal(ALERT, &[1, CLOSE_NOTIFY], out)
    }

    /// Appends a fatal alert record with description `alert` to `out`.
    pub fn seal_alert(&mut self, alert: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal(ALERT, &[2, alert], out)
    }

    /// One record of content type `typ` in the connection's format.
    /// A record that cannot be sealed leaves nothing in `out` (no plaintext goes out).
    fn seal(&mut self, typ: u8, plain: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        debug_assert!(plain.len() <= MAX_PLAINTEXT);
        let at = out.len();
        let sealed = match self.dir.version {
            Version::Tls13 => self.seal13(typ, plain, out),
            Version::Tls12 => self.seal12(typ, plain, out),
        };
        if sealed.is_err() {
            out.truncate(at);
        }
        sealed
    }

    /// TLS 1.3: our KeyUpdate first if one is owed or due, then the record.
    fn seal13(&mut self, typ: u8, plain: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let due = self.dir.at_last_record();
        if self.updates.as_ref().is_some_and(|u| u.owed || due) {
            self.seal13_record(HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED, out)?;
            if let Some(updates) = self.updates.as_deref_mut() {
                self.dir.update(&mut updates.tx);
                updates.owed = false;
            }
            self.key = self.dir.less_safe_key();
        }
        self.seal13_record(typ, plain, out)
    }

    /// One TLS 1.3 record: header, then `plain` ‖ `typ` encrypted in place, then the
    /// tag.
    fn seal13_record(
        &mut self,
        typ: u8,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let (_, nonce) = self.dir.next_out()?;
        let len = (plain.len() + 1 + TAG_LEN) as u16;
        let [hi, lo] = len.to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        out.reserve(HEADER_LEN + usize::from(len));
        out.extend_from_slice(&header);
        let start = out.len();
        out.extend_from_slice(plain);
        out.push(typ);
        self.encrypt(nonce, Aad::from(header), start, out)
    }

    /// TLS 1.2: header (with the real type), the explicit nonce (AES-GCM), then `plain`
    /// encrypted in place, then the tag.
    fn seal12(&mut self, typ: u8, plain: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let (seq, nonce) = self.dir.next_out()?;
        let explicit = self.dir.suite.explicit_nonce_len();
        let len = (explicit + plain.len() + TAG_LEN) as u16;
        let [hi, lo] = len.to_be_bytes();
        out.reserve(HEADER_LEN + usize::from(len));
        out.extend_from_slice(&[typ, 3, 3, hi, lo]);
        out.extend_from_slice(&nonce[NONCE_LEN - explicit..]);
        let start = out.len();
        out.extend_from_slice(plain);
        let aad = tls12_aad(seq, typ, [3, 3], plain.len());
        self.encrypt(nonce, aad, start, out)
    }

    /// Encrypts `out[start..]` in place and appends the tag.
    fn encrypt<A: AsRef<[u8]>>(
        &mut self,
        nonce: [u8; NONCE_LEN],
        aad: Aad<A>,
        start: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let nonce = Nonce::assume_unique_for_key(nonce);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aad, &mut out[start..])
            .map_err(|_| RecordError::Unsupported("sealing"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
