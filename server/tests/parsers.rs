//! The output parsers: known outputs parse to the expected events, and a fuzz over random chunkings,
//! truncations and junk checks that streaming never panics, equals the one-shot parse, and loses no text.
use nsa_server::parsers::{Dsml, Event, ReasoningParser, StreamParser, ToolParser, V31};

/// Text events merged per kind, so that different chunkings compare equal.
fn normalize(events: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for event in events {
        match (out.last_mut(), event) {
            (_, Event::Content(t) | Event::Reasoning(t)) if t.is_empty() => {}
            (Some(Event::Content(a)), Event::Content(b)) => a.push_str(&b),
            (Some(Event::Reasoning(a)), Event::Reasoning(b)) => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

fn run(parser: &mut dyn StreamParser, chunks: &[&str]) -> Vec<Event> {
    let mut events = Vec::new();
    for chunk in chunks {
        events.extend(parser.push(chunk));
    }
    events.extend(parser.finish());
    normalize(events)
}

fn content(text: &str) -> Event {
    Event::Content(text.into())
}

fn call(name: &str, arguments: &str) -> Event {
    Event::ToolCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

const DSML: &str = "Let me check.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris, \"FR\"</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"get_time\">\n<｜DSML｜parameter name=\"zones\" string=\"false\">[\"CET\", \"UTC\"]</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>";

const V31_TEXT: &str = "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \"days\": 3}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜> done";

#[test]
fn dsml_calls_become_tool_calls_with_typed_arguments() {
    let events = run(&mut ToolParser::<Dsml>::default(), &[DSML]);
    assert_eq!(
        events,
        vec![
            content("Let me check.\n\n"),
            call("get_weather", r#"{"city":"Paris, \"FR\"","days":3}"#),
            call("get_time", r#"{"zones":["CET","UTC"]}"#),
        ]
    );
}

#[test]
fn v31_calls_become_tool_calls() {
    let events = run(&mut ToolParser::<V31>::default(), &[V31_TEXT]);
    assert_eq!(
        events,
        vec![
            content("Sure."),
            call("get_weather", r#"{"city":"Paris","days":3}"#),
            call("get_time", "{}"),
            content(" done"),
        ]
    );
}

#[test]
fn malformed_or_truncated_blocks_come_back_as_text() {
    // Bad JSON in a string="false" parameter: the block is kept as content.
    let bad = DSML.replace(">3<", ">three<");
    assert_eq!(run(&mut ToolParser::<Dsml>::default(), &[&bad]), vec![content(&bad)]);
    // Cut off inside the block: everything returned as content at finish.
    let cut = &V31_TEXT[..V31_TEXT.find("get_time").unwrap()];
    assert_eq!(run(&mut ToolParser::<V31>::default(), &[cut]), vec![content(cut)]);
}

#[test]
fn reasoning_is_split_from_the_answer() {
    let mut thinking = ReasoningParser::new(true);
    assert_eq!(
        run(&mut thinking, &["<think>", "Two plus", " two.</th", "ink>It is 4."]),
        vec![Event::Reasoning("Two plus two.".into()), content("It is 4.")]
    );
    // Thinking off: all content, tags untouched.
    assert_eq!(
        run(&mut ReasoningParser::new(false), &["a</think>b"]),
        vec![content("a</think>b")]
    );
    // Truncated while thinking: all of it is reasoning.
    assert_eq!(
        run(&mut ReasoningParser::new(true), &["still thinking </thi"]),
        vec![Event::Reasoning("still thinking </thi".into())]
    );
}

type MakeParser = fn() -> Box<dyn StreamParser>;

/// A small deterministic generator (no rand dependency).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// `text` cut at random character boundaries.
fn random_chunks<'a>(text: &'a str, rng: &mut Lcg) -> Vec<&'a str> {
    let mut bounds: Vec<usize> = (0..rng.below(12))
        .map(|_| rng.below(text.len() + 1))
        .filter(|b| text.is_char_boundary(*b))
        .collect();
    bounds.extend([0, text.len()]);
    bounds.sort();
    bounds.dedup();
    bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

/// All the text of `events` (tool calls excluded).
fn text_of(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Content(t) | Event::Reasoning(t) => Some(t.as_str()),
            Event::ToolCall { .. } => None,
        })
        .collect()
}

#[test]
fn fuzz_chunkings_truncations_and_junk() {
    let mut rng = Lcg(2026);
    let junk = [
        "<｜DSML｜",
        "<｜tool▁calls▁begin｜>",
        "</think>",
        "<think>",
        "\"",
        "｜",
        "é",
        "<",
        ">",
        "x",
    ];
    for round in 0..400 {
        // A valid output, maybe truncated, maybe with junk spliced in.
        let base = [DSML, V31_TEXT, "<think>why</think>answer"][round % 3];
        let mut text = base.to_string();
        if round % 4 == 1 {
            let mut cut = rng.below(text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        if round % 4 == 2 {
            let mut at = rng.below(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.insert_str(at, junk[rng.below(junk.len())]);
        }
        let chunks = random_chunks(&text, &mut rng);
        // Each parser, and the text it must give back when it finds no tool call: all of it, except the
        // thinking parser's leading <think> and the first </think> (where it splits).
        let strip_think = |t: &str| {
            let t = t.strip_prefix("<think>").unwrap_or(t);
            t.replacen("</think>", "", 1)
        };
        let parsers: [(MakeParser, String); 4] = [
            (|| Box::new(ToolParser::<Dsml>::default()), text.clone()),
            (|| Box::new(ToolParser::<V31>::default()), text.clone()),
            (|| Box::new(ReasoningParser::new(true)), strip_think(&text)),
            (|| Box::new(ReasoningParser::new(false)), text.clone()),
        ];
        for (make, expected) in parsers {
            let streamed = run(make().as_mut(), &chunks);
            let whole = run(make().as_mut(), &[&text]);
            assert_eq!(
                streamed, whole,
                "chunking changed the result of {text:?} split as {chunks:?}"
            );
            if !streamed.iter().any(|e| matches!(e, Event::ToolCall { .. })) {
                assert_eq!(text_of(&streamed), expected, "text lost from {text:?}");
            }
        }
    }
}
