//! Unit tests of the push API: access rules, body permits, push validation.

use super::access::{constant_time_eq, Access, Refusal};
use super::body::{read_body, LARGE_BODY};
use super::error::ApiError;
use super::spec::{parse_push, PushSpec};
use super::*;

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::push_json::MaybePush;

#[test]
fn constant_time_eq_compares() {
    assert!(constant_time_eq(b"secret", b"secret"));
    assert!(!constant_time_eq(b"secret", b"secreT"));
    assert!(!constant_time_eq(b"secret", b"secret2"));
}

fn cfg() -> Config {
    Config::default()
}

fn access(toml: &str) -> Access {
    Access::from_config(&Config::from_toml_str(toml).unwrap().http)
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

/// A body over `LARGE_BODY` waits for a permit; a small one does not need one.
#[tokio::test]
async fn large_bodies_wait_for_a_permit() {
    let none = tokio::sync::Semaphore::new(0);
    let small = Body::from(vec![b'x'; 1000]);
    let (got, _) = read_body(small, 1 << 20, 1000, &none).await.unwrap();
    assert_eq!(got.len(), 1000);
    let large = || Body::from(vec![b'x'; LARGE_BODY + 1]);
    let waiting = read_body(large(), 1 << 20, 0, &none);
    let r = tokio::time::timeout(Duration::from_millis(50), waiting).await;
    assert!(r.is_err(), "read a large body without a permit");
    let one = tokio::sync::Semaphore::new(1);
    let (got, permit) = read_body(large(), 1 << 20, 0, &one).await.unwrap();
    assert_eq!(got.len(), LARGE_BODY + 1);
    assert_eq!(one.available_permits(), 0, "held while the body is used");
    drop(permit);
    assert_eq!(one.available_permits(), 1, "then given back");
    let over = read_body(large(), LARGE_BODY, 0, &one).await;
    assert_eq!(
        over.err().map(|e| e.status),
        Some(StatusCode::PAYLOAD_TOO_LARGE)
    );
}

#[test]
fn the_default_api_answers_only_loopback() {
    let a = access("");
    assert_eq!(a.check(ip("127.0.0.1"), None), Ok(()));
    assert_eq!(a.check(ip("127.0.0.2"), None), Ok(()));
    assert_eq!(a.check(ip("::1"), None), Ok(()));
    assert_eq!(a.check(ip("::ffff:127.0.0.1"), None), Ok(()));
    for remote in ["192.0.2.2", "10.0.0.1", "fd00::2", "::ffff:192.0.2.2"] {
        assert_eq!(
            a.check(ip(remote), None),
            Err(Refusal::RemoteWithoutToken),
            "{remote}"
        );
    }
    assert_eq!(a.check(None, None), Err(Refusal::RemoteWithoutToken));
    let open = access("[http]\nallow_remote_without_token = true\n");
    assert_eq!(open.check(ip("192.0.2.2"), None), Ok(()));
}

#[test]
fn tokens_are_needed_from_every_source_once_set() {
    let a = access("[http]\ntokens = [\"t0k\"]\nallow_remote_without_token = true\n");
    for peer in ["127.0.0.1", "192.0.2.2"] {
        assert_eq!(a.check(ip(peer), None), Err(Refusal::Unauthorized));
        assert_eq!(
            a.check(ip(peer), Some("Bearer nope")),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(ip(peer), Some("Basic t0k")),
            Err(Refusal::Unauthorized)
        );
        for ok in ["Bearer t0k", "bearer t0k", "BEARER  t0k "] {
            assert_eq!(a.check(ip(peer), Some(ok)), Ok(()), "{ok}");
        }
    }
}

fn parse(v: Value) -> Result<PushSpec, ApiError> {
    let text = v.to_string();
    match serde_json::from_str::<MaybePush>(&text).unwrap() {
        MaybePush::Object(m) => parse_push(&m, &cfg(), None),
        MaybePush::NotObject => panic!("not an object: {text}"),
    }
}

#[test]
fn push_validation_names_the_field() {
    let field = |v: Value| parse(v).err().and_then(|e| e.field).unwrap_or_default();
    assert_eq!(field(json!({"payload": "x"})), "topic");
    assert_eq!(field(json!({"topic": "a/+", "payload": "x"})), "topic");
    assert_eq!(field(json!({"topic": "a", "payload": 5})), "payload");
    assert_eq!(
        field(json!({"topic": "a", "payload": "x", "qos": 2})),
        "qos"
    );
    assert_eq!(
        field(json!({"topic": "a", "payload": "!!", "encoding": "base64"})),
        "payload"
    );
    assert_eq!(
        field(json!({"topic": "a", "payload": "x", "encoding": "hex"})),
        "encoding"
    );
    assert_eq!(
        field(json!({"topic": "a", "payload": "x", "ttl_secs": 0})),
        "ttl_secs"
    );
    assert_eq!(
        field(json!({"topic": "a", "payload": "x", "wait_ack": true})),
        "wait_ack"
    );
    assert_eq!(
        field(json!({"topic": "a", "payload": "x", "colour": 1})),
        "colour"
    );
    assert_eq!(
        field(json!({"topic": "a", "payload": "x", "client_id": ""})),
        "client_id"
    );
    let ok = parse(json!({"client_id": "d", "topic": "a", "payload": "aGk=", "encoding": "base64", "qos": 1, "wait_ack": true})).unwrap();
    assert_eq!(&ok.payload[..], b"hi");
    assert!(ok.wait_ack);
}

/// A topic push some shard answered is not 503 because another shard ended first (it
/// delivered nothing there); with no answer at all it is (issue 17.11).
#[tokio::test]
async fn a_topic_push_answered_by_some_shard_is_not_503() {
    use super::push::{shutting_down, topic_matched};
    let answers = |rs: Vec<Result<usize, ApiError>>| rs.into_iter().map(std::future::ready);
    let r = topic_matched(answers(vec![Ok(2), Err(shutting_down()), Ok(1)])).await;
    assert_eq!(r.map_err(|e| e.status), Ok(3));
    let r = topic_matched(answers(vec![Err(shutting_down()), Err(shutting_down())])).await;
    assert_eq!(r.map_err(|e| e.code), Err("shutting_down"));
    let timeout = ApiError::answer_timeout(Duration::from_millis(1));
    let r = topic_matched(answers(vec![])).await;
    assert_eq!(r.ok(), Some(0), "no shard asked: none matched");
    let r = topic_matched(answers(vec![Ok(1), Err(timeout)])).await;
    assert_eq!(r.map_err(|e| e.status), Err(StatusCode::GATEWAY_TIMEOUT));
}
