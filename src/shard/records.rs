//! A TLS connection's bytes after the socket: into rustls for the handshake, then through
//! the shard's own record layer (`tls/record.rs`, TLS 1.3 and 1.2), so that an idle TLS
//! connection holds what an idle plain one holds plus its record keys (120 bytes in the
//! wire's `records` map, and for TLS 1.3 its traffic secrets, 112 bytes of heap), not
//! rustls' ~7.4 KB.
//!
//! Life of a TLS connection:
//! 1. rustls: each read lands in the scratch buffer and is given to rustls
//!    ([`Shard::tls_feed`]); a [`Cursor`](crate::tls::record::Cursor) follows where in
//!    its record that ciphertext ends. If the connection pauses mid-read, the ciphertext
//!    not yet given waits in `ConnBufs::tls_in` ([`Shard::tls_continue`] resumes it).
//! 2. Hand-over ([`Shard::tls_settle`], between reads, at the end of the turn's
//!    flush): once the CONNECT is answered (`Active`; a handoff to another shard and
//!    the client certificate's CN still use rustls), when rustls holds no
//!    partial record and no undelivered plaintext, what it still has to send moves to
//!    `ConnBufs::tls_out`, its traffic keys and sequence numbers are taken
//!    (`dangerous_extract_secrets`) into the `records` map with the TLS 1.3 traffic
//!    secrets its key log gave at the handshake (`ConnBufs::tls_secrets`), and rustls
//!    is dropped.
//! 3. Records: reads are opened in place in the scratch buffer ([`Shard::records_read`]),
//!    a partial record waits in `tls_in`; output is sealed into `tls_out` as the socket
//!    takes it ([`write_records`]); last words end with close_notify ([`last_words`]).
//!    A refused record (bad MAC, an alert, a KeyUpdate that cannot be followed…) is
//!    answered with its alert, logged once and closes the connection
//!    ([`Shard::records_fail`]).

use std::io::{self, Write};

use mio::net::TcpStream;

use crate::metrics::{DisconnectReason, ShardMetrics};
use crate::tls::record::{Batch, RecordError, RecordKeys, Version};

use super::conn::{ConnBufs, ConnState};
use super::transport::Transport;
use super::Shard;

/// Plaintext sealed at most per batch before writing; more is sealed as the socket takes
/// it, so what waits sealed is bounded like rustls' own send buffer was.
const SEAL_BATCH: usize = 64 * 1024;

impl Shard {
    /// The `n` bytes just read into the scratch buffer, on a connection still on rustls.
    pub(super) fn tls_read(&mut self, key: usize, n: usize) -> bool {
        self.with_scratch(key, n, Self::tls_feed)
    }

    /// The `n` bytes just read into the scratch buffer, on a connection on the record
    /// layer.
    pub(super) fn records_read(&mut self, key: usize, n: usize) -> bool {
        self.with_scratch(key, n, Self::records_open)
    }

    /// Runs `f` over the `n` bytes in the scratch buffer, behind any ciphertext the
    /// connection still keeps (`tls_in`). False when the connection is gone.
    fn with_scratch(
        &mut self,
        key: usize,
        n: usize,
        f: fn(&mut Self, usize, &mut [u8]) -> bool,
    ) -> bool {
        let mut scratch = std::mem::take(&mut self.wire.scratch);
        let kept = self.take_tls_in(key);
        let alive = if kept.is_empty() {
            f(self, key, &mut scratch[..n])
        } else {
            let mut kept = kept;
            self.wire.pool.reserve(&mut kept, n, self.clock.now);
            kept.extend_from_slice(&scratch[..n]);
            let alive = f(self, key, &mut kept);
            self.wire.pool.give(kept, self.clock.now);
            alive
        };
        self.wire.scratch = scratch;
        alive
    }

