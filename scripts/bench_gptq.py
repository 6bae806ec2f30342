#!/usr/bin/env python
"""Benchmark GPTQ (and optionally AWQ) releases: one shared process vs the naive way, and
(--sweep) shared Hessians vs GPTQModel's sequential loop.

--sweep: the same permutations released twice, each in a fresh process and output folder, once
with `hessian: shared` (one calibration pass, then one solve per permutation) and once with
`hessian: sequential` (GPTQModel's layer-by-layer loop per permutation), both with evaluation.
It ends with the line `sweep: shared/sequential wall ratio R, worst perplexity change P%`
(R: the wall time of making the permutations, Hessians included, shared over sequential, with the
verification and evaluation that both modes pay alike left out — the whole runs' ratio is printed
above it; P: the largest relative perplexity difference of a permutation between the two modes;
negative when shared is better everywhere). Above it, each permutation's change with its standard
error from the two modes' per-window NLLs (`quality.paired_change`), and all permutations' pooled
window by window. `--modes batched` (or `--modes shared batched`) compares `hessian: batched`
(GPTQModel's algorithm, one batched forward per layer) the same way, ending with
`sweep: batched/sequential wall ratio R, worst perplexity change P%`; `--modes mixed`, `hessian: shared`
except where the plan's rule says it measured worse (3-bit, 4-bit without groups:
formats.gptq.shared_measured_worse), there `batched`; `--reuse MODE=SWEEP_JSON` takes
a mode's rows from an earlier run of the same code instead of running it again. --quick: 4 permutations (4-bit g32 and g64, act-order on and
off, damp 0.1) with the demo's calibration (16 x 512); otherwise the reference card's 7 (group
size 128 replaced by 64, which divides SmolLM2's width).

"release": every variant in one `run_plan`, sharing the loaded fp16 model, the tokenized
calibration text and the fp16 baseline. "naive": the same variants, each in a fresh process with
its own empty output folder, so the model, tokenizer, calibration text and baseline are loaded and
computed again per variant (what a one-script-per-permutation workflow pays).

--awq-check: the 4 GPTQ 4-bit permutations of --sweep --quick (GPTQModel's loop) and AWQ 4-bit g64
with each scale search (coarse_to_fine, the default, and full), in one release with the demo's
calibration (16 x 512), ending with the line
`awq: quantize time T× one GPTQ variant (full search F×), perplexity P (GPTQ 4-bit A–B)`
(T and F: AWQ's quantize stage over the mean of the GPTQ permutations'; A–B their perplexities).

Per variant: wall time, peak RSS, size on disk, perplexity against fp16. Run it under the heavy
lock on a shared machine:

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/bench_gptq.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from quantize.engines.gptqmodel.awq import SCALE_SEARCHES  # no torch or GPTQModel on import
from quantize.quality import paired_change

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct-fair"  # weights off the Q4_1 grid (README)
# SmolLM2-135M has hidden size 576: group sizes 64 and 32 divide it, 128 does not.
DEFAULT_GPTQ = ["4:64:act", "4:32:noact", "8:none:act"]
QUICK_SWEEP = ["4:32:act", "4:32:noact", "4:64:act", "4:64:noact"]
# hessian modes --sweep compares with sequential; mixed: shared, but batched where shared measured worse
COMPARED_MODES = ("shared", "batched", "mixed")
REUSABLE_MODES = (*COMPARED_MODES, "sequential")
REFERENCE_SWEEP = ["4:none:act", "4:64:act", "4:32:act", "3:64:act", "8:none:act", "3:32:act", "8:64:act"]


def parse_gptq(spec: str) -> dict:
    """"bits:group:act|noact" -> a recipe gptq entry."""
    bits, group, order = spec.split(":")
    return {"bits": int(bits), "group_size": group, "act_order": order == "act"}


def hessian_of(entry: dict, mode: str) -> str:
    """The recipe's `hessian:` for a permutation in a compared mode (`mixed`: the plan's own rule)."""
    from quantize.formats.gptq import GPTQVariant, shared_measured_worse

    if mode != "mixed":
        return mode
    return "batched" if shared_measured_worse(GPTQVariant(**entry)) else "shared"


def write_recipe(folder: Path, args, hessian: str | None = None) -> Path:
    gptq = [parse_gptq(spec) for spec in args.gptq]
    if hessian:
        gptq = [{**entry, "damp": 0.1, "hessian": hessian_of(entry, hessian)} for entry in gptq]
    recipe = {
        "source": {"path": str(Path(args.model).resolve()), "name": "SmolLM2 135M Instruct",
                   "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "release": {"namespace": "bench", "basename": "SmolLM2-135M-Instruct"},
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                        "held_out": args.held_out},
        "gptq": gptq,
    }
    # the gate keeps broken files from being published; a benchmark measures whatever comes out
    # (3-bit g64 on the fair SmolLM2 is above the default 1.0 nats)
    recipe["quality"] = {"max_kld": 100.0, **({"windows": args.windows} if args.windows else {})}
    if args.awq:
        several = len(args.awq_search) > 1  # then each search gets a branch of its own
        recipe["awq"] = [{"bits": 4, "group_size": group, "scale_search": search,
                          **({"branch": f"awq-4bit-{group}g-{search.replace('_', '-')}"} if several else {})}
                         for group in args.awq for search in args.awq_search]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_plan(recipe_path: Path, only: str | None = None):
    from quantize.plan import build_plan
    from quantize.recipe import load_recipe
    from quantize.source import inspect_source

    recipe = load_recipe(recipe_path)
    plan = build_plan(recipe, inspect_source(recipe))
    return plan.select(names=[only]) if only else plan


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports kilobytes


def variant_row(manifest, seconds: float, rss_mb: float) -> dict:
    quality = manifest.quality
    return {"variant": manifest.variant_id, "seconds": round(seconds, 1), "peak_rss_mb": round(rss_mb),
            "size_mb": round(manifest.total_size / 1e6, 2),
            "weights_mb": round(sum(f.size for f in manifest.weight_files()) / 1e6, 2),
            "perplexity": quality.get("perplexity"), "baseline_perplexity": quality.get("baseline_perplexity"),
            "kld_mean": quality.get("kld_mean"), "kld_p99": quality.get("kld_p99"),
            "top1_agreement": quality.get("top1_agreement"), "window_nll": quality.get("window_nll"),
            "timings": manifest.timings}


def run_release(recipe_path: Path, out: Path, only: str | None = None) -> list[dict]:
    """All variants (or one) in this process; rows carry each variant's time and the peak RSS so far."""
    from quantize.runner import run_plan

    rows, last = [], time.monotonic()

    def record(outcome):
        nonlocal last
        now = time.monotonic()
        if outcome.status != "done":
            raise SystemExit(f"{outcome.variant.id}: {outcome.status} {outcome.error or ''}")
        rows.append(variant_row(outcome.manifest, now - last, peak_rss_mb()))
        last = now

    run_plan(load_plan(recipe_path, only), out, log=lambda msg: print(msg, flush=True), on_outcome=record)
    return rows


