"""Slow: a real `quantize release` (GPTQ, AWQ and GGUF, like the demo) run as CI runs it, not on a
terminal: a short output, and the libraries' output in <out>/.work/logs/."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, tiny_recipe

pytestmark = pytest.mark.slow

MAX_LINES = 80
LIBRARY_LINE = re.compile(r"\bINFO\b|\bDEBUG\b|torchao|\d+%\|| it/s\]|s/it\]|UserWarning|FutureWarning|"
                          r"DeprecationWarning|gptqmodel", re.IGNORECASE)


def test_a_whole_release_prints_a_few_lines_and_logs_the_libraries(tiny_model, tmp_path):
    data = tiny_recipe(tiny_model, gptq=[{"bits": 4, "group_size": 128}, {"bits": 8, "group_size": "none"}],
                       awq=[{"bits": 4, "group_size": 128}], gguf={"types": ["Q4_K_M", "Q8_0"], "imatrix": True, "imatrix_chunks": 8})
    data["calibration"]["held_out"] = 0.02
    data["source"]["prompt_template"] = "{prompt}"
    data["publish"] = {"target": "local"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "quantize.cli", "release", str(recipe), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, env=env, cwd=tmp_path, timeout=1800)
    output = result.stdout
    lines = output.splitlines()
    assert result.returncode == 0, output[-3000:]
    assert len(lines) < MAX_LINES, output
    noisy = [line for line in lines if LIBRARY_LINE.search(line)]
    assert not noisy, noisy
    for variant_id in ("gptq/main", "awq/main", "gguf/Q4_K_M", "gguf/Q8_0"):
        assert f"{variant_id}: done" in output, output
    # what the libraries said is kept, per variant
    logs = out / ".work" / "logs"
    names = {p.relative_to(logs).as_posix() for p in logs.rglob("*.log")}
    assert {"shared.log", "gptq/main.log", "awq/main.log", "gguf/Q4_K_M.log", "gguf/Q8_0.log"} <= names, names
    gptq_branch = next(n for n in names if n.startswith("gptq/") and n != "gptq/main.log")
    library_lines = {name: [line for line in (logs / name).read_text().splitlines() if LIBRARY_LINE.search(line)]
                     for name in ("gptq/main.log", gptq_branch, "awq/main.log", "shared.log")}
    for name, found in library_lines.items():  # shared.log: GPTQModel's set-up, the Hessians, the reference
        assert found, f"{name} holds no library output"
