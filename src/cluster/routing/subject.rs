//! MQTT topics and filters as NATS subjects, reversibly.
//!
//! A topic `l1/l2/…/ln` becomes `<kind>.<t1>.<t2>.….<tn>` below the routing prefix, one
//! NATS token per MQTT level:
//!
//! - `kind` is `u` for ordinary topics and `d` for topics whose first level starts with
//!   `$`: NATS wildcards match every token, MQTT's leading wildcards never match a
//!   `$`-topic (MQTT 4.7.2), so a filter starting with `+` or `#` is subscribed under `u`
//!   only.
//! - a level's bytes `A-Z a-z 0-9 - _` stay as they are; every other byte (`.`, `*`, `>`,
//!   space, `~`, `$`, non-ASCII, …) becomes `~XX` (upper-case hex), and the empty level is
//!   the lone token `~`, so every token is non-empty printable ASCII and no token is a
//!   NATS wildcard. Decoding is exact ([`decode_topic`]).
//! - in a filter, `+` is `*` and `#` is `>`. `a/#` also matches `a` itself, which `a.>`
//!   does not: it takes two subjects, `a` and `a.>` ([`filter_subjects`]).
//!
//! With these rules a topic matches a filter in MQTT exactly when its subject matches one
//! of the filter's subjects in NATS (the property test below checks both ways).

use std::fmt::Write;

/// The kind token of ordinary topics.
const ORDINARY: &str = "u";
/// The kind token of topics starting with `$`.
const DOLLAR: &str = "d";

/// Appends one MQTT level as one NATS token.
fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('~');
        return;
    }
    for b in level.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            let _ = write!(out, "~{b:02X}");
        }
    }
}

fn kind(first_level: &str) -> &'static str {
    if first_level.starts_with('$') {
        DOLLAR
    } else {
        ORDINARY
    }
}

/// The subject tokens (after the prefix) of the topic name `topic`.
pub fn topic_subject(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 8);
    out.push_str(kind(topic.split('/').next().unwrap_or("")));
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The subjects (after the prefix) a node subscribes to for the MQTT filter `filter`:
/// one, or two when it ends in `#` after at least one level (`a/#` also matches `a`).
pub fn filter_subjects(filter: &str) -> Vec<String> {
    let first = filter.split('/').next().unwrap_or("");
    let mut out = String::with_capacity(filter.len() + 8);
    out.push_str(match first {
        "+" | "#" => ORDINARY,
        _ => kind(first),
    });
    let mut parent = None;
    for level in filter.split('/') {
        match level {
            "#" => {
                if out.len() > ORDINARY.len() {
                    parent = Some(out.clone());
                }
                out.push_str(".>");
            }
            "+" => out.push_str(".*"),
            _ => {
                out.push('.');
                push_level(&mut out, level);
            }
        }
    }
    parent.into_iter().chain([out]).collect()
}

/// The topic name of subject tokens made by [`topic_subject`]; `None` if they are not.
pub fn decode_topic(subject: &str) -> Option<String> {
    let mut tokens = subject.split('.');
    let kind = tokens.next()?;
    let mut bytes = Vec::with_capacity(subject.len());
    let mut first = true;
    for token in tokens {
        if !first {
            bytes.push(b'/');
        }
        first = false;
        decode_level(token, &mut bytes)?;
    }
    if first {
        return None;
    }
    let topic = String::from_utf8(bytes).ok()?;
    (kind == self::kind(topic.split('/').next().unwrap_or(""))).then_some(topic)
}

fn decode_level(token: &str, out: &mut Vec<u8>) -> Option<()> {
    if token == "~" {
        return Some(());
    }
    let b = token.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'~' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;

    /// NATS subject matching: `*` one token, `>` one or more trailing tokens.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn nats_any(filter: &str, topic: &str) -> bool {
        let subject = topic_subject(topic);
        filter_subjects(filter)
            .iter()
            .any(|f| nats_matches(f, &subject))
    }

    #[test]
    fn examples() {
        assert_eq!(topic_subject("a/b"), "u.a.b");
        assert_eq!(topic_subject("a.b/*/>/ x"), "u.a~2Eb.~2A.~3E.~20x");
        assert_eq!(topic_subject("/a//"), "u.~.a.~.~");
        assert_eq!(topic_subject("$SYS/x"), "d.~24SYS.x");
        assert_eq!(topic_subject("é"), "u.~C3~A9");
        assert_eq!(filter_subjects("a/+/c"), ["u.a.*.c"]);
        assert_eq!(filter_subjects("a/#"), ["u.a", "u.a.>"]);
        assert_eq!(filter_subjects("#"), ["u.>"]);
        assert_eq!(filter_subjects("+/#"), ["u.*", "u.*.>"]);
        assert_eq!(filter_subjects("$SYS/#"), ["d.~24SYS", "d.~24SYS.>"]);
        assert!(!nats_any("#", "$SYS/x"));
        assert!(!nats_any("+/x", "$SYS/x"));
        assert!(nats_any("$SYS/+", "$SYS/x"));
        assert!(nats_any("a/#", "a"));
        assert_eq!(decode_topic("u.a~2Eb.~"), Some("a.b/".into()));
        assert_eq!(
            decode_topic("u.~24x"),
            None,
            "a $-topic under the ordinary kind"
        );
        assert_eq!(decode_topic("u.~2"), None);
        assert_eq!(decode_topic("u"), None);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("a".to_string()),
            Just("b".to_string()),
            Just("$s".to_string()),
            Just("a.b".to_string()),
            Just("*".to_string()),
            Just(">".to_string()),
            Just(" ".to_string()),
            Just("~".to_string()),
            Just("~41".to_string()),
            Just("é".to_string()),
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        let lvl = prop_oneof![3 => level(), 1 => Just("+".to_string())];
        (prop::collection::vec(lvl, 1..5), any::<bool>()).prop_map(|(mut l, hash)| {
            if hash {
                l.push("#".into());
            }
            l.join("/")
        })
    }

    proptest! {
        #[test]
        fn a_topic_round_trips(t in topic()) {
            prop_assert_eq!(decode_topic(&topic_subject(&t)), Some(t));
        }

        #[test]
        fn mqtt_match_iff_nats_match(f in filter(), t in topic()) {
            prop_assert_eq!(matches(&f, &t), nats_any(&f, &t), "filter {:?} topic {:?}", f, t);
        }

        #[test]
        fn tokens_are_never_wildcards_nor_empty(t in topic()) {
            for token in topic_subject(&t).split('.') {
                prop_assert!(!token.is_empty() && token != "*" && token != ">");
                prop_assert!(token.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }
}
