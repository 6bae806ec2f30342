#!/usr/bin/env python
"""Peak memory of GPTQ releases against the model's size, with and without streaming layers from disk.

Two random Llama models of different sizes (about 0.3 GB and 1.5 GB in fp16, built with
scripts/model_builders.py and SmolLM2's tokenizer) are each released as two GPTQ variants (4-bit
g128 with and without act-order) with little calibration (4 x 128 tokens) and one 512-token
evaluation window, once as the recipe's default (`compute.offload: none`) and once streaming
(`compute.offload: disk`). Each release runs `quantize release` in a fresh process; its peak RSS
is that process tree's `ru_maxrss` (wait4). What a bigger model adds is the difference of the two
models' peaks, so what every run pays regardless of size (torch, GPTQModel, the tokenizer) cancels:

    S = (peak_big - peak_small) / (size_big - size_small)     (T: the same, streaming)

It ends with the line `memory: peak RSS grows S× the model size (streaming: T×)`. Each release
also prints the plan's memory estimate for its largest stage next to the peak measured. Run it
under the heavy lock on a shared machine (about 15 minutes on 2 cores):

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
GB = 1e9
QUANTIZE = [sys.executable, "-c", "import sys; from quantize.cli import main; sys.exit(main())"]  # this checkout's

# name -> build_tiny_llama arguments: ~0.29 GB and ~1.52 GB of fp16 weights
MODELS = {
    "small": {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 8, "kv_heads": 4},
    "big": {"hidden": 2048, "intermediate": 5632, "layers": 14, "heads": 16, "kv_heads": 8},
}
VARIANTS = [{"bits": 4, "group_size": 128, "act_order": True},
            {"bits": 4, "group_size": 128, "act_order": False}]


def build_model(folder: Path, shape: dict) -> Path:
    from model_builders import build_tiny_llama

    done = folder / ".built"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        build_tiny_llama(folder, **shape)
        done.write_text(json.dumps(shape))
    return folder


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def write_recipe(folder: Path, model: Path, offload: str, samples: int, seq_len: int) -> Path:
    recipe = {
        "source": {"path": str(model), "repo_id": "bench/random-llama", "license": "apache-2.0"},
        "release": {"namespace": "bench", "basename": model.name},
        # the last 0.3% of wikitext-2 test (~650 tokens) is held out: one 512-token evaluation window
        "calibration": {"samples": samples, "seq_len": seq_len, "held_out": 0.003},
        "gptq": VARIANTS,
        "publish": {"target": "none"},
        "compute": {"device": "cpu", "offload": offload},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def planned_peak(recipe: Path) -> tuple[str, int] | None:
    """The plan's largest memory estimate (stage, bytes)."""
    result = subprocess.run([*QUANTIZE, "plan", str(recipe), "--json"],
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        return None
    stages = json.loads(result.stdout).get("memory", {}).get("stages", [])
    top = max(stages, key=lambda s: s["bytes"], default=None)
    return (top["stage"], top["bytes"]) if top else None


def release(recipe: Path, out: Path) -> tuple[float, float]:
    """`quantize release` in a fresh process: (peak RSS in bytes, wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [*QUANTIZE, "release", str(recipe), "--out", str(out), "--no-publish"]
    started = time.monotonic()
    with open(out.parent / f"{out.name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"release of {recipe} failed (status {status}); see {out.parent / (out.name + '.log')}")
    return usage.ru_maxrss * 1024.0, seconds  # Linux reports kilobytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(REPO / "build" / "bench-memory"), help="models and releases go here")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    work = Path(args.work).resolve()
    sizes = {name: model_bytes(build_model(work / "models" / f"random-llama-{name}", shape))
             for name, shape in MODELS.items()}
    peaks: dict[tuple[str, str], float] = {}
    rows = []
    # the small streaming run first: a failure shows in minutes, not after the big model
    for name, offload in (("small", "disk"), ("small", "none"), ("big", "none"), ("big", "disk")):
        model = work / "models" / f"random-llama-{name}"
        recipe = write_recipe(work / f"{name}-{offload}", model, offload, args.samples, args.seq_len)
        planned = planned_peak(recipe)
        peak, seconds = release(recipe, work / f"{name}-{offload}" / "out")
        peaks[(name, offload)] = peak
        row = {"model": name, "model_gb": round(sizes[name] / GB, 3), "offload": offload,
               "peak_rss_gb": round(peak / GB, 3), "seconds": round(seconds, 1),
               "planned_stage": planned[0] if planned else None,
               "planned_gb": round(planned[1] / GB, 3) if planned else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (work / "bench-memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| Model | fp16 size | offload | peak RSS | planned (largest stage) | wall |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        planned = f"{row['planned_gb']:.2f} GB ({row['planned_stage']})" if row["planned_gb"] else "?"
        print(f"| {row['model']} | {row['model_gb']:.2f} GB | {row['offload']} | {row['peak_rss_gb']:.2f} GB | "
              f"{planned} | {row['seconds']:.0f} s |")
    growth = {offload: (peaks[("big", offload)] - peaks[("small", offload)]) / (sizes["big"] - sizes["small"])
              for offload in ("none", "disk")}
    print(f"memory: peak RSS grows {growth['none']:.2f}× the model size (streaming: {growth['disk']:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
