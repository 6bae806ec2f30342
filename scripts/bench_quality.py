#!/usr/bin/env python
"""Every format of one release side by side, on the fair SmolLM2-135M-Instruct: size, bits per
weight, perplexity, KL divergence to the fp16 model (mean and 99th percentile) and top-1 token
agreement, all measured by the one evaluation protocol (README "Evaluation").

Two releases in one output folder tree: the whole GGUF ladder with an importance matrix plus GPTQ
4-bit g32/g64 with and without act-order, GPTQ 8-bit and AWQ 4-bit g64; and the ladder again
without an importance matrix. Prints one markdown table (the README's) and writes the release's
size-vs-KLD chart next to it.

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/bench_quality.py [--fresh]

Needs the fair model (scripts/build_smollm2.py) and llama.cpp (scripts/setup_llamacpp.sh).
Finished variants are reused on a second run (--fresh: start again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quantize.card.chart import ChartPoint, render_chart  # noqa: E402
from quantize.quant_types import GGUF_LADDER  # noqa: E402

from bench_common import run_recipe, smollm2_source  # noqa: E402

MODEL = REPO / "models" / "SmolLM2-135M-Instruct-fair"
# SmolLM2-135M's width is 576: group sizes 32 and 64 divide it, 128 does not.
GPTQ = [{"bits": 4, "group_size": 32, "act_order": True}, {"bits": 4, "group_size": 32, "act_order": False},
        {"bits": 4, "group_size": 64, "act_order": True}, {"bits": 4, "group_size": 64, "act_order": False},
        {"bits": 8, "group_size": None, "act_order": True}]
AWQ = [{"bits": 4, "group_size": 64}]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-quality")
    parser.add_argument("--types", nargs="+", default=GGUF_LADDER)
    parser.add_argument("--samples", type=int, default=16, help="GPTQ/AWQ calibration windows")
    parser.add_argument("--held-out", type=float, default=0.03)
    parser.add_argument("--no-weights", action="store_true", help="GGUF only (quick)")
    parser.add_argument("--chart", type=Path, help="where to write the chart (default: in --out)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier results first")
    return parser.parse_args()


def recipe_for(args: argparse.Namespace, imatrix: bool) -> dict:
    recipe = {
        "source": smollm2_source(args.model, "SmolLM2 135M Instruct (fair)"),
        "release": {"namespace": "bench", "basename": "SmolLM2-135M-Instruct"},
        "calibration": {"dataset": "wikitext", "samples": args.samples, "seq_len": 512, "held_out": args.held_out},
        "quality": {"max_kld": 100.0},  # measure every type, Q2_K without an importance matrix included
        "gguf": {"types": args.types, "imatrix": imatrix, **({"imatrix_chunks": 64} if imatrix else {})},
    }
    if imatrix and not args.no_weights:
        recipe["gptq"] = [{**spec, "damp": 0.1} for spec in GPTQ]
        recipe["awq"] = AWQ
    return recipe


def run_release(args: argparse.Namespace, imatrix: bool) -> list:
    outcomes, seconds = run_recipe(args.out / ("imatrix" if imatrix else "plain"), recipe_for(args, imatrix))
    print(f"  {len(outcomes)} variants in {seconds:.0f} s", flush=True)
    return [o.manifest for o in outcomes]


def label(manifest, imatrix: bool) -> str:
    if manifest.format == "gguf":
        return f"GGUF {manifest.name}" + (" imatrix" if imatrix else "")
    params = manifest.requested
    group = params.get("group_size")
    group = "none" if group in (None, -1) else group
    order = " act-order" if params.get("act_order") else ""
    return f"{manifest.format.upper()} {params['bits']}-bit g{group}{order}"


def source_parameters(model: Path) -> int:
    """The fp16 model's parameter count: its safetensors' bytes / 2."""
    return sum(p.stat().st_size for p in model.glob("*.safetensors")) // 2


def bits_per_weight(manifest, parameters: int) -> float:
    """The same measure for every format: the weight files' bits over the source's parameters."""
    return round(sum(f.size for f in manifest.weight_files()) * 8 / parameters, 2)


def row(manifest, imatrix: bool, parameters: int) -> dict:
    quality = manifest.quality
    return {"variant": label(manifest, imatrix), "series": manifest.format.upper() + (" imatrix" if imatrix and manifest.format == "gguf" else ""),
            "size": manifest.total_size, "size_mb": round(manifest.total_size / 1e6, 1),
            "bpw": bits_per_weight(manifest, parameters), "perplexity": quality.get("perplexity"),
            "kld_mean": quality.get("kld_mean"), "kld_p99": quality.get("kld_p99"),
            "top1": quality.get("top1_agreement"), "engine": quality.get("engine"),
            "baseline": quality.get("baseline_perplexity"),
            "engine_baseline": quality.get("engine_baseline_perplexity"),
            "quantize_s": manifest.timings.get("quantize")}


def number(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    args = parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no fair fp16 model; run scripts/build_smollm2.py first")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    print("GPTQ, AWQ and the GGUF ladder with an importance matrix:", flush=True)
    parameters = source_parameters(args.model)
    rows = [row(m, True, parameters) for m in run_release(args, imatrix=True)]
    print("the GGUF ladder without an importance matrix:", flush=True)
    rows += [row(m, False, parameters) for m in run_release(args, imatrix=False)]
    rows.sort(key=lambda r: r["size_mb"])
    baseline = rows[0]["baseline"]
    engine_baselines = sorted({r["engine_baseline"] for r in rows if r["engine_baseline"]})
    print(f"\nfp16 perplexity (transformers) {number(baseline, '.3f')}; llama.cpp's F16 on the same tokens "
          + ", ".join(f"{b:.3f}" for b in engine_baselines))
    print("\n| File | Size MB | bpw | PPL | KLD mean | KLD p99 | top-1 | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['size_mb']:.1f} | {number(r['bpw'], '.2f')} | {number(r['perplexity'], '.3f')} | "
              f"{number(r['kld_mean'], '.4f')} | {number(r['kld_p99'], '.3f')} | "
              f"{number(None if r['top1'] is None else 100 * r['top1'], '.1f')}% | {number(r['quantize_s'], '.0f')} |")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    chart = args.chart or args.out / "size-vs-kld.png"
    chart.write_bytes(render_chart([ChartPoint(r["series"], r["variant"].split(" ", 1)[1].removesuffix(" imatrix"), r["size"],
                                               r["kld_mean"])
                                    for r in rows if r["kld_mean"]], "SmolLM2-135M-Instruct (fair): every file"))
    print(f"\nsummary: {args.out / 'summary.json'}; chart: {chart}")


if __name__ == "__main__":
    main()
