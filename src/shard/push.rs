//! The business pool's requests on a shard: pushes to a device by client id, pushes to a
//! topic, client lookups and kicks.
//!
//! Answers to pushes are held until the end of the loop turn, after the turn's writes, so
//! `sent` means the PUBLISH was handed to the device's socket, not merely decided.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::codec::{reason, Version};
use crate::mailbox::{
    ClientInfo, ClientPush, ClientSummary, PushOutcome, PushStatus, SubscriptionInfo,
};
use crate::message::Message;
use crate::metrics::DisconnectReason;
use crate::session::Queued;

use super::delivery::Delivery;
use super::{ConnState, Shard};

/// An answer waiting for the end of the turn.
pub(super) enum PendingReply {
    Push(oneshot::Sender<Vec<PushOutcome>>, Vec<PushOutcome>),
    Topic(oneshot::Sender<usize>, usize),
}

impl Shard {
    pub(super) fn on_push(
        &mut self,
        items: Vec<ClientPush>,
        reply: oneshot::Sender<Vec<PushOutcome>>,
    ) {
        let puts = self.services.store.as_ref().map_or(0, |s| s.puts);
        let outcomes: Vec<PushOutcome> = items.into_iter().map(|p| self.push_one(p)).collect();
        // `queued` is answered only once the message is durable: the answer rides with
        // this turn's store ops and the store writer sends it after the commit.
        let stored = self.services.store.as_ref().map_or(0, |s| s.puts) != puts;
        match self.services.store.as_mut() {
            Some(st) if stored && outcomes.iter().any(|o| o.status == PushStatus::Queued) => {
                st.defer((reply, outcomes));
            }
            _ => self
                .pending_replies
                .push(PendingReply::Push(reply, outcomes)),
        }
    }

    fn push_one(&mut self, p: ClientPush) -> PushOutcome {
        let Some(skey) = self.sessions.find(&p.client_id) else {
            return PushOutcome {
                status: PushStatus::Offline,
                ack: None,
            };
        };
        if let Some(reason) = self.store_refusal(skey as usize, p.msg.qos) {
            return PushOutcome {
                status: PushStatus::Dropped(reason),
                ack: None,
            };
        }
        let (waiter, ack) = if p.wait_ack && p.msg.qos > 0 {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let item = Queued {
            qos: p.msg.qos,
            retain: p.msg.retain,
            msg: p.msg,
            sub_ids: None,
            shared: None,
            waiter,
            seq: 0,
            dup: false,
        };
        match self.deliver_item(skey as usize, item) {
            Delivery::Sent => PushOutcome {
                status: PushStatus::Sent,
                ack,
            },
            Delivery::Queued => PushOutcome {
                status: PushStatus::Queued,
                ack,
            },
            Delivery::Dropped(crate::metrics::DropReason::Offline) => PushOutcome {
                status: PushStatus::Offline,
                ack: None,
            },
            Delivery::Dropped(r) => PushOutcome {
                status: PushStatus::Dropped(r.as_str()),
                ack: None,
            },
        }
    }

    pub(super) fn on_push_topic(&mut self, msg: Arc<Message>, reply: oneshot::Sender<usize>) {
        let matched = self.accept_remote(&msg);
        self.pending_replies
            .push(PendingReply::Topic(reply, matched));
    }

    /// Sends the answers held during this turn (called after the turn's writes).
    pub(super) fn send_pending_replies(&mut self) {
        for r in self.pending_replies.drain(..) {
            match r {
                PendingReply::Push(tx, outcomes) => {
                    let _ = tx.send(outcomes);
                }
                PendingReply::Topic(tx, n) => {
                    let _ = tx.send(n);
                }
            }
        }
    }

    pub(super) fn client_info(&self, client_id: &str) -> Option<ClientInfo> {
        let skey = self.sessions.find(client_id)? as usize;
        let subscriptions = self.sessions[skey]
            .subs
            .iter()
            .map(|(f, o, _)| SubscriptionInfo {
                filter: f.to_string(),
                qos: o & 3,
            })
            .collect();
        Some(ClientInfo {
            summary: self.client_summary(skey),
            subscriptions,
        })
    }

    /// Session `skey` and its live connection, if any, as the API shows them.
    pub(super) fn client_summary(&self, skey: usize) -> ClientSummary {
        let s = &self.sessions[skey];
        let conn = s
            .conn
            .and_then(|c| self.wire.conns.get(c.index()))
            .filter(|c| c.state == ConnState::Active);
        let connected_at = conn.map(|c| {
            let at = self.clock.started_wall + self.settings.tick * c.accepted_at;
            at.duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs()
        });
        ClientSummary {
            client_id: s.client_id.to_string(),
            online: conn.is_some(),
            protocol_version: conn.map(|c| match c.version {
                Version::V31 => 3,
                Version::V311 => 4,
                Version::V5 => 5,
            }),
            keep_alive: conn.map(|c| c.keep_alive),
            connected_at,
            peer: conn.map(|c| c.peer.to_string()),
            shard: self.id,
            queued_messages: s.queued_len(),
            inflight_messages: s.inflight_len(),
            session_expiry_secs: s.expiry_secs,
        }
    }

    /// Disconnects a client with MQTT 5 reason 0x98; with `clear_session` also ends its
    /// session. `None` if the client id is unknown here, else whether it was online.
    pub(super) fn kick(&mut self, client_id: &str, clear_session: bool) -> Option<bool> {
        let skey = self.sessions.find(client_id)?;
        let conn = self.sessions[skey as usize].conn;
        if let Some(conn) = conn {
            tracing::info!(shard = self.id, client_id, "disconnected by the API");
            self.close_conn(
                conn.index(),
                DisconnectReason::Admin,
                Some(reason::ADMINISTRATIVE_ACTION),
            );
        }
        if clear_session {
            // The close may already have ended a session with expiry 0.
            if let Some(skey) = self.sessions.find(client_id) {
                self.end_session(skey as usize);
            }
        }
        Some(conn.is_some())
    }
}