def run_child(recipe_path: Path, out: Path, variant_id: str = "") -> tuple[list[dict], float, float]:
    """A release (or one variant of it) in a fresh process: its rows, wall seconds and peak RSS (MB)."""
    result = out.with_suffix(".json")
    command = [sys.executable, __file__, "--single", variant_id, "--recipe", str(recipe_path), "--out", str(out),
               "--result", str(result)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"release of {variant_id or recipe_path} failed (status {status})")
    return json.loads(result.read_text()), seconds, usage.ru_maxrss / 1024


def run_naive(recipe_path: Path, out: Path, variant_ids: list[str]) -> list[dict]:
    """Each variant in a fresh process and a fresh output folder; its own wall time and peak RSS."""
    rows = []
    for index, variant_id in enumerate(variant_ids):
        (row,), seconds, rss = run_child(recipe_path, out / f"naive-{index}", variant_id)
        rows.append({**row, "seconds": round(seconds, 1), "peak_rss_mb": round(rss)})
    return rows


def sweep(args, out: Path) -> dict:
    modes = {}
    reused = dict(item.split("=", 1) for item in args.reuse)
    for mode in (*args.modes, "sequential"):
        if mode in reused:  # an earlier run of the same code for this mode
            modes[mode] = {key: json.loads(Path(reused[mode]).read_text())[mode][key]
                           for key in ("rows", "seconds", "peak_rss_mb")}
            print(f"{mode}: from {reused[mode]}", flush=True)
            continue
        recipe_path = write_recipe(out / mode, args, hessian=mode)
        rows, seconds, rss = run_child(recipe_path, out / mode / "out")
        modes[mode] = {"rows": rows, "seconds": round(seconds, 1), "peak_rss_mb": round(rss)}
        print(f"{mode}: {seconds:.1f} s, peak RSS {rss:.0f} MB", flush=True)
    report = dict(modes)
    for mode in args.modes:
        ratio, worst = compare(args, mode, modes[mode], modes["sequential"])
        report[f"{mode}_ratio"], report[f"{mode}_worst_change_percent"] = round(ratio, 3), round(worst, 3)
    if "shared" in args.modes:
        report["ratio"], report["worst_change_percent"] = report["shared_ratio"], report["shared_worst_change_percent"]
    return report


