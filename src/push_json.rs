//! Push request bodies parsed straight into borrowed fields.
//!
//! The push API validates each field itself (so an error can name it, `messages[3].qos`),
//! so it only needs each member of an object as "null, a bool, a non-negative integer, a
//! string, or something else". Parsing into `serde_json::Value` built a `BTreeMap`, a
//! `String` per key and per string value for every message of a batch — half of the
//! HTTP side's CPU at high push rates was malloc and free of those trees. Here a member
//! is a [`Field`] whose strings borrow from the request body unless they contain escapes,
//! and an object is a `Vec` of members in document order. A push object (`/v1/push`, each
//! item of a batch) is read in one pass into a [`PushObject`]: its known members by
//! position and its first unknown key, with no member list and no search by name.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value, as the push API reads it.
#[derive(Debug, PartialEq)]
pub enum Field<'a> {
    Null,
    Bool(bool),
    /// A non-negative integer (what `serde_json::Value::as_u64` accepts).
    UInt(u64),
    Str(Cow<'a, str>),
    /// Anything else: a negative or fractional number, an array, an object.
    Other,
}

/// The members of a JSON object, in document order.
#[derive(Debug, Default, PartialEq)]
pub struct Object<'a>(pub Vec<(Cow<'a, str>, Field<'a>)>);

impl<'a> Object<'a> {
    /// A member by name; of a repeated key the last one counts (as with serde_json's
    /// `Map`).
    pub fn get(&self, name: &str) -> Option<&Field<'a>> {
        self.0.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The first key, in sort order, that is not in `known`.
    pub fn unknown(&self, known: &[&str]) -> Option<&str> {
        self.0
            .iter()
            .map(|(k, _)| k.as_ref())
            .filter(|k| !known.contains(k))
            .min()
    }
}

/// A JSON value that should be an object.
#[derive(Debug, PartialEq)]
pub enum MaybeObject<'a> {
    Object(Object<'a>),
    NotObject,
}

/// The body of `POST /v1/push/batch`: `{"messages": [...]}`, or why it is not.
#[derive(Debug, PartialEq)]
pub enum BatchBody<'a> {
    NotObject,
    Batch {
        /// `None` without a `messages` member; `Some(None)` if it is not an array.
        messages: Option<Option<Vec<MaybePush<'a>>>>,
        /// The first member other than `messages`, in sort order.
        unknown: Option<String>,
    },
}

/// Any JSON value, checked as strictly as parsing it into a `serde_json::Value` would
/// (numbers in range, strings valid, the nesting limit), then dropped. serde's
/// `IgnoredAny` would skip it unchecked, so a body `Value` rejects could get through.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Skip;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Skip)
            }
        }
        d.deserialize_any(V)
    }
}

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Visits any JSON value; `Other` for the kinds the caller does not take apart
/// (consumed, so parsing goes on after them).
macro_rules! scalar_visits {
    ($out:ty, $other:expr) => {
        fn visit_i64<E>(self, _: i64) -> Result<$out, E> {
            Ok($other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<$out, E> {
            Ok($other)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<$out, A::Error> {
            while seq.next_element::<Skip>()?.is_some() {}
            Ok($other)
        }
    };
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Field<'de>, E> {
                Ok(Field::Null)
            }
            fn visit_none<E>(self) -> Result<Field<'de>, E> {
                Ok(Field::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
                Ok(Field::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
                Ok(Field::UInt(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Field::Other)
            }
            scalar_visits!(Field<'de>, Field::Other);
        }
        d.deserialize_any(V)
    }
}

/// Visits any JSON value; an object becomes `$object(members)`, anything else `$other`.
macro_rules! not_an_object {
    ($out:ty, $other:expr) => {
        fn visit_unit<E>(self) -> Result<$out, E> {
            Ok($other)
        }
        fn visit_bool<E>(self, _: bool) -> Result<$out, E> {
            Ok($other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<$out, E> {
            Ok($other)
        }
        fn visit_str<E>(self, _: &str) -> Result<$out, E> {
            Ok($other)
        }
        scalar_visits!($out, $other);
    };
}

impl<'de> Deserialize<'de> for MaybeObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Key(k), v)) = map.next_entry::<Key, Field>()? {
                    members.push((k, v));
                }
                Ok(MaybeObject::Object(Object(members)))
            }
            not_an_object!(MaybeObject<'de>, MaybeObject::NotObject);
        }
        d.deserialize_any(V)
    }
}

