"""The whole job with the real backends: a tiny model released to the Hub stand-in (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from quantize.cli import main
from quantize.manifest import read_manifest, sha256_file
from quantize.card.chart import CHART_FILE
from quantize.publish.layout import RECORD_FILE

from .conftest import tiny_recipe
from .hub_server import hub  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_tiny_model_release_to_the_hub(hub, tiny_model, tmp_path, capsys):
    if importlib.util.find_spec("gptqmodel") is None:  # (importing it here would print its banner)
        pytest.skip("gptqmodel is not installed")
    from quantize.engines.llamacpp import find_llama_cpp

    try:
        find_llama_cpp()
    except Exception as exc:
        pytest.skip(f"llama.cpp tools not built: {exc}")
    data = tiny_recipe(tiny_model,
                       gptq=[{"bits": 4, "group_size": 128, "act_order": True},
                             {"bits": 8, "group_size": "none", "act_order": False}],
                       awq=[{"bits": 4, "group_size": 128}],
                       gguf={"types": ["Q4_K_M", "Q8_0"], "imatrix": True, "imatrix_chunks": 8},
                       publish={"target": "hub"})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    capsys.readouterr()

    assert main(["release", str(recipe), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [v["status"] for v in summary["variants"]] == ["done"] * 5
    assert len(summary["published"]) == 4

    hf = HfApi(endpoint=hub.endpoint, token=hub.token)
    branches = {repo: {b.name for b in hf.list_repo_refs(repo).branches}
                for repo in ("tester/Tiny-Llama-GPTQ", "tester/Tiny-Llama-AWQ", "tester/Tiny-Llama-GGUF")}
    assert branches == {"tester/Tiny-Llama-GPTQ": {"main", "gptq-8bit--1g-actorder_False"},
                        "tester/Tiny-Llama-AWQ": {"main"}, "tester/Tiny-Llama-GGUF": {"main"}}
    for variant in summary["variants"]:
        manifest = read_manifest(out, variant["id"])
        on_branch = set(hub.files(manifest.repo_id, manifest.branch))
        expected = {manifest.repo_path(f) for f in manifest.files} | {".gitattributes", "README.md", RECORD_FILE, CHART_FILE}
        if manifest.format == "gguf":
            expected |= {f"Tiny-Llama.{t}.gguf" for t in ("Q4_K_M", "Q8_0")}
        assert on_branch == expected, variant["id"]
        for entry in manifest.weight_files():
            path = hf_hub_download(manifest.repo_id, manifest.repo_path(entry), revision=manifest.branch,
                                   endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "cache")
            assert sha256_file(Path(path)) == entry.sha256
        readme = hub.files(manifest.repo_id, manifest.branch)["README.md"].decode()
        assert "PPL" in readme and "Original model card" in readme

    # what a user does: download a branch and load it with transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = snapshot_download("tester/Tiny-Llama-GPTQ", revision="main", endpoint=hub.endpoint, token=hub.token,
                               cache_dir=tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert math.isfinite(loss) and generated.shape[1] == ids.shape[1] + 4

    # a rerun does nothing and sends nothing
    puts = len(hub.lfs_upload_puts())
    capsys.readouterr()  # what loading printed above (GPTQModel logs to stdout)
    assert main(["release", str(recipe), "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [v["status"] for v in again["variants"]] == ["skipped"] * 5
    assert len(hub.lfs_upload_puts()) == puts and all(p["uploaded"] == [] for p in again["published"])