    fn take_tls_in(&mut self, key: usize) -> Vec<u8> {
        match self.wire.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) {
            Some(b) => std::mem::take(&mut b.tls_in),
            None => Vec::new(),
        }
    }

    /// Gives ciphertext to rustls and processes it (its plaintext goes on to the
    /// framer); if the connection pauses, the rest waits in `tls_in`. False when the
    /// connection is gone.
    pub(super) fn tls_feed(&mut self, key: usize, data: &mut [u8]) -> bool {
        let mut at = 0;
        while at < data.len() {
            let Some(bufs) = self.wire.conns.get_mut(key).and_then(|c| c.bufs.as_mut()) else {
                return false;
            };
            let Some(tls) = bufs.tls.as_mut() else {
                return false;
            };
            let mut rd = &data[at..];
            let taken = match tls.read_tls(&mut rd) {
                // rustls takes nothing after the peer's close_notify.
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) => {
                    ShardMetrics::add(&self.services.metrics.tls_failures, 1);
                    tracing::info!(shard = self.id, peer = %self.wire.conns[key].peer, error = %e, "TLS failed, closing");
                    self.close_conn(key, DisconnectReason::ProtocolError, None);
                    return false;
                }
            };
            bufs.tls_cursor.advance(&data[at..at + taken]);
            at += taken;
            if !self.tls_process_feeding(key, &data[at..]) {
                return false;
            }
            if self.wire.is_holding(key) && at < data.len() {
                self.append_tls_in(key, &data[at..]);
                return true;
            }
        }
        true
    }

    /// Opens the whole records in `data` and hands their plaintext to the framer; a
    /// trailing partial record waits in `tls_in`. False when the connection is gone.
    fn records_open(&mut self, key: usize, data: &mut [u8]) -> bool {
        let Some(keys) = self.wire.records.get_mut(&(key as u32)) else {
            // A TLS connection with neither rustls nor keys has no way to read.
            self.close_conn(key, DisconnectReason::ProtocolError, None);
            return false;
        };
        let Batch { plain, used, end } = keys.opener().open_many(data);
        if end.is_none() && used < data.len() {
            self.append_tls_in(key, &data[used..]);
        }
        if plain > 0 && !self.ingest_plaintext(key, &mut data[..plain]) {
            return false;
        }
        match end {
            None => true,
            Some(Ok(())) => {
                // close_notify: the client ended the TLS session.
                self.close_conn(key, DisconnectReason::CloseWait, None);
                false
            }
            Some(Err(e)) => {
                self.records_fail(key, e);
                false
            }
        }
    }

    /// A refused record: answers with its alert, logs once, closes. Nothing more goes
    /// out (the keys are gone, so the last words are not sent).
    fn records_fail(&mut self, key: usize, e: RecordError) {
        let keys = self.wire.records.remove(&(key as u32));
        let conn = &mut self.wire.conns[key];
        if let (Some(mut keys), Some(alert)) = (keys, e.alert()) {
            // Behind whatever sealed bytes still wait: alone, it could land in the middle
            // of a record.
            write_behind_sealed(&mut conn.socket, conn.bufs.as_deref_mut(), |wire| {
                let _ = keys.sealer().seal_alert(alert, wire);
            });
        }
        ShardMetrics::add(&self.services.metrics.tls_failures, 1);
        tracing::info!(shard = self.id, client_id = %self.client_id_of(key), peer = %self.wire.conns[key].peer, error = %e, "TLS record refused, closing");
        self.close_conn(key, DisconnectReason::ProtocolError, None);
    }

    /// [`Shard::tls_process`] within [`Shard::tls_feed`], `untaken` the ciphertext rustls
    /// has not taken yet: if the plaintext sends the connection to its home shard
    /// (`hand_off`), that ciphertext goes with it, after what the connection kept; if it
    /// was a CONNECT whose credentials are now checked off the shard, that ciphertext
    /// waits in `tls_in` (`on_auth_done` reads it). False when the connection is gone.
    fn tls_process_feeding(&mut self, key: usize, untaken: &[u8]) -> bool {
        let outer = self.wire.tls_feeding.replace(key);
        let alive = self.tls_process(key);
        self.wire.tls_feeding = outer;
        if let Some((home, mut handoff)) = self.wire.deferred_handoff.take() {
            handoff.tls_in.extend_from_slice(untaken);
            self.post_handoff(home, handoff);
        } else if !alive && self.authenticating(key) {
            self.append_tls_in(key, untaken);
        }
        alive
    }

    fn authenticating(&self, key: usize) -> bool {
        (self.wire.conns.get(key)).is_some_and(|c| c.state == ConnState::Authenticating)
    }

    /// Keeps ciphertext for the next read (or the resumption of a paused connection),
    /// after what connection `key` already keeps.
    pub(super) fn append_tls_in(&mut self, key: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut kept = self.take_tls_in(key);
        self.wire
            .pool
            .reserve(&mut kept, bytes.len(), self.clock.now);
        kept.extend_from_slice(bytes);
        let bufs = self.wire.conns[key]
            .bufs
            .get_or_insert_with(Default::default);
        bufs.tls_in = kept;
    }

    /// Ciphertext read past the CONNECT elsewhere (on another shard, or by the TLS
    /// handshake thread), fed as if just read; kept in `tls_in` while the connection
    /// pauses or its credentials are being checked. False when the connection is gone.
    pub(super) fn tls_carried(&mut self, key: usize, carried: &mut [u8]) -> bool {
        if !self.wire.conns.contains(key) {
            return false;
        }
        if carried.is_empty() {
            return true;
        }
        if self.authenticating(key) || self.wire.is_holding(key) {
            self.append_tls_in(key, carried);
            return true;
        }
        self.tls_feed(key, carried)
    }

    /// Feeds the ciphertext a connection kept (`tls_carried`) once it may be read. False
    /// when the connection is gone.
    pub(super) fn tls_carried_kept(&mut self, key: usize) -> bool {
        let mut kept = self.take_tls_in(key);
        let alive = self.tls_carried(key, &mut kept);
        self.wire.pool.give(kept, self.clock.now);
        alive
    }

    /// Handles, after a pause, the TLS bytes a connection still holds: plaintext inside
    /// rustls, then ciphertext kept in `tls_in`. True to read it again.
    pub(super) fn tls_continue(&mut self, key: usize) -> bool {
        let Some(conn) = self.wire.conns.get(key) else {
            return false;
        };
        if conn.is_tls() && (!self.tls_process(key) || self.wire.is_holding(key)) {
            return false;
        }
        let via = Transport::of(&self.wire.conns[key]);
        let mut kept = self.take_tls_in(key);
        if kept.is_empty() {
            return true;
        }
        let alive = match via {
            Transport::Tls => self.tls_feed(key, &mut kept),
            _ => self.records_open(key, &mut kept),
        };
        self.wire.pool.give(kept, self.clock.now);
        alive && !self.wire.is_holding(key)
    }

    /// Moves an established TLS 1.2 or 1.3 connection from rustls to the record layer when
    /// rustls holds nothing half-done (see the module doc); else leaves it for a later
    /// turn. Called between reads.
    pub(super) fn tls_settle(&mut self, key: usize) {
        let Some(conn) = self.wire.conns.get_mut(key) else {
            return;
        };
        let Some(bufs) = conn
            .bufs
            .as_mut()
            .filter(|_| conn.state == ConnState::Active)
        else {
            return;
        };
        let Some(tls) = bufs.tls.as_mut() else {
            return;
        };
        let version = match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Version::Tls13,
            Some(rustls::ProtocolVersion::TLSv1_2) => Version::Tls12,
            _ => return,
        };
        if tls.is_handshaking()
            || !bufs.tls_cursor.at_boundary()
            || !tls
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() == 0)
        {
            return;
        }
        // What rustls still has to send (session tickets, output, the KeyUpdate it owes)
        // goes out first.
        crate::tls::traffic_secret::release_owed_key_update(tls);
        while tls.wants_write() {
            if tls.write_tls(&mut bufs.tls_out).is_err() {
                return;
            }
        }
        let sealed = !bufs.tls_out.is_empty();
        let Some(tls) = bufs.tls.take() else {
            return;
        };
        let logged = bufs.tls_secrets.take();
        let keys = tls
            .dangerous_extract_secrets()
            .map_err(|e| e.to_string())
            .and_then(|s| {
                RecordKeys::from_secrets(&s, version, logged.as_deref()).map_err(|e| e.to_string())
            });
        match keys {
            Ok(keys) => {
                self.wire.records.insert(key as u32, keys);
                if sealed {
                    self.wire.mark_dirty(key);
                }
                self.wire.release_idle_bufs(&self.clock, key);
            }
            Err(e) => {
                tracing::warn!(shard = self.id, client_id = %self.client_id_of(key), error = %e, "cannot take the TLS keys from rustls, closing");
                self.close_conn(key, DisconnectReason::ProtocolError, None);
            }
        }
    }
}

