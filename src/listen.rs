//! Binding the device listeners: one `SO_REUSEPORT` socket per shard on one address, after
//! making sure no other process already listens there.
//!
//! `SO_REUSEPORT` lets every shard bind the same address so the kernel spreads accepts,
//! but it would also let a second gateway (a staging copy of the config, a stale process,
//! a botched blue/green restart) join the port silently and take half of the new devices.
//! So before the shard sockets are bound, [`bind_group`] probes the address with a plain
//! bind (no `SO_REUSEPORT`): Linux refuses it while any socket listens there, whoever owns
//! it. The probe stays bound until the group is, so the port cannot change hands between
//! the check and the binds. Every device listener (MQTT, MQTT over TLS, and any later one) goes through
//! [`bind_group`], so each gets the same check and the same error.
//!
//! [`AcceptRetry`] is the shard's memory of an `accept()` that failed for want of a file
//! descriptor: the listeners are edge-triggered, so the devices already waiting in the
//! backlog would get no new event and wait for the next SYN; the shard retries on a
//! timer instead.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::ShardMetrics;

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

/// Binds `addr` without `SO_REUSEPORT`: fails with `AddrInUse` while any socket listens
/// on it. Returns the bound socket (never listening) and its address (port 0 resolves
/// here). Held while the group binds, it keeps a port 0 choice from going to another
/// bind in between; with `SO_REUSEADDR` on both sides and this one not listening, it
/// does not conflict with the group's own sockets.
fn probe(addr: SocketAddr) -> io::Result<(Socket, SocketAddr)> {
    let s = socket(addr)?;
    s.bind(&addr.into())?;
    let bound = s.local_addr()?.as_socket();
    let bound = bound.ok_or_else(|| io::Error::other("probe bound a non-IP address"))?;
    Ok((s, bound))
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
pub(crate) fn bind_group(
    key: &'static str,
    addr: SocketAddr,
    n: usize,
    backlog: i32,
) -> Result<Vec<TcpListener>, BindError> {
    let err = |addr, error| BindError { key, addr, error };
    let (_probe, resolved) = probe(addr).map_err(|e| err(addr, e))?;
    (0..n.max(1))
        .map(|_| bind_reuseport(resolved, backlog).map_err(|e| err(resolved, e)))
        .collect()
}

/// Whether `accept()` failed because the process or the system is out of file
/// descriptors (or socket memory): the connection stays in the backlog.
pub(crate) fn out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// What the shard does about a failed accept this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryCheck {
    /// Nothing failed, or it has been retried with success.
    Idle,
    /// Accept again now.
    Due,
    /// Wake no later than this to accept again.
    At(Instant),
}

/// A shard's pending retry of `accept()` after the fds ran out.
#[derive(Debug)]
pub(crate) struct AcceptRetry {
    interval: Duration,
    retry_at: Option<Instant>,
}

impl AcceptRetry {
    pub(crate) fn new(interval: Duration) -> AcceptRetry {
        AcceptRetry {
            interval,
            retry_at: None,
        }
    }

    /// Records a failed accept at `now`; true when it starts an episode (count and log it
    /// then, not on every retry). The shard then wakes by [`AcceptRetry::check`].
    pub(crate) fn failed(&mut self, now: Instant) -> bool {
        let first = self.retry_at.is_none();
        self.retry_at = Some(now + self.interval);
        first
    }

    /// An accept succeeded: true when that ends an episode.
    pub(crate) fn succeeded(&mut self) -> bool {
        self.retry_at.take().is_some()
    }

    /// [`AcceptRetry::failed`] for the shard `shard`: counts and logs the start of an
    /// episode; returns when to retry.
    pub(crate) fn on_error(
        &mut self,
        now: Instant,
        error: &io::Error,
        shard: usize,
        metrics: &ShardMetrics,
    ) -> Instant {
        if self.failed(now) {
            ShardMetrics::add(&metrics.accept_paused_fds, 1);
            tracing::warn!(
                shard,
                %error,
                retry_ms = self.interval.as_millis() as u64,
                "accept failed: out of file descriptors; devices wait in the backlog, retrying"
            );
        }
        now + self.interval
    }

    /// [`AcceptRetry::succeeded`] for the shard `shard`: logs the end of an episode.
    pub(crate) fn on_accept(&mut self, shard: usize) {
        if self.succeeded() {
            tracing::info!(
                shard,
                "accepting again after running out of file descriptors"
            );
        }
    }

    /// Whether to accept again now, later, or not at all.
    pub(crate) fn check(&self, now: Instant) -> RetryCheck {
        match self.retry_at {
            None => RetryCheck::Idle,
            Some(at) if at <= now => RetryCheck::Due,
            Some(at) => RetryCheck::At(at),
        }
    }
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

    #[test]
    fn a_failed_accept_is_retried_after_the_interval_until_one_succeeds() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = AcceptRetry::new(ms(100));
        assert_eq!(r.check(t0), RetryCheck::Idle);
        assert!(r.failed(t0), "starts an episode");
        assert_eq!(r.check(t0 + ms(50)), RetryCheck::At(t0 + ms(100)));
        assert_eq!(r.check(t0 + ms(100)), RetryCheck::Due);
        assert!(!r.failed(t0 + ms(100)), "the same episode");
        assert_eq!(r.check(t0 + ms(150)), RetryCheck::At(t0 + ms(200)));
        assert!(r.succeeded());
        assert!(!r.succeeded());
        assert_eq!(r.check(t0 + ms(500)), RetryCheck::Idle);
        assert!(out_of_fds(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!out_of_fds(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
