//! A push request as validated: the fields `/v1/push` accepts (`parse_push`, each error
//! naming its field), and the answers a push and a batch give back.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::Value;

use crate::config::Config;
use crate::push_json::{Field, PushField, PushObject};
use crate::topic;

use super::error::ApiError;
use super::message_id::MessageId;
use super::{DEFAULT_TIMEOUT_MS, MAX_IDEMPOTENCY_KEY, MAX_TIMEOUT_MS};

/// One validated push.
pub(super) struct PushSpec {
    pub(super) client_id: Option<String>,
    /// Shared with the [`crate::message::Message`] built from it.
    pub(super) topic: Arc<str>,
    pub(super) payload: Bytes,
    pub(super) qos: u8,
    pub(super) retain: bool,
    pub(super) ttl_secs: Option<u32>,
    pub(super) wait_ack: bool,
    pub(super) timeout: Duration,
    pub(super) idempotency_key: Option<String>,
}

/// The answer to one accepted push, as `docs/API.md` documents it: built and
/// serialized without a JSON value tree (a batch answers up to `max_batch` of them).
#[derive(Clone, Debug)]
pub(super) enum PushAnswer {
    /// `{"id", "status"}`, plus `"reason"` when the status is `dropped`.
    Client {
        id: MessageId,
        status: &'static str,
        reason: Option<&'static str>,
    },
    /// `{"id", "matched"}`.
    Topic { id: MessageId, matched: usize },
}

impl PushAnswer {
    /// The `status` label of `gateway_push_messages_total`.
    pub(super) fn status(&self) -> &'static str {
        match self {
            PushAnswer::Client { status, .. } => status,
            PushAnswer::Topic { .. } => "matched",
        }
    }
}

impl serde::Serialize for PushAnswer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self {
            PushAnswer::Client { id, status, reason } => {
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", status)?;
                if let Some(r) = reason {
                    m.serialize_entry("reason", r)?;
                }
            }
            PushAnswer::Topic { id, matched } => {
                m.serialize_entry("id", id)?;
                m.serialize_entry("matched", matched)?;
            }
        }
        m.end()
    }
}

/// One item of a batch's `results`: its answer, or its error object.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub(super) enum BatchResult {
    Answer(PushAnswer),
    Error(Value),
}

#[derive(serde::Serialize)]
pub(super) struct BatchAnswer<'a> {
    pub(super) results: &'a [BatchResult],
}

impl BatchAnswer<'_> {
    /// The answer's JSON, byte for byte what serde_json writes for it, written straight
    /// into one buffer sized for the batch: through `axum::Json` each answer was a dozen
    /// small writes into a buffer that grew from 128 bytes, and every key and label went
    /// through the string escaper.
    pub(super) fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 48 * self.results.len());
        out.extend_from_slice(b"{\"results\":[");
        for (i, r) in self.results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match r {
                BatchResult::Answer(a) => a.write_json(&mut out),
                BatchResult::Error(v) => json_into(&mut out, v),
            }
        }
        out.extend_from_slice(b"]}");
        out
    }
}

impl PushAnswer {
    /// Appends this answer's JSON as its `Serialize` writes it.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"id\":\"");
        match self {
            PushAnswer::Client { id, status, reason } => {
                id.write_to(out);
                out.extend_from_slice(b"\",\"status\":");
                label_into(out, status);
                if let Some(r) = reason {
                    out.extend_from_slice(b",\"reason\":");
                    label_into(out, r);
                }
            }
            PushAnswer::Topic { id, matched } => {
                id.write_to(out);
                out.extend_from_slice(b"\",\"matched\":");
                json_into(out, matched);
            }
        }
        out.push(b'}');
    }
}

/// A status or reason label as a JSON string: as it is when it needs no escaping (they
/// are all `snake_case`), else through serde_json.
fn label_into(out: &mut Vec<u8>, label: &str) {
    if label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        out.push(b'"');
        out.extend_from_slice(label.as_bytes());
        out.push(b'"');
    } else {
        json_into(out, label);
    }
}

