"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, recipes written on the fly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import sys

import pytest
import yaml

from quantize.formats import Backend, Produced

REPO = Path(__file__).resolve().parent.parent
SHARED_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
sys.path.insert(0, str(REPO / "scripts"))  # model_builders: the demo's and the tests' models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests plan 34B-sized configs without weights: the memory and disk check before a release
# (quantize/memory.py) would refuse them here. tests/test_memory.py turns it back on.
os.environ.setdefault("QUANTIZE_SKIP_RESOURCE_CHECK", "1")
if SHARED_WIKITEXT.is_dir():
    os.environ.setdefault("QUANTIZE_WIKITEXT_DIR", str(SHARED_WIKITEXT))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from model_builders import save_smollm2_tokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    save_smollm2_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama (hidden 256, intermediate 512) saved as an fp16 folder. Do not modify it."""
    from model_builders import build_tiny_llama

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
    from model_builders import build_smollm2_fp16

    return build_smollm2_fp16(REPO / "models" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def fair_smollm2_folder(smollm2_folder) -> Path:
    """SmolLM2 with its weights off the Q4_1 grid (the demo recipe's source; ~10 s after the plain one)."""
    from model_builders import build_fair_smollm2, fair_folder

    return build_fair_smollm2(fair_folder(smollm2_folder), source=smollm2_folder)


TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
               "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 49152, "tie_word_embeddings": True,
               "max_position_embeddings": 2048}


class RecordingBackend(Backend):
    """Writes a small 'model' per variant; records calls; can fail on chosen variants."""

    calls: list[str] = []
    fail_on: set[str] = set()

    def check(self, variants):
        pass

    def produce(self, variant, staging: Path) -> Produced:
        RecordingBackend.calls.append(variant.id)
        if variant.id in RecordingBackend.fail_on:
            raise RuntimeError(f"simulated crash in {variant.id}")
        if variant.file_name:
            path = staging / variant.file_name
            path.write_bytes(variant.name.encode() * 1000)
            return Produced([path], quality={"perplexity": 10.0})
        weights = staging / "model.safetensors"
        weights.write_bytes(json.dumps(variant.params).encode() * 100)
        config = staging / "config.json"
        config.write_text(json.dumps({"quantization_config": variant.params}))
        return Produced([weights, config], quality={"perplexity": 12.5, "baseline_perplexity": 11.0})


@pytest.fixture
def recording(monkeypatch):
    RecordingBackend.calls = []
    RecordingBackend.fail_on = set()
    monkeypatch.setattr("quantize.runner.backend_class", lambda fmt: RecordingBackend)
    return RecordingBackend


@pytest.fixture
def release_recipe(tmp_path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    (model / "README.md").write_text("# The original card\n")
    data = tiny_recipe(model, gptq=[{"bits": 4}, {"bits": 8, "group_size": "none"}], gguf={"types": ["Q4_K_M", "Q8_0"]})
    data["source"]["prompt_template"] = "{prompt}"
    data["publish"] = {"target": "local"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
