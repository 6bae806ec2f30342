"""Executors without a cluster: the task graph and its resources, the choice of executor, the
artifact lock that lets tasks in several processes share one store, and the once-only kill point."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quantize import executors
from quantize.cli import main
from quantize.errors import BadInput
from quantize.executors.graph import ARTIFACT, GIB, VARIANT, Resources, build_graph, unplaceable
from quantize.plan import build_plan
from quantize.recipe import load_recipe, with_device
from quantize.source import inspect_source
from quantize.stages import Artifact, ArtifactStore

from .conftest import REPO


def plan_of(recipe_path: Path, device: str | None = None):
    recipe = load_recipe(recipe_path)
    recipe = with_device(recipe, device) if device else recipe
    return build_plan(recipe, inspect_source(recipe))


def test_the_graph_runs_each_artifact_after_what_it_is_made_from_then_the_variants(release_recipe):
    plan = plan_of(release_recipe, "cpu")
    tasks = build_graph(plan, plan.variants)
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys))
    for index, task in enumerate(tasks):
        assert all(keys.index(need) < index for need in task.needs), task.key
    artifacts = [t.name for t in tasks if t.kind == ARTIFACT]
    assert artifacts == list(plan.artifacts)
    assert [t.name for t in tasks if t.kind == VARIANT] == [v.id for v in plan.variants]
    gguf = next(t for t in tasks if t.name == "gguf/Q4_K_M")
    assert set(gguf.needs) >= {"artifact:gguf_convert", "artifact:gguf_reference"}


def test_only_the_artifacts_of_pending_variants_are_tasks(release_recipe):
    plan = plan_of(release_recipe, "cpu")
    tasks = build_graph(plan, plan.of_format("gguf"))
    assert {t.name for t in tasks if t.kind == VARIANT} == {"gguf/Q4_K_M", "gguf/Q8_0"}
    assert not any(t.name.startswith("windows") for t in tasks)


def test_a_cuda_device_asks_one_gpu_for_what_computes_on_it_and_none_for_the_rest(release_recipe):
    plan = plan_of(release_recipe, "cuda")  # planned here without a GPU: the device's problem is kept
    resources = {t.name: t.resources for t in build_graph(plan, plan.variants, cpus=2)}
    assert resources["gptq/main"].gpus == 1 and resources["fp16_reference"].gpus == 1
    assert resources["gguf/Q4_K_M"].gpus == 0 and resources["gguf_convert"].gpus == 0
    assert resources["tokens"].gpus == 0
    assert all(r.cpus == 2 for r in resources.values())


def test_memory_comes_from_the_model_size(release_recipe):
    plan = plan_of(release_recipe, "cpu")
    params = plan.source.facts.param_count
    resources = {t.name: t.resources for t in build_graph(plan, plan.variants)}
    gptq = resources["gptq/main"].memory
    variant = next(v for v in plan.variants if v.id == "gptq/main")
    assert gptq == max(m.bytes for m in variant.memory) > params * 2  # the plan's peak for its stages
    assert resources["fp16_reference"].memory == plan.artifacts["fp16_reference"].memory().bytes
    convert = plan.artifacts["gguf_convert"].estimated_bytes()
    assert resources["gguf/Q8_0"].memory >= convert  # llama-quantize reads the F16 file
    assert resources["gguf/Q8_0"].memory < gptq


def test_a_task_no_node_can_take_is_named_with_what_is_missing():
    task = build_graph.__globals__["Task"]("variant:gptq/main", VARIANT, "gptq/main", (),
                                           Resources(cpus=1, gpus=1, memory=2 * GIB))
    cpu_only = [{"CPU": 4.0, "memory": 8.0 * GIB}]
    assert unplaceable([task], cpu_only) == [(task, "no node has 1 GPU")]
    small = [{"CPU": 4.0, "GPU": 1.0, "memory": 1.0 * GIB}]
    assert "2.0 GiB of memory" in unplaceable([task], small)[0][1]
    assert unplaceable([task], [{"CPU": 1.0, "GPU": 1.0, "memory": 4.0 * GIB}]) == []
    many = build_graph.__globals__["Task"]("artifact:x", ARTIFACT, "x", (), Resources(cpus=4))
    assert "no node has 4 CPUs (most: 1)" in unplaceable([many], [{"CPU": 1.0}])[0][1]


def test_resources_as_ray_options():
    assert Resources(cpus=2, gpus=1, memory=GIB).ray_options() == {"num_cpus": 2, "num_gpus": 1, "memory": GIB}
    assert Resources().ray_options() == {"num_cpus": 1, "num_gpus": 0}
    assert Resources(cpus=1, gpus=1, memory=3 * GIB // 2).describe() == "1 CPU, 1 GPU, 1.5 GiB"


def test_executor_choice_is_checked_before_work(monkeypatch):
    with pytest.raises(BadInput, match="unknown executor"):
        executors.make_executor("dask")
    with pytest.raises(BadInput, match="only with --executor ray"):
        executors.make_executor("local", address="ray://x:10001")
    assert executors.make_executor("local").name == "local"
    real = executors.importlib.util.find_spec
    monkeypatch.setattr(executors.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    with pytest.raises(BadInput, match=r"pip install 'quantize\[ray\]'"):
        executors.make_executor("ray")


def test_release_with_ray_missing_exits_2_with_one_line_and_makes_nothing(release_recipe, tmp_path, monkeypatch,
                                                                          capsys, recording):
    real = executors.importlib.util.find_spec
    monkeypatch.setattr(executors.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    out = tmp_path / "out"
    assert main(["release", str(release_recipe), "--out", str(out), "--executor", "ray"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "ray package is not installed" in error
    assert not out.exists() and recording.calls == []


def test_the_local_summary_gives_each_variant_its_node_and_times(release_recipe, tmp_path, recording, capsys):
    assert main(["release", str(release_recipe), "--out", str(tmp_path / "out"), "--no-publish", "--json"]) == 0
    variants = json.loads(capsys.readouterr().out)["variants"]
    assert all(v["node"]["hostname"] and v["started_at"] <= v["finished_at"] for v in variants)


# --- the artifact lock: tasks in several processes share one store --------------------------------

@dataclass(frozen=True, repr=False)
class Slow(Artifact):
    counter: str  # a file that gets one line per compute

    @property
    def name(self) -> str:
        return "slow"

    def inputs(self) -> dict[str, Any]:
        return {}

    def compute(self, store, folder: Path) -> Any:
        with open(self.counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (folder / "data.txt").write_text("made once")
        return {"ok": True}


def _get_slow(out_dir: str, counter: str) -> None:
    ArtifactStore(Path(out_dir), log=lambda _: None).get(Slow(counter))


def test_two_processes_needing_one_artifact_compute_it_once(tmp_path):
    counter = tmp_path / "computed.txt"
    processes = [multiprocessing.get_context("spawn").Process(target=_get_slow, args=(str(tmp_path), str(counter)))
                 for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert len(counter.read_text().splitlines()) == 1
    assert (tmp_path / ".work" / "slow" / "data.txt").read_text() == "made once"


def test_a_kill_point_with_a_once_file_kills_only_the_first_process(tmp_path):
    once = tmp_path / "killed"
    env = {**os.environ, "QUANTIZE_TEST_KILL_AT": "here", "QUANTIZE_TEST_KILL_ONCE": str(once),
           "PYTHONPATH": str(REPO)}
    code = "from quantize.killpoints import kill_point; kill_point('here'); print('passed')"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == -9 and once.read_text().split()[1] == "here"
    assert second.returncode == 0 and second.stdout.strip() == "passed"
