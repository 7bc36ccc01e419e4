//! DeepSeek-V3.2's chat encoding against the published examples (its model card and the encoding's test
//! fixtures): thinking and chat modes, earlier reasoning dropped, tools described in the system message,
//! DSML tool calls and `<function_results>` in the history.
use nsa_server::api::{ChatMessage, tools};
use nsa_server::chat::{encode, python_json};
use serde_json::{Value, json};

fn messages(value: Value) -> Vec<ChatMessage> {
    serde_json::from_value(value).expect("messages")
}

#[test]
fn thinking_mode_drops_earlier_reasoning_and_opens_a_think_block() {
    // The model card's example.
    let m = messages(json!([
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
        {"role": "user", "content": "1+1=?"}
    ]));
    assert_eq!(
        encode(&m, &[], true).unwrap(),
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>"
    );
}

#[test]
fn chat_mode_closes_the_think_block_at_every_turn() {
    let m = messages(json!([
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "q"}]}
    ]));
    assert_eq!(
        encode(&m, &[], false).unwrap(),
        "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜></think>Hello<｜end▁of▁sentence｜><｜User｜>q<｜Assistant｜></think>"
    );
}

#[test]
fn tools_and_tool_calls_follow_the_fixture() {
    let tool = json!({"type": "function", "function": {"name": "get_datetime", "description": "Get the current date and time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "description": "The timezone, e.g. America/New_York, UTC"}}, "required": ["timezone"]}}});
    let tools = tools(&[tool]).unwrap();
    let m = messages(json!([
        {"role": "system", "content": "You are a helpful Assistant."},
        {"role": "user", "content": "What's the weather tomorrow in San Francisco and New York?"},
        {"role": "assistant", "content": "", "reasoning_content": "dropped", "tool_calls": [{"id": "a", "type": "function",
            "function": {"name": "get_datetime", "arguments": "{\"timezone\": \"America/New_York\"}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "{\"current_date\": \"2024-01-15\"}"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Thanks!"}
    ]));
    let prompt = encode(&m, &tools, true).unwrap();
    let schema = "{\"name\": \"get_datetime\", \"description\": \"Get the current date and time\", \"parameters\": {\"type\": \"object\", \"properties\": {\"timezone\": {\"type\": \"string\", \"description\": \"The timezone, e.g. America/New_York, UTC\"}}, \"required\": [\"timezone\"]}}";
    assert!(prompt.starts_with(
        "<｜begin▁of▁sentence｜>You are a helpful Assistant.\n\n## Tools\n\nYou have access to a set of tools you can use to answer the user's question.\n"
    ));
    let tail = format!(
        "<functions>\n{schema}\n</functions>\n<｜User｜>What's the weather tomorrow in San Francisco and New York?<｜Assistant｜></think>\n\n\
<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_datetime\">\n<｜DSML｜parameter name=\"timezone\" string=\"true\">America/New_York</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>\n\n\
<function_results>\n<result>{{\"current_date\": \"2024-01-15\"}}</result>\n</function_results>\n\n</think>Done.<｜end▁of▁sentence｜><｜User｜>Thanks!<｜Assistant｜><think>"
    );
    assert!(prompt.ends_with(&tail), "{prompt}");
    // The block's fixed text: the instructions with their blank lines, and the thinking example.
    assert!(prompt.contains("</｜DSML｜function_calls>\n\nString and scalar parameters"));
    assert!(prompt.contains(
        "\n\n<think>...thinking about results</think>\n\nHere are the functions available in JSONSchema format:\n"
    ));
}

#[test]
fn tool_results_after_the_last_user_open_a_think_block_and_values_keep_their_json() {
    let m = messages(json!([
        {"role": "user", "content": "find"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": "{\"query\": \"a b\", \"topn\": 10, \"filters\": {\"x\": [1, 2]}}"}},
            {"type": "function", "function": {"name": "open", "arguments": ""}}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"}
    ]));
    let prompt = encode(&m, &[], true).unwrap();
    assert_eq!(
        prompt,
        "<｜begin▁of▁sentence｜><｜User｜>find<｜Assistant｜><think></think>\n\n<｜DSML｜function_calls>\n\
<｜DSML｜invoke name=\"search\">\n<｜DSML｜parameter name=\"query\" string=\"true\">a b</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"topn\" string=\"false\">10</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"filters\" string=\"false\">{\"x\": [1, 2]}</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"open\">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>\n\n\
<function_results>\n<result>r1</result>\n<result>r2</result>\n</function_results>\n\n<think>"
    );
}

#[test]
fn malformed_conversations_are_refused() {
    assert!(encode(&[], &[], false).is_err());
    let orphan = messages(json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]));
    assert!(encode(&orphan, &[], false).is_err());
    let unknown = messages(json!([{"role": "narrator", "content": "x"}]));
    assert!(encode(&unknown, &[], false).is_err());
    let bad_arguments = messages(
        json!([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]),
    );
    assert!(encode(&bad_arguments, &[], false).is_err());
    assert!(tools(&[json!({"type": "function", "function": {"name": "has space"}})]).is_err());
    assert!(tools(&[json!({"type": "retrieval"})]).is_err());
}

#[test]
fn json_is_written_as_python_writes_it() {
    let value: Value = serde_json::from_str(r#"{"b": 1, "a": [true, null, 1.5, "é\"x"], "c": {}}"#).unwrap();
    assert_eq!(
        python_json(&value),
        r#"{"b": 1, "a": [true, null, 1.5, "é\"x"], "c": {}}"#
    );
}
