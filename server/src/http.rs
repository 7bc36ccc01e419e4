//! The HTTP side: OpenAI's `/v1/completions`, `/v1/chat/completions` (JSON or SSE streams with usage),
//! `/v1/models`, plus `/health` and `/metrics`. A handler checks the request, submits it to the engine
//! thread and turns its tokens into the response; when the client goes away the request is cancelled.
use crate::api::{self, ApiError, ChatRequest, CompletionRequest, Prompt, Sampling};
use crate::chat;
use crate::metrics::Metrics;
use crate::parsers::{Dsml, Event, ReasoningParser, StreamParser, ToolParser, V31};
use crate::text::{Next, TextStream};
use crate::worker::{Submit, WorkerHandle};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nsa_model::Tokenizer;
use nsa_runtime::sampling::{Sampled, SamplingParams};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallParser {
    Deepseekv32,
    Deepseekv31,
}

/// What the handlers need to know about the served model.
pub struct ServedModel {
    pub name: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// generation_config.json's sampling defaults.
    pub defaults: SamplingParams,
    pub reasoning_parser: bool,
    pub tool_call_parser: Option<ToolCallParser>,
}

pub struct AppState {
    pub worker: WorkerHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    pub model: ServedModel,
    pub next_id: AtomicU64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such route".into(),
                param: None,
            }
        })
        .with_state(state)
}

/// 200 while the engine runs; 503 once it has stopped (e.g. a device error), so a supervisor restarts us.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.worker.is_alive() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let model = json!({"id": state.model.name, "object": "model", "created": created(), "owned_by": "nsa",
        "max_model_len": state.model.context_length});
    axum::Json(json!({"object": "list", "data": [model]})).into_response()
}

/// A checked request, ready for the engine.
struct Prepared {
    prompt: Vec<u32>,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    stop_strings: Vec<String>,
    params: SamplingParams,
    seed: Option<u64>,
    stream: bool,
    include_usage: bool,
}

fn number_in<T: PartialOrd + std::fmt::Display>(value: T, low: T, high: T, param: &'static str) -> Result<T, ApiError> {
    if value >= low && value <= high {
        Ok(value)
    } else {
        Err(ApiError::bad_request(
            format!("{param} must be in [{low}, {high}], got {value}"),
            Some(param),
        ))
    }
}

