#!/usr/bin/env python
"""The whole GGUF k-quant ladder of SmolLM2-135M-Instruct, without and with an importance matrix.

Prints, per type: file size, bits per weight (measured from the file), perplexity on held-out
wikitext and its change from the F16 baseline, and the time of each stage; then what the release
cost against the naive way (one conversion per type).

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/bench_gguf.py [--fresh]

Needs the fp16 model (scripts/build_smollm2.py) and llama.cpp (scripts/setup_llamacpp.sh).
Results are kept: a second run reuses finished files, so use --fresh for timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if (REPO.parent / "shared" / "data" / "wikitext-2").is_dir():
    os.environ.setdefault("QUANTIZE_WIKITEXT_DIR", str(REPO.parent / "shared" / "data" / "wikitext-2"))

from quantize.quant_types import GGUF_LADDER  # noqa: E402

from bench_common import run_recipe, smollm2_source  # noqa: E402

MODEL = REPO / "models" / "SmolLM2-135M-Instruct-fair"  # weights off the Q4_1 grid (README)
SHARED_STAGES = ("gguf_convert_shared", "gguf_imatrix_shared", "fp16_reference_shared", "gguf_reference_shared")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-gguf")
    parser.add_argument("--types", nargs="+", default=GGUF_LADDER)
    parser.add_argument("--imatrix-chunks", type=int, default=64, help="512-token chunks (0: all the calibration text)")
    parser.add_argument("--held-out", type=float, default=0.05, help="fraction of wikitext kept for perplexity")
    parser.add_argument("--fresh", action="store_true", help="delete earlier results first (for timings)")
    return parser.parse_args()


def recipe_for(args: argparse.Namespace, imatrix: bool) -> dict:
    gguf = {"types": args.types, "imatrix": imatrix}
    if imatrix and args.imatrix_chunks:
        gguf["imatrix_chunks"] = args.imatrix_chunks
    return {
        "source": smollm2_source(args.model),
        "release": {"namespace": "bench", "basename": "SmolLM2-135M-Instruct"},
        "calibration": {"dataset": "wikitext", "held_out": args.held_out},
        "gguf": gguf,
    }


def run_release(args: argparse.Namespace, imatrix: bool) -> tuple[list, float]:
    outcomes, seconds = run_recipe(args.out / ("imatrix" if imatrix else "plain"), recipe_for(args, imatrix))
    if all(o.status == "skipped" for o in outcomes):
        print("  (every type was already made: figures below are from that run; use --fresh to time again)")
    return [o.manifest for o in outcomes], seconds


def fallback_count(manifest) -> str:
    """"12/272" from llama-quantize's fallback note, "-" when every tensor took its type."""
    for note in manifest.notes:
        match = re.search(r"fallback types for (\d+) of (\d+) tensors", note)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return "-"


def print_ladder(plain: list, matrixed: list) -> None:
    quality = plain[0].quality
    print(f"\nfp16 reference perplexity: {quality['baseline_perplexity']:.4f} (transformers), F16 "
          f"{quality['engine_baseline_perplexity']:.4f} (llama.cpp), on {quality['eval_tokens']} tokens of "
          f"{quality['eval_text']}\n")
    print(f"{'type':8} {'size MB':>8} {'bpw':>6} {'ppl':>9} {'KLD':>8} {'top-1':>6} {'ppl imat':>9} {'KLD imat':>8} "
          f"{'top-1':>6} {'fallback':>8} {'quant s':>8} {'q+imat s':>8} {'eval s':>6}")
    for without, with_imatrix in zip(plain, matrixed):
        q, qi = without.quality, with_imatrix.quality
        print(f"{without.params['type']:8} {without.total_size / 1e6:>8.1f} {without.params['bpw']:>6.2f} "
              f"{q['perplexity']:>9.4f} {q['kld_mean']:>8.4f} {q['top1_agreement']:>6.3f} "
              f"{qi['perplexity']:>9.4f} {qi['kld_mean']:>8.4f} {qi['top1_agreement']:>6.3f} "
              f"{fallback_count(without):>8} {without.timings['quantize']:>8.1f} "
              f"{with_imatrix.timings['quantize']:>8.1f} {without.timings['evaluate']:>6.1f}")
    print("\nfallback: tensors llama-quantize stored in another type because their rows are not a multiple "
          "of the type's block (256 for k-quants); details in each manifest's notes.")


def print_costs(label: str, manifests: list, wall: float) -> None:
    shared = {stage: manifests[0].timings.get(stage) for stage in SHARED_STAGES if stage in manifests[0].timings}
    quantize = sum(m.timings["quantize"] for m in manifests)
    perplexity = sum(m.timings["evaluate"] for m in manifests)
    convert = shared["gguf_convert_shared"]
    imatrix = shared.get("gguf_imatrix_shared", 0.0)
    naive = convert * len(manifests) + imatrix + quantize
    ours = convert + imatrix + quantize
    print(f"\n{label}: wall {wall:.0f} s for {len(manifests)} types; shared stages "
          + ", ".join(f"{k.removesuffix('_shared')} {v:.1f} s" for k, v in shared.items())
          + f"; quantize {quantize:.1f} s (sum over types, run in parallel); evaluation {perplexity:.1f} s")
    print(f"  making the files: one conversion {ours:.1f} s vs naive one-conversion-per-type {naive:.1f} s "
          f"({naive / ours:.1f}x)")


def main() -> None:
    args = parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no fp16 model; run scripts/build_smollm2.py first")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    print("without imatrix:")
    plain, plain_wall = run_release(args, imatrix=False)
    print("with imatrix:")
    matrixed, matrixed_wall = run_release(args, imatrix=True)
    print_ladder(plain, matrixed)
    print_costs("without imatrix", plain, plain_wall)
    print_costs("with imatrix", matrixed, matrixed_wall)
    imatrix = matrixed[0].calibration["imatrix"]
    print(f"  imatrix: {imatrix['chunks']} chunks of {imatrix['context']} tokens from {imatrix['dataset']}")
    summary = {"plain": [m.model_dump() for m in plain], "imatrix": [m.model_dump() for m in matrixed],
               "wall_s": {"plain": plain_wall, "imatrix": matrixed_wall}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nmanifests: {args.out}/*/out/manifests; summary: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
