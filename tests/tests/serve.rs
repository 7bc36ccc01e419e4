//! `nsa serve` end to end: the bundled tiny model served by the host reference engine on a free port,
//! driven over HTTP. Greedy outputs are checked against the model's own cached generation; streams against
//! non-streamed answers; 64 concurrent streaming clients (some cancelling) against single requests; bad
//! requests against OpenAI's error shape.
use nsa_model::reference::ReferenceModel;
use nsa_model::{Tokenizer, bundled_model_dir};
use nsa_server::http::ToolCallParser;
use nsa_server::{ModelDevice, ServeConfig, WeightFormat};
use nsa_tests::sse;
use serde_json::{Value, json};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let config = ServeConfig {
            model_path: bundled_model_dir(),
            tokenizer_path: None,
            dummy_weights: false,
            device: ModelDevice::Host,
            weight_format: WeightFormat::F32,
            host: "127.0.0.1".into(),
            port: 0,
            served_model_name: Some("tiny".into()),
            context_length: Some(1024),
            page_size: 16,
            max_running_requests: 40,
            chunked_prefill_size: 32,
            // A small pool (40 pages): 64 clients make requests wait and preempt each other.
            max_total_tokens: Some(640),
            mem_fraction_static: None,
            disable_radix_cache: false,
            reasoning_parser: true,
            tool_call_parser: Some(ToolCallParser::Deepseekv32),
            sparse_prefill: None,
            kv_format: Default::default(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result = nsa_server::serve(config, |address| tx.send(address).expect("test waits"));
            panic!("the server stopped: {result:?}");
        });
        let address = rx.recv_timeout(Duration::from_secs(120)).expect("server starts");
        format!("http://{address}")
    })
}

fn post(path: &str, body: &Value) -> (u16, Value) {
    let response = ureq::post(&format!("{}{path}", server())).send_json(body.clone());
    match response {
        Ok(r) => (r.status(), r.into_json().expect("json body")),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().expect("json error body")),
        Err(e) => panic!("{path}: {e}"),
    }
}

fn post_raw(path: &str, body: &str) -> (u16, Value) {
    let response = ureq::post(&format!("{}{path}", server()))
        .set("content-type", "application/json")
        .send_string(body);
    match response {
        Ok(r) => (r.status(), r.into_json().expect("json body")),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().expect("json error body")),
        Err(e) => panic!("{path}: {e}"),
    }
}

/// The SSE stream's JSON events (up to `[DONE]`); `take` stops reading early (the client goes away).
fn stream(path: &str, body: &Value, take: Option<usize>) -> Vec<Value> {
    let response = ureq::post(&format!("{}{path}", server()))
        .send_json(body.clone())
        .expect("stream starts");
    sse::events(response.into_reader(), take)
}

fn reference() -> &'static (ReferenceModel, Tokenizer) {
    static MODEL: OnceLock<(ReferenceModel, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = bundled_model_dir();
        (
            ReferenceModel::load(&dir).expect("model"),
            Tokenizer::load(&dir).expect("tokenizer"),
        )
    })
}

/// The model's own greedy continuation (cached decode, stopping at EOS), as text.
fn greedy(prompt: &str, max_tokens: usize) -> String {
    let (model, tokenizer) = reference();
    let ids = tokenizer.encode(prompt).expect("encodes");
    let out = model.generate_greedy_cached(&ids, max_tokens);
    let end = out
        .iter()
        .position(|t| model.config.eos_token_ids.contains(t))
        .unwrap_or(out.len());
    tokenizer.decode(&out[..end]).expect("decodes")
}

fn error_of(status: u16, body: &Value, expected: u16) -> String {
    assert_eq!(status, expected, "{body}");
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(error["code"], expected, "{body}");
    error["type"].as_str().expect("type").to_string()
}

