//! Fuzzes the push API's body parser (`gateway::push_json`) against `serde_json::Value`
//! on arbitrary bytes: a body parses as an object exactly when `Value` parses it as one,
//! a batch body parses exactly when `Value` parses it, and every member of an object
//! reads the same (null, bool, non-negative integer, string or other; the last of a
//! repeated key).

#![no_main]

use gateway::push_json::{BatchBody, Field, MaybeObject};
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
                    (v, Field::Other) => !v.is_null() && !v.is_boolean() && !v.is_string() && v.as_u64().is_none(),
                    _ => false,
                };
                assert!(same, "{k}: {v:?} vs {got:?}");
            }
        }
        (Ok(Value::Object(_)), Ok(MaybeObject::NotObject)) => panic!("an object read as not one"),
        (Ok(_), Ok(MaybeObject::Object(_))) => panic!("a non-object read as an object"),
        _ => {}
    }
});