fn json_into<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Writing into a Vec cannot fail, nor can serializing a number, string or Value.
    let _ = serde_json::to_writer(out, v);
}

/// Validates a push object; errors name the field (`messages[3].qos` for item 3 of a
/// batch). The field name is only formatted when there is an error.
pub(super) fn parse_push(
    m: &PushObject,
    config: &Config,
    index: Option<usize>,
) -> Result<PushSpec, ApiError> {
    use PushField as P;
    let fields = Fields { m, index };
    let f = |name: &str| fields.name(name);
    if let Some(k) = m.unknown() {
        return Err(ApiError::bad(&f(k), format!("unknown field `{k}`")));
    }
    let string = |field| fields.string(field);
    let boolean = |field| fields.boolean(field);
    let integer = |field, min: u64, max: u64| fields.integer(field, min, max);

    let client_id = check_client_id(string(P::ClientId)?, config, &f)?;
    let topic =
        string(P::Topic)?.ok_or_else(|| ApiError::bad(&f("topic"), "`topic` is required"))?;
    check_topic(topic, config, &f)?;
    let raw =
        string(P::Payload)?.ok_or_else(|| ApiError::bad(&f("payload"), "`payload` is required"))?;
    let payload = decode_payload(raw, string(P::Encoding)?, &f)?;
    let max = config.mqtt.max_packet_size as usize;
    if payload.len() + topic.len() + 16 > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the message would exceed max_packet_size ({max} bytes)"),
        )
        .field(f("payload")));
    }
    let qos = integer(P::Qos, 0, 1)?.unwrap_or(0) as u8;
    let retain = boolean(P::Retain)?;
    if retain && client_id.is_some() {
        return Err(ApiError::bad(
            &f("retain"),
            "`retain` applies to topic pushes; omit it when `client_id` is set",
        ));
    }
    let ttl_secs = integer(P::TtlSecs, 1, u64::from(u32::MAX))?.map(|n| n as u32);
    let wait_ack = boolean(P::WaitAck)?;
    if wait_ack && (qos != 1 || client_id.is_none()) {
        return Err(ApiError::bad(
            &f("wait_ack"),
            "`wait_ack` needs `qos`: 1 and a `client_id`",
        ));
    }
    let timeout = Duration::from_millis(
        integer(P::TimeoutMs, 1, MAX_TIMEOUT_MS)?.unwrap_or(DEFAULT_TIMEOUT_MS),
    );
    let idempotency_key = match string(P::IdempotencyKey)? {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY => {
            return Err(ApiError::bad(
                &f("idempotency_key"),
                format!("`idempotency_key` must be 1..={MAX_IDEMPOTENCY_KEY} bytes"),
            ))
        }
        k => k.map(str::to_owned),
    };
    Ok(PushSpec {
        client_id,
        topic: Arc::from(topic),
        payload,
        qos,
        retain,
        ttl_secs,
        wait_ack,
        timeout,
        idempotency_key,
    })
}

/// The fields of one push object, and the name each error gives a field.
struct Fields<'a> {
    m: &'a PushObject<'a>,
    index: Option<usize>,
}

impl Fields<'_> {
    /// The field's name in an error: `messages[3].qos` for item 3 of a batch.
    fn name(&self, name: &str) -> String {
        match self.index {
            Some(i) => format!("messages[{i}].{name}"),
            None => name.to_owned(),
        }
    }

    /// A field is given or omitted: `null` is refused (the OpenAPI types are not nullable).
    fn get(&self, field: PushField) -> Result<Option<&Field<'_>>, ApiError> {
        match self.m.get(field) {
            Some(Field::Null) => Err(ApiError::bad(
                &self.name(field.name()),
                format!("`{}` must not be null (omit it instead)", field.name()),
            )),
            v => Ok(v),
        }
    }

    /// 400 naming `field`, which is not of its type (`what` it must be).
    fn wrong(&self, field: PushField, what: &str) -> ApiError {
        let name = field.name();
        ApiError::bad(&self.name(name), format!("`{name}` must be {what}"))
    }

    fn string(&self, field: PushField) -> Result<Option<&str>, ApiError> {
        match self.get(field)? {
            None => Ok(None),
            Some(Field::Str(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong(field, "a string")),
        }
    }

    fn boolean(&self, field: PushField) -> Result<bool, ApiError> {
        match self.get(field)? {
            None => Ok(false),
            Some(Field::Bool(b)) => Ok(*b),
            Some(_) => Err(self.wrong(field, "true or false")),
        }
    }

    fn integer(&self, field: PushField, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        match self.get(field)? {
            None => Ok(None),
            Some(Field::UInt(n)) if (min..=max).contains(n) => Ok(Some(*n)),
            Some(_) => Err(self.wrong(field, &format!("an integer in {min}..={max}"))),
        }
    }
}

