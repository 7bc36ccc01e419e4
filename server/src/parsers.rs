//! Streaming parsers of DeepSeek's output text: the reasoning parser (`--reasoning-parser deepseek-v3`:
//! `<think>…</think>` → reasoning_content) and the tool-call parsers (`--tool-call-parser deepseekv32`, the
//! DSML markup, and `deepseekv31`, the special-token format) → OpenAI tool calls.
//!
//! Each parser takes the text as it is generated, in chunks split anywhere, and returns events. Text that
//! may be the start of a marker is held back until the next chunk decides; a tool call is emitted when its
//! block closes. `finish` flushes: whatever never became a complete tool call (a truncated or malformed
//! block) comes back as content, so no text is lost.

/// What a parser recovers from the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Content(String),
    Reasoning(String),
    /// A complete call: the function's name and its arguments as a JSON object text.
    ToolCall {
        name: String,
        arguments: String,
    },
}

pub trait StreamParser {
    /// The events `chunk` completes.
    fn push(&mut self, chunk: &str) -> Vec<Event>;
    /// The end of the output: everything still held back.
    fn finish(&mut self) -> Vec<Event>;
}

/// The longest suffix of `text` that begins `marker` (at a character boundary): text to hold back.
fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// Appends `event`, merging it into the last one when both are text of the same kind.
fn emit(events: &mut Vec<Event>, event: Event) {
    match (events.last_mut(), event) {
        (_, Event::Content(t) | Event::Reasoning(t)) if t.is_empty() => {}
        (Some(Event::Content(a)), Event::Content(b)) => a.push_str(&b),
        (Some(Event::Reasoning(a)), Event::Reasoning(b)) => a.push_str(&b),
        (_, event) => events.push(event),
    }
}

const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// `--reasoning-parser deepseek-v3`: with thinking on, the prompt ends in `<think>`, so the output is
/// reasoning until `</think>` (a leading `<think>` is dropped); with thinking off, it is all content.
pub struct ReasoningParser {
    in_reasoning: bool,
    at_start: bool,
    pending: String,
}

impl ReasoningParser {
    pub fn new(thinking: bool) -> ReasoningParser {
        ReasoningParser {
            in_reasoning: thinking,
            at_start: thinking,
            pending: String::new(),
        }
    }
}

impl StreamParser for ReasoningParser {
    fn push(&mut self, chunk: &str) -> Vec<Event> {
        self.pending.push_str(chunk);
        let mut events = Vec::new();
        if self.at_start {
            if THINK_START.starts_with(self.pending.as_str()) && self.pending.len() < THINK_START.len() {
                return events; // maybe a leading <think>: wait
            }
            if let Some(rest) = self.pending.strip_prefix(THINK_START) {
                self.pending = rest.to_string();
            }
            self.at_start = false;
        }
        if !self.in_reasoning {
            emit(&mut events, Event::Content(std::mem::take(&mut self.pending)));
            return events;
        }
        if let Some(end) = self.pending.find(THINK_END) {
            let rest = self.pending.split_off(end);
            emit(&mut events, Event::Reasoning(std::mem::take(&mut self.pending)));
            self.in_reasoning = false;
            emit(&mut events, Event::Content(rest[THINK_END.len()..].to_string()));
            return events;
        }
        let keep = partial_marker_len(&self.pending, THINK_END);
        let rest = self.pending.split_off(self.pending.len() - keep);
        emit(
            &mut events,
            Event::Reasoning(std::mem::replace(&mut self.pending, rest)),
        );
        events
    }

    fn finish(&mut self) -> Vec<Event> {
        self.at_start = false;
        let text = std::mem::take(&mut self.pending);
        let mut events = Vec::new();
        // Truncated inside the reasoning: what was held back is reasoning too.
        emit(
            &mut events,
            if self.in_reasoning {
                Event::Reasoning(text)
            } else {
                Event::Content(text)
            },
        );
        events
    }
}

/// A tool-call format: where its block starts and ends, and how a complete block reads.
pub trait ToolFormat {
    const START: &'static str;
    const END: &'static str;
    /// The calls of a complete block (its text between START and END); `None` when it is malformed.
    fn calls(block: &str) -> Option<Vec<(String, String)>>;
}

/// A tool-call parser over format `F`: content outside blocks, one event per call of each block.
pub struct ToolParser<F: ToolFormat> {
    pending: String,
    in_block: bool,
    format: std::marker::PhantomData<F>,
}

impl<F: ToolFormat> Default for ToolParser<F> {
    fn default() -> Self {
        ToolParser {
            pending: String::new(),
            in_block: false,
            format: std::marker::PhantomData,
        }
    }
}

