//! A write deadline for one HTTP connection: hyper has a header read timeout but none for
//! writing, so a client that sends requests and never reads the answers would hold its
//! `http.max_connections` slot for good. [`WriteDeadline`] wraps the socket and fails a
//! write (or flush, or shutdown) that has made no progress for `http.write_timeout_ms`;
//! hyper then drops the connection and the slot frees.
//!
//! The clock starts when the socket first refuses bytes (`Pending`) and stops at the next
//! write that takes any. The kernel reports a full socket writable again only once a
//! good part of its send buffer (which grows to megabytes) has drained, so a slow reader
//! of a large answer may take longer than the limit to free that much: when the limit
//! passes, the bytes still queued in the kernel (`SIOCOUTQ`) are looked at, and if the
//! client took any since the clock started, it starts again. A reader that keeps taking
//! something is never cut off.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How many bytes a socket's kernel send queue still holds (`None`: unknown).
pub(super) trait Unsent {
    fn unsent(&self) -> Option<u32>;
}

impl Unsent for tokio::net::TcpStream {
    fn unsent(&self) -> Option<u32> {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer it is given.
        let r = unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        (r == 0).then_some(n.max(0) as u32)
    }
}

/// `S` with writes that fail with `TimedOut` after `limit` without progress.
pub(super) struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write is pending: fires `limit` after the first refusal (or after
    /// the client last took bytes from the kernel's queue).
    stalled: Option<Pin<Box<Sleep>>>,
    /// The kernel's queue when the clock (re)started.
    queued: Option<u32>,
}

impl<S: Unsent> WriteDeadline<S> {
    pub(super) fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
            queued: None,
        }
    }

    /// After the inner write's answer `r`: progress disarms the deadline, a refusal arms
    /// it (once) and turns into `TimedOut` when it has passed with nothing taken.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        if self.stalled.is_none() {
            self.queued = self.inner.unsent();
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let now = self.inner.unsent();
        if now.zip(self.queued).is_some_and(|(now, then)| now < then) {
            // The client is reading, only slowly: the clock starts again.
            self.queued = now;
            sleep.as_mut().reset(Instant::now() + limit);
            return match sleep.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => Poll::Ready(Err(timed_out())),
            };
        }
        Poll::Ready(Err(timed_out()))
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client took nothing of the answer for http.write_timeout_ms",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unsent + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    impl Unsent for tokio::io::DuplexStream {
        fn unsent(&self) -> Option<u32> {
            None
        }
    }

    /// A socket that never takes a write, with a kernel queue the test drains by hand.
    struct Full(Arc<AtomicU32>);

    impl Unsent for Full {
        fn unsent(&self) -> Option<u32> {
            Some(self.0.load(Ordering::Relaxed))
        }
    }

    impl AsyncWrite for Full {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The socket stays full, but the kernel's queue shrinks every 20 s (the client
    /// reads, too slowly to free room): the 30 s clock keeps starting again; once the
    /// queue stops shrinking, the write fails 30 s later.
    #[tokio::test(start_paused = true)]
    async fn a_full_socket_whose_queue_drains_is_not_cut_off() {
        let queue = Arc::new(AtomicU32::new(1_000_000));
        let drain = queue.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                drain.fetch_sub(1000, Ordering::Relaxed);
            }
        });
        let mut w = WriteDeadline::new(Full(queue), Duration::from_secs(30));
        let t0 = Instant::now();
        let err = w.write(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Checked at 30, 60, 90 (each saw a smaller queue), 120 (likewise: the last drain
        // was at 100), then 150 with nothing taken since 120.
        assert_eq!(t0.elapsed(), Duration::from_secs(150));
    }

    /// A pipe whose reader takes nothing: writes fill its buffer, then fail after the
    /// limit (time paused, so the test does not wait for it).
    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_limit() {
        let (writer, _reader) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(writer, Duration::from_secs(30));
        let t0 = Instant::now();
        let err = loop {
            match w.write(&[0u8; 512]).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
    }

    /// A reader that takes a little every 20 s never trips a 30 s limit: each write that
    /// goes through restarts the clock.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_not_cut_off() {
        let (writer, mut reader) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(writer, Duration::from_secs(30));
        let drain = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let mut total = 0;
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                total += reader.read(&mut buf).await.unwrap();
            }
            total
        });
        let mut written = 0;
        while written < 1024 + 20 * 256 - 512 {
            written += w.write(&[0u8; 256]).await.expect("never stalls 30 s");
        }
        assert!(drain.await.unwrap() > 0);
    }

    /// Reads pass through untouched.
    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = WriteDeadline::new(a, Duration::from_millis(100));
        b.write_all(b"GET /").await.unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET /");
    }
}
