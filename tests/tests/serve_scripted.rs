//! The server end to end over scripted models (`nsa_server::serve_model`, `nsa_tests::scripted`): a model
//! that answers every prompt with a fixed text, so that what the tiny random checkpoint never writes —
//! tool calls in both DeepSeek formats — comes out through the parsers as OpenAI `tool_calls`, streaming
//! and not; and a slow one, so that a client going away is seen to cancel its request.
use nsa_model::bundled_model_dir;
use nsa_model::{ModelConfig, Tokenizer};
use nsa_server::http::ToolCallParser;
use nsa_tests::scripted::spawn_script as serve_script;
use nsa_tests::sse;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

fn chat(base: &str, stream: bool) -> ureq::Response {
    let body = json!({
        "model": "scripted",
        "messages": [{"role": "user", "content": "Weather in Paris for 3 days, and the time?"}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                "properties": {"zones": {"type": "array", "items": {"type": "string"}}}}}}
        ],
        "stream": stream,
    });
    ureq::post(&format!("{base}/v1/chat/completions"))
        .send_json(body)
        .expect("the request succeeds")
}

/// The tool calls of a streamed answer, joined from their deltas: (name, arguments) by index.
fn streamed_calls(events: &[Value]) -> Vec<(String, String)> {
    let mut calls: Vec<(String, String)> = Vec::new();
    for event in events {
        let Some(deltas) = event["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for delta in deltas {
            let index = delta["index"].as_u64().expect("index") as usize;
            if index == calls.len() {
                calls.push(Default::default());
            }
            let call = &mut calls[index];
            call.0 += delta["function"]["name"].as_str().unwrap_or("");
            call.1 += delta["function"]["arguments"].as_str().unwrap_or("");
        }
    }
    calls
}

/// Both formats' answers come out as the same OpenAI tool calls (arguments as JSON text), with the text
/// before them as content and finish_reason `tool_calls`, whole and streamed.
fn check_tool_calls(text: &str, parser: ToolCallParser, before: &str) {
    let base = serve_script(text, Some(parser), Duration::ZERO);
    let expected = [
        ("get_weather", json!({"city": "Paris", "days": 3})),
        ("get_time", json!({})),
    ];
    let body: Value = chat(&base, false).into_json().expect("json");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{parser:?}: {body}");
    assert_eq!(
        choice["message"]["content"].as_str().unwrap_or("").trim(),
        before,
        "{body}"
    );
    let calls = choice["message"]["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 2, "{body}");
    for (call, (name, arguments)) in calls.iter().zip(&expected) {
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()), "{call}");
        assert_eq!(call["function"]["name"], *name);
        let parsed: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("text")).unwrap();
        assert_eq!(parsed, *arguments, "{parser:?}");
    }
    let events = sse::events(chat(&base, true).into_reader(), None);
    let finish = events.iter().find_map(|e| e["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"), "{parser:?}");
    let calls = streamed_calls(&events);
    assert_eq!(calls.len(), 2, "{parser:?}: {events:?}");
    for ((name, arguments), (want_name, want_arguments)) in calls.iter().zip(&expected) {
        assert_eq!(name, want_name);
        assert_eq!(serde_json::from_str::<Value>(arguments).unwrap(), *want_arguments);
    }
}

#[test]
fn dsml_tool_calls_come_out_as_openai_tool_calls() {
    let text = "Let me check.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
                <｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
                <｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
                <｜DSML｜invoke name=\"get_time\">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>";
    check_tool_calls(text, ToolCallParser::Deepseekv32, "Let me check.");
}

#[test]
fn v31_tool_calls_come_out_as_openai_tool_calls() {
    let text = "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \
                \"days\": 3}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜>\
                <｜tool▁calls▁end｜>";
    check_tool_calls(text, ToolCallParser::Deepseekv31, "Sure.");
}

