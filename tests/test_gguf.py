"""GGUF through llama.cpp: output parsing, checks and bad input (fast); real releases of a tiny model (slow)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import pytest
import yaml

from quantize.formats import ReleaseContext
from quantize.formats.gguf import (GGUFBackend, check_architecture, dataset_file_name, gguf_metadata,
                                   quantize_parallelism, read_gguf_facts, source_architecture)
from quantize.engines.llamacpp import (BINARIES, CONVERTER, FOLDER_ENV, LlamaCpp, find_llama_cpp,
                                        parse_fallbacks, registered_architectures, tool_report)
from quantize.errors import BadInput
from quantize.manifest import read_manifest
from quantize.plan import build_plan
from quantize.recipe import load_recipe
from quantize.runner import STAGING_DIR, run_plan
from quantize.source import inspect_source
from tests.conftest import tiny_recipe

QUANTIZE_OUTPUT = """[   3/  30]            blk.0.ffn_down.weight - [  576,   256,     1,     1], type =    f16, converting to q6_K ..
warning: blk.0.ffn_down.weight                - ncols    576 not divisible by 256 (required for type    q6_K) -> falling back to    q8_0
warning: blk.1.ffn_down.weight                - ncols    576 not divisible by 256 (required for type    q6_K) -> falling back to    q8_0
warning: blk.1.attn_q.weight                  - ncols    576 not divisible by 256 (required for type    q4_K) -> falling back to    q5_0
llama_model_quantize_impl: WARNING: 3 of 30 tensor(s) required fallback quantization
"""


# --- parsing what the tools print -------------------------------------------------------------

def test_fallbacks_are_reported_per_kind_of_tensor():
    notes = parse_fallbacks(QUANTIZE_OUTPUT)
    assert notes[0] == "llama-quantize used fallback types for 3 of 30 tensors"
    assert "2 × ffn_down.weight (576 columns, not a multiple of 256): q6_K fell back to q8_0" in notes
    assert "1 × attn_q.weight (576 columns, not a multiple of 256): q4_K fell back to q5_0" in notes
    assert parse_fallbacks("llama_model_quantize_impl: model size = 26.0 MB\n") == []


# --- finding the tools and checking the input ------------------------------------------------

def _fake_llama_cpp(root: Path, architectures: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM")) -> Path:
    """A llama.cpp folder whose binaries only leave a mark when run: checks must not run them."""
    (root / "bin").mkdir(parents=True)
    for name in BINARIES:
        tool = root / "bin" / name
        tool.write_text(f"#!/bin/sh\ntouch '{root}/ran-{name}'\nexit 1\n")
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    (root / "conversion").mkdir()
    registered = ",\n    ".join(f'"{name}"' for name in architectures)
    (root / "conversion" / "llama.py").write_text(f"@ModelBase.register(\n    {registered})\nclass LlamaModel: ...\n")
    (root / "conversion" / "gpt2.py").write_text('@ModelBase.register("GPT2LMHeadModel")\nclass GPT2Model: ...\n')
    (root / CONVERTER).write_text("raise SystemExit('the fake converter must not run')\n")
    return root


def test_registered_architectures_reads_multiline_register_calls(tmp_path):
    root = _fake_llama_cpp(tmp_path / "llama.cpp")
    assert registered_architectures(root) == {"LlamaForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel"}


def test_user_build_is_found_through_the_environment(tmp_path, monkeypatch):
    root = _fake_llama_cpp(tmp_path / "llama.cpp")
    monkeypatch.setenv(FOLDER_ENV, str(root))
    tools = find_llama_cpp()
    assert tools.origin == FOLDER_ENV and tools.tool("llama-quantize") == (root / "bin" / "llama-quantize").resolve()


@pytest.mark.parametrize("make_folder", [False, True])
def test_missing_tools_are_one_line_of_bad_input(tmp_path, monkeypatch, make_folder):
    folder = tmp_path / "no-llama"
    if make_folder:
        folder.mkdir()
    monkeypatch.setenv(FOLDER_ENV, str(folder))
    with pytest.raises(BadInput) as caught:
        find_llama_cpp()
    message = str(caught.value)
    assert "\n" not in message and "scripts/setup_llamacpp.sh" in message
    assert ("llama-quantize" in message) == make_folder
    report = tool_report()
    assert report["found"] is False and report["problem"] == message


def test_architecture_check():
    assert source_architecture({"architectures": ["LlamaForCausalLM"]}) == "LlamaForCausalLM"
    assert source_architecture({"architectures": ["Wrapper"], "text_config": {"architectures": ["Inner"]}}) == "Inner"
    assert source_architecture({}) is None


def test_unsupported_architecture_is_bad_input(tmp_path):
    from quantize.source import facts_from_config

    tools = LlamaCpp(_fake_llama_cpp(tmp_path / "llama.cpp"), "cache", {}, {"llama_cpp_commit": "abc1234",
                                                                          "llama_cpp_python": "0.3.36"})
    check_architecture(facts_from_config({"architectures": ["LlamaForCausalLM"]}), tools)
    with pytest.raises(BadInput, match="cannot convert architecture MagicForCausalLM"):
        check_architecture(facts_from_config({"architectures": ["MagicForCausalLM"]}), tools)
    with pytest.raises(BadInput, match="lists no `architectures`"):
        check_architecture(facts_from_config({"model_type": "llama"}), tools)


def _tiny_config_model(folder: Path, architecture: str) -> Path:
    """A model folder with only a config.json: enough for planning and checks, nothing to convert."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": [architecture], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000}))
    return folder