/// The members a push object may have, in the order `PushObject` keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushField {
    ClientId,
    Topic,
    Payload,
    Encoding,
    Qos,
    Retain,
    TtlSecs,
    WaitAck,
    TimeoutMs,
    IdempotencyKey,
}

impl PushField {
    pub const ALL: [PushField; 10] = [
        PushField::ClientId,
        PushField::Topic,
        PushField::Payload,
        PushField::Encoding,
        PushField::Qos,
        PushField::Retain,
        PushField::TtlSecs,
        PushField::WaitAck,
        PushField::TimeoutMs,
        PushField::IdempotencyKey,
    ];

    /// The member's name in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            PushField::ClientId => "client_id",
            PushField::Topic => "topic",
            PushField::Payload => "payload",
            PushField::Encoding => "encoding",
            PushField::Qos => "qos",
            PushField::Retain => "retain",
            PushField::TtlSecs => "ttl_secs",
            PushField::WaitAck => "wait_ack",
            PushField::TimeoutMs => "timeout_ms",
            PushField::IdempotencyKey => "idempotency_key",
        }
    }

    fn of(key: &str) -> Option<PushField> {
        PushField::ALL.into_iter().find(|f| f.name() == key)
    }
}

/// A push object as the API reads it: each known member (of a repeated key the last
/// one, as with [`Object::get`]) and the first unknown key in sort order (as
/// [`Object::unknown`] finds it).
#[derive(Debug, Default, PartialEq)]
pub struct PushObject<'a> {
    fields: [Option<Field<'a>>; 10],
    unknown: Option<Cow<'a, str>>,
}

impl<'a> PushObject<'a> {
    pub fn get(&self, f: PushField) -> Option<&Field<'a>> {
        self.fields[f as usize].as_ref()
    }

    /// The first member, in sort order, that is not a [`PushField`].
    pub fn unknown(&self) -> Option<&str> {
        self.unknown.as_deref()
    }
}

/// A JSON value that should be a push object. Kept inline in a batch's `Vec` (about
/// 270 bytes an item): boxing it would bring back the allocation per item it saves.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum MaybePush<'a> {
    Object(PushObject<'a>),
    NotObject,
}

impl<'de> Deserialize<'de> for MaybePush<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybePush<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut o = PushObject::default();
                while let Some(Key(k)) = map.next_key::<Key>()? {
                    match PushField::of(&k) {
                        Some(f) => o.fields[f as usize] = Some(map.next_value::<Field>()?),
                        None => {
                            map.next_value::<Skip>()?;
                            if o.unknown.as_deref().is_none_or(|u| k.as_ref() < u) {
                                o.unknown = Some(k);
                            }
                        }
                    }
                }
                Ok(MaybePush::Object(o))
            }
            not_an_object!(MaybePush<'de>, MaybePush::NotObject);
        }
        d.deserialize_any(V)
    }
}

/// The `messages` member: the items, or `None` if it is not an array.
struct Messages<'a>(Option<Vec<MaybePush<'a>>>);