fn metric(base: &str, name: &str) -> f64 {
    let text = ureq::get(&format!("{base}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .unwrap();
    sse::metric(&text, name)
}

/// A streaming client that reads two chunks and goes away: its request is cancelled (counted, no longer
/// running) long before the 400-token answer would have finished.
#[test]
fn a_client_going_away_cancels_its_request() {
    let base = serve_script(&"word ".repeat(400), None, Duration::from_millis(20));
    let body = json!({"model": "scripted", "prompt": "Tell me a long story", "max_tokens": 400, "stream": true});
    let response = ureq::post(&format!("{base}/v1/completions"))
        .send_json(body)
        .expect("starts");
    let mut reader = BufReader::new(response.into_reader());
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 2 {
        line.clear();
        reader.read_line(&mut line).expect("a line");
        chunks += usize::from(line.starts_with("data: "));
    }
    assert_eq!(metric(&base, "nsa_num_running_reqs"), 1.0);
    drop(reader);
    let gone = Instant::now();
    while metric(&base, "nsa_requests_cancelled_total") < 1.0 {
        assert!(
            gone.elapsed() < Duration::from_secs(4),
            "not cancelled 4 s after the client left (8 s of answer)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    while metric(&base, "nsa_num_running_reqs") > 0.0 {
        assert!(
            gone.elapsed() < Duration::from_secs(4),
            "still running 4 s after the client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server still answers (a short request on the same engine).
    let body = json!({"model": "scripted", "prompt": "Hi", "max_tokens": 3});
    let mut text = String::new();
    ureq::post(&format!("{base}/v1/completions"))
        .send_json(body)
        .expect("answers")
        .into_reader()
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    // At least the 3 + 2 tokens just generated, over the 10-second window.
    assert!(metric(&base, "nsa_gen_throughput") >= 0.5, "generation rate gauge");
}

/// Over HTTP: `stop_token_ids` ends the answer before the stop token (finish_reason `stop`), and chat
/// logprobs report every generated token with its log-probability and the requested top alternatives.
#[test]
fn stop_token_ids_and_chat_logprobs() {
    let text = "alpha beta gamma delta";
    let base = serve_script(text, None, Duration::ZERO);
    let tokenizer = Tokenizer::load(&bundled_model_dir()).unwrap();
    let script = tokenizer.encode(text).unwrap();
    assert!(script.len() >= 4, "{script:?}");
    let post = |path: &str, body: Value| -> Value {
        (ureq::post(&format!("{base}{path}")).send_json(body))
            .expect("answers")
            .into_json()
            .expect("json")
    };
    let body = post(
        "/v1/completions",
        json!({"model": "scripted", "prompt": "Go", "max_tokens": 50, "stop_token_ids": [script[2]]}),
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    assert_eq!(
        body["choices"][0]["text"],
        tokenizer.decode(&script[..2]).unwrap(),
        "{body}"
    );
    let body = post(
        "/v1/chat/completions",
        json!({"model": "scripted", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 50,
               "logprobs": true, "top_logprobs": 2}),
    );
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content");
    // Every generated token has an entry, the end-of-sequence token last (as completion_tokens counts it).
    assert_eq!(content.len(), script.len() + 1, "one entry per generated token: {body}");
    let eos = ModelConfig::load(&bundled_model_dir()).unwrap().eos_token_ids[0];
    for (entry, id) in content.iter().zip(script.iter().chain([&eos])) {
        let token = tokenizer.decode(&[*id]).unwrap();
        assert_eq!(entry["token"], token.as_str(), "{entry}");
        let logprob = entry["logprob"].as_f64().expect("logprob");
        assert!((-1e-6..=0.0).contains(&logprob), "a certain token's logprob {logprob}");
        let top = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 2, "{entry}");
        assert_eq!(top[0]["token"], token.as_str());
        assert!(top[1]["logprob"].as_f64().unwrap() < -20.0, "{entry}");
    }
}
