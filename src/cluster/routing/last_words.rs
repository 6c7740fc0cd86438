//! The messages connection's last words: when the gateway stops, the messages its shards
//! queued last (the wills a graceful stop publishes, `[mqtt] wills_on_stop`) are written
//! to NATS, and the connection waits for the PONG of a PING written after them, so the
//! server has read them before the node closes the socket (a close with unread input
//! resets the connection, and a reset can lose what the server had not read yet). At
//! most [`LAST_WORDS_WAIT`]; the shards have stopped, so the queue only empties.

use std::time::Duration;

use bytes::BytesMut;

use super::subscribed::LAST_WORDS;
use super::{Exit, Session};

/// The longest the last words wait for NATS's PONG (within what is left of
/// `Fleet::close`'s time).
pub(super) const LAST_WORDS_WAIT: Duration = Duration::from_millis(1500);

impl Session<'_> {
    /// Writes what is queued, then a PING, and waits for its PONG, the reader's end or
    /// [`LAST_WORDS_WAIT`], whichever is first.
    pub(super) async fn last_words(
        &mut self,
        reader: &mut tokio::task::JoinHandle<String>,
        out: &mut BytesMut,
    ) -> Exit {
        let deadline = tokio::time::Instant::now() + LAST_WORDS_WAIT;
        let router = self.router;
        let handle = &router.handle;
        let queued = handle.queue.len();
        while !handle.queue.is_empty() {
            self.publish_queued(out);
            if let Err(e) = self.flush(out).await {
                return Exit::Failed(e);
            }
        }
        (self.table.groups.lock())
            .unwrap_or_else(|p| p.into_inner())
            .barrier(vec![(LAST_WORDS, 0)], out);
        if let Err(e) = self.flush(out).await {
            return Exit::Failed(e);
        }
        let read = handle.subscribed.last_words_read();
        tokio::select! {
            _ = read => {
                tracing::debug!(queued, "cluster: NATS has read the routing connection's last messages");
                Exit::Stopped
            }
            ended = &mut *reader => Exit::ReaderEnded(ended.unwrap_or_else(|e| e.to_string())),
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(queued, wait = ?LAST_WORDS_WAIT, "cluster: NATS did not confirm the routing connection's last messages; some may be lost");
                Exit::Stopped
            }
        }
    }
}
