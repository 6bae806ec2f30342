#!/usr/bin/env bash
# The CI entry a training pipeline calls right after it saves the fp16 model:
#
#   scripts/ci/release.sh RECIPE MODEL_DIR [more `quantize release` options, e.g. --only gptq,gguf]
#
# Non-interactive. Installs what it needs (idempotent, cached), makes and publishes the release of
# RECIPE from MODEL_DIR, writes the machine-readable summary to $QUANTIZE_SUMMARY
# (default: release-summary.json) and exits 0 (done), 2 (bad input: nothing started) or 1 (failure
# during the run; finished variants are kept, so re-running the job continues where it stopped).
# Publishing to the Hub reads the token from HF_TOKEN; it is never printed.
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 RECIPE MODEL_DIR [quantize release options]" >&2
    exit 2
fi
RECIPE=$(realpath "$1"); MODEL=$(realpath "$2"); shift 2
SUMMARY=${QUANTIZE_SUMMARY:-release-summary.json}
cd "$(dirname "$0")/../.."
bash scripts/setup.sh >&2 && bash scripts/setup_llamacpp.sh >&2 || { echo "error: setting up quantize failed" >&2; exit 1; }

.venv/bin/quantize release "$RECIPE" --model "$MODEL" --json "$@" > "$SUMMARY"
status=$?
case $status in
    0) echo "quantize: release done; summary in $SUMMARY" >&2 ;;
    2) echo "quantize: bad input, nothing was started (see the error above)" >&2 ;;
    *) failed=$(.venv/bin/python -c 'import json,sys; d=json.load(open(sys.argv[1])); print(", ".join(f"{v[\"id\"]} ({v[\"error\"]})" for v in d["variants"] if v["status"]=="failed"))' "$SUMMARY" 2>/dev/null)
       echo "quantize: the release failed${failed:+: $failed}; re-run this job to continue" >&2 ;;
esac
exit $status
