//! Reading the server's answers in tests: SSE streams and Prometheus metrics.
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};

/// A stream's JSON events up to `[DONE]`; `take` stops reading after that many (the client goes away).
/// Panics when the stream ends without `[DONE]`.
pub fn events(stream: impl Read, take: Option<usize>) -> Vec<Value> {
    let mut events = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.expect("stream line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return events;
        }
        events.push(serde_json::from_str(data).expect("event json"));
        if take.is_some_and(|n| events.len() >= n) {
            return events;
        }
    }
    panic!("stream ended without [DONE]");
}

/// The value of metric `name` (a line `name value`) in `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    let line = (text.lines())
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{name} in {text}"));
    line.rsplit(' ').next().unwrap().parse().expect("a number")
}
