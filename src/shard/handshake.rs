//! Where a TLS connection's handshake runs.
//!
//! By default (`[limits] tls_handshakes_on_shards = false`), not here: the shard
//! accepts it (its admission limits apply), then hands the socket and its rustls session
//! to a handshake thread (`crate::tls::handshaker`), which gives it back once the
//! handshake is done ([`Shard::adopt_handshaken`]); the shard reads its CONNECT as usual.
//! Behind a PROXY header, the shard reads the header first.
//!
//! With `tls_handshakes_on_shards = true`, they run on the shard, under the budget of
//! one loop turn
//! (`[limits] tls_handshakes_per_turn`):
//!
//! A handshake step — rustls processing what a connection still in its handshake sent:
//! the ClientHello (key exchange and the certificate signature of a full handshake), the
//! client's certificate and Finished — is the most CPU a shard spends on one read. In a
//! reconnect storm thousands arrive at once; run all in one turn and the established
//! connections of that shard wait behind them. So each turn may take only so many steps:
//! a handshaking connection read when the budget is spent is not read but queued for the
//! next turn's rereads (its bytes wait in the kernel; the poll is edge-triggered, so the
//! reread is what brings it back), counted in `gateway_tls_handshakes_deferred_total`.
//! Established connections are never deferred, and the deferred ones go first next turn.
//! A connection's own reads within one readiness event are not cut short once begun, so a
//! turn may exceed the budget by the few steps one handshake flight makes.

use std::sync::atomic::Ordering;

use super::conn::Conn;
use super::transport::Transport;
use super::Shard;
use crate::metrics::{DisconnectReason, ShardMetrics};
use crate::tls::handshaker::{Arrival, Handshaken};

/// Handshake steps left in this turn.
#[derive(Debug, Default)]
pub(super) struct HandshakeBudget {
    left: u32,
    /// `tls_handshakes_per_turn` at the last refill; 0 = unlimited.
    per_turn: u32,
}

impl HandshakeBudget {
    /// A new turn: `per_turn` steps (0 = unlimited).
    pub(super) fn refill(&mut self, per_turn: u32) {
        self.per_turn = per_turn;
        self.left = per_turn;
    }

    /// One handshake step taken.
    pub(super) fn spend(&mut self) {
        self.left = self.left.saturating_sub(1);
    }

    /// No step is left this turn.
    pub(super) fn spent(&self) -> bool {
        self.per_turn != 0 && self.left == 0
    }
}

/// Whether `conn` is a TLS connection still in its handshake.
fn in_tls_handshake(conn: &Conn) -> bool {
    Transport::of(conn) == Transport::Tls
        && conn
            .bufs
            .as_ref()
            .and_then(|b| b.tls.as_ref())
            .is_some_and(|t| t.is_handshaking())
}

impl Shard {
    /// This shard's TLS handshakes under way on the handshake threads.
    pub(super) fn handshaking_elsewhere(&self) -> usize {
        self.services
            .metrics
            .tls_handshaking
            .load(Ordering::Relaxed) as usize
    }

    /// With handshake threads, hands TLS connection `key` (accepted, its PROXY header
    /// read if one was expected) to one with `early`, the ciphertext already read. True
    /// when it went; false when handshakes run here.
    pub(super) fn outsource_handshake(&mut self, key: usize, early: &[u8]) -> bool {
        let Some(handshakers) = self.services.handshakers.clone() else {
            return false;
        };
        // Only a connection with its rustls session goes (checked before it leaves the
        // shard: one detached and not handed over would be lost uncounted).
        if !self.wire.conns.get(key).is_some_and(|c| c.is_tls()) {
            return false;
        }
        let d = self.detach(key);
        let Some(tls) = d.tls else {
            unreachable!("a TLS connection's rustls session travels with it");
        };
        // Counted before the thread can see it (its release subtracts).
        let in_progress = &self.services.metrics.tls_handshaking;
        in_progress.fetch_add(1, Ordering::Relaxed);
        let submitted = handshakers.submit(Arrival {
            socket: d.socket,
            peer: d.peer,
            link: d.link,
            tls,
            accepted_at: d.accepted_at,
            shard: self.id,
            // Any ciphertext the connection kept comes before what was just read.
            early: [&d.tls_in[..], early].concat(),
        });
        if let Err(a) = submitted {
            // The thread takes no more (the gateway is stopping): closed here.
            in_progress.fetch_sub(1, Ordering::Relaxed);
            self.release_detached(a.peer);
            self.services.metrics.disconnect(DisconnectReason::Shutdown);
        }
        true
    }

    /// A TLS connection this shard accepted is back from its handshake thread: it
    /// waits for its CONNECT here, within what is left of the connect timeout.
    pub(super) fn adopt_handshaken(&mut self, h: Handshaken) {
        let state = super::ConnState::after_prefix(h.link);
        let Some(key) = self.adopt_socket(h.socket, h.peer, state, h.link, h.accepted_at) else {
            return;
        };
        let bufs = self.wire.conns[key]
            .bufs
            .get_or_insert_with(Default::default);
        bufs.tls = Some(h.tls);
        bufs.tls_cursor = h.tls_cursor;
        bufs.tls_secrets = h.tls_secrets;
        // The plaintext rustls decrypted with the handshake's last flight (a CONNECT
        // sent at once) is inside it; the ciphertext it did not take follows, kept with
        // the connection meanwhile: it goes along if that CONNECT sends the connection
        // to its home shard, and waits while its credentials are being checked.
        self.append_tls_in(key, &h.rest);
        if self.tls_process(key) {
            self.tls_carried_kept(key);
        }
    }

    /// True when connection `key` is in its TLS handshake and this turn's budget is
    /// spent: then it is queued to be read next turn instead, and counted.
    pub(super) fn defer_handshake(&mut self, key: usize) -> bool {
        if !self.admission.handshake_budget.spent()
            || !self.wire.conns.get(key).is_some_and(in_tls_handshake)
        {
            return false;
        }
        self.wire.reread.push(key as u32);
        ShardMetrics::add(&self.services.metrics.tls_handshakes_deferred, 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_spent_and_refilled_per_turn() {
        let mut b = HandshakeBudget::default();
        b.refill(2);
        assert!(!b.spent());
        b.spend();
        assert!(!b.spent());
        b.spend();
        assert!(b.spent());
        b.spend();
        assert!(b.spent());
        b.refill(2);
        assert!(!b.spent());
    }

    #[test]
    fn zero_is_unlimited() {
        let mut b = HandshakeBudget::default();
        b.refill(0);
        for _ in 0..10 {
            b.spend();
        }
        assert!(!b.spent());
    }
}
