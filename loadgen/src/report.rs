//! What people see: the live progress bar while a run goes on, and at the end a Markdown
//! table followed by the same summary as one JSON line (the last line of stdout, so
//! `tail -n1 | jq` works; `--json` prints only that line).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// The progress bar on stderr, hidden with `--quiet` or when stderr is not a terminal.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let target = if quiet || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr_with_hz(4)
        };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { bar }
    }

    /// Starts a phase: a bar of `len` units (or a spinner for 0) with a prefix.
    pub fn phase(&self, prefix: &str, len: u64) {
        let style = if len > 0 {
            ProgressStyle::with_template(
                "{prefix:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
        } else {
            ProgressStyle::with_template("{prefix:>8} [{elapsed_precise}] {spinner} {msg}")
        }
        .expect("static template");
        self.bar.set_style(style);
        self.bar.set_prefix(prefix.to_string());
        self.bar.set_length(len);
        self.bar.set_position(0);
        self.bar.reset_elapsed();
    }

    pub fn update(&self, pos: u64, msg: String) {
        self.bar.set_position(pos);
        self.bar.set_message(msg);
    }

    pub fn println(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Prints the summary: Markdown table (unless `json_only`) then the JSON line, both
/// with the top-level keys in the order given.
pub fn print(fields: &[(String, Value)], json_only: bool) {
    if !json_only {
        println!("{}", markdown(fields));
    }
    println!("{}", json_line(fields));
}

/// One JSON object on one line, keys in the order given.
pub fn json_line(fields: &[(String, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// A two-column Markdown table of every leaf, nested keys joined with dots.
pub fn markdown(fields: &[(String, Value)]) -> String {
    let mut rows = Vec::new();
    for (k, v) in fields {
        flatten(k, v, &mut rows);
    }
    let mut s = String::from("| metric | value |\n|---|---|\n");
    for (k, v) in rows {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    s
}

fn flatten(prefix: &str, v: &Value, rows: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, rows);
            }
        }
        Value::Null => rows.push((prefix.to_string(), "–".into())),
        Value::String(s) => rows.push((prefix.to_string(), s.replace('|', "\\|"))),
        other => rows.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields() -> Vec<(String, Value)> {
        vec![
            ("connected".into(), json!(5)),
            ("latency_ms".into(), json!({"p50": 1.5, "max": null})),
            ("rounds".into(), json!([{"backoff": "none"}])),
            ("failures".into(), json!({})),
        ]
    }

    #[test]
    fn json_line_keeps_the_order_and_parses() {
        let line = json_line(&fields());
        assert!(
            line.starts_with(r#"{"connected":5,"latency_ms":"#),
            "{line}"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["latency_ms"]["p50"], 1.5);
        assert!(!line.contains('\n'));
    }

    #[test]
    fn table_flattens_nested_values() {
        let t = markdown(&fields());
        assert!(t.contains("| connected | 5 |"), "{t}");
        assert!(t.contains("| latency_ms.p50 | 1.5 |"), "{t}");
        assert!(t.contains("| latency_ms.max | – |"), "{t}");
        assert!(t.contains("| rounds[0].backoff | none |"), "{t}");
        assert!(t.contains("| failures | {} |"), "{t}");
    }
}
