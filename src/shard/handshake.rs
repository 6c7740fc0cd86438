//! The TLS handshake budget of one loop turn (`[limits] tls_handshakes_per_turn`).
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

use super::conn::Conn;
use super::transport::Transport;
use super::Shard;
use crate::metrics::ShardMetrics;

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
