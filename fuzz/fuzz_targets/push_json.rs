//! Fuzzes the push API's body parser (`gateway::push_json`) against `serde_json::Value`
//! on arbitrary bytes: a body parses as an object exactly when `Value` parses it as one,
//! a batch body parses exactly when `Value` parses it, and every member of an object
//! reads the same (null, bool, non-negative integer, string or other; the last of a
//! repeated key). The reader the push handlers use (`MaybePush`) reads every push field
//! and the first unknown key as the member list does; and a body that is not UTF-8 is
//! one no parse accepts (the handlers check UTF-8 once and parse the text).

#![no_main]

use gateway::push_json::{BatchBody, Field, MaybeObject, MaybePush, PushField};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let theirs = serde_json::from_slice::<Value>(data);
    let mine = serde_json::from_slice::<MaybeObject>(data);
    assert_eq!(theirs.is_ok(), mine.is_ok());
    assert_eq!(
        theirs.is_ok(),
        serde_json::from_slice::<BatchBody>(data).is_ok()
    );
    match (theirs, mine) {
        (Ok(Value::Object(m)), Ok(MaybeObject::Object(o))) => {
            for (k, v) in &m {
                let got = o.get(k).expect("every key is there");
                let same = match (v, got) {
                    (Value::Null, Field::Null) => true,
                    (Value::Bool(a), Field::Bool(b)) => a == b,
                    (Value::String(a), Field::Str(b)) => a == b,
                    (v, Field::UInt(n)) => v.as_u64() == Some(*n),
                    (v, Field::Other) => {
                        !v.is_null() && !v.is_boolean() && !v.is_string() && v.as_u64().is_none()
                    }
                    _ => false,
                };
                assert!(same, "{k}: {v:?} vs {got:?}");
            }
        }
        (Ok(Value::Object(_)), Ok(MaybeObject::NotObject)) => panic!("an object read as not one"),
        (Ok(_), Ok(MaybeObject::Object(_))) => panic!("a non-object read as an object"),
        _ => {}
    }
    let member_list = serde_json::from_slice::<MaybeObject>(data);
    match (member_list, serde_json::from_slice::<MaybePush>(data)) {
        (Ok(MaybeObject::Object(o)), Ok(MaybePush::Object(p))) => {
            for f in PushField::ALL {
                assert_eq!(o.get(f.name()), p.get(f), "{}", f.name());
            }
            assert_eq!(o.unknown(&PushField::ALL.map(PushField::name)), p.unknown());
        }
        (Ok(MaybeObject::NotObject), Ok(MaybePush::NotObject)) | (Err(_), Err(_)) => {}
        _ => panic!("MaybePush and MaybeObject disagree"),
    }
    match std::str::from_utf8(data) {
        Ok(text) => assert_eq!(
            serde_json::from_str::<MaybePush>(text).is_ok(),
            serde_json::from_slice::<MaybePush>(data).is_ok()
        ),
        Err(_) => assert!(serde_json::from_slice::<Value>(data).is_err()),
    }
});
