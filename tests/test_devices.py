"""Devices: the pure selection logic with injected facts (no GPU needed), the recipe key, the CLI
flag, and which keys the compute dtype enters."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from quantize import devices
from quantize.cli import main
from quantize.devices import Device, resolve
from quantize.errors import BadInput
from quantize.evaluate import EVAL_DTYPE, FP16Reference
from quantize.formats.base import artifact_tree
from quantize.stages import content_key
from quantize.engines.gptqmodel.hessians import GPTQHessians
from quantize.plan import build_plan
from quantize.recipe import load_recipe, parse_recipe, with_device
from quantize.source import inspect_source

from .conftest import tiny_recipe


# --- resolve: every branch, facts injected ---------------------------------------------------------

def test_auto_without_cuda_is_the_cpu_in_float32():
    assert resolve("auto", False, 0) == Device("cpu", "float32", "float32", "auto")


def test_auto_with_cuda_is_the_first_gpu_in_float16():
    assert resolve("auto", True, 2) == Device("cuda:0", "float16", "float16", "auto")


def test_auto_with_cuda_available_but_no_device_is_the_cpu():
    assert resolve("auto", True, 0).name == "cpu"


def test_cpu_is_the_cpu_even_with_a_gpu():
    assert resolve("cpu", True, 1).name == "cpu"


def test_cpu_with_native_bf16_evaluates_in_bf16_and_quantizes_bf16_sources_in_bf16():
    assert resolve("cpu", False, 0, "float16", cpu_has_native_bf16=True) == Device("cpu", "float32", "bfloat16", "cpu")
    assert resolve("cpu", False, 0, "bfloat16", cpu_has_native_bf16=True) == Device("cpu", "bfloat16", "bfloat16", "cpu")


def test_cpu_without_native_bf16_keeps_float32_for_a_bf16_source():
    assert resolve("cpu", False, 0, "bfloat16") == Device("cpu", "float32", "float32", "cpu")


@pytest.mark.parametrize("requested, name", [("cuda", "cuda:0"), ("cuda:0", "cuda:0"), ("cuda:1", "cuda:1")])
def test_a_named_gpu(requested, name):
    assert resolve(requested, True, 2).name == name


def test_gpu_bf16_only_for_a_bf16_source_on_a_gpu_that_supports_it():
    assert resolve("cuda", True, 1, "bfloat16", gpu_supports_bf16=True).compute_dtype == "bfloat16"
    assert resolve("cuda", True, 1, "bfloat16", gpu_supports_bf16=True).eval_dtype == "bfloat16"
    assert resolve("cuda", True, 1, "bfloat16", gpu_supports_bf16=False).compute_dtype == "float16"
    assert resolve("cuda", True, 1, "float16", gpu_supports_bf16=True).compute_dtype == "float16"


def test_a_gpu_index_beyond_the_machine_is_refused_naming_the_count():
    with pytest.raises(BadInput, match=r"cuda:3 asked for, but this machine has 1 CUDA device\(s\) \(cuda:0 to cuda:0\)"):
        resolve("cuda:3", True, 1)


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(requested):
    with pytest.raises(BadInput, match="CUDA is not available here"):
        resolve(requested, False, 0)


@pytest.mark.parametrize("requested", ["tpu", "gpu", "cuda:", "cuda:x", "CPU", "", "cuda:0 "])
def test_an_unknown_device_name_is_refused(requested):
    with pytest.raises(BadInput, match="must be auto, cpu, cuda or cuda:N"):
        resolve(requested, True, 8)


def test_without_strict_a_missing_device_is_kept_with_its_problem():
    device = resolve("cuda:1", False, 0, strict=False)
    assert device.name == "cuda:1" and device.compute_dtype == "float16"
    assert "CUDA is not available" in device.problem
    assert resolve("cpu", False, 0, strict=False).problem is None


def test_device_records_what_manifests_measure():
    device = resolve("cuda", True, 1)
    assert device.is_cuda and not resolve("cpu", False, 0).is_cuda
    assert device.measured() == {"device": "cuda:0", "quantize_dtype": "float16", "eval_dtype": "float16"}


def test_detect_on_this_machine_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.detect("auto").name == "cpu"
    with pytest.raises(BadInput):
        devices.detect("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.detect("auto", "bfloat16") == Device("cuda:0", "bfloat16", "bfloat16", "auto")
    with pytest.raises(BadInput, match="has 1 CUDA device"):
        devices.detect("cuda:3")


@pytest.mark.parametrize("config, dtype", [({"torch_dtype": "bfloat16"}, "bfloat16"), ({"dtype": "float16"}, "float16"),
                                           ({"torch_dtype": "float32"}, "float16"), ({}, "float16"), (None, "float16")])
def test_source_dtype(config, dtype):
    assert devices.source_dtype(config) == dtype


# --- the recipe and the CLI ------------------------------------------------------------------------

def test_recipe_compute_device_is_validated(tiny_model, tmp_path):
    data = tiny_recipe(tiny_model, gptq=[{"bits": 4}])
    assert parse_recipe(data, tmp_path).compute.device == "auto"
    assert parse_recipe({**data, "compute": {"device": "cuda:1"}}, tmp_path).compute.device == "cuda:1"
    with pytest.raises(BadInput, match=r"compute\.device: must be auto, cpu, cuda or cuda:N \(got 'tpu'\)"):
        parse_recipe({**data, "compute": {"device": "tpu"}}, tmp_path)
    with pytest.raises(BadInput, match=r"compute\.gpus: unknown key"):
        parse_recipe({**data, "compute": {"gpus": 2}}, tmp_path)


def test_device_flag_overrides_the_recipe(tiny_model, tmp_path):
    recipe = parse_recipe({**tiny_recipe(tiny_model, gptq=[{"bits": 4}]), "compute": {"device": "cuda"}}, tmp_path)
    assert with_device(recipe, "cpu").compute.device == "cpu"
    with pytest.raises(BadInput, match="--device: must be auto, cpu, cuda or cuda:N"):
        with_device(recipe, "tpu")


@pytest.mark.parametrize("flag", ["cuda:3", "tpu", "cuda"])
def test_a_bad_device_is_one_line_exit_2_before_any_work(recording, release_recipe, tmp_path, capsys, monkeypatch, flag):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(["release", str(release_recipe), "--out", str(out), "--device", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and flag in err
    assert recording.calls == [] and not out.exists()


def test_a_recipe_device_this_machine_lacks_is_refused_but_still_planned(recording, release_recipe, tmp_path, capsys,
                                                                       monkeypatch):
    import torch
    import yaml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = yaml.safe_load(release_recipe.read_text())
    data["compute"] = {"device": "cuda:1"}
    release_recipe.write_text(yaml.safe_dump(data))
    assert main(["plan", str(release_recipe), "--json"]) == 0  # a plan made here for a GPU machine
    planned = json.loads(capsys.readouterr().out)["device"]
    assert planned["name"] == "cuda:1" and "CUDA is not available" in planned["problem"]
    assert main(["release", str(release_recipe), "--out", str(tmp_path / "out")]) == 2
    assert "cuda:1 asked for, but CUDA is not available" in capsys.readouterr().err
    assert main(["release", str(release_recipe), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-publish"]) == 0
    assert recording.calls


# --- keys: the compute dtype, not the device's name, and float32 keeps today's keys ----------------

def _plan(tiny_model, write_recipe, **compute):
    data = tiny_recipe(tiny_model, gptq=[{"bits": 4, "hessian": "shared"}], awq=[{"bits": 4}])
    if compute:
        data["compute"] = compute
    return build_plan(load_recipe(write_recipe(data)), inspect_source(load_recipe(write_recipe(data))))


def test_cpu_float32_keeps_the_keys_of_a_plan_without_a_device(tiny_model, write_recipe):
    plan = _plan(tiny_model, write_recipe, device="cpu")
    for variant in plan.variants:
        assert variant.device.compute_dtype == "float32"
        assert variant.digest == replace(variant, device=None).digest
        calibration = {k: v for k, v in variant.calibration_summary.items() if k != "path"}
        assert variant.digest == content_key(variant.format, variant.params, calibration, variant.source_identity,
                                             [artifact_tree(a) for a in variant.needs])  # the formula of before
    reference = next(a for a in plan.artifacts.values() if isinstance(a, FP16Reference))
    hessians = next(a for a in plan.artifacts.values() if isinstance(a, GPTQHessians))
    assert hessians.inputs()["dtype"] == "float32"
    assert reference.inputs()["dtype"] == f"torch.{plan.device.eval_dtype}" == str(EVAL_DTYPE)  # as before
    assert plan.to_dict()["device"]["compute_dtype"] == "float32"


def test_the_compute_dtype_changes_the_keys_and_the_device_name_does_not(tiny_model, write_recipe):
    plan = _plan(tiny_model, write_recipe, device="cpu")
    variant = plan.variants[0]
    same_dtype = replace(variant, device=Device("cuda:1", "float32", "float32"))
    half = replace(variant, device=Device("cuda:0", "float16", "float16"))
    assert same_dtype.digest == variant.digest
    assert half.digest != variant.digest
    reference = next(a for a in plan.artifacts.values() if isinstance(a, FP16Reference))
    assert replace(reference, eval_dtype="float16", device="cuda:0").inputs() != reference.inputs()
    assert replace(reference, device="cuda:3").inputs() == reference.inputs()
    hessians = next(a for a in plan.artifacts.values() if isinstance(a, GPTQHessians))
    assert GPTQHessians(hessians.windows, hessians.source_identity, 0, "float16", "cuda:0").inputs()["dtype"] == "float16"
    assert GPTQHessians(hessians.windows, hessians.source_identity, 0, "float32", "cuda:0").inputs() == hessians.inputs()