impl<F: ToolFormat> StreamParser for ToolParser<F> {
    fn push(&mut self, chunk: &str) -> Vec<Event> {
        self.pending.push_str(chunk);
        let mut events = Vec::new();
        loop {
            if !self.in_block {
                if let Some(start) = self.pending.find(F::START) {
                    let block = self.pending.split_off(start);
                    emit(&mut events, Event::Content(std::mem::replace(&mut self.pending, block)));
                    self.in_block = true;
                    continue;
                }
                let keep = partial_marker_len(&self.pending, F::START);
                let rest = self.pending.split_off(self.pending.len() - keep);
                emit(&mut events, Event::Content(std::mem::replace(&mut self.pending, rest)));
                return events;
            }
            // In a block (pending starts with START): wait for its end.
            let Some(end) = self.pending[F::START.len()..].find(F::END).map(|e| e + F::START.len()) else {
                return events;
            };
            let rest = self.pending.split_off(end + F::END.len());
            let block = std::mem::replace(&mut self.pending, rest);
            self.in_block = false;
            match F::calls(&block[F::START.len()..end]) {
                Some(calls) => {
                    for (name, arguments) in calls {
                        emit(&mut events, Event::ToolCall { name, arguments });
                    }
                }
                // Not a well-formed call: the text is kept as content.
                None => emit(&mut events, Event::Content(block)),
            }
        }
    }

    fn finish(&mut self) -> Vec<Event> {
        self.in_block = false;
        let mut events = Vec::new();
        emit(&mut events, Event::Content(std::mem::take(&mut self.pending)));
        events
    }
}

/// The text between `open` and `close` at the start of `text` (after whitespace), and what follows.
fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<(&'a str, &'a str)> {
    let rest = text.trim_start().strip_prefix(open)?;
    let end = rest.find(close)?;
    Some((&rest[..end], &rest[end + close.len()..]))
}

/// `--tool-call-parser deepseekv32`: DeepSeek-V3.2's DSML markup.
///
/// ```text
/// <｜DSML｜function_calls>
/// <｜DSML｜invoke name="get_weather">
/// <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
/// <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
/// </｜DSML｜invoke>
/// </｜DSML｜function_calls>
/// ```
/// A `string="true"` value is the text itself; `string="false"` is JSON (a number, bool, array, object).
pub struct Dsml;

impl ToolFormat for Dsml {
    const START: &'static str = "<｜DSML｜function_calls>";
    const END: &'static str = "</｜DSML｜function_calls>";

    fn calls(block: &str) -> Option<Vec<(String, String)>> {
        let mut calls = Vec::new();
        let mut rest = block;
        while !rest.trim().is_empty() {
            let (name, after) = between(rest, "<｜DSML｜invoke name=\"", "\">")?;
            let end = after.find("</｜DSML｜invoke>")?;
            let (mut body, tail) = (&after[..end], &after[end + "</｜DSML｜invoke>".len()..]);
            let mut arguments = serde_json::Map::new();
            while !body.trim().is_empty() {
                let (key, after) = between(body, "<｜DSML｜parameter name=\"", "\"")?;
                let (kind, after) = between(after, "string=\"", "\">")?;
                let end = after.find("</｜DSML｜parameter>")?;
                let value = &after[..end];
                let value = match kind {
                    "true" => serde_json::Value::String(value.to_string()),
                    "false" => serde_json::from_str(value).ok()?,
                    _ => return None,
                };
                arguments.insert(key.to_string(), value);
                body = &after[end + "</｜DSML｜parameter>".len()..];
            }
            calls.push((name.to_string(), serde_json::Value::Object(arguments).to_string()));
            rest = tail;
        }
        (!calls.is_empty()).then_some(calls)
    }
}

/// `--tool-call-parser deepseekv31`: DeepSeek-V3.1's special tokens, JSON arguments.
///
/// ```text
/// <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>
/// ```
pub struct V31;

impl ToolFormat for V31 {
    const START: &'static str = "<｜tool▁calls▁begin｜>";
    const END: &'static str = "<｜tool▁calls▁end｜>";

    fn calls(block: &str) -> Option<Vec<(String, String)>> {
        let mut calls = Vec::new();
        let mut rest = block;
        while !rest.trim().is_empty() {
            let (call, after) = between(rest, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>")?;
            let (name, arguments) = call.split_once("<｜tool▁sep｜>")?;
            let arguments: serde_json::Value = serde_json::from_str(arguments).ok()?;
            if !arguments.is_object() {
                return None;
            }
            calls.push((name.trim().to_string(), arguments.to_string()));
            rest = after;
        }
        (!calls.is_empty()).then_some(calls)
    }
}
