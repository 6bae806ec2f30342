"""Recipe validation and the CLI contract: bad input is one clear line naming the field, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from quantize.cli import main
from quantize.recipe import load_recipe

from .conftest import REPO, tiny_recipe

GOOD_GPTQ = [{"bits": 4, "group_size": 128}]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_folder(tmp_path: Path, config: dict | None = None) -> Path:
    """A model folder with only a config.json: enough to plan and render cards."""
    folder = tmp_path / "model"
    folder.mkdir()
    config = config or json.loads((REPO / "tests/data/codellama-34b-config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("change, field", [
    ({"gptq": [{"bits": 4, "colour": "red"}]}, "gptq[0].colour: unknown key"),
    ({"surprise": 1}, "surprise: unknown key"),
    ({"gptq": [{"bits": 5}]}, "gptq[0].bits: must be one of 2, 3, 4, 8 (got 5)"),
    ({"gptq": [{"bits": 4, "group_size": 0}]}, "gptq[0].group_size"),
    ({"gptq": [{"bits": 4, "group_size": 100}]}, "gptq[0].group_size: must be a power of two"),
    ({"gptq": [{"bits": 4, "damp": 0}]}, "gptq[0].damp: must be between 0 and 1"),
    ({"gptq": [{"bits": 4, "damp": 1.0}]}, "gptq[0].damp"),
    ({"gptq": [{"bits": 4, "damp": -0.5}]}, "gptq[0].damp"),
    ({"gguf": {"types": ["Q4_K_M", "Q9_X"]}}, "gguf.types: unknown GGUF type 'Q9_X'"),
    ({"gguf": {"types": ["IQ2_XS"]}}, "IQ2_XS need an importance matrix"),
    ({"gguf": {"types": []}}, "gguf.types: list at least one GGUF type"),
    ({"gptq": [{"bits": 4, "branch": "fast"}, {"bits": 8, "branch": "fast"}]}, "branch 'fast' is also used by gptq[0]"),
    ({"gptq": [{"bits": 4, "group_size": 128}, {"bits": 4, "group_size": 128}, {"bits": 4, "group_size": 128}]},
     "branch 'gptq-4bit-128g-actorder_True' is also used by gptq[1]"),
    ({"gptq": []}, "gptq: empty list"),
    ({"awq": []}, "awq: empty list"),
    ({"gptq": None}, "the recipe lists no variants"),
    ({"awq": [{"bits": 3}]}, "awq[0].bits: AWQ supports 4-bit only"),
    ({"calibration": {"dataset": "file"}}, "calibration: dataset 'file' needs calibration.path"),
    ({"calibration": {"samples": 0}}, "calibration.samples"),
])
def test_bad_recipe_is_one_line_naming_the_field(tmp_path, write_recipe, capsys, change, field):
    data = tiny_recipe(model_folder(tmp_path), gptq=GOOD_GPTQ)
    data.update(change)
    data = {key: value for key, value in data.items() if value is not None}
    code, out, err = run_cli(capsys, "plan", write_recipe(data))
    assert code == 2
    assert field in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == ""


def test_missing_model_folder(tmp_path, write_recipe, capsys):
    code, _, err = run_cli(capsys, "plan", write_recipe(tiny_recipe(tmp_path / "nowhere", gptq=GOOD_GPTQ)))
    assert code == 2 and "source.path: model folder" in err and "does not exist" in err


def test_missing_config_json(tmp_path, write_recipe, capsys):
    (tmp_path / "empty-model").mkdir()
    code, _, err = run_cli(capsys, "plan", write_recipe(tiny_recipe(tmp_path / "empty-model", gptq=GOOD_GPTQ)))
    assert code == 2 and "source.path: no config.json in" in err


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("source:\n  path: [unclosed\nrelease: {\n")
    code, _, err = run_cli(capsys, "plan", path)
    assert code == 2 and "malformed YAML at line" in err and len(err.strip().splitlines()) == 1


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", tmp_path / "absent.yaml")
    assert code == 2 and "recipe file not found" in err


def test_group_size_must_divide_layer_width(tmp_path, write_recipe, capsys):
    config = json.loads((REPO / "tests/data/codellama-34b-config.json").read_text())
    config.update(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    data = tiny_recipe(model_folder(tmp_path, config), gptq=GOOD_GPTQ)
    code, _, err = run_cli(capsys, "plan", write_recipe(data))
    assert code == 2
    assert "gptq[0].group_size: 128 does not divide the layer width 576" in err and "64" in err


def test_relative_paths_are_relative_to_the_recipe(tmp_path, capsys):
    model = model_folder(tmp_path)
    sub = tmp_path / "recipes"
    sub.mkdir()
    data = tiny_recipe(Path("../model"), gptq=GOOD_GPTQ)
    (sub / "r.yaml").write_text(yaml.safe_dump(data))
    assert load_recipe(sub / "r.yaml").resolve(Path("../model")) == model.resolve()
    code, _, _ = run_cli(capsys, "plan", sub / "r.yaml")
    assert code == 0


def test_plan_json_lists_every_variant_with_sizes(tmp_path, write_recipe, capsys):
    data = tiny_recipe(model_folder(tmp_path), gptq=[{"bits": 4, "group_size": 128}, {"bits": 8, "group_size": "none"}],
                       awq=[{"bits": 4, "group_size": 128}], gguf={"types": ["Q4_K_M", "q8_0"]})
    code, out, _ = run_cli(capsys, "plan", write_recipe(data), "--json")
    assert code == 0
    plan = json.loads(out)
    ids = [v["id"] for v in plan["variants"]]
    assert ids == ["gptq/main", "gptq/gptq-8bit--1g-actorder_True", "awq/main", "gguf/Q4_K_M", "gguf/Q8_0"]
    assert plan["release"]["repos"] == {"gptq": "tester/Tiny-Llama-GPTQ", "awq": "tester/Tiny-Llama-AWQ",
                                        "gguf": "tester/Tiny-Llama-GGUF"}
    assert all(v["estimated_bytes"] > 0 for v in plan["variants"])
    gguf = plan["variants"][3]
    assert gguf["file_name"] == "Tiny-Llama.Q4_K_M.gguf" and gguf["branch"] == "main"
    assert plan["totals"]["disk"] == sum(v["estimated_bytes"] for v in plan["variants"]) + plan["totals"]["working_files"]


def test_model_override_replaces_the_source(tmp_path, write_recipe, capsys):
    data = tiny_recipe(tmp_path / "not-here", gptq=GOOD_GPTQ)
    code, out, _ = run_cli(capsys, "plan", write_recipe(data), "--model", model_folder(tmp_path), "--json")
    assert code == 0 and json.loads(out)["source"]["path"].endswith("model")


def test_release_rejects_unknown_format_before_work(tmp_path, write_recipe, capsys):
    data = tiny_recipe(model_folder(tmp_path), gptq=GOOD_GPTQ)
    code, _, err = run_cli(capsys, "release", write_recipe(data), "--only", "exl2", "--no-publish",
                           "--out", tmp_path / "out")
    assert code == 2 and "--only: unknown format 'exl2'" in err
    assert not (tmp_path / "out").exists()


def test_release_dry_run_is_the_plan(tmp_path, write_recipe, capsys):
    data = tiny_recipe(model_folder(tmp_path), gptq=GOOD_GPTQ, gguf={"types": ["Q8_0"]})
    code, out, _ = run_cli(capsys, "release", write_recipe(data), "--dry-run", "--json", "--only", "gguf")
    assert code == 0 and [v["id"] for v in json.loads(out)["variants"]] == ["gguf/Q8_0"]


def test_hub_source_offline_plans_without_sizes(tmp_path, write_recipe, capsys):
    data = tiny_recipe(tmp_path, gptq=GOOD_GPTQ)
    data["source"] = {"hub": "nobody/unreachable-model", "name": "Unreachable"}
    code, out, err = run_cli(capsys, "plan", write_recipe(data), "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["variants"][0]["estimated_bytes"] is None
    assert "planning without size estimates" in " ".join(plan["warnings"])


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_plans(recipe, fair_smollm2_folder, capsys):
    code, out, err = run_cli(capsys, "plan", recipe)
    assert code == 0, err
    assert "variant(s)" in out


def test_doctor_reports_tools_and_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTIZE_LLAMA_CPP", str(tmp_path / "no-llama-here"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, out, _ = run_cli(capsys, "doctor", "--json")
    facts = json.loads(out)
    assert code == 1
    assert {lib["name"] for lib in facts["libraries"]} >= {"torch", "transformers", "gptqmodel", "huggingface_hub"}
    assert facts["llama_cpp"]["found"] is False
    assert any(problem.startswith("llama.cpp:") for problem in facts["problems"])
    assert facts["hub"]["token"] == "missing"  # no HF_TOKEN, no stored login
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert json.loads(run_cli(capsys, "doctor", "--json")[1])["hub"]["token"] == "found"
