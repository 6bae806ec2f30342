#!/usr/bin/env bash
# Builds the llama.cpp tools quantize uses for GGUF releases, once per pinned version.
#
#   scripts/setup_llamacpp.sh          build (6-7 minutes on 2 cores) or return at once if cached
#
# llama.cpp comes from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp tree), pinned below.
# The result is cached in ${QUANTIZE_CACHE:-~/.cache/quantize}/llama.cpp-<version>/:
#   bin/                     llama-quantize llama-imatrix llama-perplexity llama-gguf-split
#   convert_hf_to_gguf.py    the converter, with its conversion/ package
#   gguf-py/                 the gguf Python package of the same tree (PyPI's lags behind)
#   BUILD.json               version, llama.cpp commit, build options
# The folder appears only when complete (built in a temporary folder, then renamed), so an
# interrupted build is never mistaken for a finished one.
#
# Environment:
#   QUANTIZE_CACHE          cache root (default ~/.cache/quantize)
#   QUANTIZE_LLAMA_SDIST    a local llama_cpp_python-<version>.tar.gz to build from (offline)
#   QUANTIZE_BUILD_JOBS     parallel compile jobs (default: all cores)
# To use your own llama.cpp build instead, skip this script and set QUANTIZE_LLAMA_CPP (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36  # llama-cpp-python; keep in step with LLAMA_CPP_PYTHON_VERSION in quantize/backends/llamacpp.py
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-gguf-split)
CACHE_ROOT=${QUANTIZE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantize}
PREFIX="$CACHE_ROOT/llama.cpp-$VERSION"
JOBS=${QUANTIZE_BUILD_JOBS:-$(nproc)}
PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3

is_complete() {
    [ -f "$PREFIX/BUILD.json" ] && [ -f "$PREFIX/convert_hf_to_gguf.py" ] || return 1
    for tool in "${TOOLS[@]}"; do [ -x "$PREFIX/bin/$tool" ] || return 1; done
}

if is_complete; then
    echo "llama.cpp $VERSION: ready in $PREFIX"
    exit 0
fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.llama.cpp-$VERSION.lock"
flock 9  # a concurrent run builds; this one waits and then finds it done
if is_complete; then
    echo "llama.cpp $VERSION: ready in $PREFIX"
    exit 0
fi

WORK=$(mktemp -d "$CACHE_ROOT/.build-llama.cpp-$VERSION.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

SDIST=${QUANTIZE_LLAMA_SDIST:-}
if [ -z "$SDIST" ]; then
    echo "llama.cpp $VERSION: downloading the llama-cpp-python sdist"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$WORK/sdist"
    SDIST=$(ls "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz)
fi
tar -xzf "$SDIST" -C "$WORK"
ROOT="$WORK/llama_cpp_python-$VERSION"
SRC="$ROOT/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "error: $SDIST has no vendor/llama.cpp tree" >&2; exit 1; }
# The sdist has no git history; its changelog names the llama.cpp commit it vendors.
COMMIT=$(grep -m1 -o 'ggml-org/llama.cpp@[0-9a-f]*' "$ROOT/CHANGELOG.md" | cut -d@ -f2 || true)

# GGML_NATIVE=ON segfaults on some CPUs (e.g. this project's CI machines): build for the baseline.
# Tools need LLAMA_BUILD_COMMON + LLAMA_BUILD_TOOLS (their default is ON only for standalone trees).
OPTIONS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF
         -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF
         -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
         -DLLAMA_OPENSSL=OFF)
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
echo "llama.cpp $VERSION (commit ${COMMIT:-unknown}): building ${TOOLS[*]} with $JOBS jobs"
cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" "${OPTIONS[@]}" > "$WORK/configure.log" 2>&1 \
    || { tail -30 "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" --target "${TOOLS[@]}" -j "$JOBS" > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; exit 1; }

STAGE="$WORK/stage"
mkdir -p "$STAGE/bin"
for tool in "${TOOLS[@]}"; do cp "$WORK/build/bin/$tool" "$STAGE/bin/"; done
cp "$SRC/convert_hf_to_gguf.py" "$STAGE/"
cp -r "$SRC/conversion" "$SRC/gguf-py" "$STAGE/"
cp "$SRC/LICENSE" "$STAGE/LICENSE.llama.cpp"
cat > "$STAGE/BUILD.json" <<EOF
{
  "llama_cpp_python": "$VERSION",
  "llama_cpp_commit": "${COMMIT:-unknown}",
  "cmake_options": "${OPTIONS[*]}",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
rm -rf "$PREFIX"
mv "$STAGE" "$PREFIX"
echo "llama.cpp $VERSION: ready in $PREFIX"
