"""Build the SmolLM2-135M-Instruct fp16 folder the demo recipe and the benchmarks use.

usage: python scripts/build_smollm2.py [FOLDER]   (default: models/SmolLM2-135M-Instruct)
"""

import sys
import time
from pathlib import Path

from model_builders import build_smollm2_fp16

folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct")
started = time.monotonic()
build_smollm2_fp16(folder)
size = sum(p.stat().st_size for p in folder.iterdir())
print(f"SmolLM2-135M-Instruct fp16: {folder} ({size / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
