//! Binding the device listeners: one `SO_REUSEPORT` socket per shard on one address, after
//! making sure no other process already listens there.
//!
//! `SO_REUSEPORT` lets every shard bind the same address so the kernel spreads accepts,
//! but it would also let a second gateway (a staging copy of the config, a stale process,
//! a botched blue/green restart) join the port silently and take half of the new devices.
//! So before the shard sockets are bound, [`bind_group`] probes the address with a plain
//! bind (no `SO_REUSEPORT`): Linux refuses it while any socket listens there, whoever owns
//! it. Every device listener (MQTT, MQTT over TLS, and any later one) goes through
//! [`bind_group`], so each gets the same check and the same error.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// A listener that could not be bound: the config key, the address, and why.
#[derive(Debug)]
pub struct BindError {
    /// The config key naming the address, e.g. `mqtt.listen`.
    pub key: &'static str,
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl BindError {
    /// True when another socket (most likely another process) holds the address.
    pub fn in_use(&self) -> bool {
        self.error.kind() == io::ErrorKind::AddrInUse
    }
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (key, addr) = (self.key, self.addr);
        if self.in_use() {
            write!(
                f,
                "{key} {addr} is already in use: another process listens there (another \
                 gateway?). Stop it or give this gateway another {key}"
            )
        } else {
            write!(f, "cannot listen on {key} {addr}: {}", self.error)
        }
    }
}

impl std::error::Error for BindError {}

/// A socket for `addr` with `SO_REUSEADDR` (so connections of a previous run in TIME_WAIT
/// do not block a restart), non-blocking, not yet bound.
fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds `addr` without `SO_REUSEPORT` and releases it: fails with `AddrInUse` while any
/// socket listens on it. Returns the address bound (port 0 resolves here).
fn probe(addr: SocketAddr) -> io::Result<SocketAddr> {
    let s = socket(addr)?;
    s.bind(&addr.into())?;
    let bound = s.local_addr()?.as_socket();
    bound.ok_or_else(|| io::Error::other("probe bound a non-IP address"))
}

/// One shard's listener: `SO_REUSEPORT` so every shard can bind the same address.
fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let s = socket(addr)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

/// `n` listeners on `addr` (the config key `key` names it), after checking that no other
/// process listens there. Port 0 picks one free port for all `n`.
pub fn bind_group(
    key: &'static str,
    addr: SocketAddr,
    n: usize,
    backlog: i32,
) -> Result<Vec<TcpListener>, BindError> {
    let err = |addr, error| BindError { key, addr, error };
    let resolved = probe(addr).map_err(|e| err(addr, e))?;
    (0..n.max(1))
        .map(|_| bind_reuseport(resolved, backlog).map_err(|e| err(resolved, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_group_on_a_listening_address_is_refused_naming_it() {
        let first = bind_group("mqtt.listen", "127.0.0.1:0".parse().unwrap(), 2, 16).unwrap();
        let addr = first[0].local_addr().unwrap();
        assert_eq!(first[1].local_addr().unwrap(), addr);
        let e = bind_group("mqtt.listen", addr, 2, 16).unwrap_err();
        assert!(e.in_use(), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&addr.to_string()) && text.contains("mqtt.listen"),
            "{text}"
        );
        drop(first);
        // Once released, the address is free again.
        assert_eq!(bind_group("mqtt.listen", addr, 1, 16).unwrap().len(), 1);
    }
}
