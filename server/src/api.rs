//! OpenAI's request bodies (the fields nsa reads; others are ignored as OpenAI's clients send many) and
//! its error object. Values are checked here so that every bad request gets a 4xx naming the parameter.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
        }
    }

    pub fn body(&self) -> Value {
        let kind = match self.status {
            StatusCode::NOT_FOUND => "model_not_found",
            s if s.is_server_error() => "internal_server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// The request body as `T`, or a 400 saying what is wrong with the JSON.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping, shared by both endpoints.
#[derive(Deserialize, Default)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany<String>>,
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    /// Not built: refused unless 0 / empty (silently ignoring them would change what the client asked for).
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub best_of: Option<i64>,
    pub response_format: Option<Value>,
}

impl Sampling {
    /// Refuses the parameters nsa does not implement when they would change the output.
    pub fn refuse_unbuilt(&self) -> Result<(), ApiError> {
        let not_built = |param: &'static str| {
            Err(ApiError::bad_request(
                format!("{param} is not supported by nsa serve yet"),
                Some(param),
            ))
        };
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return not_built("presence_penalty");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return not_built("frequency_penalty");
        }
        if self.repetition_penalty.is_some_and(|p| p != 1.0) {
            return not_built("repetition_penalty");
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return not_built("logit_bias");
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return not_built("best_of");
        }
        match &self.response_format {
            None | Some(Value::Null) => Ok(()),
            Some(format) if format["type"] == "text" => Ok(()),
            Some(_) => not_built("response_format"),
        }
    }
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// The number of most likely tokens to report at each position (0–20).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub chat_template_kwargs: Option<Value>,
    /// SGLang's switch for the reasoning parser's split (default on when a parser is set).
    pub separate_reasoning: Option<bool>,
}

#[derive(Deserialize, Clone, Debug)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub reasoning_content: Option<String>,
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    /// The text of the message: a string, or its `text` parts joined (other parts refused).
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(text) => Ok(text.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|part| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text.to_string()),
                    (kind, _) => Err(ApiError::bad_request(
                        format!("content part of type {kind:?} is not supported (text only)"),
                        Some("messages"),
                    )),
                })
                .collect(),
        }
    }
}

/// A tool the model may call: `{"type": "function", "function": {"name", "description"?, "parameters"?}}`.
#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

pub fn tools(tools: &[Value]) -> Result<Vec<Tool>, ApiError> {
    let bad =
        |i: usize, what: &str| ApiError::bad_request(format!("invalid tool schema: tools[{i}] {what}"), Some("tools"));
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            if tool["type"] != "function" {
                return Err(bad(i, "must have \"type\": \"function\""));
            }
            let function = &tool["function"];
            let name = function["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad(i, "needs function.name"))?;
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Err(bad(i, "function.name may hold only a-z, A-Z, 0-9, _, - and ."));
            }
            let parameters = match &function["parameters"] {
                Value::Null => json!({"type": "object", "properties": {}}),
                p @ Value::Object(_) => p.clone(),
                _ => return Err(bad(i, "function.parameters must be a JSON Schema object")),
            };
            Ok(Tool {
                name: name.to_string(),
                description: function["description"].as_str().unwrap_or_default().to_string(),
                parameters,
            })
        })
        .collect()
}