impl<'de> Deserialize<'de> for Messages<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(item) = seq.next_element::<MaybePush>()? {
                    items.push(item);
                }
                Ok(Messages(Some(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Messages(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for BatchBody<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BatchBody<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut messages = None;
                let mut unknown: Option<String> = None;
                while let Some(Key(k)) = map.next_key::<Key>()? {
                    if k == "messages" {
                        messages = Some(map.next_value::<Messages>()?.0);
                    } else {
                        map.next_value::<Skip>()?;
                        if unknown.as_deref().is_none_or(|u| k.as_ref() < u) {
                            unknown = Some(k.into_owned());
                        }
                    }
                }
                Ok(BatchBody::Batch { messages, unknown })
            }
            not_an_object!(BatchBody<'de>, BatchBody::NotObject);
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn object(json: &str) -> Object<'_> {
        match serde_json::from_str::<MaybeObject>(json).unwrap() {
            MaybeObject::Object(o) => o,
            MaybeObject::NotObject => panic!("not an object: {json}"),
        }
    }

    #[test]
    fn members_keep_their_kind_and_borrow_unescaped_strings() {
        let o = object(
            r#"{"a": null, "b": true, "c": 7, "d": -1, "e": 1.5, "f": "x", "g": "\u00e9\n",
                "h": [1, [2]], "i": {"j": {}}, "k": 18446744073709551615}"#,
        );
        assert_eq!(o.get("a"), Some(&Field::Null));
        assert_eq!(o.get("b"), Some(&Field::Bool(true)));
        assert_eq!(o.get("c"), Some(&Field::UInt(7)));
        assert_eq!(o.get("d"), Some(&Field::Other));
        assert_eq!(o.get("e"), Some(&Field::Other));
        assert!(matches!(o.get("f"), Some(Field::Str(Cow::Borrowed("x")))));
        assert!(matches!(o.get("g"), Some(Field::Str(Cow::Owned(s))) if s == "é\n"));
        assert_eq!(o.get("h"), Some(&Field::Other));
        assert_eq!(o.get("i"), Some(&Field::Other));
        assert_eq!(o.get("k"), Some(&Field::UInt(u64::MAX)));
        assert_eq!(o.get("z"), None);
    }

    #[test]
    fn the_last_of_a_repeated_key_counts_and_unknown_keys_come_in_sort_order() {
        let o = object(r#"{"qos": 0, "zz": 1, "qos": 1, "aa": 2, "topic": "t"}"#);
        assert_eq!(o.get("qos"), Some(&Field::UInt(1)));
        assert_eq!(o.unknown(&["qos", "topic"]), Some("aa"));
        assert_eq!(o.unknown(&["qos", "topic", "aa", "zz"]), None);
    }

    /// Agrees with `serde_json::Value` on what a member is, for arbitrary JSON.
    #[test]
    fn agrees_with_serde_json_value() {
        let samples = [
            r#"{"s": "a\"b", "n": 0, "neg": -0, "f": 0.0, "e": 1e3, "big": 12345678901234567890}"#,
            r#"{"nested": {"a": [1, {"b": null}]}, "t": false, "u": "\ud83d\ude00"}"#,
        ];
        for json in samples {
            let mine = object(json);
            let Value::Object(theirs) = serde_json::from_str::<Value>(json).unwrap() else {
                unreachable!()
            };
            assert_eq!(mine.0.len(), theirs.len(), "{json}");
            for (k, v) in &theirs {
                let expected = match v {
                    Value::Null => Field::Null,
                    Value::Bool(b) => Field::Bool(*b),
                    Value::String(s) => Field::Str(Cow::Owned(s.clone())),
                    v => v.as_u64().map_or(Field::Other, Field::UInt),
                };
                let got = match mine.get(k).unwrap() {
                    Field::Str(s) => Field::Str(Cow::Owned(s.to_string())),
                    other => match other {
                        Field::Null => Field::Null,
                        Field::Bool(b) => Field::Bool(*b),
                        Field::UInt(n) => Field::UInt(*n),
                        _ => Field::Other,
                    },
                };
                assert_eq!(got, expected, "{k} in {json}");
            }
        }
    }

    /// Whatever `serde_json::Value` rejects is rejected here too, wherever it hides:
    /// in a skipped member, a repeated key, an unknown field or a non-object item.
    #[test]
    fn rejects_what_a_value_parse_rejects() {
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        let bodies = [
            r#"{"messages": [{"topic": "t", "payload": "x"}, [1e400]]}"#.to_string(),
            r#"{"messages": [{"topic": "t"}, ["\ud800"]]}"#.to_string(),
            r#"{"topic": "t", "payload": "x", "qos": [1e400], "qos": 1}"#.to_string(),
            r#"{"topic": "t", "qos": {"a": 1e400}, "qos": 1}"#.to_string(),
            r#"{"messages": {"a": 1e400}, "messages": []}"#.to_string(),
            r#"{"messages": [], "zz": "\udc00"}"#.to_string(),
            r#"{"x": [[1,]]}"#.to_string(),
            r#"[1e400]"#.to_string(),
            format!(r#"{{"messages": [{deep}]}}"#),
            format!(r#"{{"topic": "t", "qos": {deep}, "qos": 1}}"#),
        ];
        for body in &bodies {
            assert!(serde_json::from_str::<Value>(body).is_err(), "{body}");
            assert!(serde_json::from_str::<MaybeObject>(body).is_err(), "{body}");
            assert!(serde_json::from_str::<MaybePush>(body).is_err(), "{body}");
            assert!(serde_json::from_str::<BatchBody>(body).is_err(), "{body}");
        }
        // Invalid UTF-8 inside a skipped member.
        let raw = b"{\"topic\": \"t\", \"qos\": [\"\xff\"], \"qos\": 1}";
        assert!(serde_json::from_slice::<Value>(raw).is_err());
        assert!(serde_json::from_slice::<MaybeObject>(raw).is_err());
        assert!(serde_json::from_slice::<MaybePush>(raw).is_err());
    }

    #[test]
    fn batches_say_what_is_wrong_with_them() {
        let parse = |json: &'static str| serde_json::from_str::<BatchBody>(json).unwrap();
        assert_eq!(parse("[1]"), BatchBody::NotObject);
        assert_eq!(parse("\"x\""), BatchBody::NotObject);
        assert_eq!(
            parse(r#"{"zeta": 1, "messages": 3, "alpha": [2]}"#),
            BatchBody::Batch {
                messages: Some(None),
                unknown: Some("alpha".into())
            }
        );
        assert_eq!(
            parse(r#"{}"#),
            BatchBody::Batch {
                messages: None,
                unknown: None
            }
        );
        let BatchBody::Batch {
            messages: Some(Some(items)),
            unknown: None,
        } = parse(r#"{"messages": [{"topic": "t"}, 5, [], {}]}"#)
        else {
            panic!("a batch of four");
        };
        assert_eq!(items.len(), 4);
        assert!(matches!(&items[0], MaybePush::Object(o) if o.get(PushField::Topic).is_some()));
        assert_eq!(items[1], MaybePush::NotObject);
        assert_eq!(items[2], MaybePush::NotObject);
        assert_eq!(items[3], MaybePush::Object(PushObject::default()));
        assert!(serde_json::from_str::<BatchBody>(r#"{"messages": [}"#).is_err());
    }

    /// What a member is, by `serde_json::Value`'s reading: the model `Field` must match.
    fn model(v: &Value) -> Field<'static> {
        match v {
            Value::Null => Field::Null,
            Value::Bool(b) => Field::Bool(*b),
            Value::String(s) => Field::Str(Cow::Owned(s.clone())),
            v => v.as_u64().map_or(Field::Other, Field::UInt),
        }
    }

    fn owned(f: &Field) -> Field<'static> {
        match f {
            Field::Null => Field::Null,
            Field::Bool(b) => Field::Bool(*b),
            Field::UInt(n) => Field::UInt(*n),
            Field::Str(s) => Field::Str(Cow::Owned(s.to_string())),
            Field::Other => Field::Other,
        }
    }

    /// JSON text for one value: scalars including the awkward ones (out-of-range
    /// numbers, lone surrogates, escapes), arrays and objects nested a few deep, keys
    /// from a small set so they repeat.
    fn value_text() -> impl Strategy<Value = String> {
        // Mostly valid values; the ones a Value parse rejects (out of range, lone
        // surrogate) are rarer so that whole objects often parse.
        let leaf = prop_oneof![
            4 => Just("null"),
            4 => Just("true"),
            4 => Just("false"),
            4 => Just("0"),
            4 => Just("1"),
            4 => Just("-1"),
            4 => Just("-0"),
            4 => Just("1.0"),
            4 => Just("1e2"),
            1 => Just("1e400"),
            4 => Just("18446744073709551615"),
            4 => Just("18446744073709551616"),
            4 => Just("\"s\""),
            4 => Just("\"\\n\""),
            1 => Just("\"\\ud800\""),
            4 => Just("\"\\ud83d\\ude00\""),
        ]
        .prop_map(str::to_owned);
        leaf.prop_recursive(3, 24, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((key_text(), inner), 0..3).prop_map(|m| {
                    let m: Vec<String> = m.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    format!("{{{}}}", m.join(","))
                }),
            ]
        })
    }

    fn key_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => Just("\"qos\""),
            4 => Just("\"topic\""),
            4 => Just("\"q\\u006fs\""),
            4 => Just("\"messages\""),
            4 => Just("\"x\""),
            4 => Just("\"client_id\""),
            4 => Just("\"payload\""),
            4 => Just("\"wait_ack\""),
            4 => Just("\"a\""),
            1 => Just("\"\\ud800\""),
        ]
        .prop_map(str::to_owned)
    }

    /// An object's text, sometimes damaged (a trailing comma, a cut-off end, a
    /// missing colon), and sometimes not an object at all.
    fn json_text() -> impl Strategy<Value = String> {
        let object = proptest::collection::vec((key_text(), value_text()), 0..5).prop_map(|m| {
            let m: Vec<String> = m.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", m.join(","))
        });
        (object, value_text(), 0..10u8).prop_map(|(o, v, damage)| match damage {
            0 => format!("{},}}", &o[..o.len() - 1]),
            1 => o[..o.len() / 2].to_owned(),
            2 => o.replacen(':', " ", 1),
            3 => v,
            _ => o,
        })
    }

    proptest! {
        /// For any text: it parses as an object here exactly when it parses as a JSON
        /// object with serde_json, and then every member reads the same.
        #[test]
        fn objects_agree_with_serde_json_on_any_text(
            body in json_text()
        ) {
            let theirs = serde_json::from_str::<Value>(&body);
            let mine = serde_json::from_str::<MaybeObject>(&body);
            prop_assert_eq!(theirs.is_ok(), mine.is_ok(), "{}", body);
            match (theirs, mine) {
                (Ok(Value::Object(m)), Ok(MaybeObject::Object(o))) => {
                    for (k, v) in &m {
                        prop_assert_eq!(o.get(k).map(owned), Some(model(v)), "{} in {}", k, body);
                    }
                    let keys: std::collections::BTreeSet<&str> = o.0.iter().map(|(k, _)| k.as_ref()).collect();
                    prop_assert_eq!(keys.len(), m.len());
                    let first_unknown = m.keys().find(|k| k.as_str() != "topic");
                    prop_assert_eq!(o.unknown(&["topic"]), first_unknown.map(String::as_str));
                }
                (Ok(Value::Object(_)), Ok(MaybeObject::NotObject)) | (Ok(_), Ok(MaybeObject::Object(_))) => {
                    prop_assert!(false, "object-ness differs: {}", body);
                }
                _ => {}
            }
            // A push object reads every known member and the first unknown key as the
            // member list does.
            match (serde_json::from_str::<MaybeObject>(&body), serde_json::from_str::<MaybePush>(&body)) {
                (Ok(MaybeObject::Object(o)), Ok(MaybePush::Object(p))) => {
                    for f in PushField::ALL {
                        prop_assert_eq!(o.get(f.name()).map(owned), p.get(f).map(owned), "{} in {}", f.name(), body);
                    }
                    let names = PushField::ALL.map(PushField::name);
                    prop_assert_eq!(o.unknown(&names), p.unknown(), "{}", body);
                }
                (Ok(MaybeObject::NotObject), Ok(MaybePush::NotObject)) | (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "a push object reads differently: {}", body),
            }
            // A batch body parses exactly when the text is valid JSON, too.
            prop_assert_eq!(serde_json::from_str::<Value>(&body).is_ok(), serde_json::from_str::<BatchBody>(&body).is_ok(), "{}", body);
        }
    }
}
