"""Memory bounded by design: the plan's per-stage peak memory, the refusal before work when a stage
can't fit, and streaming layers from disk (compute.offload: disk) giving the same GPTQ files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantize import api, memory
from quantize.cli import main
from quantize.engines.gptqmodel.hessians import MAX_SOLVE_THREADS, solve_threads
from quantize.formats.gptq import plan_hessian

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
    shapes = memory.shapes(facts)
    quantize = stages["gptq/main: quantize"]
    parts = dict(quantize.parts)  # GPTQModel's lazy loader: one layer at a time in float32, finished ones packed
    embeddings = shapes.vocab * shapes.hidden  # read in the source's fp16
    assert parts["embeddings"] == embeddings * 2 and parts["head, norms"] == (shapes.other_params - embeddings) * 4
    assert parts["two layers"] == 2 * shapes.layer_params * 4
    assert 0 < parts["packed layers"] < shapes.linear_params * 2
    reference = dict(stages["fp16_reference"].parts)  # the model in its own fp16, one layer at a time in float32
    assert reference["model"] == facts.param_count * 2 and reference["one layer"] == shapes.layer_params * 4
    assert quantize.bytes == sum(size for _, size in quantize.parts) > memory.RUNTIME_BYTES
    assert stages["gguf/Q4_K_M: quantize"].mapped and not quantize.mapped
    assert plan.peak_memory().stage == max((m for m in stages.values() if not m.mapped), key=lambda m: m.bytes).stage

    code, out, _ = run_cli(capsys, "plan", recipe, "--json")
    listed = json.loads(out)["memory"]
    assert code == 0 and listed["offload"] == "none"
    assert {s["stage"]: s["bytes"] for s in listed["stages"]} == {k: v.bytes for k, v in stages.items()}
    code, out, _ = run_cli(capsys, "plan", recipe)
    assert code == 0 and "memory: ~" in out and "gptq/main: quantize" in out



def test_awq_plans_several_samples_per_forward(tiny_model, write_recipe):
    """AWQ's loop and scale search run FORWARD_TOKENS of samples per forward, GPTQ's loop one sample."""
    from quantize.engines.gptqmodel.setup import samples_per_forward

    data = tiny_recipe(tiny_model, gptq=[{"bits": 4, "group_size": 128, "hessian": "sequential"}],
                       awq=[{"bits": 4, "group_size": 128}], compute={"device": "cpu"})
    plan = api.plan(write_recipe(data))
    stages, s = stages_of(plan), memory.shapes(plan.source.facts)
    samples, seq_len = data["calibration"]["samples"], data["calibration"]["seq_len"]
    forward_samples = min(samples, samples_per_forward(seq_len))
    assert forward_samples > 1
    for fmt, per_forward in (("gptq", 1), ("awq", forward_samples)):
        planned = dict(stages[f"{fmt}/main: quantize"].parts)["calibration activations"]
        # every sample's layer input and output, and the MLP intermediates of one forward's samples, float32
        assert planned == (2 * samples * seq_len * s.hidden + 3 * per_forward * seq_len * s.intermediate) * 4


def test_streaming_plans_one_layer_resident(tiny_model, write_recipe, capsys):
    recipe = write_recipe(tiny_recipe(tiny_model, **GPTQ_AND_GGUF, compute={"device": "cpu"}))
    held, streamed = stages_of(api.plan(recipe)), stages_of(api.plan(recipe, offload="disk"))
    shapes = memory.shapes(api.plan(recipe).source.facts)
    assert streamed["gptq/main: quantize"].bytes < held["gptq/main: quantize"].bytes  # no packed layers kept
    assert "packed layers" not in dict(streamed["gptq/main: quantize"].parts)
    reference = dict(streamed["fp16_reference"].parts)
    assert reference == {"runtime": memory.RUNTIME_BYTES, "embeddings, head": shapes.other_params * 2,
                         "one layer": shapes.layer_params * 4, **{k: v for k, v in reference.items()
                                                                  if k in ("logits", "activations")}}
    verify = dict(streamed["gptq/main: verify"].parts)  # mapped, each layer paged out after use
    assert "model (packed)" in dict(held["gptq/main: verify"].parts) and "model (packed)" not in verify
    assert verify["embeddings, head"] == shapes.other_params * 2 and verify["one layer"] == shapes.layer_params * 4
    assert 0 < verify["one packed layer"] < shapes.layer_params
    assert streamed["gptq/main: verify"].bytes < held["gptq/main: verify"].bytes
    code, out, _ = run_cli(capsys, "plan", recipe, "--offload", "disk", "--json")
    assert code == 0 and json.loads(out)["memory"]["offload"] == "disk"
    code, _, err = run_cli(capsys, "plan", recipe, "--offload", "ram")
    assert code == 2 and "--offload" in err


def test_shared_hessians_plan_one_layer_resident(tiny_model, write_recipe, capsys):
    """The shared capture and each solve stream the model like GPTQModel's loop: no stage holds the
    whole model in the compute dtype, nor every Hessian; with offload: disk no packed layers either."""
    data = tiny_recipe(tiny_model, gptq=[{"bits": 4, "group_size": 128, "hessian": "shared"}], compute={"device": "cpu"})
    recipe = write_recipe(data)
    held, streamed = stages_of(api.plan(recipe)), stages_of(api.plan(recipe, offload="disk"))
    shapes = memory.shapes(api.plan(recipe).source.facts)
    hessians = 2 * (3 * 256 ** 2 + 512 ** 2) * 4  # the tiny model's two layers
    for stages in (held, streamed):
        capture, solve = dict(stages["gptq_hessians_128"].parts), dict(stages["gptq/main: quantize"].parts)
        assert capture["one layer"] == solve["one layer"] == shapes.layer_params * 4
        assert capture["layer Hessians"] == solve["layer Hessians"] == hessians // 2
        assert capture["embeddings"] == shapes.vocab * shapes.hidden * 2 and "model" not in capture | solve
    assert 0 < dict(held["gptq/main: quantize"].parts)["packed layers"] < shapes.linear_params * 2
    concurrent = solve_threads("cpu", MAX_SOLVE_THREADS)  # the plan is the same on any machine
    assert dict(held["gptq/main: quantize"].parts)["layer solve"] == memory.layer_solve(shapes, concurrent)
    assert "packed layers" not in dict(streamed["gptq/main: quantize"].parts)
    data["compute"]["offload"] = "disk"
    code, out, _ = run_cli(capsys, "plan", write_recipe(data, "streamed.yaml"), "--json")
    assert code == 0 and json.loads(out)["memory"]["offload"] == "disk"


def test_batched_hessians_plan_every_windows_activations_at_once(tiny_model, write_recipe):
    """hessian: batched runs every calibration window through a layer in one forward: the plan counts all
    their MLP intermediates, where GPTQModel's loop (one window per forward) counts one window's."""
    gptq = [{"bits": 4, "group_size": 128, "hessian": "batched"},
            {"bits": 4, "group_size": 128, "act_order": False, "hessian": "sequential"}]
    plan = api.plan(write_recipe(tiny_recipe(tiny_model, gptq=gptq, compute={"device": "cpu"})))
    stages, shapes = stages_of(plan), memory.shapes(plan.source.facts)
    batched = dict(stages["gptq/main: quantize"].parts)
    sequential = dict(stages["gptq/gptq-4bit-128g-actorder_False: quantize"].parts)
    assert batched["calibration activations"] == memory.activations(shapes, 8, 128, 4, forward_samples=8)
    assert sequential["calibration activations"] == memory.activations(shapes, 8, 128, 4)
    assert batched["calibration activations"] > sequential["calibration activations"]
    assert not [a for a in plan.artifacts if a.startswith("gptq_hessians")]  # no shared pass


def test_hessian_auto_runs_batched_where_its_memory_fits_else_gptqmodels_loop(tiny_model, write_recipe, tmp_path,
                                                                             capsys, monkeypatch):
    """The default, hessian: auto, is resolved by the plan: batched (GPTQModel's loop's files, one forward per
    layer) where its peak fits the memory available, else sequential; the plan shows, counts and checks the
    mode that will run, so a release it can't run batched runs the loop instead of being refused."""
    data = tiny_recipe(tiny_model, calibration={"samples": 64, "seq_len": 512}, gptq=[{"bits": 4, "group_size": 128}],
                       compute={"device": "cpu"})
    recipe = write_recipe(data)
    batched = stages_of(api.plan(write_recipe({**data, "gptq": [{**data["gptq"][0], "hessian": "batched"}]},
                                              "batched.yaml")))["gptq/main: quantize"]
    for available, mode in ((batched.bytes, "batched"), (batched.bytes - 1, "sequential")):
        monkeypatch.setattr(memory, "available_memory", lambda: available)
        plan = api.plan(recipe)
        assert plan.variants[0].spec.hessian == mode
        code, out, err = run_cli(capsys, "release", recipe, "--out", tmp_path / "out", "--no-publish", "--dry-run")
        assert code == 0 and f"{mode} hessian" in out, err