def compare(args, mode: str, ours: dict, sequential: dict) -> tuple[float, float]:
    """`mode` against GPTQModel's loop, permutation by permutation; ends with the sweep line. (R, P)."""
    print(f"| Permutation | PPL {mode} | PPL sequential | change % | ± s.e. % | {mode} s | sequential s |")
    print("|---|---|---|---|---|---|---|")
    changes = []
    for row, theirs in zip(ours["rows"], sequential["rows"]):
        change, error = perplexity_change(theirs, row)
        changes.append(change)
        print(f"| {row['variant']} | {row['perplexity']:.3f} | {theirs['perplexity']:.3f} | {change:+.2f} | "
              f"{'–' if error is None else f'{error:.2f}'} | {row['seconds']} | {theirs['seconds']} |")
    if all(row.get("window_nll") for row in ours["rows"] + sequential["rows"]):
        mean, error = paired_change(*(mean_per_window([row["window_nll"] for row in side["rows"]])
                                      for side in (sequential, ours)))
        print(f"over the {len(changes)} permutations {mode} changes perplexity by {mean:+.2f}% ± {error:.2f}% "
              f"(one standard error, {len(ours['rows'][0]['window_nll'])} windows, paired)")
    hessians = capture_seconds(ours["rows"], args.seq_len)
    print(f"fp16 perplexity {ours['rows'][0]['baseline_perplexity']:.3f}; "
          f"{f'Hessian capture {hessians} s; ' if hessians is not None else ''}"
          f"peak RSS {mode} {ours['peak_rss_mb']} MB, sequential {sequential['peak_rss_mb']} MB")
    work = {side: quantization_seconds(rows["rows"], args.seq_len) for side, rows in ((mode, ours),
                                                                                     ("sequential", sequential))}
    print(f"quantization (Hessians, load, solve or GPTQModel's loop, packing, saving): {mode} {work[mode]:.1f} s, "
          f"sequential {work['sequential']:.1f} s; whole runs with verification and evaluation: {mode} "
          f"{ours['seconds']:.1f} s, sequential {sequential['seconds']:.1f} s "
          f"({ours['seconds'] / sequential['seconds']:.2f})")
    ratio = work[mode] / work["sequential"]
    print(f"sweep: {mode}/sequential wall ratio {ratio:.2f}, worst perplexity change {max(changes):.2f}%")
    return ratio, max(changes)


