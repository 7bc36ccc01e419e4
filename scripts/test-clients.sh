#!/usr/bin/env bash
# `nsa serve` with no arguments (the bundled tiny model, on the best device found), driven by real clients:
# curl and OpenAI's Python package (tests/clients/openai_client.py). Run by scripts/test.sh after the
# cargo tests; needs the release binary and scripts/setup-deps.sh's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
nsa="${CARGO_TARGET_DIR:-$HOME/.cache/nsa-target}/release/nsa"
venv="${NSA_VENV:-$HOME/.cache/nsa-venv}"
port="${NSA_TEST_PORT:-30123}"
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  echo "test-clients: no Python with the openai package at $venv — run ./scripts/setup-deps.sh" >&2
  exit 1
fi
log=$(mktemp)
# Waits until the server at $1 (process $2) answers /health, at most $3 half-seconds (default 240); fails
# as soon as the process has exited.
await_health() {
  for _ in $(seq 1 "${3:-240}"); do
    curl -sf "$1/health" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# First `nsa serve` exactly as a new user starts it (no arguments: the bundled model on port 30000), when
# that port is free.
if ! curl -s -o /dev/null http://127.0.0.1:30000/ 2>/dev/null; then
  "$nsa" serve >"$log" 2>&1 &
  plain=$!
  await_health http://127.0.0.1:30000 $plain && curl -sf http://127.0.0.1:30000/v1/models | grep -q '"tiny-v32"' \
    && curl -sf http://127.0.0.1:30000/v1/completions -H 'content-type: application/json' \
      -d '{"prompt":"Hello","max_tokens":4}' | grep -q '"text_completion"' \
    || { cat "$log" >&2; echo "test-clients: plain nsa serve failed" >&2; stop $plain; exit 1; }
  stop $plain
  echo "test-clients: nsa serve with no arguments answered on port 30000"
else
  echo "test-clients: WARNING: port 30000 is busy, so \`nsa serve\` with no arguments was NOT checked" >&2
fi
# The narrow KV caches (`--kv-cache-dtype fp8_e4m3` and `bf16`; `--device auto` takes a device model for them:
# wgpu, lavapipe in CI) serve a completion.
narrow_port=$((port + 1))
for dtype in fp8_e4m3 bf16; do
  "$nsa" serve --port "$narrow_port" --kv-cache-dtype "$dtype" >"$log" 2>&1 &
  narrow=$!
  await_health "http://127.0.0.1:$narrow_port" $narrow && curl -sf "http://127.0.0.1:$narrow_port/v1/completions" -H 'content-type: application/json' \
    -d '{"prompt":"Hello","max_tokens":6,"temperature":0}' | grep -q '"text_completion"' \
    || { cat "$log" >&2; echo "test-clients: nsa serve --kv-cache-dtype $dtype failed" >&2; stop $narrow; exit 1; }
  stop $narrow
  echo "test-clients: nsa serve --kv-cache-dtype $dtype answered"
done
"$nsa" serve --port "$port" --reasoning-parser deepseek-v3 --tool-call-parser deepseekv32 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
base="http://127.0.0.1:$port"
await_health "$base" $server || { cat "$log" >&2; echo "test-clients: nsa serve exited or did not come up" >&2; exit 1; }

fail() { echo "test-clients: $1" >&2; cat "$log" >&2; exit 1; }
# curl: a chat completion, a stream ending in [DONE], an error object with a 400.
curl -sf "$base/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8,"temperature":0}' | grep -q '"chat.completion"' \
  || fail "curl chat completion"
curl -sfN "$base/v1/completions" -H 'content-type: application/json' \
  -d '{"prompt":"Hello","max_tokens":8,"stream":true}' | tail -n 2 | grep -q 'data: \[DONE\]' || fail "curl stream"
code=$(curl -s -o /tmp/nsa-error.json -w '%{http_code}' "$base/v1/completions" -H 'content-type: application/json' -d '{"prompt":')
[ "$code" = 400 ] && grep -q '"invalid_request_error"' /tmp/nsa-error.json || fail "curl malformed JSON → $code"
curl -sf "$base/metrics" | grep -q '^nsa_requests_total' || fail "curl metrics"
echo "test-clients: curl checks passed"

"$venv/bin/python" tests/clients/openai_client.py "$base/v1" || fail "openai client"

# Tool calls as the openai package reads them: the tiny model never writes one, so a scripted model
# (`nsa-scripted-server`, built by the cargo tests) answers every prompt with two, in each DeepSeek format.
scripted="${CARGO_TARGET_DIR:-$HOME/.cache/nsa-target}/release/nsa-scripted-server"
answer=$(mktemp)
for format in deepseekv32 deepseekv31; do
  if [ $format = deepseekv32 ]; then
    cat >"$answer" <<'DSML'
Let me check.

<｜DSML｜function_calls>
<｜DSML｜invoke name="get_weather">
<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
</｜DSML｜invoke>
<｜DSML｜invoke name="get_time">
</｜DSML｜invoke>
</｜DSML｜function_calls>
DSML
  else
    printf '%s' 'Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>' >"$answer"
  fi
  tools_port=$((port + 2))
  "$scripted" "$tools_port" "$answer" $format >"$log" 2>&1 &
  tools=$!
  await_health "http://127.0.0.1:$tools_port" $tools 120 \
    && "$venv/bin/python" tests/clients/openai_tools.py "http://127.0.0.1:$tools_port/v1" \
    || { stop $tools; fail "openai client tool calls ($format)"; }
  stop $tools
  echo "test-clients: tool calls in the $format format read by the openai package"
done
rm -f "$answer"
