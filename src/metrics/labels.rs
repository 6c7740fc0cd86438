//! The label values the gateway's metrics carry: why a connection ended
//! (`DisconnectReason`), why a CONNECT was refused (`RefuseReason`), why a message was
//! dropped (`DropReason`), how a TLS handshake ended (`TlsHandshake`), the packet types and the connection-age buckets.

/// Why a connection ended; the `reason` label of `gateway_disconnects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    Client,
    /// No packet within 1.5 × keep-alive.
    Keepalive,
    /// No CONNECT within `connect_timeout_secs`.
    ConnectTimeout,
    /// The peer closed its side (read of 0) without DISCONNECT.
    CloseWait,
    /// The socket took no bytes for `write_stall_timeout_secs`.
    WriteStall,
    /// The client broke the protocol (malformed, oversized, forbidden packet).
    ProtocolError,
    /// A new connection with the same client id took the session over.
    Takeover,
    /// The gateway is shutting down.
    Shutdown,
    /// An operator or the API disconnected it.
    Admin,
    /// The socket failed (reset, timeout from TCP keepalive / user timeout).
    SocketError,
    /// The CONNECT was refused (CONNACK with an error code).
    Refused,
    /// The peer closed or reset the connection before it sent CONNECT: a load-balancer
    /// health check (a TCP connect, or a PROXY v2 LOCAL header, then a close or reset)
    /// or a port scan, not a device's network failing.
    Probe,
    /// The store could not commit a change the connection's acknowledgement waited for.
    StoreError,
    /// A congested subscriber (`slow_consumer = "pace"`) did not get back under its
    /// watermark and queue mark within `write_stall_timeout_secs`: it stopped reading or
    /// stopped acknowledging.
    SlowConsumer,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 14] = [
        DisconnectReason::Client,
        DisconnectReason::Keepalive,
        DisconnectReason::ConnectTimeout,
        DisconnectReason::CloseWait,
        DisconnectReason::WriteStall,
        DisconnectReason::ProtocolError,
        DisconnectReason::Takeover,
        DisconnectReason::Shutdown,
        DisconnectReason::Admin,
        DisconnectReason::SocketError,
        DisconnectReason::Refused,
        DisconnectReason::Probe,
        DisconnectReason::StoreError,
        DisconnectReason::SlowConsumer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Client => "client",
            DisconnectReason::Keepalive => "keepalive",
            DisconnectReason::ConnectTimeout => "connect_timeout",
            DisconnectReason::CloseWait => "close_wait",
            DisconnectReason::WriteStall => "write_stall",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::Takeover => "takeover",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::Admin => "admin",
            DisconnectReason::SocketError => "socket_error",
            DisconnectReason::Refused => "refused",
            DisconnectReason::Probe => "probe",
            DisconnectReason::StoreError => "store_error",
            DisconnectReason::SlowConsumer => "slow_consumer",
        }
    }

    /// The reason to count for a connection that ended with `self`: one the peer closed
    /// or reset before it sent CONNECT (`connect_read` false) is a [`Probe`](Self::Probe),
    /// so health checks do not swamp the real `socket_error` and `close_wait` counts.
    pub fn counted(self, connect_read: bool) -> DisconnectReason {
        match self {
            DisconnectReason::SocketError | DisconnectReason::CloseWait if !connect_read => {
                DisconnectReason::Probe
            }
            r => r,
        }
    }
}

/// Why a CONNECT was refused; the `reason` label of `gateway_connect_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseReason {
    Protocol,
    ClientId,
    Duplicate,
    Busy,
    Auth,
    MaxConnections,
    /// An authentication backend (webhook) was slow or down: "server unavailable".
    AuthUnavailable,
    /// `max_connections_per_ip` reached for the connection's address.
    PerIp,
    /// A PROXY header from a peer not in `mqtt.proxy_trusted`.
    ProxyUntrusted,
    /// A WebSocket upgrade request refused (answered with a 4xx).
    WsUpgrade,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 10] = [
        RefuseReason::Protocol,
        RefuseReason::ClientId,
        RefuseReason::Duplicate,
        RefuseReason::Busy,
        RefuseReason::Auth,
        RefuseReason::MaxConnections,
        RefuseReason::AuthUnavailable,
        RefuseReason::PerIp,
        RefuseReason::ProxyUntrusted,
        RefuseReason::WsUpgrade,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::Protocol => "protocol",
            RefuseReason::ClientId => "client_id",
            RefuseReason::Duplicate => "duplicate",
            RefuseReason::Busy => "busy",
            RefuseReason::Auth => "auth",
            RefuseReason::MaxConnections => "max_connections",
            RefuseReason::AuthUnavailable => "auth_unavailable",
            RefuseReason::PerIp => "per_ip",
            RefuseReason::ProxyUntrusted => "proxy_untrusted",
            RefuseReason::WsUpgrade => "ws_upgrade",
        }
    }
}

/// How a TLS handshake ended; the `kind` label of `gateway_tls_handshakes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TlsHandshake {
    /// A full handshake (certificate, key exchange; with or without a HelloRetryRequest).
    Full,
    /// Resumed from a session ticket: no certificate, no signature.
    Resumed,
    /// Failed before it completed (bad ClientHello, unknown CA, missing client
    /// certificate, plaintext on the TLS port).
    Failed,
}

impl TlsHandshake {
    pub const ALL: [TlsHandshake; 3] = [
        TlsHandshake::Full,
        TlsHandshake::Resumed,
        TlsHandshake::Failed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            TlsHandshake::Full => "full",
            TlsHandshake::Resumed => "resumed",
            TlsHandshake::Failed => "failed",
        }
    }
}

/// Why a message was not delivered; the `reason` label of `gateway_messages_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DropReason {
    /// QoS 0 above the connection's outbound high watermark.
    SlowConsumer,
    /// The session's queue was full; the oldest message was dropped.
    QueueFull,
    /// Message Expiry Interval / TTL passed before delivery.
    Expired,
    /// Larger than the client's Maximum Packet Size.
    TooLarge,
    /// A shard mailbox was full.
    MailboxFull,
    /// QoS 0 for an offline persistent session (not queued, per spec option).
    Offline,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::SlowConsumer,
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::MailboxFull,
        DropReason::Offline,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::MailboxFull => "mailbox_full",
            DropReason::Offline => "offline",
        }
    }
}

/// MQTT control packet type names, indexed by the packet type number (0 and 15 included so
/// an index never goes out of bounds).
pub const PACKET_TYPES: [&str; 16] = [
    "reserved",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

/// Upper bounds (seconds) of `gateway_connection_age_seconds`: 1 s to 7 days.
pub const CONNECTION_AGE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 60.0, 600.0, 3_600.0, 21_600.0, 86_400.0, 604_800.0,
];