/// Writes a record-layer connection's output: what is sealed first, then its plaintext
/// sealed a batch at a time, as far as the socket takes it. Returns the bytes the socket
/// took, and false when writing failed (close it).
pub(super) fn write_records(
    socket: &mut TcpStream,
    bufs: &mut ConnBufs,
    keys: &mut RecordKeys,
) -> (usize, bool) {
    let mut sent = 0;
    loop {
        let (n, ok) = write_some(socket, &bufs.tls_out);
        sent += n;
        bufs.tls_out.drain(..n);
        if !ok {
            return (sent, false);
        }
        let end = bufs.writable_end();
        if !bufs.tls_out.is_empty() || bufs.out_pos >= end {
            return (sent, true);
        }
        let stop = end.min(bufs.out_pos + SEAL_BATCH);
        if let Err(e) = keys
            .sealer()
            .seal_data(&bufs.out[bufs.out_pos..stop], &mut bufs.tls_out)
        {
            tracing::info!(error = %e, "cannot seal TLS records, closing");
            return (sent, false);
        }
        bufs.out_pos = stop;
    }
}

/// Writes as much of `bytes` as the socket takes: (bytes taken, false on an error).
fn write_some(socket: &mut TcpStream, bytes: &[u8]) -> (usize, bool) {
    let mut at = 0;
    while at < bytes.len() {
        match socket.write(&bytes[at..]) {
            Ok(0) => return (at, false),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (at, false),
        }
    }
    (at, true)
}

