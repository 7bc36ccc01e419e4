//! DeepSeek-V3.2's chat encoding (its `encoding_dsv32`, thinking and chat modes): messages → the prompt
//! text. Turns are joined with no separators; the last user turn ends `<｜Assistant｜><think>` when
//! thinking, else `<｜Assistant｜></think>`; earlier reasoning is not shown; tools are described in the
//! first system message (one is added when there is none, as SGLang does); assistant tool calls are written
//! in DSML and tool results follow the assistant's turn in a `<function_results>` block, matched to the
//! calls by position.
use crate::api::{ApiError, ChatMessage, Tool};
use serde_json::Value;

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
const USER: &str = "<｜User｜>";
const ASSISTANT: &str = "<｜Assistant｜>";
const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

const TOOLS_HEADER: &str = "## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a \"<｜DSML｜function_calls>\" block like the following as part of your reply to the user:
<｜DSML｜function_calls>
<｜DSML｜invoke name=\"$FUNCTION_NAME\">
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name=\"$FUNCTION_NAME2\">
...
</｜DSML｜invoke>
</｜DSML｜function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The \"string\" attribute should be set to \"true\" for string type parameters and \"false\" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<｜DSML｜function_calls>
...
</｜DSML｜function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
";

/// JSON as Python's `json.dumps(x, ensure_ascii=False)` writes it (what the model was trained on):
/// `", "` and `": "` separators, keys in their given order.
pub fn python_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(python_json).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

fn tools_block(tools: &[Tool]) -> String {
    let schemas: Vec<String> = tools
        .iter()
        .map(|t| {
            let mut function = serde_json::Map::new();
            function.insert("name".into(), Value::String(t.name.clone()));
            if !t.description.is_empty() {
                function.insert("description".into(), Value::String(t.description.clone()));
            }
            function.insert("parameters".into(), t.parameters.clone());
            python_json(&Value::Object(function))
        })
        .collect();
    format!("{TOOLS_HEADER}{}\n</functions>\n", schemas.join("\n"))
}

/// An assistant's tool calls (OpenAI's `tool_calls`) in DSML.
fn tool_calls_block(calls: &[Value]) -> Result<String, ApiError> {
    let bad = |what: &str| ApiError::bad_request(format!("invalid assistant tool_calls: {what}"), Some("messages"));
    let mut invokes = Vec::new();
    for call in calls {
        let function = &call["function"];
        let name = function["name"]
            .as_str()
            .ok_or_else(|| bad("a call without function.name"))?;
        let arguments = match &function["arguments"] {
            Value::String(text) if text.trim().is_empty() => Value::Object(Default::default()),
            Value::String(text) => {
                serde_json::from_str(text).map_err(|e| bad(&format!("arguments are not JSON: {e}")))?
            }
            Value::Null => Value::Object(Default::default()),
            other => other.clone(),
        };
        let Value::Object(arguments) = arguments else {
            return Err(bad("arguments must be a JSON object"));
        };
        let parameters: Vec<String> = arguments
            .iter()
            .map(|(key, value)| match value {
                Value::String(text) => {
                    format!("<｜DSML｜parameter name=\"{key}\" string=\"true\">{text}</｜DSML｜parameter>")
                }
                other => format!(
                    "<｜DSML｜parameter name=\"{key}\" string=\"false\">{}</｜DSML｜parameter>",
                    python_json(other)
                ),
            })
            .collect();
        invokes.push(format!(
            "<｜DSML｜invoke name=\"{name}\">\n{}\n</｜DSML｜invoke>",
            parameters.join("\n")
        ));
    }
    Ok(format!(
        "<｜DSML｜function_calls>\n{}\n</｜DSML｜function_calls>",
        invokes.join("\n")
    ))
}

fn text(message: &ChatMessage) -> Result<String, ApiError> {
    message.content.as_ref().map_or(Ok(String::new()), |c| c.text())
}

/// The prompt for `messages` (with `tools` described in the system message), ending where the model
/// answers.
pub fn encode(messages: &[ChatMessage], tools: &[Tool], thinking: bool) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    let mut messages = messages.to_vec();
    if !tools.is_empty() && messages[0].role != "system" {
        messages.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content: None,
                reasoning_content: None,
                tool_calls: None,
                tool_call_id: None,
                name: None,
            },
        );
    }
    let last_user = messages.iter().rposition(|m| m.role == "user" || m.role == "developer");
    let think_after = |index: usize| {
        if thinking && last_user.is_some_and(|last| index >= last) {
            THINK_START
        } else {
            THINK_END
        }
    };
    let mut prompt = String::from(BOS);
    // Tool results are matched to the last assistant's calls by position.
    let (mut calls, mut results) = (0usize, 0usize);
    for (index, message) in messages.iter().enumerate() {
        match message.role.as_str() {
            "system" => {
                prompt.push_str(&text(message)?);
                if index == 0 && !tools.is_empty() {
                    prompt.push_str("\n\n");
                    prompt.push_str(&tools_block(tools));
                }
            }
            "user" => {
                let end = if Some(index) == last_user {
                    think_after(index)
                } else {
                    THINK_END
                };
                prompt.push_str(&format!("{USER}{}{ASSISTANT}{end}", text(message)?));
            }
            "developer" => {
                let content = text(message)?;
                if content.is_empty() {
                    return Err(ApiError::bad_request(
                        "a developer message needs content",
                        Some("messages"),
                    ));
                }
                let end = if Some(index) == last_user {
                    think_after(index)
                } else {
                    THINK_END
                };
                prompt.push_str(&format!("{USER}\n\n# The user's message is: {content}{ASSISTANT}{end}"));
            }
            "assistant" => {
                if thinking && last_user.is_some_and(|last| index > last) {
                    prompt.push_str(message.reasoning_content.as_deref().unwrap_or_default());
                    prompt.push_str(THINK_END);
                }
                prompt.push_str(&text(message)?);
                let tool_calls = message.tool_calls.as_deref().unwrap_or_default();
                if !tool_calls.is_empty() {
                    prompt.push_str("\n\n");
                    prompt.push_str(&tool_calls_block(tool_calls)?);
                }
                prompt.push_str(EOS);
                (calls, results) = (tool_calls.len(), 0);
            }
            "tool" => {
                if results >= calls {
                    return Err(ApiError::bad_request(
                        "a tool message must answer a call of the assistant message before it",
                        Some("messages"),
                    ));
                }
                if results == 0 {
                    prompt.push_str("\n\n<function_results>");
                }
                prompt.push_str(&format!("\n<result>{}</result>", text(message)?));
                results += 1;
                if results == calls {
                    prompt.push_str(&format!("\n</function_results>\n\n{}", think_after(index)));
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    format!("unknown message role `{other}` (system, developer, user, assistant, tool)"),
                    Some("messages"),
                ));
            }
        }
    }
    Ok(prompt)
}
