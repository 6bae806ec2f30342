"""What the SmolLM2 benchmarks share: the source section of their recipes, and one release run."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from quantize.plan import build_plan
from quantize.recipe import load_recipe
from quantize.runner import run_plan
from quantize.source import inspect_source


def smollm2_source(model: Path, name: str = "SmolLM2 135M Instruct") -> dict:
    return {"path": str(Path(model).resolve()), "name": name, "creator": "Hugging Face",
            "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}


def run_recipe(folder: Path, data: dict) -> tuple[list, float]:
    """Release the recipe `data` in `folder/out` (the recipe written next to it, finished variants
    reused); its outcomes and wall seconds. Any failed variant stops the benchmark."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(recipe_path)
    started = time.monotonic()
    outcomes = run_plan(build_plan(recipe, inspect_source(recipe)), folder / "out",
                        log=lambda line: print("  " + line, flush=True))
    failed = [f"{o.variant.id}: {o.error}" for o in outcomes if o.status == "failed"]
    if failed:
        raise SystemExit("failed:\n" + "\n".join(failed))
    return outcomes, time.monotonic() - started
