//! What the events tests share: the `[events]` config of a TOML snippet, a started
//! pipeline on the test's runtime, events to send, and polling with a deadline.
#![allow(dead_code)]

pub mod receiver;

use std::time::Duration;

use gateway::codec::Version;
use gateway::config::Config;
use gateway::events::{Connected, Event, EventKind, Events, SeqGen};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// The `[events]` config of `toml` (merged over the defaults and validated).
pub fn events_config(toml: &str) -> gateway::events::EventsConfig {
    Config::from_toml_str(&format!("[events]\n{toml}"))
        .expect("valid [events]")
        .events
}

/// Polls `f` every 20 ms until it is true; panics with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A listener on a free loopback port.
pub async fn free_listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A `connected` event of MQTT 5 client `id` from 10.1.2.3:40000, user `alice`.
pub fn connected(seq: &mut SeqGen, id: &str, session_present: bool) -> Event {
    Event::now(
        seq.next_seq(),
        id.into(),
        EventKind::Connected(Box::new(Connected {
            username: Some("alice".into()),
            peer: "10.1.2.3:40000".parse().unwrap(),
            version: Version::V5,
            keep_alive: 60,
            clean_start: !session_present,
            session_present,
        })),
    )
}

/// A small event (`session_expired`) of client `dev-<i>`, to count and order.
pub fn numbered(seq: &mut SeqGen, i: usize) -> Event {
    Event::now(
        seq.next_seq(),
        format!("dev-{i}").into(),
        EventKind::SessionExpired,
    )
}

/// The pipeline of `[events]` + `toml` on the test's runtime, node `node-a`.
pub fn start(toml: &str) -> Events {
    Events::start(
        &events_config(toml),
        "node-a",
        &tokio::runtime::Handle::current(),
    )
    .expect("events start")
}
