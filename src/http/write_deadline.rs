//! A write deadline for one HTTP connection: hyper has a header read timeout but none for
//! writing, so a client that sends requests and never reads the answers would hold its
//! `http.max_connections` slot for good. [`WriteDeadline`] wraps the socket and fails a
//! write (or flush, or shutdown) that has made no progress for `http.write_timeout_ms`;
//! hyper then drops the connection and the slot frees.
//!
//! The clock starts when the socket first refuses bytes (`Pending`) and stops at the next
//! write that takes any: a slow reader that keeps taking something is never cut off.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `S` with writes that fail with `TimedOut` after `limit` without progress.
pub(super) struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write is pending: fires `limit` after the first refusal.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub(super) fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After the inner write's answer `r`: progress disarms the deadline, a refusal arms
    /// it (once) and turns into `TimedOut` when it has passed.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing of the answer for http.write_timeout_ms",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
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

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