def awq_check(args, out: Path) -> dict:
    """AWQ against the GPTQ 4-bit permutations: quantize time and perplexity, one release."""
    args.gptq, args.awq, args.awq_search = QUICK_SWEEP, [64], list(SCALE_SEARCHES)
    args.samples = 16
    with full_search_curves() as curves:
        # the GPTQ variants as GPTQModel's loop makes them: the yardstick (~106 s one), not hessian: auto's
        rows = run_release(write_recipe(out, args, hessian="sequential"), out / "release")
    print("| Variant | quantize s | PPL | KLD |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['timings']['quantize']} | {row['perplexity']:.3f} | {row['kld_mean']:.4f} |")
    gptq = [row for row in rows if row["variant"].startswith("gptq/")]
    awq = {search: next(row for row in rows if row["variant"].endswith(search.replace("_", "-")))
           for search in args.awq_search}
    one_gptq = sum(row["timings"]["quantize"] for row in gptq) / len(gptq)
    low, high = min(row["perplexity"] for row in gptq), max(row["perplexity"] for row in gptq)
    fast, full = awq["coarse_to_fine"], awq["full"]
    print(f"fp16 perplexity {rows[0]['baseline_perplexity']:.3f}; AWQ full search: perplexity "
          f"{full['perplexity']:.3f}, KLD {full['kld_mean']:.4f}")
    same, unimodal = agreement(curves)
    print(f"the full search's {len(curves)} loss curves: coarse_to_fine picks the same grid point on {same} "
          f"({unimodal} fall and then rise)")
    print(f"awq: quantize time {fast['timings']['quantize'] / one_gptq:.2f}× one GPTQ variant "
          f"(full search {full['timings']['quantize'] / one_gptq:.2f}×), perplexity {fast['perplexity']:.2f} "
          f"(GPTQ 4-bit {low:.2f}–{high:.2f})")
    return {"rows": rows, "one_gptq_seconds": round(one_gptq, 1), "full_search_curves": curves}


@contextmanager
def full_search_curves():
    """The loss at every grid point of each AWQ scale search made with `scale_search: full`."""
    from quantize.engines.gptqmodel import awq

    curves, search = [], awq.grid_minimum

    def recording(loss_at, size, strides):
        best, losses = search(loss_at, size, strides)
        if strides == SCALE_SEARCHES["full"]:
            curves.append([losses[point] for point in range(size)])
        return best, losses

    awq.grid_minimum = recording
    try:
        yield curves
    finally:
        awq.grid_minimum = search


def agreement(curves: list[list[float]]) -> tuple[int, int]:
    """Of these loss curves, how many the coarse-to-fine search minimises as the full one does, and how
    many fall and then rise (where it must)."""
    from quantize.engines.gptqmodel.awq import grid_minimum

    def pick(curve, search):
        return grid_minimum(curve.__getitem__, len(curve), SCALE_SEARCHES[search])[0]

    same = sum(pick(c, "coarse_to_fine") == pick(c, "full") for c in curves)
    return same, sum(falls_then_rises(curve) for curve in curves)


def falls_then_rises(curve: list[float]) -> bool:
    low = curve.index(min(curve))
    return (all(a > b for a, b in zip(curve[:low], curve[1:low + 1]))
            and all(a < b for a, b in zip(curve[low:], curve[low + 1:])))


def perplexity_change(base: dict, other: dict) -> tuple[float, float | None]:
    """`other`'s perplexity change over `base`'s in percent, with its standard error where both rows carry
    their windows' NLLs (rows from before they were recorded do not)."""
    if base.get("window_nll") and other.get("window_nll"):
        return paired_change(base["window_nll"], other["window_nll"])
    return 100 * (other["perplexity"] / base["perplexity"] - 1), None


def mean_per_window(series: list[list[float]]) -> list[float]:
    """Several variants' per-window NLLs averaged window by window."""
    return [sum(values) / len(values) for values in zip(*series)]


def quantization_seconds(rows: list[dict], seq_len: int) -> float:
    """What making the permutations cost, evaluation and verification (the same in both modes) left
    out: the shared Hessians once, then each permutation's load, quantization and save."""
    made = sum(row["timings"][stage] for row in rows for stage in ("load", "quantize", "save"))
    return (capture_seconds(rows, seq_len) or 0.0) + made


def capture_seconds(rows: list[dict], seq_len: int) -> float | None:
    """The shared Hessians' capture time, from a row that used them (None where none did)."""
    key = f"gptq_hessians_{seq_len}_shared"
    return next((row["timings"][key] for row in rows if key in row["timings"]), None)


