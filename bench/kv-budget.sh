#!/usr/bin/env bash
# KV budget quality and speed: perplexity at ctx 2048 (GPL-3, fed 16 tokens per step so eviction happens
# as in generation) and decode tokens/s of a 1024-token greedy generation, for none / sinks / h2o at
# several budgets, on both real models. Prints a markdown table for bench/RESULTS.md.
# Usage: bench/kv-budget.sh [budgets...]   (default: 64 128 256 512; env CHUNKS=3 CTX=2048 GEN=1024;
#        SKIP_PPL=1 measures decode speed only, SKIP_TG=1 perplexity only)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/pagellm
TEXT=/usr/share/common-licenses/GPL-3
CTX=${CTX:-2048}; CHUNKS=${CHUNKS:-3}; GEN=${GEN:-1024}; STEP=${STEP:-16}
BUDGETS=${*:-64 128 256 512}
PROMPT="Write a long story about a lighthouse keeper who finds a map."
[ -x "$BIN" ] || cargo build --release
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)"
echo "command: bench/kv-budget.sh $BUDGETS (CTX=$CTX CHUNKS=$CHUNKS GEN=$GEN STEP=$STEP)"
echo
echo "| model | policy | budget | PPL (ctx $CTX, $CHUNKS chunks) | decode tok/s ($GEN tokens) |"
echo "| --- | --- | --- | --- | --- |"
for m in models/SmolLM2-135M-Instruct.Q4_1.gguf models/gemma-3-270m-q4_k_m.gguf; do
  name=$(basename "$m" .gguf)
  run_one() { # policy budget
    local flags=()
    [ "$1" != none ] && flags=(--kv-budget "$2" --kv-policy "$1")
    local ppl tg
    ppl=-; tg=-
    [ -z "${SKIP_PPL:-}" ] && ppl=$($BIN perplexity "$m" -f "$TEXT" -c "$CTX" --chunks "$CHUNKS" --kv-step "$STEP" --device cpu "${flags[@]}" 2>/dev/null | sed -n 's/.*PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1 ± \2/p')
    [ -z "${SKIP_TG:-}" ] && tg=$($BIN run "$m" --raw -p "$PROMPT" -n "$GEN" --ignore-eos --temp 0 --ctx "$CTX" --device cpu "${flags[@]}" 2>&1 >/dev/null | sed -n 's/.*generation [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')
    echo "| $name | $1 | ${3:-$2} | $ppl | $tg |"
  }
  run_one none "$CTX" "all ($CTX)"
  for b in $BUDGETS; do
    for p in sinks h2o; do run_one "$p" "$b"; done
  done
done