def _plan(recipe_path: Path):
    recipe = load_recipe(recipe_path)
    return build_plan(recipe, inspect_source(recipe))


@pytest.mark.parametrize("problem", ["missing tools", "unsupported architecture"])
def test_bad_input_stops_the_release_before_any_work(tmp_path, monkeypatch, write_recipe, problem):
    tools_root = _fake_llama_cpp(tmp_path / "llama.cpp")
    architecture = "LlamaForCausalLM" if problem == "missing tools" else "MagicForCausalLM"
    model = _tiny_config_model(tmp_path / "model", architecture)
    monkeypatch.setenv(FOLDER_ENV, str(tmp_path / "nowhere" if problem == "missing tools" else tools_root))
    plan = _plan(write_recipe(tiny_recipe(model, gguf={"types": ["Q4_K_M", "Q8_0"]})))
    out = tmp_path / "out"
    with pytest.raises(BadInput):
        run_plan(plan, out, log=lambda _: None)
    assert not (out / STAGING_DIR).exists() and not list(tools_root.glob("ran-*"))


@pytest.mark.parametrize("gguf, message", [
    ({"types": ["IQ3_XXS"]}, "IQ3_XXS need an importance matrix"),
    ({"types": ["Q4_K_XL"]}, "unknown GGUF type 'Q4_K_XL'"),
])
def test_recipe_rejects_impossible_types(tmp_path, write_recipe, gguf, message):
    model = _tiny_config_model(tmp_path / "model", "LlamaForCausalLM")
    with pytest.raises(BadInput, match=message):
        load_recipe(write_recipe(tiny_recipe(model, gguf=gguf)))


def test_backend_check_rejects_iq_types_without_imatrix(tmp_path, monkeypatch, write_recipe):
    monkeypatch.setenv(FOLDER_ENV, str(_fake_llama_cpp(tmp_path / "llama.cpp")))
    model = _tiny_config_model(tmp_path / "model", "LlamaForCausalLM")
    plan = _plan(write_recipe(tiny_recipe(model, gguf={"types": ["IQ4_XS"], "imatrix": True})))
    variant = plan.variants[0]
    unmatrixed = dataclasses.replace(variant, spec=variant.spec.model_copy(update={"imatrix": False}))
    with pytest.raises(BadInput, match="IQ4_XS need an importance matrix"):
        GGUFBackend(ReleaseContext(plan, tmp_path / "out")).check([unmatrixed])


