//! Asking a shard from the fleet's tasks (never from a shard): the message is sent
//! waiting for room in the shard's mailbox, and the answer awaited, both within
//! [`SHARD_ANSWER`], so a busy shard delays these tasks a bounded time and a stopping
//! one fails them at once.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::mailbox::{home_shard, ClientInfo, Mailboxes, ShardMsg};

/// Longest wait for a shard's room and answer together.
pub(super) const SHARD_ANSWER: Duration = Duration::from_secs(5);

/// Sends `ask` to `shard` and waits for its `answer` (`Err`: no room, no answer, or the
/// shard stopped, within [`SHARD_ANSWER`]).
pub(super) async fn ask_shard<T>(
    shards: &Mailboxes,
    shard: usize,
    ask: ShardMsg,
    answer: oneshot::Receiver<T>,
) -> Result<T, ()> {
    let asked = async {
        shards.send(shard, ask).await.map_err(drop)?;
        answer.await.map_err(drop)
    };
    tokio::time::timeout(SHARD_ANSWER, asked)
        .await
        .unwrap_or(Err(()))
}

/// What `client_id`'s home shard knows of it (`None`: no session there).
pub(super) async fn client_info(
    shards: &Mailboxes,
    client_id: &str,
) -> Result<Option<ClientInfo>, ()> {
    let (reply, answer) = oneshot::channel();
    let ask = ShardMsg::ClientInfo {
        client_id: client_id.to_string(),
        reply,
    };
    ask_shard(shards, home_shard(client_id, shards.len()), ask, answer).await
}
