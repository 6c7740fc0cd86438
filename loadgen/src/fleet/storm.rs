//! Storm: a dropped device reconnects at once or with full-jitter exponential backoff,
//! counting attempts, refusals and the time until it is back in the round's report.

use std::time::Duration;

use tokio::sync::watch;

use super::{Conn, Fleet, Phase};
use crate::codec;

/// splitmix64: a tiny seeded generator for backoff jitter and WebSocket masks (no crate
/// needed).
#[derive(Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

impl Fleet {
    /// Storm: reconnect after a drop, at once or with full-jitter exponential backoff,
    /// until connected, the round deadline passes or the parent says stop.
    pub(super) async fn reconnect(
        &self,
        i: u64,
        p: Phase,
        phase: &mut watch::Receiver<Phase>,
    ) -> Option<Conn> {
        let Phase::Drop {
            round,
            jitter,
            base_ms,
            max_ms,
            deadline_tick,
            at,
        } = p
        else {
            return None;
        };
        let mut rng = Rng(i.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ u64::from(round));
        let mut attempt: u32 = 0;
        let mut delay_ms = if jitter { rng.below(base_ms + 1) } else { 0 };
        loop {
            if delay_ms > 0 {
                let wake = self
                    .ticker
                    .after(Duration::from_millis(delay_ms))
                    .min(deadline_tick);
                self.ticker.until(wake).await;
            }
            if *phase.borrow() == Phase::Stop || self.ticker.now() >= deadline_tick {
                self.round.lock().unwrap().gave_up += 1;
                return None;
            }
            self.round.lock().unwrap().report.attempts += 1;
            match self.establish(i, false).await {
                Ok(conn) => {
                    let us = at.elapsed().as_micros() as u64;
                    {
                        let mut r = self.round.lock().unwrap();
                        r.report.back += 1;
                        r.report.last_back_us = r.report.last_back_us.max(us);
                        r.report.back_hist.record(us);
                    }
                    // Mark the drop seen so the session does not act on it again; a stop
                    // that came meanwhile is acted on here.
                    let now = *phase.borrow_and_update();
                    if now == Phase::Stop {
                        let mut conn = conn;
                        let _ = conn.link.write_all(&codec::DISCONNECT).await;
                        return None;
                    }
                    return Some(conn);
                }
                Err(cause) => {
                    {
                        let mut r = self.round.lock().unwrap();
                        r.report.refused += 1;
                        *r.report.causes.entry(cause).or_default() += 1;
                    }
                    attempt = attempt.saturating_add(1);
                    delay_ms = if jitter {
                        let ceiling = base_ms.saturating_mul(1u64 << attempt.min(20)).min(max_ms);
                        rng.below(ceiling + 1)
                    } else {
                        tokio::task::yield_now().await;
                        0
                    };
                }
            }
        }
    }
}