#[test]
fn health_models_and_metrics() {
    let health = ureq::get(&format!("{}/health", server())).call().expect("health");
    assert_eq!(health.status(), 200);
    let models: Value = ureq::get(&format!("{}/v1/models", server()))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 1024);
    let (status, _) = post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200);
    let metrics = ureq::get(&format!("{}/metrics", server()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for name in [
        "nsa_num_queue_reqs",
        "nsa_num_running_reqs",
        "nsa_generation_tokens_total",
        "nsa_time_to_first_token_seconds_count",
        "nsa_inter_token_latency_seconds_bucket",
        "nsa_cache_usage",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    assert!(sse::metric(&metrics, "nsa_generation_tokens_total") >= 2.0);
}

#[test]
fn greedy_completion_is_the_models_own_generation() {
    let prompt = "<｜begin▁of▁sentence｜><｜User｜>Hello there";
    let (status, body) = post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], greedy(prompt, 12));
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], reference().1.encode(prompt).unwrap().len());
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // The same streamed: chunks join to the same text; usage comes last when asked for.
    let events = stream(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        None,
    );
    let text: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, body["choices"][0]["text"]);
    assert_eq!(events.last().unwrap()["usage"], *usage);
    let finishes: Vec<&Value> = events
        .iter()
        .map(|e| &e["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&body["choices"][0]["finish_reason"]]);
}

#[test]
fn sampling_is_reproducible_with_a_seed_and_logprobs_are_reported() {
    let request = json!({"prompt": "<｜begin▁of▁sentence｜>abc", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7, "logprobs": 3});
    let (s1, a) = post("/v1/completions", &request);
    let (s2, b) = post("/v1/completions", &request);
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let logprobs = &a["choices"][0]["logprobs"];
    let n = logprobs["tokens"].as_array().unwrap().len();
    assert_eq!(n as u64, a["usage"]["completion_tokens"].as_u64().unwrap());
    for (lp, top) in logprobs["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(logprobs["top_logprobs"].as_array().unwrap())
    {
        let lp = lp.as_f64().unwrap();
        assert!(lp <= 0.0 && lp.is_finite());
        assert!(!top.as_object().unwrap().is_empty() && top.as_object().unwrap().len() <= 3);
    }
}

#[test]
fn stop_strings_end_the_output_before_them() {
    let prompt = "<｜begin▁of▁sentence｜><｜User｜>Hello there";
    let full = greedy(prompt, 24);
    // A stop string from the middle of the greedy output: the answer is the text before it.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "greedy output too short to cut: {full:?}");
    let stop: String = chars[5..8].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let (status, body) = post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], expected);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[test]
fn chat_reasoning_and_streaming_agree() {
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]);
    for thinking in [false, true] {
        let request = json!({"model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0,
            "chat_template_kwargs": {"thinking": thinking}});
        let (status, body) = post("/v1/chat/completions", &request);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "chat.completion");
        let message = &body["choices"][0]["message"];
        assert_eq!(message["role"], "assistant");
        // The raw text (parser off) is the prompt's continuation: reasoning until </think> when thinking.
        let mut raw_request = request.clone();
        raw_request["separate_reasoning"] = json!(false);
        let (_, raw) = post("/v1/chat/completions", &raw_request);
        let raw = raw["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let (reasoning, content) = match (thinking, raw.split_once("</think>")) {
            (true, Some((r, c))) => (r.to_string(), c.to_string()),
            (true, None) => (raw.clone(), String::new()),
            (false, _) => (String::new(), raw.clone()),
        };
        assert_eq!(
            message["reasoning_content"].as_str().unwrap_or(""),
            reasoning,
            "thinking {thinking}"
        );
        assert_eq!(
            message["content"].as_str().unwrap_or(""),
            content,
            "thinking {thinking}"
        );

        let mut streaming = request.clone();
        streaming["stream"] = json!(true);
        let events = stream("/v1/chat/completions", &streaming, None);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let joined = |key: &str| -> String {
            events
                .iter()
                .filter_map(|e| e["choices"][0]["delta"][key].as_str())
                .collect()
        };
        assert_eq!(joined("content"), content);
        assert_eq!(joined("reasoning_content"), reasoning);
    }
}

