//! Loading helpers: the deep merge of a user file over the defaults, the check that
//! every key the user names exists in the defaults, and the translation of serde's
//! errors into ones that name the key.

use toml::{Table, Value};

use super::ConfigError;

/// Fails on the first key in `user` that `defaults` does not have, naming its full path.
/// Only tables that are tables on both sides are descended into; a type clash (a table
/// where a value belongs) is left to deserialization, which names the key too.
pub(super) fn reject_unknown_keys(
    user: &Table,
    defaults: &Table,
    prefix: &str,
) -> Result<(), ConfigError> {
    for (key, value) in user {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match defaults.get(key) {
            None => {
                return Err(ConfigError::UnknownKey {
                    key: path,
                    known: defaults.keys().cloned().collect(),
                })
            }
            Some(Value::Table(default_table)) => {
                if let Value::Table(user_table) = value {
                    reject_unknown_keys(user_table, default_table, &path)?;
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Deep merge: tables merge key by key, anything else in `over` replaces what is in `base`.
pub(super) fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(over_table)) => {
                merge(base_table, over_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Turns a deserialization error into one that names the key. Unknown keys are caught
/// earlier by [`reject_unknown_keys`]; should one reach serde anyway, serde_path_to_error
/// 0.1.20 names it in full (`mqtt.lisen`), but a path that stops at the enclosing table
/// (`mqtt`) gets the field from serde's message appended, so the key is named either way.
pub(super) fn deserialize_error(e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = e.path().to_string();
    // toml appends a line "in `mqtt.listen`"; the key is already named, so keep the first.
    let inner = e.inner().to_string();
    let message = inner.lines().next().unwrap_or_default().trim().to_string();
    let parent = if path == "." { String::new() } else { path };
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let named = parent == field || parent.ends_with(&format!(".{field}"));
        let key = if named {
            parent
        } else if parent.is_empty() {
            field.to_string()
        } else {
            format!("{parent}.{field}")
        };
        return ConfigError::Invalid { key, message };
    }
    ConfigError::Invalid {
        key: parent,
        message: integer_range_message(&message).unwrap_or(message),
    }
}

/// serde's "invalid value: integer `70000`, expected u16" in the words of the range
/// rules: "must be at most 65535, got 70000" (or "must not be negative").
fn integer_range_message(message: &str) -> Option<String> {
    let rest = message.strip_prefix("invalid value: integer `")?;
    let (value, ty) = rest.split_once("`, expected ")?;
    let max = match ty {
        "u8" => u64::from(u8::MAX),
        "u16" => u64::from(u16::MAX),
        "u32" => u64::from(u32::MAX),
        _ => return None,
    };
    Some(if value.starts_with('-') {
        format!("must not be negative, got {value}")
    } else {
        format!("must be at most {max}, got {value}")
    })
}

/// Levenshtein distance, for the "did you mean" hint on unknown keys.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