def test_metadata_names_the_release_and_its_base_model(tmp_path, write_recipe):
    model = _tiny_config_model(tmp_path / "model", "LlamaForCausalLM")
    metadata = gguf_metadata(load_recipe(write_recipe(tiny_recipe(model, gguf={"types": ["Q8_0"]}))))
    assert metadata["general.name"] == "Tiny Llama" and metadata["general.basename"] == "Tiny-Llama"
    assert metadata["general.quantized_by"] == "tester"
    assert metadata["general.base_models"][0]["repo_url"] == "https://huggingface.co/test-lab/tiny-llama"


def test_calibration_file_name_says_where_the_text_came_from():
    assert dataset_file_name({"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"}) \
        == "wikitext-2-raw-v1-test.calibration.txt"
    assert dataset_file_name({"dataset": "file", "path": "/data/my text.jsonl"}) == "my_text.calibration.txt"


def test_parallelism_stays_within_cores():
    processes, threads = quantize_parallelism(jobs=12, source_bytes=1000)
    assert 1 <= processes <= (os.cpu_count() or 1) and processes * threads <= max(os.cpu_count() or 1, 1)
    assert quantize_parallelism(jobs=1, source_bytes=1000)[0] == 1


# --- real releases (slow: needs scripts/setup_llamacpp.sh) ------------------------------------

def _tools_problem() -> str | None:
    try:
        find_llama_cpp()
    except BadInput as exc:
        return str(exc)
    return None


needs_llama_cpp = pytest.mark.skipif(_tools_problem() is not None,
                                     reason=f"llama.cpp tools not found: {_tools_problem()}")
LADDER = ["Q4_K_M", "Q8_0", "Q5_K_S", "IQ4_XS"]
IMATRIX_CHUNKS = 4


def _write_plan(folder: Path, model: Path, **sections):
    folder.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe(model, **sections)
    recipe["calibration"]["held_out"] = 0.05
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return _plan(path)


