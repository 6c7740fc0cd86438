//! The ACL's word on what a session does (PUBLISH, SUBSCRIBE) and receives (through a
//! wildcard subscription a deny rule overlaps), and the retained byte bounds' word on a
//! retained PUBLISH. Refusals are counted and logged here, once.

use crate::acl::Who;

use crate::shard::Shard;

impl Shard {
    /// The ACL's word on a PUBLISH to `topic` from session `skey`; a refusal is counted.
    pub(in crate::shard) fn publish_allowed(&mut self, skey: usize, topic: &str) -> bool {
        self.acl_allows(skey, None, topic).is_some()
    }

    /// The ACL's word on a SUBSCRIBE filter (`shared`: inside `$share/`) from session
    /// `skey`: the bits to add to the subscription's options (0, or `ACL_FILTERED`), or
    /// None when refused (counted).
    pub(in crate::shard) fn subscribe_allowed(
        &mut self,
        skey: usize,
        filter: &str,
        shared: bool,
    ) -> Option<u8> {
        self.acl_allows(skey, Some(shared), filter)
    }

    /// Asks the ACL about a SUBSCRIBE filter (`subscribe` = Some(shared)) or a PUBLISH
    /// topic. A refused SUBSCRIBE is logged at info; a refused PUBLISH only at debug, so a
    /// device publishing where it may not cannot flood the log. Both are counted.
    fn acl_allows(&mut self, skey: usize, subscribe: Option<bool>, topic: &str) -> Option<u8> {
        if !self.services.acl.enabled() {
            return Some(0);
        }
        let s = &self.sessions[skey];
        let conn_acl = s.extra.as_ref().and_then(|st| st.acl.as_deref());
        let who = Who {
            client_id: &s.client_id,
            username: conn_acl.and_then(|a| a.username.as_deref()),
        };
        let allowed = match subscribe {
            Some(shared) => self
                .services
                .acl
                .may_subscribe(&who, conn_acl, topic)
                .option_bits(shared),
            None => self
                .services
                .acl
                .may_publish(&who, conn_acl, topic)
                .then_some(0),
        };
        if allowed.is_some() {
            return allowed;
        }
        self.services.metrics.acl_denied(subscribe.is_some());
        if subscribe.is_some() {
            tracing::info!(shard = self.id, client_id = %s.client_id, filter = topic, "SUBSCRIBE filter denied by the ACL");
        } else {
            tracing::debug!(shard = self.id, client_id = %s.client_id, topic, "PUBLISH denied by the ACL");
        }
        None
    }

    /// Whether a message on `topic` may reach session `skey` through a subscription
    /// marked `ACL_FILTERED` (a deny rule overlaps its filter).
    pub(in crate::shard) fn acl_receives(&self, skey: usize, topic: &str) -> bool {
        let Some(s) = self.sessions.get(skey) else {
            return false;
        };
        let conn_acl = s.extra.as_ref().and_then(|st| st.acl.as_deref());
        let who = Who {
            client_id: &s.client_id,
            username: conn_acl.and_then(|a| a.username.as_deref()),
        };
        self.services.acl.may_receive(&who, topic)
    }

    /// Whether session `skey` may set `topic` to a retained `payload` within the retained
    /// byte bounds (an empty payload deletes: always). A refusal is logged.
    pub(in crate::shard) fn retained_admitted(
        &self,
        skey: usize,
        topic: &str,
        payload: &[u8],
    ) -> bool {
        if payload.is_empty() {
            return true;
        }
        let client = &self.sessions[skey].client_id;
        let cost = crate::retained_budget::cost(topic, payload);
        let Err(over) = self.routing.retained_budget.admit(client, topic, cost) else {
            return true;
        };
        tracing::info!(shard = self.id, client_id = %client, topic, bytes = cost, bound = over.key(), "retained PUBLISH refused: retained byte bound reached");
        false
    }
}
