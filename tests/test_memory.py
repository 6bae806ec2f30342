"""Memory bounded by design: the plan's per-stage peak memory, the refusal before work when a stage
can't fit, and streaming layers from disk (compute.offload: disk) giving the same GPTQ files."""

from __future__ import annotations

import json

import pytest

from quantize import api, memory
from quantize.cli import main

from .conftest import tiny_recipe

GPTQ_AND_GGUF = {"gptq": [{"bits": 4, "group_size": 128}], "gguf": {"types": ["Q4_K_M"]}}


@pytest.fixture(autouse=True)
def resource_check_on(monkeypatch):
    monkeypatch.delenv(memory.SKIP_CHECK_ENV, raising=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stages_of(plan) -> dict[str, memory.StageMemory]:
    return {m.stage: m for m in plan.memory()}


def test_plan_shows_the_peak_memory_of_every_stage(tiny_model, write_recipe, capsys):
    recipe = write_recipe(tiny_recipe(tiny_model, **GPTQ_AND_GGUF, compute={"device": "cpu"}))
    plan = api.plan(recipe)
    stages = stages_of(plan)
    assert set(stages) == {"fp16_reference", "gptq/main: quantize", "gptq/main: verify", "gguf_convert",
                           "gguf_reference", "gguf/Q4_K_M: quantize", "gguf/Q4_K_M: perplexity"}
    facts = plan.source.facts
    quantize = stages["gptq/main: quantize"]
    assert dict(quantize.parts)["model"] == facts.param_count * 4  # the whole model in float32 on a CPU
    assert quantize.bytes == sum(size for _, size in quantize.parts) > memory.RUNTIME_BYTES
    assert stages["gguf/Q4_K_M: quantize"].mapped and not quantize.mapped
    assert plan.peak_memory().stage == max((m for m in stages.values() if not m.mapped), key=lambda m: m.bytes).stage

    code, out, _ = run_cli(capsys, "plan", recipe, "--json")
    listed = json.loads(out)["memory"]
    assert code == 0 and listed["offload"] == "none"
    assert {s["stage"]: s["bytes"] for s in listed["stages"]} == {k: v.bytes for k, v in stages.items()}
    code, out, _ = run_cli(capsys, "plan", recipe)
    assert code == 0 and "memory: ~" in out and "gptq/main: quantize" in out


def test_streaming_plans_one_layer_resident(tiny_model, write_recipe, capsys):
    recipe = write_recipe(tiny_recipe(tiny_model, **GPTQ_AND_GGUF, compute={"device": "cpu"}))
    held, streamed = stages_of(api.plan(recipe)), stages_of(api.plan(recipe, offload="disk"))
    shapes = memory.shapes(api.plan(recipe).source.facts)
    for name in ("gptq/main: quantize", "fp16_reference"):  # two layers resident at most: all of this tiny model's
        assert streamed[name].bytes <= held[name].bytes, name
    assert streamed["gptq/main: verify"].bytes < held["gptq/main: verify"].bytes
    assert dict(streamed["gptq/main: quantize"].parts)["model"] == (shapes.other_params + 2 * shapes.layer_params) * 4
    assert "dense layers" not in dict(streamed["gptq/main: verify"].parts)
    code, out, _ = run_cli(capsys, "plan", recipe, "--offload", "disk", "--json")
    assert code == 0 and json.loads(out)["memory"]["offload"] == "disk"
    code, _, err = run_cli(capsys, "plan", recipe, "--offload", "ram")
    assert code == 2 and "--offload" in err


def test_shared_hessians_cannot_stream(tiny_model, write_recipe, capsys):
    recipe = write_recipe(tiny_recipe(tiny_model, gptq=[{"bits": 4, "group_size": 128, "hessian": "shared"}],
                                      compute={"offload": "disk"}))
    code, _, err = run_cli(capsys, "plan", recipe)
    assert code == 2 and "gptq[0].hessian: shared" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("offload, hint", [("none", "set compute.offload: disk"), ("disk", "free memory")])
def test_release_refuses_when_memory_is_short(tiny_model, write_recipe, tmp_path, capsys, monkeypatch,
                                              offload, hint):
    monkeypatch.setattr(memory, "available_memory", lambda: 200 * 1000 ** 2)
    recipe = write_recipe(tiny_recipe(tiny_model, **GPTQ_AND_GGUF, compute={"device": "cpu", "offload": offload}))
    out_dir = tmp_path / "out"
    for extra in ((), ("--dry-run",)):
        code, _, err = run_cli(capsys, "release", recipe, "--out", out_dir, "--no-publish", *extra)
        peak = api.plan(recipe).peak_memory()
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{peak.stage} needs ~{memory.gb(peak.bytes)} of memory, 0.20 GB available" in err and hint in err
        assert not out_dir.exists()
    monkeypatch.setenv(memory.SKIP_CHECK_ENV, "1")
    code, _, _ = run_cli(capsys, "release", recipe, "--out", out_dir, "--no-publish", "--dry-run")
    assert code == 0


def test_release_refuses_when_disk_is_short(tiny_model, write_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "free_disk", lambda folder: 1000 ** 2)
    recipe = write_recipe(tiny_recipe(tiny_model, **GPTQ_AND_GGUF))
    code, _, err = run_cli(capsys, "release", recipe, "--out", tmp_path / "out", "--no-publish")
    assert code == 2 and "of disk" in err and "0.00 GB free" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_finished_variants_and_cached_work_need_nothing(tiny_model, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 0)
    monkeypatch.setattr(memory, "free_disk", lambda folder: 0)
    plan = api.plan(write_recipe(tiny_recipe(tiny_model, **GPTQ_AND_GGUF)))
    memory.check_resources(plan, tmp_path, pending=[])  # nothing left to make: nothing to refuse
    with pytest.raises(api.BadInput, match="gptq/main: (quantize|verify) needs"):
        memory.check_resources(plan, tmp_path, pending=["gptq/main"])
    with pytest.raises(api.BadInput, match="fp16_reference needs"):  # GGUF is scored against the fp16 reference
        memory.check_resources(plan, tmp_path, pending=["gguf/Q4_K_M"])
    monkeypatch.setattr(memory, "available_memory", lambda: 10 ** 15)
    with pytest.raises(api.BadInput, match="of disk"):  # llama.cpp's own stages are memory-mapped: only disk
        memory.check_resources(plan, tmp_path, pending=["gguf/Q4_K_M"])


def test_streamed_fp16_reference_matches_the_resident_one(tiny_model, tmp_path):
    from quantize.evaluate import load_fp16_model, reference_rows

    windows = [[(7 * i + 3 * j) % 4000 + 10 for j in range(64)] for i in range(2)]

    def window_nlls(model) -> list[float]:
        nll: list[float] = []
        for _ in reference_rows(model, windows, None, nll):
            pass
        return nll

    held = window_nlls(load_fp16_model(tiny_model))
    streamed_model = load_fp16_model(tiny_model, offload_folder=tmp_path / "offload")
    assert any(p.device.type == "meta" for p in streamed_model.model.layers.parameters())  # layers not in memory
    assert window_nlls(streamed_model) == pytest.approx(held, rel=1e-6)


def quantize_tiny(model_dir, target, offload_folder=None):
    from quantize.engines.gptqmodel.setup import load_unquantized
    from quantize.engines.gptqmodel.weights import calibration_batch
    from quantize.formats.gptq import GPTQ, GPTQVariant

    spec = GPTQVariant(bits=4, group_size=128, act_order=True)
    model = load_unquantized(model_dir, "float32", GPTQ.quantize_config(spec, None, offload_folder))
    windows = [[(31 * i + 17 * j) % 40000 + 100 for j in range(128)] for i in range(4)]
    model.quantize(calibration_batch(windows), batch_size=1, backend=GPTQ.backend_for(None))
    model.save(str(target))
    return target


def test_streaming_gives_the_same_gptq_weights(tiny_model, tmp_path):
    """Streaming changes where the layers wait, not the computation: the packed tensors are identical."""
    from safetensors.torch import load_file

    held = quantize_tiny(tiny_model, tmp_path / "held")
    streamed = quantize_tiny(tiny_model, tmp_path / "streamed", tmp_path / "offload")
    a, b = (load_file(str(next(folder.glob("*.safetensors")))) for folder in (held, streamed))
    assert set(a) == set(b) and any(name.endswith("qweight") for name in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and bool((a[name] == b[name]).all()), name
