"""`nsa serve` driven by OpenAI's own Python client: completions and chat, non-streaming and streaming,
tools, reasoning, errors. Usage: python openai_client.py BASE_URL (e.g. http://127.0.0.1:30123/v1).
Exits non-zero on the first failed check."""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="none")
model = client.models.list().data[0].id
prompt = "<｜begin▁of▁sentence｜><｜User｜>Hello"

# Completions: greedy is deterministic; the stream joins to the same text.
full = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
assert full.choices[0].finish_reason in ("stop", "length"), full
assert full.usage.completion_tokens >= 1, full.usage
again = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
assert again.choices[0].text == full.choices[0].text
chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True))
assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text

# Chat, non-streaming and streaming, with usage in the stream.
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
assert chat.choices[0].message.role == "assistant"
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
)
parts, usage = [], None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
assert "".join(parts) == (chat.choices[0].message.content or ""), (parts, chat)
assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

# Reasoning (thinking on): the text goes to reasoning_content until </think>.
think = client.chat.completions.create(
    model=model, messages=messages, max_tokens=10, temperature=0, extra_body={"chat_template_kwargs": {"thinking": True}}
)
message = think.choices[0].message


def reasoning_of(part):
    return getattr(part, "reasoning_content", None) or (part.model_extra or {}).get("reasoning_content")


# The prompt ends inside <think> and the tiny model never closes it in 10 tokens: all of it is reasoning.
reasoning = reasoning_of(message)
assert reasoning and not message.content, think
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=10,
    temperature=0,
    stream=True,
    extra_body={"chat_template_kwargs": {"thinking": True}},
)
streamed_reasoning, streamed_content = [], []
for chunk in stream:
    for choice in chunk.choices:
        streamed_reasoning.append(reasoning_of(choice.delta) or "")
        streamed_content.append(choice.delta.content or "")
assert "".join(streamed_reasoning) == reasoning, (streamed_reasoning, reasoning)
assert "".join(streamed_content) == "", streamed_content

# Tools: the request is accepted, the tools are in the prompt (the tiny random model does not call them;
# tool_calls coming out of both DeepSeek formats are checked with scripted models in tests/tests/serve_scripted.rs).
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
tooled = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=8, temperature=0)
assert tooled.choices[0].finish_reason in ("stop", "length", "tool_calls"), tooled
assert tooled.usage.prompt_tokens > chat.usage.prompt_tokens + 100, (tooled.usage, chat.usage)

# Errors come back as OpenAI errors.
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass
try:
    client.completions.create(model=model, prompt=prompt, max_tokens=-1)
    raise AssertionError("a negative max_tokens was accepted")
except openai.BadRequestError as e:
    assert "max_tokens" in str(e)

print(f"openai client: all checks passed against {model} at {base}")
