"""OpenAI's Python client reading tool calls: against `nsa-scripted-server` answering every prompt with two
DeepSeek tool calls (DSML or v31 format, parsed by the server), non-streaming and streaming.
Usage: python openai_tools.py BASE_URL (e.g. http://127.0.0.1:30124/v1). Exits non-zero on a failed check."""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "Weather in Paris for 3 days, and the time?"}]
tools = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
expected = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]

whole = client.chat.completions.create(model=model, messages=messages, tools=tools)
choice = whole.choices[0]
assert choice.finish_reason == "tool_calls", whole
calls = choice.message.tool_calls
assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected, calls
assert all(c.type == "function" and c.id for c in calls), calls

names, arguments, finish = {}, {}, None
for chunk in client.chat.completions.create(model=model, messages=messages, tools=tools, stream=True):
    for part in chunk.choices:
        finish = part.finish_reason or finish
        for call in part.delta.tool_calls or []:
            names[call.index] = names.get(call.index, "") + (call.function.name or "")
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
assert finish == "tool_calls", finish
streamed = [(names[i], json.loads(arguments[i])) for i in sorted(names)]
assert streamed == expected, streamed

print(f"openai client: tool calls read whole and streamed at {sys.argv[1]}")