def test_hessian_auto_keeps_gptqmodels_loop_where_batched_was_not_checked():
    peak = memory.StageMemory("gptq/main: quantize", 10 ** 9)
    llama = {"model_type": "llama", "hidden_size": 4096}
    assert plan_hessian(peak, 2 * 10 ** 9, False, llama) == "batched"
    assert plan_hessian(peak, 2 * 10 ** 9, True, llama) == "sequential"  # a GPU: not run there yet
    assert plan_hessian(peak, 2 * 10 ** 9, False, {**llama, "num_local_experts": 8}) == "sequential"
    assert plan_hessian(peak, 2 * 10 ** 9, False, {"text_config": {"n_routed_experts": 64}}) == "sequential"
    assert plan_hessian(None, 2 * 10 ** 9, False, llama) == "sequential"  # shapes unknown


def test_concurrent_solves_count_each_groups_work():
    s = memory.Shapes(params=6_738_415_616, linear_params=6_476_005_376, layers=32, hidden=4096,
                      intermediate=11008, vocab=32000, widest_input=11008)  # Llama-2-7B
    one, two, four = (memory.layer_solve(s, n) for n in (1, 2, 4))
    # the whole layer's float32 weights x3 instead of half of them, and a 4096-wide H and inverse per extra solve
    assert two - one == 3 * s.layer_params * 4 // 2 + 2 * 4096 ** 2 * 4
    assert four - two == 2 * 2 * 4096 ** 2 * 4
    assert solve_threads("cpu", 2) == 2 and solve_threads("cpu", 64) == 4 and solve_threads("cuda:0", 64) == 1


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


