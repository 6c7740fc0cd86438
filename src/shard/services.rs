//! The services a shard calls on, shared with the rest of the gateway: authentication
//! and the business runtime it runs on, the ACL, the durable store, metrics, the other
//! shards' mailboxes, the gateway-wide connection counts, and the events to the backend.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::limits::PerIpLimit;
use crate::mailbox::Mailboxes;
use crate::metrics::ShardMetrics;

pub(super) struct Services {
    pub auth: Arc<crate::auth::Authenticator>,
    /// The business runtime, where slow authentication runs.
    pub business: tokio::runtime::Handle,
    /// This shard's compiled `[acl]` rules.
    pub acl: crate::acl::Acl,
    /// This shard's side of the durable store (`None` when `[store] enabled = false`).
    pub store: Option<crate::store::StoreHandle>,
    pub metrics: Arc<ShardMetrics>,
    pub mailboxes: Mailboxes,
    /// Connections per IP across all shards (`max_connections_per_ip`).
    pub per_ip: Arc<PerIpLimit>,
    /// Connections open across the whole gateway (for `max_connections`).
    pub open_connections: Arc<AtomicUsize>,
    /// Shards whose loop has not ended yet: a stopped shard drains its mailbox until 0.
    pub shards_running: Arc<AtomicUsize>,
    /// Events to the backend (`src/events/`); disabled unless `[events]` names a sink.
    pub events: crate::events::EventSender,
    /// The fleet's copy of the persistent sessions (`[cluster]` on, with the store).
    pub sessions: Option<Arc<crate::cluster::sessions::SessionStore>>,
    /// The TLS handshake threads (`None` with `[limits] tls_handshakes_on_shards`).
    pub handshakers: Option<crate::tls::handshaker::Handshakers>,
    /// The fleet's message routing (`[cluster] enabled`; `fleet_route.rs`).
    pub fleet_route: Option<crate::cluster::routing::RouteHandle>,
    /// The routing queue was seen backlogged since the last turn's end (`fleet_route.rs`).
    pub fleet_paced: std::cell::Cell<bool>,
}
