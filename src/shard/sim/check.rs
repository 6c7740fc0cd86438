//! The shard's own bookkeeping, checked after every simulated action: connections and
//! sessions point at each other, one live connection per client id, one wheel entry per
//! connection and per offline session and no other, idle connections hold no buffer,
//! in-flight within the window, the queued-messages count right.

use std::collections::HashMap;

use super::super::{ConnState, Shard};

pub(super) fn shard(shard: &Shard, client_ids: &[&str]) -> Result<(), String> {
    connections(shard)?;
    sessions(shard, client_ids)?;
    interest(shard, client_ids)
}

/// The interest filter counts every subscription of every session once (one shard: the
/// shared groups' owner is this shard too).
fn interest(shard: &Shard, client_ids: &[&str]) -> Result<(), String> {
    let counted = shard.services.mailboxes.interest().total(shard.id);
    let subs: u64 = (client_ids.iter())
        .filter_map(|id| shard.sessions.find(id))
        .map(|sk| shard.sessions[sk as usize].subs.len() as u64)
        .sum();
    if counted != subs {
        return Err(format!(
            "the interest filter counts {counted} subscriptions, the sessions hold {subs}"
        ));
    }
    Ok(())
}

fn connections(shard: &Shard) -> Result<(), String> {
    let wheel = &shard.timers.wheel;
    let mut conn_of: HashMap<usize, usize> = HashMap::new();
    for (k, c) in shard.wire.conns.iter() {
        if wheel.deadline(c.timer).is_none() {
            return Err(format!("connection {k} has no timer on the wheel"));
        }
        if let Some(b) = c.bufs.as_ref().filter(|b| b.is_idle(shard.clock.now_ns())) {
            return Err(format!(
                "idle connection {k} holds a buffer box (capacities: in {}, out {}, held {})",
                b.inbuf.capacity(),
                b.out.capacity(),
                b.held.capacity()
            ));
        }
        if c.state == ConnState::Closing {
            // In its close grace: no session, no buffers, only its grace timer.
            if c.session.is_some() || c.bufs.is_some() {
                return Err(format!(
                    "closing connection {k} still holds a session or buffers"
                ));
            }
            continue;
        }
        let Some(sk) = c.session else { continue };
        if let Some(other) = conn_of.insert(sk.index(), k) {
            return Err(format!(
                "connections {other} and {k} share session {}",
                sk.index()
            ));
        }
        let Some(s) = shard.sessions.get(sk.index()) else {
            return Err(format!(
                "connection {k} points at missing session {}",
                sk.index()
            ));
        };
        if s.conn.map(|c| c.index()) != Some(k) {
            return Err(format!(
                "connection {k} points at session {} ({}), which points at {:?}",
                sk.index(),
                s.client_id,
                s.conn.map(|c| c.index())
            ));
        }
        if s.on_wire_len() > usize::from(c.window) {
            return Err(format!(
                "{}: {} in flight, window {}",
                s.client_id,
                s.on_wire_len(),
                c.window
            ));
        }
    }
    Ok(())
}

fn sessions(shard: &Shard, client_ids: &[&str]) -> Result<(), String> {
    let wheel = &shard.timers.wheel;
    let (mut found, mut timers, mut queued) = (0, 0, 0u64);
    for id in client_ids {
        let Some(sk) = shard.sessions.find(id) else {
            continue;
        };
        found += 1;
        let s = &shard.sessions[sk as usize];
        if &*s.client_id != *id {
            return Err(format!("the index finds {} under {id}", s.client_id));
        }
        queued += s.queued_len() as u64;
        match s.conn {
            Some(ck) => {
                let back = shard.wire.conns.get(ck.index()).and_then(|c| c.session);
                if back.map(|b| b.index()) != Some(sk as usize) {
                    return Err(format!("{id}: its connection {} is not its", ck.index()));
                }
                if s.timer.is_some() {
                    return Err(format!("{id}: online with an offline timer"));
                }
            }
            None => {
                if s.expiry_secs == 0 {
                    return Err(format!(
                        "{id}: offline, but its session ends with its connection"
                    ));
                }
                if s.timer.is_none_or(|t| wheel.deadline(t).is_none()) {
                    return Err(format!("{id}: offline without a timer on the wheel"));
                }
                timers += 1;
            }
        }
    }
    if found != shard.sessions.len() {
        return Err(format!(
            "{} sessions, {found} of them under the sim's client ids",
            shard.sessions.len()
        ));
    }
    let want = shard.wire.conns.len() + timers;
    if wheel.len() != want {
        return Err(format!(
            "{} wheel entries for {} connections and {timers} offline sessions",
            wheel.len(),
            shard.wire.conns.len()
        ));
    }
    if queued != shard.sessions.queued_total {
        return Err(format!(
            "queued_total {} but the sessions queue {queued}",
            shard.sessions.queued_total
        ));
    }
    Ok(())
}
