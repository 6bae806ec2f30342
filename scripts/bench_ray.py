"""The cost of `--executor ray` against the local executor on the same machine and the same tiny
release (GPTQ, AWQ, two GGUF types with an imatrix), each from an empty output folder.

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/bench_ray.py [--nodes 2] [--cpus 1]

Starts a Ray cluster of --nodes nodes with --cpus CPUs each on this machine (its start-up is
timed apart), runs the release with each executor in a fresh process, prints each variant's
node and time, and ends with
`ray overhead: local L s, ray R s on N node(s) x C CPU, difference D s (P%)`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

ENV = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "GPTQMODEL_CPU_WORKERS": "2"}


def release(recipe: Path, out: Path, *extra: str) -> tuple[float, dict]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "quantize.cli", "release", str(recipe), "--out", str(out),
                             "--no-publish", "--json", *extra], env={**os.environ, **ENV}, capture_output=True,
                            text=True)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"release failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return seconds, json.loads(result.stdout)


def show(label: str, seconds: float, summary: dict) -> None:
    print(f"{label}: {seconds:.1f} s")
    for v in summary["variants"]:
        node = v.get("node") or {}
        where = f"node {node['node_id'][:8]}" if node.get("node_id") else node.get("hostname", "?")
        print(f"  {v['id']:<14} {v['status']:<8} {v['seconds']:7.1f} s  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    from local_ray_cluster import LocalRayCluster
    from model_builders import build_tiny_llama, save_smollm2_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    save_smollm2_tokenizer(work / "tokenizer")
    model = build_tiny_llama(work / "tiny-llama", tokenizer_from=work / "tokenizer")
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "source": {"path": str(model), "name": "Tiny Llama", "creator": "Test Lab", "repo_id": "test-lab/tiny-llama",
                   "license": "apache-2.0"},
        "release": {"namespace": "tester", "basename": "Tiny-Llama"},
        "calibration": {"samples": 8, "seq_len": 128, "held_out": 0.02},
        "gptq": [{"bits": 4, "group_size": 128}], "awq": [{"bits": 4, "group_size": 128}],
        "gguf": {"types": ["Q4_K_M", "Q8_0"], "imatrix": True}}, sort_keys=False))

    local_s, local = release(recipe, work / "out-local")
    show("local", local_s, local)
    started = time.monotonic()
    with LocalRayCluster(nodes=args.nodes, cpus=args.cpus, env=ENV) as cluster:
        print(f"cluster start-up ({args.nodes} node(s) x {args.cpus} CPU): {time.monotonic() - started:.1f} s "
              "(not counted)")
        ray_s, on_ray = release(recipe, work / "out-ray", "--executor", "ray", "--address", cluster.address)
        show("ray", ray_s, on_ray)
    nodes = len({(v.get("node") or {}).get("node_id") for v in on_ray["variants"]})
    print(f"placement: {len(on_ray['variants'])} variant(s) on {nodes} node(s)")
    print(f"ray overhead: local {local_s:.1f} s, ray {ray_s:.1f} s on {args.nodes} node(s) x {args.cpus} CPU, "
          f"difference {ray_s - local_s:+.1f} s ({(ray_s - local_s) / local_s * 100:+.0f}%)")


if __name__ == "__main__":
    main()