def markdown(release: list[dict], naive: list[dict], release_seconds: float) -> str:
    lines = ["| Variant | Size MB | PPL | fp16 PPL | Δ PPL % | Release s | Naive s | Release peak RSS MB | Naive peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ours, theirs in zip(release, naive):
        delta = 100 * (ours["perplexity"] / ours["baseline_perplexity"] - 1)
        lines.append(f"| {ours['variant']} | {ours['size_mb']} | {ours['perplexity']:.3f} | "
                     f"{ours['baseline_perplexity']:.3f} | {delta:+.1f} | {ours['seconds']} | {theirs['seconds']} | "
                     f"{ours['peak_rss_mb']} | {theirs['peak_rss_mb']} |")
    naive_total = sum(r["seconds"] for r in naive)
    lines.append(f"\nRelease, one process: {release_seconds:.1f} s in all; naive, one process per variant: "
                 f"{naive_total:.1f} s in all ({naive_total / release_seconds:.2f}x).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="fp16 model folder")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    parser.add_argument("--gptq", nargs="+", default=DEFAULT_GPTQ, help="bits:group:act|noact, e.g. 4:64:act")
    parser.add_argument("--awq", nargs="*", type=int, default=[], help="AWQ group sizes to add (slow on CPU)")
    parser.add_argument("--awq-search", nargs="+", default=["coarse_to_fine"], choices=list(SCALE_SEARCHES),
                        help="AWQ scale searches: one variant per group size and search")
    parser.add_argument("--awq-check", action="store_true", help="AWQ 4-bit g64 against the GPTQ 4-bit permutations")
    parser.add_argument("--held-out", type=float, default=None,
                        help="evaluation share of the text (default 0.1; --sweep --quick: 0.2, --awq-check: 0.03)")
    parser.add_argument("--windows", type=int, default=None,
                        help="512-token windows scored per variant (default: the recipe's, 20; --sweep --quick: 100)")
    parser.add_argument("--out", default=str(REPO / "build" / "bench-gptq"))
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="shared Hessians vs sequential, same permutations")
    parser.add_argument("--modes", nargs="+", default=["shared"], choices=COMPARED_MODES,
                        help="with --sweep: the hessian modes compared with sequential (GPTQModel's loop)")
    parser.add_argument("--quick", action="store_true", help="with --sweep: 4 permutations, 16 x 512 calibration")
    parser.add_argument("--reuse", action="append", default=[], metavar="MODE=SWEEP_JSON",
                        help=f"with --sweep: take MODE's ({', '.join(REUSABLE_MODES)}) results from an earlier run's "
                             "sweep.json instead of running it, where only the other mode's code changed")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one variant, for the naive runs
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for item in args.reuse:
        mode, _, path = item.partition("=")
        if mode not in REUSABLE_MODES or not Path(path).is_file():
            parser.error(f"--reuse {item}: give MODE=FILE (MODE one of {', '.join(REUSABLE_MODES)}), "
                         "FILE an earlier sweep.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shared_wikitext = REPO.parent / "shared" / "data" / "wikitext-2"
    if shared_wikitext.is_dir():
        os.environ.setdefault("QUANTIZE_WIKITEXT_DIR", str(shared_wikitext))
    quick_sweep = args.sweep and args.quick
    # --sweep --quick scores 100 windows (25,500 tokens) of the last 20% of the text: one permutation's
    # perplexity change then has a standard error of about 0.5%, where 20 windows left about 1.2%
    args.held_out = args.held_out or (0.2 if quick_sweep else 0.03 if args.awq_check else 0.1)
    args.windows = args.windows or (100 if quick_sweep else None)
    out = Path(args.out).resolve()

    if args.single is not None:
        rows = run_release(Path(args.recipe), out, args.single or None)
        Path(args.result).write_text(json.dumps(rows))
        return 0

    import shutil

    if out.exists():
        shutil.rmtree(out)
    if args.awq_check:
        report = awq_check(args, out)
        (out / "awq.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0
    if args.sweep:
        if args.gptq == DEFAULT_GPTQ:
            args.gptq = QUICK_SWEEP if args.quick else REFERENCE_SWEEP
        if args.quick:
            args.samples = 16
        report = sweep(args, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0
    recipe_path = write_recipe(out, args)
    started = time.monotonic()
    release = run_release(recipe_path, out / "release")
    release_seconds = time.monotonic() - started
    naive = [] if args.skip_naive else run_naive(recipe_path, out, [r["variant"] for r in release])
    report = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "cpu_count": os.cpu_count(),
              "release_seconds": round(release_seconds, 1), "release": release, "naive": naive}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if naive:
        print(markdown(release, naive, release_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