@pytest.fixture(scope="module")
def release(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-release")
    plan = _write_plan(folder, tiny_model, gguf={"types": LADDER, "imatrix": True, "imatrix_chunks": IMATRIX_CHUNKS})
    out = folder / "out"
    outcomes = run_plan(plan, out, log=lambda _: None)
    return plan, out, outcomes


@pytest.mark.slow
@needs_llama_cpp
def test_release_makes_every_type(release):
    plan, out, outcomes = release
    assert [o.status for o in outcomes] == ["done"] * len(LADDER), [o.error for o in outcomes]
    for outcome in outcomes:
        manifest = outcome.manifest
        assert [f.path for f in manifest.files] == [f"gguf/Tiny-Llama.{outcome.variant.name}.gguf"]
        facts = read_gguf_facts([out / manifest.files[0].path])
        assert facts.file_type == outcome.variant.name == manifest.measured["file_type"]
        assert 4 < manifest.measured["bpw"] < 9
        assert manifest.requested["type"] == outcome.variant.name and manifest.requested["imatrix"] is True
        assert facts.metadata["general.name"] == "Tiny Llama"
        assert facts.metadata["general.quantized_by"] == "tester"
        assert facts.metadata["general.license"] == "apache-2.0"
        quality = manifest.quality
        assert math.isfinite(quality["perplexity"]) and quality["engine"] == "llama.cpp"
        assert quality["eval_window"] == 512 and quality["eval_tokens"] == quality["eval_windows"] * 255
        assert manifest.tools["llama.cpp"] and {"quantize", "evaluate", "gguf_convert_shared"} <= set(manifest.timings)


@pytest.mark.slow
@needs_llama_cpp
def test_quality_is_ordered_by_bits_against_the_fp16_reference(release):
    """Measured on the tiny random model (near-uniform predictions, so every KL divergence is small):
    Q8_0 ~1e-5 nats, the 4-5 bit types ~1e-3."""
    _, _, outcomes = release
    quality = {o.variant.name: o.manifest.quality for o in outcomes}
    kld = {name: q["kld_mean"] for name, q in quality.items()}
    assert kld["Q8_0"] < kld["Q4_K_M"] / 10 and kld["Q8_0"] < 1e-4, kld
    assert kld["Q5_K_S"] < kld["Q4_K_M"] * 1.1 and kld["IQ4_XS"] < 0.01, kld  # more bits never worse by a margin
    assert all(q["kld_p99"] >= q["kld_mean"] and 0 < q["top1_agreement"] <= 1 for q in quality.values()), quality
    assert quality["Q8_0"]["top1_agreement"] > quality["Q4_K_M"]["top1_agreement"], quality


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_reads_the_transformers_reference_and_the_two_fp16_baselines_agree(release):
    """The F16 conversion scored by llama.cpp against the reference transformers wrote: the same
    function on the same tokens, so perplexity within 1% and KL divergence near zero."""
    _, out, outcomes = release
    baseline = json.loads((out / ".work" / "gguf_reference" / "artifact.json").read_text())["value"]
    reference = json.loads((out / ".work" / "fp16_reference" / "artifact.json").read_text())["value"]
    assert abs(baseline["perplexity"] / reference["perplexity"] - 1) < 0.01, (baseline, reference)
    assert baseline["kld_mean"] < 1e-4 and baseline["top1_agreement"] > 0.99, baseline
    assert baseline["eval_tokens"] == reference["eval_tokens"]
    for outcome in outcomes:
        quality = outcome.manifest.quality
        assert quality["baseline_perplexity"] == round(reference["perplexity"], 4)
        assert quality["engine_baseline_perplexity"] == round(baseline["perplexity"], 4)


@pytest.mark.slow
@needs_llama_cpp
def test_release_converts_once_to_f16(release):
    _, out, _ = release
    converted = sorted((out / ".work").rglob("*.F16.gguf"))
    assert [p.name for p in converted] == ["Tiny-Llama.F16.gguf"]
    assert read_gguf_facts(converted).file_type == "F16"


@pytest.mark.slow
@needs_llama_cpp
def test_release_records_the_importance_matrix(release):
    _, out, outcomes = release
    for outcome in outcomes:
        imatrix = outcome.manifest.calibration["imatrix"]
        assert imatrix["chunks"] == IMATRIX_CHUNKS and imatrix["dataset"] == "wikitext-2-raw-v1-test.calibration.txt"
        metadata = read_gguf_facts([out / outcome.manifest.files[0].path]).metadata
        assert metadata["quantize.imatrix.chunks_count"] == IMATRIX_CHUNKS
        assert metadata["quantize.imatrix.dataset"] == imatrix["dataset"]


@pytest.mark.slow
@needs_llama_cpp
def test_rerun_does_no_work(release, monkeypatch, tmp_path):
    plan, out, _ = release
    monkeypatch.setenv(FOLDER_ENV, str(tmp_path / "no-tools"))  # any backend work would now fail its check
    outcomes = run_plan(plan, out, log=lambda _: None)
    assert [o.status for o in outcomes] == ["skipped"] * len(LADDER)


@pytest.mark.slow
@needs_llama_cpp
def test_split_and_fallbacks_on_odd_widths(tokenizer_dir, tmp_path):
    from model_builders import build_tiny_llama

    model = build_tiny_llama(tmp_path / "odd-llama", hidden=384, intermediate=768, heads=4, kv_heads=2,
                             tokenizer_from=tokenizer_dir)
    release_dir = tmp_path / "release"
    plan = _write_plan(release_dir, model, gguf={"types": ["Q4_K_M"]},
                       release={"namespace": "tester", "basename": "Tiny-Llama", "split_max_size_gb": 0.01})
    (outcome,) = run_plan(plan, release_dir / "out", log=lambda _: None)
    assert outcome.status == "done", outcome.error
    parts = [f.path for f in outcome.manifest.files]
    assert len(parts) >= 2 and parts[0] == f"gguf/Tiny-Llama.Q4_K_M-00001-of-{len(parts):05d}.gguf"
    assert read_gguf_facts([release_dir / "out" / p for p in parts]).file_type == "Q4_K_M"
    assert any("fell back" in note for note in outcome.manifest.notes)
    assert any("split into" in note for note in outcome.manifest.notes)
    assert outcome.manifest.calibration is None and math.isfinite(outcome.manifest.quality["perplexity"])
    assert read_manifest(release_dir / "out", "gguf/Q4_K_M") is not None