/// `client_id`: not empty, no NUL, at most `mqtt.max_client_id_len` bytes.
fn check_client_id(
    c: Option<&str>,
    config: &Config,
    f: &dyn Fn(&str) -> String,
) -> Result<Option<String>, ApiError> {
    match c {
        Some("") => Err(ApiError::bad(
            &f("client_id"),
            "`client_id` must not be empty",
        )),
        Some(c) if c.contains('\0') => Err(ApiError::bad(
            &f("client_id"),
            "`client_id` must not contain NUL (U+0000)",
        )),
        Some(c) if c.len() > config.mqtt.max_client_id_len as usize => Err(ApiError::bad(
            &f("client_id"),
            format!(
                "`client_id` is longer than {} bytes",
                config.mqtt.max_client_id_len
            ),
        )),
        c => Ok(c.map(str::to_owned)),
    }
}

/// `topic`: a valid MQTT topic name within `mqtt.max_topic_len`.
fn check_topic(topic: &str, config: &Config, f: &dyn Fn(&str) -> String) -> Result<(), ApiError> {
    if !topic::valid_topic_name(topic) {
        return Err(ApiError::bad(
            &f("topic"),
            "`topic` must be a valid MQTT topic name (non-empty, no `+` or `#`)",
        ));
    }
    if topic.len() > config.mqtt.max_topic_len as usize {
        return Err(ApiError::bad(
            &f("topic"),
            format!(
                "`topic` is longer than mqtt.max_topic_len ({} bytes)",
                config.mqtt.max_topic_len
            ),
        ));
    }
    Ok(())
}

/// The payload's bytes, from `payload` in its `encoding` (utf8 by default, or base64).
fn decode_payload(
    raw: &str,
    encoding: Option<&str>,
    f: &dyn Fn(&str) -> String,
) -> Result<Bytes, ApiError> {
    let payload = match encoding.unwrap_or("utf8") {
        "utf8" => Bytes::copy_from_slice(raw.as_bytes()),
        "base64" => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|e| {
                    ApiError::bad(&f("payload"), format!("`payload` is not valid base64: {e}"))
                })?,
        ),
        _ => {
            return Err(ApiError::bad(
                &f("encoding"),
                "`encoding` must be \"utf8\" or \"base64\"",
            ))
        }
    };
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The batch answer written by hand is byte for byte serde_json's.
    #[test]
    fn batch_answer_json_is_serde_jsons() {
        let id = |n| MessageId::new(0x65f1_c2a0, n);
        let results = [
            BatchResult::Answer(PushAnswer::Client {
                id: id(0),
                status: "sent",
                reason: None,
            }),
            BatchResult::Answer(PushAnswer::Client {
                id: id(0xffff_ffff),
                status: "dropped",
                reason: Some("slow_consumer"),
            }),
            BatchResult::Answer(PushAnswer::Client {
                id: id(7),
                status: "odd \"label\"\n",
                reason: Some("é"),
            }),
            BatchResult::Answer(PushAnswer::Topic {
                id: id(8),
                matched: 12_345,
            }),
            BatchResult::Error(
                json!({"error": {"code": "bad_request", "message": "`qos` must be \"0\"", "field": "messages[4].qos", "status": 400}}),
            ),
        ];
        for n in 0..=results.len() {
            let answer = BatchAnswer {
                results: &results[..n],
            };
            assert_eq!(
                String::from_utf8(answer.to_json()).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
    }
}
