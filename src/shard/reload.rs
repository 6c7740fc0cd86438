//! A shard's part of a config reload (`src/reload.rs`): it takes the `[acl]` rules the
//! reload compiled, in one mailbox message, so no lock is read per check. Subscriptions
//! already granted stay; those marked `ACL_FILTERED` are checked per message against the
//! rules in force when the message arrives, every new SUBSCRIBE and PUBLISH against the
//! new rules.

use super::Shard;

impl Shard {
    pub(super) fn replace_acl(&mut self, acl: crate::acl::Acl) {
        self.services.acl = acl;
        tracing::debug!(shard = self.id, "ACL rules reloaded");
    }
}