/// The last words of a record-layer connection: what is sealed, `out` sealed, and
/// close_notify, in one write. The bytes written if any of it was more than the
/// close_notify; nothing without keys (its records were refused).
pub(super) fn last_words(
    socket: &mut TcpStream,
    bufs: Option<&mut ConnBufs>,
    keys: Option<RecordKeys>,
    out: &[u8],
) -> usize {
    let Some(mut keys) = keys else {
        return 0;
    };
    let mut taken = false;
    let (written, held) = write_behind_sealed(socket, bufs, |wire| {
        let mut sealer = keys.sealer();
        taken = !out.is_empty() && sealer.seal_data(out, wire).is_ok();
        let _ = sealer.seal_close_notify(wire);
    });
    if (held || taken) && written > 0 {
        written
    } else {
        0
    }
}

/// One write of what is sealed and waiting in `tls_out`, then what `seal` appends: a
/// short write cuts the stream, it never puts the new records first. The bytes written,
/// and whether anything was waiting.
fn write_behind_sealed(
    socket: &mut TcpStream,
    bufs: Option<&mut ConnBufs>,
    seal: impl FnOnce(&mut Vec<u8>),
) -> (usize, bool) {
    let mut wire = bufs
        .map(|b| std::mem::take(&mut b.tls_out))
        .unwrap_or_default();
    let held = !wire.is_empty();
    seal(&mut wire);
    (socket.write(&wire).unwrap_or(0), held)
}