def test_a_batched_stage_that_does_not_fit_names_the_mode_that_does(tiny_model, write_recipe, tmp_path, capsys,
                                                                    monkeypatch):
    """Offloading layers to disk does not shrink hessian: batched's activations: the one-line refusal
    points to hessian: sequential instead."""
    recipe = write_recipe(tiny_recipe(tiny_model, calibration={"samples": 64, "seq_len": 512},
                                      gptq=[{"bits": 4, "group_size": 128, "hessian": "batched"}],
                                      compute={"device": "cpu", "offload": "disk"}))
    peak = api.plan(recipe).peak_memory()
    assert peak.stage == "gptq/main: quantize"
    monkeypatch.setattr(memory, "available_memory", lambda: peak.bytes - 1)
    code, _, err = run_cli(capsys, "release", recipe, "--out", tmp_path / "out", "--no-publish", "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "gptq/main: quantize needs" in err and "use hessian: sequential" in err and "offload" not in err


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
    with pytest.raises(api.BadInput, match="(gptq/main: (quantize|verify)|fp16_reference) needs"):
        memory.check_resources(plan, tmp_path, pending=["gptq/main"])
    with pytest.raises(api.BadInput, match="fp16_reference needs"):  # GGUF is scored against the fp16 reference
        memory.check_resources(plan, tmp_path, pending=["gguf/Q4_K_M"])
    monkeypatch.setattr(memory, "available_memory", lambda: 10 ** 15)
    with pytest.raises(api.BadInput, match="of disk"):  # llama.cpp's own stages are memory-mapped: only disk
        memory.check_resources(plan, tmp_path, pending=["gguf/Q4_K_M"])


def test_streamed_fp16_reference_matches_the_resident_one(tiny_model, tmp_path):
    import torch

    from quantize.evaluate import load_fp16_model, reference_rows

    windows = [[(7 * i + 3 * j) % 4000 + 10 for j in range(64)] for i in range(2)]

    def window_nlls(model) -> list[float]:
        nll: list[float] = []
        for _ in reference_rows(model, windows, None, nll):
            pass
        return nll

    held = window_nlls(load_fp16_model(tiny_model))
    streamed_model = load_fp16_model(tiny_model, offload_folder=tmp_path / "offload", stored=torch.float16)
    assert any(p.device.type == "meta" for p in streamed_model.model.layers.parameters())  # layers not in memory
    assert streamed_model.get_input_embeddings().weight.dtype == torch.float16
    assert window_nlls(streamed_model) == held  # each layer read in fp16 and computed in float32: the same numbers


def test_layer_by_layer_computes_what_the_float32_model_computes(tiny_model):
    """The fp16 model held in fp16, each layer cast to float32 for its forward pass: the same numbers
    as the whole model loaded in float32, and afterwards every layer is fp16 again."""
    import torch

    from quantize.evaluate import decoder_layers, load_fp16_model, window_logits

    ids = [(13 * j) % 4000 + 10 for j in range(96)]
    whole = window_logits(load_fp16_model(tiny_model, dtype=torch.float32), ids)
    model = load_fp16_model(tiny_model, dtype=torch.float32, stored=torch.float16)
    assert torch.equal(window_logits(model, ids), whole)
    assert {p.dtype for p in decoder_layers(model)[1].parameters()} == {torch.float16}
    assert model.get_input_embeddings().weight.dtype == torch.float16


def test_rewriting_safetensors_casts_one_tensor_at_a_time(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from quantize.engines.gptqmodel.folder import cast_unquantized_tensors, rewrite_safetensors

    tensors = {"embed.weight": torch.randn(3, 5), "q.scales": torch.randn(7), "q.qweight": torch.randint(0, 99, (4, 4), dtype=torch.int32),
               "q.g_idx": torch.arange(5, dtype=torch.int32), "scalar": torch.tensor(2.5), "empty": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cast_unquantized_tensors(tmp_path, "bfloat16")
    out = load_file(str(tmp_path / "model.safetensors"))
    assert set(out) == set(tensors)
    assert torch.equal(out["embed.weight"], tensors["embed.weight"].to(torch.bfloat16))
    assert torch.equal(out["q.scales"], tensors["q.scales"].half())  # scales are fp16 whatever the source
    assert torch.equal(out["q.qweight"], tensors["q.qweight"]) and torch.equal(out["q.g_idx"], tensors["q.g_idx"])
    assert out["scalar"].item() == 2.5 and out["empty"].shape == (0,) and out["empty"].dtype == torch.bfloat16
    before = (tmp_path / "model.safetensors").stat().st_mtime_ns
    assert not rewrite_safetensors(tmp_path / "model.safetensors", lambda name, dtype: out[name].dtype, {"format": "pt"})
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns == before  # nothing to change: not rewritten


def quantize_tiny(model_dir, target, fmt: str, offload_folder=None, keep_in_memory=False):
    """A GPTQ or AWQ permutation of the tiny model as a release makes it; returns the folder and the
    dtypes of the embeddings' weight and of the first layer's input in the calibration forward."""
    from quantize.engines.gptqmodel.folder import save_model
    from quantize.engines.gptqmodel.setup import load_unquantized, quantize_in_loop
    from quantize.engines.gptqmodel.weights import calibration_batch
    from quantize.formats.awq import AWQ, AWQVariant
    from quantize.formats.gptq import GPTQ, GPTQVariant

    weight_format, spec = ((GPTQ, GPTQVariant(bits=4, group_size=128, act_order=True)) if fmt == "gptq"
                           else (AWQ, AWQVariant(bits=4, group_size=128)))
    model = load_unquantized(model_dir, "float32", weight_format.quantize_config(spec, None, offload_folder))
    if keep_in_memory:  # read lazily, finished layers kept (what offload: none does)
        model.quantize_config.offload_to_disk = False
    seen = []
    embeddings, first_layer = model.model.get_input_embeddings(), model.model.model.layers[0]

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((embeddings.weight.dtype, hidden.dtype))

    first_layer.register_forward_pre_hook(record, with_kwargs=True)
    windows = [[(31 * i + 17 * j) % 40000 + 100 for j in range(128)] for i in range(4)]
    with weight_format.quantizing(spec):
        quantize_in_loop(model, calibration_batch(windows), weight_format.backend_for(None), model_dir)
    save_model(model, target, model_dir, "float16")
    return target, set(seen)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_streaming_gives_the_same_weights(tiny_model, tmp_path, fmt):
    """Streaming changes where the layers wait, not the computation: the saved tensors are identical
    whether the model is loaded whole, read a layer at a time and kept, or read and written back to disk.
    Read lazily, the embeddings stay fp16 (half the float32 size) and pass float32 on; every file keeps
    the source's own fp16 embeddings, and AWQ's scaled norms keep their new values."""
    import torch
    from safetensors.torch import load_file

    whole, whole_seen = quantize_tiny(tiny_model, tmp_path / "whole", fmt)
    lazy, lazy_seen = quantize_tiny(tiny_model, tmp_path / "lazy", fmt, tmp_path / "offload-lazy", keep_in_memory=True)
    streamed, streamed_seen = quantize_tiny(tiny_model, tmp_path / "streamed", fmt, tmp_path / "offload")
    assert whole_seen == {(torch.float32, torch.float32)}
    assert lazy_seen == streamed_seen == {(torch.float16, torch.float32)}
    assert not any((tmp_path / "offload-lazy").rglob("*.safetensors"))  # nothing went to disk
    a = load_file(str(next(whole.glob("*.safetensors"))))
    assert any(name.endswith("qweight") for name in a)
    source = load_file(str(next(tiny_model.glob("*.safetensors"))))
    assert a["model.embed_tokens.weight"].dtype == torch.float16
    assert torch.equal(a["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    norms = [name for name in a if name.endswith("layernorm.weight")]
    assert norms and all(a[name].dtype == torch.float16 for name in norms)
    changed = sum(not torch.equal(a[name], source[name]) for name in norms)
    assert changed == (len(norms) if fmt == "awq" else 0)  # AWQ scales the norms in front of what it quantizes
    for folder in (lazy, streamed):
        b = load_file(str(next(folder.glob("*.safetensors"))))
        assert set(a) == set(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and bool((a[name] == b[name]).all()), (folder.name, name)


def mapped_rss(path: Path) -> int:
    """This process's resident bytes of the memory mappings of one file (/proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            current = len(fields) == 6 and Path(fields[5]) == path
        elif current and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc")
def test_paging_out_each_layer_after_use_keeps_the_mapped_model_out_of_memory(tiny_model, tmp_path):
    """transformers maps the checkpoint; every page a forward pass touches stays resident, unless each
    layer's pages (and the head's) are paged out after use. The numbers stay the same."""
    import shutil

    import torch

    from quantize.evaluate import load_fp16_model, page_out_after_use, window_logits

    # a copy no other test has mapped: the kernel pages out only pages this one mapping holds
    tiny_model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    checkpoint = next(tiny_model.glob("*.safetensors")).resolve()
    ids = [(13 * j) % 4000 + 10 for j in range(96)]
    streamed = page_out_after_use(load_fp16_model(tiny_model, dtype=torch.float32, stored=torch.float16))
    logits = window_logits(streamed, ids)
    assert mapped_rss(checkpoint) < 0.1 * checkpoint.stat().st_size
    kept = load_fp16_model(tiny_model, dtype=torch.float32, stored=torch.float16)
    assert torch.equal(window_logits(kept, ids), logits)
    assert mapped_rss(checkpoint) > 0.8 * checkpoint.stat().st_size  # without: the file stays resident


HEAP_PROBE = """
import sys, torch
from quantize.memory import bound_heap
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
if sys.argv[1] == "bound":
    bound_heap()
torch.ones(2**20).sum()  # torch's threads and their stacks start before the measurement
before = rss()
freed = torch.ones(20 * 2**20 // 4); del freed  # a mapped block freed: glibc raises its threshold to 20 MB
layer = torch.ones(16 * 2**20 // 4); above = torch.ones(2**18); del layer  # a layer, then a tensor after it
print(rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_freed_layers_go_back_to_the_system_with_the_heap_bounded():
    """Without bound_heap, a 16 MB tensor freed after glibc raised its mmap threshold stays in the
    process (the heap can't shrink past the tensor allocated after it); with it, it is unmapped."""
    grown = {mode: int(subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True,
                                      check=True).stdout) for mode in ("bound", "plain")}
    assert grown["plain"] > 12 * 2**20, grown  # the probe shows the problem (measured 18-25 MB)
    assert grown["plain"] - grown["bound"] > 12 * 2**20, grown  # the 16 MB went back (bound: 2.5-8 MB measured)


def test_a_quantized_model_is_freed_although_gptqmodel_still_refers_to_it(tiny_model, tmp_path):
    import gc
    import weakref

    from gptqmodel.nn_modules.hooked_linear import STOP_FORWARD_EXCEPTION

    from quantize.engines.gptqmodel.setup import load_unquantized, release_model
    from quantize.engines.gptqmodel.weights import calibration_batch
    from quantize.formats.gptq import GPTQ, GPTQVariant

    spec = GPTQVariant(bits=4, group_size=128)
    model = load_unquantized(tiny_model, "float32", GPTQ.quantize_config(spec, None, tmp_path / "offload"))
    model.quantize_config.offload_to_disk = False
    model.quantize(calibration_batch([[(7 * j) % 4000 + 10 for j in range(128)] for _ in range(2)]), batch_size=1,
                   backend=GPTQ.backend_for(None))
    held = weakref.ref(model.model)
    assert STOP_FORWARD_EXCEPTION.__traceback__ is not None  # what keeps the model: the problem is still there
    release_model(model)
    assert STOP_FORWARD_EXCEPTION.__traceback__ is None
    assert {t.device.type for t in (*model.model.parameters(), *model.model.buffers())} == {"meta"}
    del model
    gc.collect()
    if held() is not None:  # GPTQModel's pool may still hold it: then only as an empty shell
        assert all(t.device.type == "meta" for t in held().parameters())
