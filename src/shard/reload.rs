//! A shard's part of a config reload (`src/reload.rs`): it takes the `[acl]` rules the
//! reload compiled, in one mailbox message, so no lock is read per check. Subscriptions
//! already granted stay; those marked `ACL_FILTERED` are checked per message against the
//! rules in force when the message arrives, every new SUBSCRIBE and PUBLISH against the
//! new rules. The shard says when they are in force (`applied`): the reload answers only
//! then, so whatever a client sends after the answer is judged by the new rules.

use tokio::sync::oneshot;

use super::Shard;

impl Shard {
    pub(super) fn replace_acl(&mut self, acl: crate::acl::Acl, applied: oneshot::Sender<()>) {
        self.services.acl = acl;
        // The reload may have stopped waiting (its deadline passed): nobody to tell.
        let _ = applied.send(());
        tracing::debug!(shard = self.id, "ACL rules reloaded");
    }
}