impl AppState {
    fn prepare(&self, sampling: Sampling, prompt: Vec<u32>, default_max: Option<usize>) -> Result<Prepared, ApiError> {
        if let Some(model) = &sampling.model
            && model != &self.model.name
        {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "The model `{model}` does not exist (this server serves `{}`).",
                    self.model.name
                ),
                param: Some("model"),
            });
        }
        sampling.refuse_unbuilt()?;
        if sampling.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "n must be 1 (several choices per request are not built)",
                Some("n"),
            ));
        }
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= self.model.vocab_size) {
            return Err(ApiError::bad_request(
                format!("token id {bad} is outside the vocabulary"),
                Some("prompt"),
            ));
        }
        let context = self.model.context_length;
        if prompt.len() >= context {
            return Err(ApiError::bad_request(
                format!(
                    "This model's maximum context length is {context} tokens, but the prompt has {} tokens.",
                    prompt.len()
                ),
                Some("messages"),
            ));
        }
        let room = context - prompt.len();
        let max_tokens = match sampling.max_completion_tokens.or(sampling.max_tokens) {
            Some(n) if n < 1 => {
                return Err(ApiError::bad_request(
                    format!("max_tokens must be at least 1, got {n}"),
                    Some("max_tokens"),
                ));
            }
            Some(n) => (n as usize).min(room),
            None => default_max.unwrap_or(room).min(room),
        };
        let defaults = &self.model.defaults;
        let params = SamplingParams {
            temperature: sampling.temperature.unwrap_or(defaults.temperature),
            top_p: sampling.top_p.unwrap_or(defaults.top_p),
            top_k: match sampling.top_k {
                Some(k) if k < -1 => {
                    return Err(ApiError::bad_request(
                        "top_k must be -1 (all), 0 (all) or positive",
                        Some("top_k"),
                    ));
                }
                Some(k) => k.max(0) as usize,
                None => defaults.top_k,
            },
            min_p: sampling.min_p.unwrap_or(defaults.min_p),
        };
        params.validate().map_err(|e| ApiError::bad_request(e, None))?;
        let mut stop_tokens = if sampling.ignore_eos {
            Vec::new()
        } else {
            self.model.eos_token_ids.clone()
        };
        stop_tokens.extend(sampling.stop_token_ids.unwrap_or_default());
        let stop_strings: Vec<String> = sampling.stop.map(|s| s.into_vec()).unwrap_or_default();
        if stop_strings.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad_request("stop strings must not be empty", Some("stop")));
        }
        Ok(Prepared {
            prompt,
            max_tokens,
            stop_tokens,
            stop_strings,
            params,
            seed: sampling.seed,
            stream: sampling.stream,
            include_usage: sampling.stream_options.is_some_and(|o| o.include_usage),
        })
    }

    /// Hands the request to the engine; its text arrives on the returned stream.
    fn submit(&self, prepared: &Prepared, logprobs: Option<usize>) -> Result<TextStream, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let submit = Submit {
            prompt: prepared.prompt.clone(),
            max_tokens: prepared.max_tokens,
            stop_tokens: prepared.stop_tokens.clone(),
            params: prepared.params.clone(),
            seed: prepared.seed,
            logprobs,
            out: tx,
        };
        if !self.worker.submit(submit) {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the engine has stopped".into(),
                param: None,
            });
        }
        self.metrics.request(prepared.prompt.len());
        let tokenizer = self.tokenizer.clone();
        Ok(TextStream::new(
            rx,
            tokenizer,
            prepared.stop_tokens.clone(),
            &prepared.stop_strings,
            self.metrics.clone(),
        ))
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))
    }

    fn request_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn failed(&self, error: ApiError) -> Response {
        self.metrics.failed();
        error.into_response()
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The stream's last events (those given), then `[DONE]`; stops early when the client is gone.
async fn end_stream(tx: &mpsc::Sender<Value>, last: [Option<Value>; 2]) {
    for event in last.into_iter().flatten().chain([Value::Null]) {
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// The chunk `stream_options.include_usage` asks for: no choices, the request's token counts.
fn usage_chunk(id: &str, object: &str, model: &str, prompt: usize, completion: usize) -> Value {
    json!({"id": id, "object": object, "created": created(), "model": model, "choices": [],
        "usage": usage(prompt, completion)})
}

/// An SSE response fed by a task; the task stops (and the request is cancelled) when the client goes away.
fn sse(rx: mpsc::Receiver<Value>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let events = tokio_stream::StreamExt::map(stream, |value: Value| {
        Ok::<_, Infallible>(match value {
            Value::Null => SseEvent::default().data("[DONE]"),
            value => SseEvent::default().data(value.to_string()),
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

// ---- /v1/completions

fn completion_logprobs(state: &AppState, sampled: &[Sampled], offset: usize) -> Value {
    let mut text_offset = Vec::new();
    let mut at = offset;
    let tokens: Vec<String> = sampled.iter().map(|s| state.token_text(s.token)).collect();
    for t in &tokens {
        text_offset.push(at);
        at += t.len();
    }
    json!({
        "tokens": tokens,
        "token_logprobs": sampled.iter().map(|s| s.logprob).collect::<Vec<_>>(),
        "top_logprobs": sampled.iter().map(|s| s.top_logprobs.iter().map(|(t, lp)| (state.token_text(*t), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match completions_inner(&state, &body).await {
        Ok(response) => response,
        Err(error) => state.failed(error),
    }
}

async fn completions_inner(state: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let request: CompletionRequest = api::parse(body)?;
    let (prompt_text, prompt) = match request.prompt {
        Prompt::Text(text) => (text.clone(), state.encode(&text)?),
        Prompt::Ids(ids) => (state.tokenizer.decode(&ids).unwrap_or_default(), ids),
        Prompt::Texts(texts) if texts.len() == 1 => (texts[0].clone(), state.encode(&texts[0])?),
        Prompt::Texts(_) => {
            return Err(ApiError::bad_request(
                "one prompt per request (batched prompts are not built)",
                Some("prompt"),
            ));
        }
    };
    let top = match request.logprobs {
        Some(n) => Some(number_in(n, 0, 20, "logprobs")? as usize),
        None => None,
    };
    let prepared = state.prepare(request.sampling, prompt, Some(16))?;
    let mut text = state.submit(&prepared, top)?;
    let (id, model, prompt_tokens) = (
        state.request_id("cmpl"),
        state.model.name.clone(),
        prepared.prompt.len(),
    );
    let echo = if request.echo { prompt_text } else { String::new() };
    if !prepared.stream {
        let (mut out, mut sampled) = (echo, Vec::new());
        let (finish, tokens) = loop {
            match text.next().await {
                Next::Piece(piece) => {
                    out.push_str(&piece.text);
                    sampled.extend(piece.logprobs);
                }
                Next::Done { finish, tokens } => break (finish, tokens),
                Next::Failed(error) => return Err(error),
            }
        };
        let logprobs = top.map(|_| completion_logprobs(state, &sampled, 0));
        let choice = json!({"index": 0, "text": out, "logprobs": logprobs, "finish_reason": finish});
        return Ok(axum::Json(
            json!({"id": id, "object": "text_completion", "created": created(), "model": model,
            "choices": [choice], "usage": usage(prompt_tokens, tokens)}),
        )
        .into_response());
    }
    let (tx, rx) = mpsc::channel(64);
    let state = state.clone();
    tokio::spawn(async move {
        let chunk = |text: String, logprobs: Value, finish: Value| {
            json!({"id": id, "object": "text_completion", "created": created(), "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
        };
        if !echo.is_empty() && tx.send(chunk(echo, Value::Null, Value::Null)).await.is_err() {
            return;
        }
        let mut offset = 0;
        loop {
            let message = match text.next().await {
                Next::Piece(piece) => {
                    let logprobs = top.map_or(Value::Null, |_| completion_logprobs(&state, &piece.logprobs, offset));
                    offset += piece.text.len();
                    chunk(piece.text, logprobs, Value::Null)
                }
                Next::Done { finish, tokens } => {
                    let last = chunk(String::new(), Value::Null, json!(finish));
                    let usage = prepared
                        .include_usage
                        .then(|| usage_chunk(&id, "text_completion", &model, prompt_tokens, tokens));
                    return end_stream(&tx, [Some(last), usage]).await;
                }
                Next::Failed(error) => return end_stream(&tx, [Some(error.body()), None]).await,
            };
            if tx.send(message).await.is_err() {
                return;
            }
        }
    });
    Ok(sse(rx))
}

// ---- /v1/chat/completions

/// The output's text through the configured parsers: reasoning split off, tool calls recognized.
struct ChatParsers {
    reasoning: Option<ReasoningParser>,
    tools: Option<Box<dyn StreamParser + Send>>,
    calls: usize,
}

impl ChatParsers {
    fn push(&mut self, text: &str, end: bool) -> Vec<Event> {
        let mut events = match &mut self.reasoning {
            Some(parser) => {
                let mut events = parser.push(text);
                if end {
                    events.extend(parser.finish());
                }
                events
            }
            None => vec![Event::Content(text.to_string())],
        };
        if let Some(tools) = &mut self.tools {
            let mut parsed = Vec::new();
            for event in events {
                match event {
                    Event::Content(text) => parsed.extend(tools.push(&text)),
                    other => parsed.push(other),
                }
            }
            if end {
                parsed.extend(tools.finish());
            }
            events = parsed;
        }
        events
    }
}

fn chat_logprobs(state: &AppState, sampled: &[Sampled]) -> Value {
    let entry = |token: u32, logprob: Option<f64>| {
        let text = state.token_text(token);
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = sampled
        .iter()
        .map(|s| {
            let mut e = entry(s.token, s.logprob);
            e["top_logprobs"] = s.top_logprobs.iter().map(|(t, lp)| entry(*t, Some(*lp))).collect();
            e
        })
        .collect();
    json!({"content": content})
}

fn tool_call_json(index: usize, id: &str, name: &str, arguments: &str) -> Value {
    json!({"index": index, "id": format!("call_{id}_{index}"), "type": "function",
        "function": {"name": name, "arguments": arguments}})
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_inner(&state, &body).await {
        Ok(response) => response,
        Err(error) => state.failed(error),
    }
}

async fn chat_inner(state: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let request: ChatRequest = api::parse(body)?;
    let tools = api::tools(request.tools.as_deref().unwrap_or_default())?;
    let use_tools = match &request.tool_choice {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) if s == "auto" => true,
        Some(Value::String(s)) if s == "none" => false,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("tool_choice {other} is not built (auto or none)"),
                Some("tool_choice"),
            ));
        }
    };
    let tools = if use_tools { tools } else { Vec::new() };
    let kwargs = request.chat_template_kwargs.clone().unwrap_or(Value::Null);
    let thinking = kwargs["thinking"]
        .as_bool()
        .or(kwargs["enable_thinking"].as_bool())
        .unwrap_or(false);
    let prompt_text = chat::encode(&request.messages, &tools, thinking)?;
    let prompt = state.encode(&prompt_text)?;
    let top = match (request.logprobs, request.top_logprobs) {
        (true, n) => Some(number_in(n.unwrap_or(0), 0, 20, "top_logprobs")? as usize),
        (false, _) => None,
    };
    let prepared = state.prepare(request.sampling, prompt, None)?;
    let mut text = state.submit(&prepared, top)?;
    let mut parsers = ChatParsers {
        reasoning: (state.model.reasoning_parser && request.separate_reasoning != Some(false))
            .then(|| ReasoningParser::new(thinking)),
        tools: match (state.model.tool_call_parser, tools.is_empty()) {
            (Some(ToolCallParser::Deepseekv32), false) => Some(Box::new(ToolParser::<Dsml>::default())),
            (Some(ToolCallParser::Deepseekv31), false) => Some(Box::new(ToolParser::<V31>::default())),
            _ => None,
        },
        calls: 0,
    };
    let (id, model, prompt_tokens) = (
        state.request_id("chatcmpl"),
        state.model.name.clone(),
        prepared.prompt.len(),
    );
    if !prepared.stream {
        let (mut content, mut reasoning, mut calls, mut sampled) =
            (String::new(), String::new(), Vec::new(), Vec::new());
        let (finish, tokens) = loop {
            let (piece, end) = match text.next().await {
                Next::Piece(piece) => (piece, None),
                Next::Done { finish, tokens } => (Default::default(), Some((finish, tokens))),
                Next::Failed(error) => return Err(error),
            };
            sampled.extend(piece.logprobs);
            for event in parsers.push(&piece.text, end.is_some()) {
                match event {
                    Event::Content(t) => content.push_str(&t),
                    Event::Reasoning(t) => reasoning.push_str(&t),
                    Event::ToolCall { name, arguments } => {
                        let mut call = tool_call_json(calls.len(), &id, &name, &arguments);
                        call.as_object_mut().expect("an object").remove("index");
                        calls.push(call);
                    }
                }
            }
            if let Some(end) = end {
                break end;
            }
        };
        let mut message = json!({"role": "assistant", "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { json!(content) }});
        if parsers.reasoning.is_some() {
            message["reasoning_content"] = if reasoning.is_empty() {
                Value::Null
            } else {
                json!(reasoning)
            };
        }
        if !calls.is_empty() {
            message["tool_calls"] = json!(calls);
        }
        let finish = if calls.is_empty() { finish } else { "tool_calls" };
        let logprobs = top.map_or(Value::Null, |_| chat_logprobs(state, &sampled));
        let choice = json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish});
        return Ok(axum::Json(
            json!({"id": id, "object": "chat.completion", "created": created(), "model": model,
            "choices": [choice], "usage": usage(prompt_tokens, tokens)}),
        )
        .into_response());
    }
    let (tx, rx) = mpsc::channel(64);
    let state = state.clone();
    tokio::spawn(async move {
        let chunk = |delta: Value, logprobs: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created(), "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
        };
        if tx
            .send(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                Value::Null,
            ))
            .await
            .is_err()
        {
            return;
        }
        let mut held = Vec::new();
        loop {
            let (piece, end) = match text.next().await {
                Next::Piece(piece) => (piece, None),
                Next::Done { finish, tokens } => (Default::default(), Some((finish, tokens))),
                Next::Failed(error) => return end_stream(&tx, [Some(error.body()), None]).await,
            };
            // Tokens whose text a parser holds back keep their log-probabilities for the next delta.
            held.extend(piece.logprobs);
            let events = parsers.push(&piece.text, end.is_some());
            let mut logprobs = match (top, events.is_empty() && end.is_none()) {
                (Some(_), false) => chat_logprobs(&state, &std::mem::take(&mut held)),
                _ => Value::Null,
            };
            for event in events {
                let delta = match event {
                    Event::Content(t) => json!({"content": t}),
                    Event::Reasoning(t) => json!({"reasoning_content": t}),
                    Event::ToolCall { name, arguments } => {
                        parsers.calls += 1;
                        json!({"tool_calls": [tool_call_json(parsers.calls - 1, &id, &name, &arguments)]})
                    }
                };
                if tx
                    .send(chunk(delta, std::mem::take(&mut logprobs), Value::Null))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if let Some((finish, tokens)) = end {
                let finish = if parsers.calls > 0 { "tool_calls" } else { finish };
                let last = chunk(json!({}), logprobs, json!(finish));
                let usage = prepared
                    .include_usage
                    .then(|| usage_chunk(&id, "chat.completion.chunk", &model, prompt_tokens, tokens));
                return end_stream(&tx, [Some(last), usage]).await;
            }
        }
    });
    Ok(sse(rx))
}