#[test]
fn chat_with_tools_describes_them_in_the_prompt() {
    let tool = json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let messages = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let (s1, plain) = post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 4, "temperature": 0}),
    );
    let (s2, tools) = post(
        "/v1/chat/completions",
        &json!({"messages": messages, "tools": [tool], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!((s1, s2), (200, 200), "{plain} {tools}");
    assert!(tools["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64().map(|n| n + 100));
    let finish = tools["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(["stop", "length", "tool_calls"].contains(&finish));
    // A conversation with a tool call and its result encodes and runs.
    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"}
    ]);
    let (status, body) = post(
        "/v1/chat/completions",
        &json!({"messages": history, "tools": [tool], "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn bad_requests_get_openai_errors() {
    let (status, body) = post_raw("/v1/chat/completions", "{\"messages\": [");
    assert_eq!(error_of(status, &body, 400), "invalid_request_error");
    let (status, body) = post(
        "/v1/chat/completions",
        &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(error_of(status, &body, 404), "model_not_found");
    let (status, body) = post("/v1/completions", &json!({"prompt": "hi", "max_tokens": -5}));
    error_of(status, &body, 400);
    assert_eq!(body["error"]["param"], "max_tokens");
    let long = "a b c d ".repeat(600);
    let (status, body) = post("/v1/completions", &json!({"prompt": long}));
    error_of(status, &body, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );
    let (status, body) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"description": "no name"}}]}),
    );
    error_of(status, &body, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid tool schema")
    );
    for bad in [
        json!({"prompt": "hi", "temperature": -1}),
        json!({"prompt": "hi", "top_p": 0}),
        json!({"prompt": "hi", "n": 3}),
        json!({"prompt": "hi", "logprobs": 50}),
        json!({"prompt": ""}),
        json!({"prompt": [99999999]}),
        json!({"prompt": "hi", "presence_penalty": 0.5}),
        json!({"prompt": "hi", "logit_bias": {"5": 10}}),
        json!({"prompt": "hi", "response_format": {"type": "json_object"}}),
    ] {
        let (status, body) = post("/v1/completions", &bad);
        error_of(status, &body, 400);
    }
    let (status, body) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "wizard", "content": "hi"}]}),
    );
    error_of(status, &body, 400);
    let missing = ureq::get(&format!("{}/v1/nothing", server())).call();
    assert!(matches!(missing, Err(ureq::Error::Status(404, _))));
}

#[test]
fn sixty_four_concurrent_streams_match_single_requests() {
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("<｜begin▁of▁sentence｜><｜User｜>Question {i}: hello"))
        .collect();
    let expected: Vec<String> = prompts.iter().map(|p| greedy(p, 10)).collect();
    let start = Instant::now();
    let handles: Vec<_> = (0..64)
        .map(|client| {
            let prompt = prompts[client % 8].clone();
            std::thread::spawn(move || {
                let request = json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": true});
                // Every fifth client goes away after its first chunk.
                let take = (client % 5 == 4).then_some(1);
                let events = stream("/v1/completions", &request, take);
                let text: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
                (client, take.is_some(), text)
            })
        })
        .collect();
    for handle in handles {
        let (client, cancelled, text) = handle.join().expect("client thread");
        if !cancelled {
            assert_eq!(text, expected[client % 8], "client {client}");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(300), "took {:?}", start.elapsed());
    let metrics = ureq::get(&format!("{}/metrics", server()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let preemptions = sse::metric(&metrics, "nsa_preemptions_total");
    eprintln!("64 clients in {:?}; {preemptions} preemptions", start.elapsed());
    assert!(preemptions > 0.0, "the 40-page pool never preempted a request");
    // The server is still whole afterwards.
    let (status, body) = post(
        "/v1/completions",
        &json!({"prompt": prompts[0], "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(
        (status, body["choices"][0]["text"].as_str().unwrap()),
        (200, expected[0].as_str())
    );
}
