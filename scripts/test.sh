#!/usr/bin/env bash
# The test command: formatting, then every test in release (debug would build the GPU stack twice), kernel
# tests on the best device found (lavapipe's Vulkan on a machine without a GPU), snapshot drift, and
# `nsa serve` driven by curl and OpenAI's Python client.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nsa-target}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# Snapshots never update silently: a mismatch fails and leaves a .snap.new to review.
export INSTA_UPDATE=no
cargo fmt --all --check
cargo test --release --workspace --locked --no-fail-fast
if find . -name '*.snap.new' -not -path './target/*' | grep -q .; then
  echo "pending snapshot changes (.snap.new) — review with cargo insta review" >&2
  exit 1
fi
./scripts/test-clients.sh
