"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, recipes written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if SHARED_WIKITEXT.is_dir():
    os.environ.setdefault("QUANTIZE_WIKITEXT_DIR", str(SHARED_WIKITEXT))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from quantize.fixtures import save_smollm2_tokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    save_smollm2_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama (hidden 256, intermediate 512) saved as an fp16 folder. Do not modify it."""
    from quantize.fixtures import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer_from=tokenizer_dir)


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(dict) -> path of a recipe YAML file in a fresh folder."""

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def tiny_recipe(model: Path, **sections) -> dict:
    """A minimal recipe around a local model; pass gptq=[...], awq=[...], gguf={...} etc."""
    recipe = {
        "source": {"path": str(model), "name": "Tiny Llama", "creator": "Test Lab",
                   "repo_id": "test-lab/tiny-llama", "license": "apache-2.0"},
        "release": {"namespace": "tester", "basename": "Tiny-Llama"},
        "calibration": {"samples": 8, "seq_len": 128},
    }
    recipe.update(sections)
    return recipe


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The real SmolLM2-135M-Instruct fp16 folder the demo recipe names (built once, ~40 s)."""
    from quantize.fixtures import build_smollm2_fp16

    return build_smollm2_fp16(REPO / "models" / "SmolLM2-135M-Instruct")
