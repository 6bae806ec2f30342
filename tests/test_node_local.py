"""`--executor ray` without shared storage: each variant task makes its variant in its own node's folder
and publishes it to the Hub itself. The executor's own logic runs here, its tasks in this process on two
pretend nodes that cannot see the output folder (the real two-node cluster: tests/test_ray_cluster.py);
and two tasks publishing to one branch at the same time keep each other's files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi

from quantize import api
from quantize.cli import main
from quantize.errors import BadInput
from quantize.executors import Publishing
from quantize.executors.graph import ARTIFACT, GIB, build_graph
from quantize.plan import build_plan
from quantize.publish import claim, publish_variant, published_manifests, read_states
from quantize.publish.hub import HubTarget
from quantize.publish.layout import RECORD_FILE
from quantize.recipe import load_recipe
from quantize.source import inspect_source

from .hub_server import hub  # noqa: F401  (fixture)
from .test_publish_hub import GGUF_REPO, GPTQ_8BIT, GPTQ_REPO, hub_recipe, set_recipe  # noqa: F401

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

NODES = [{"node_id": "a" * 56, "ip": "10.0.0.1", "hostname": "node-a", "pid": 1},
         {"node_id": "b" * 56, "ip": "10.0.0.2", "hostname": "node-b", "pid": 2}]


class Events:
    def __init__(self) -> None:
        self.items: list[tuple] = []

    def put(self, item) -> None:
        self.items.append(item)


def in_process_ray(monkeypatch, sees_output: bool = False):
    """RayExecutor with the cluster replaced: two nodes (that see the output folder only if `sees_output`),
    each task run here in turn, node a then node b."""
    from quantize.executors import ray_cluster

    class InProcessRay(ray_cluster.RayExecutor):
        tasks_run: list[tuple[str, str]] = []

        def _connect(self) -> None:
            pass

        @staticmethod
        def nodes():
            return [{"NodeID": n["node_id"], "Alive": True, "NodeManagerHostname": n["hostname"],
                     "NodeManagerAddress": n["ip"], "Resources": {"CPU": 1.0, "memory": 16.0 * GIB}} for n in NODES]

        def unseen_paths(self, plan, out_dir, nodes, check_output=True):
            return [] if sees_output or not check_output else [("node-b 10.0.0.2 (node bbbbbbbb)", "probe")]

        def _run_graph(self, plan, tasks, out_dir, check_hashes, log, on_outcome, publishing=None):
            results = {}
            for index, task in enumerate(tasks):
                assert task.kind != ARTIFACT or publishing is None  # node-local: shared work made in the task
                node = NODES[index % 2]
                monkeypatch.setattr(ray_cluster, "node_facts", lambda node=node: node)
                monkeypatch.setattr(ray_cluster, "pin_threads", lambda cpus: None)
                if task.kind == ARTIFACT:
                    ray_cluster.compute_artifact(plan, task.name, str(out_dir), 1, Events())
                    continue
                outcome = ray_cluster.make_variant(plan, task.name, str(out_dir), check_hashes, 1, Events(),
                                                   publishing)
                InProcessRay.tasks_run.append((task.name, node["hostname"]))
                results[task.name] = outcome = ray_cluster.quality_gate(outcome, plan.recipe.quality.max_kld)
                if on_outcome:
                    on_outcome(outcome)
            return results

    InProcessRay.tasks_run = []
    monkeypatch.setattr(ray_cluster, "RayExecutor", InProcessRay)
    return InProcessRay


def release(recipe: Path, out: Path, capsys, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["release", str(recipe), "--out", str(out), "--executor", "ray", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_without_shared_storage_each_task_publishes_its_variant_and_the_cards_list_all(
        hub, recording, hub_recipe, tmp_path, monkeypatch, capsys):
    executor = in_process_ray(monkeypatch)
    out = tmp_path / "out"
    code, summary = release(hub_recipe, out, capsys)
    assert code == 0, summary
    assert sorted(executor.tasks_run) == [("gguf/Q4_K_M", "node-a"), ("gguf/Q8_0", "node-b"),
                                          ("gptq/gptq-8bit--1g-actorder_True", "node-b"), ("gptq/main", "node-a")]
    assert {v["node"]["hostname"] for v in summary["variants"]} == {"node-a", "node-b"}
    assert not (out / "manifests").exists()  # the driver's folder holds no variant: each node's folder does
    nodes = out / ".work" / "nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["a" * 12, "b" * 12]
    assert sorted(p.name for p in (nodes / ("a" * 12) / "manifests").rglob("*.json")) == ["Q4_K_M.json", "main.json"]

    gguf = hub.files(GGUF_REPO, "main")
    assert {"Tiny-Llama.Q4_K_M.gguf", "Tiny-Llama.Q8_0.gguf", "README.md", RECORD_FILE} <= set(gguf)
    record = json.loads(gguf[RECORD_FILE])
    assert sorted(v["variant_id"] for v in record["variants"]) == ["gguf/Q4_K_M", "gguf/Q8_0"]
    for branch in ("main", GPTQ_8BIT):  # the last card (made once every task had published) on every branch
        readme = hub.files(GPTQ_REPO, branch)["README.md"].decode()
        assert "| [main]" in readme and f"| [{GPTQ_8BIT}]" in readme, branch
    assert gguf["Tiny-Llama.Q4_K_M.gguf"] == (nodes / ("a" * 12) / "gguf" / "Tiny-Llama.Q4_K_M.gguf").read_bytes()
    published = {(p["repo_id"], p["branch"]): p["uploaded"] for p in summary["published"]}
    assert "Tiny-Llama.Q8_0.gguf" in published[(GGUF_REPO, "main")]

    recording.calls.clear()
    commits = len(hub.requests("POST", "/commit/"))
    code, again = release(hub_recipe, out, capsys)  # finished = published with the same fingerprint
    assert code == 0 and [v["status"] for v in again["variants"]] == ["skipped"] * 4
    assert recording.calls == [] and len(hub.requests("POST", "/commit/")) == commits

    set_recipe(hub_recipe, lambda d: d["gptq"][0].update(damp=0.05))  # changes gptq/main's bytes only
    code, changed = release(hub_recipe, out, capsys)
    assert code == 0 and recording.calls == ["gptq/main"]
    assert [v["status"] for v in changed["variants"]].count("done") == 1


def test_a_retried_task_finds_its_variant_published_and_sends_nothing(hub, recording, hub_recipe, tmp_path,
                                                                      monkeypatch, capsys):
    from quantize.executors import ray_cluster

    in_process_ray(monkeypatch)
    out = tmp_path / "out"
    assert release(hub_recipe, out, capsys, "--only", "gguf")[0] == 0
    recording.calls.clear()
    commits = len(hub.requests("POST", "/commit/"))
    plan = api.plan(hub_recipe)
    identity = claim(plan, out, HubTarget())
    events = Events()  # Ray runs the task again after its worker died once it had published
    outcome = ray_cluster.make_variant(plan, "gguf/Q8_0", str(out), True, 1, events, Publishing(plan, identity))
    assert outcome.status == "done" and outcome.manifest.variant_id == "gguf/Q8_0" and outcome.published is None
    assert ("log", "gguf/Q8_0: already published by an earlier attempt", NODES[1]) in events.items
    assert recording.calls == [] and len(hub.requests("POST", "/commit/")) == commits


def test_two_tasks_publishing_to_one_branch_at_once_keep_each_others_files(hub, recording, hub_recipe, tmp_path,
                                                                           monkeypatch):
    plan = api.plan(hub_recipe)
    made = {}
    for name in ("Q4_K_M", "Q8_0"):  # each made in the folder of its own node
        result = api.release(hub_recipe, out=tmp_path / name, variants=[name], publish=False, log=lambda m: None)
        made[name] = result.outcomes[0].manifest
    target = HubTarget()
    identity = claim(plan, tmp_path / "Q4_K_M", target)
    original = HubTarget.publish
    raced = []

    def racing(self, content, state, log=print):  # Q8_0's task commits between Q4_K_M's read and commit
        if not raced and content.repo_id == GGUF_REPO:
            raced.append(True)
            publish_variant(plan, tmp_path / "Q8_0", made["Q8_0"], HubTarget(), identity, log=lambda m: None)
        return original(self, content, state, log)

    monkeypatch.setattr(HubTarget, "publish", racing)
    published = publish_variant(plan, tmp_path / "Q4_K_M", made["Q4_K_M"], target, identity, log=lambda m: None,
                                pause=lambda attempt: None)
    assert raced and 412 in [r.status for r in hub.requests("POST", f"{GGUF_REPO}/commit/main")]
    files = hub.files(GGUF_REPO, "main")
    assert {"Tiny-Llama.Q4_K_M.gguf", "Tiny-Llama.Q8_0.gguf"} <= set(files) <= set(published.files) | {".gitattributes"}
    record = json.loads(files[RECORD_FILE])
    assert sorted(v["variant_id"] for v in record["variants"]) == ["gguf/Q4_K_M", "gguf/Q8_0"]
    readme = files["README.md"].decode()
    assert "[Tiny-Llama.Q4_K_M.gguf]" in readme and "[Tiny-Llama.Q8_0.gguf]" in readme


def test_published_means_finished_only_with_the_same_fingerprint(hub, recording, hub_recipe, tmp_path):
    api.release(hub_recipe, out=tmp_path / "out", log=lambda m: None)
    plan = api.plan(hub_recipe)
    assert sorted(published_manifests(plan, read_states(HubTarget(), plan))) == sorted(v.id for v in plan.variants)
    set_recipe(hub_recipe, lambda d: d["gptq"][0].update(damp=0.05))
    changed = api.plan(hub_recipe)
    assert "gptq/main" not in published_manifests(changed, read_states(HubTarget(), changed))
    HfApi().delete_file("Tiny-Llama.Q8_0.gguf", repo_id=GGUF_REPO)  # a published file gone: not finished
    assert "gguf/Q8_0" not in published_manifests(plan, read_states(HubTarget(), plan))


def test_storage_mode_follows_what_the_nodes_see_and_the_target(hub_recipe, tmp_path, monkeypatch, capsys,
                                                                recording):
    from quantize.executors import ray_cluster

    plan = build_plan(load_recipe(hub_recipe), inspect_source(load_recipe(hub_recipe)))
    publishing = Publishing(plan, None)
    executor = in_process_ray(monkeypatch)(None, 1)
    nodes = executor.nodes()
    lines = []
    assert executor.storage_mode(plan, tmp_path, nodes, publishing, lines.append) == ray_cluster.NODE
    assert "does not see the output folder" in lines[0] and "publishes its variant to the Hub" in lines[0]
    with pytest.raises(BadInput, match="with --no-publish every node needs the output folder on shared storage"):
        executor.storage_mode(plan, tmp_path, nodes, None)
    monkeypatch.setenv("QUANTIZE_RAY_STORAGE", "shared")
    with pytest.raises(BadInput, match="QUANTIZE_RAY_STORAGE=shared every node needs the output folder on shared"):
        executor.storage_mode(plan, tmp_path, nodes, publishing)
    monkeypatch.setenv("QUANTIZE_RAY_STORAGE", "node")
    with pytest.raises(BadInput, match="needs the Hub target"):
        executor.storage_mode(plan, tmp_path, nodes, None)
    monkeypatch.setenv("QUANTIZE_RAY_STORAGE", "nfs")
    with pytest.raises(BadInput, match="not a storage mode"):
        executor.storage_mode(plan, tmp_path, nodes, publishing)
    monkeypatch.delenv("QUANTIZE_RAY_STORAGE")
    sees = in_process_ray(monkeypatch, sees_output=True)(None, 1)
    assert sees.storage_mode(plan, tmp_path, nodes, publishing) == ray_cluster.SHARED

    in_process_ray(monkeypatch)  # the local target without shared storage: exit 2, one line, nothing made
    out = tmp_path / "local-target"
    local_recipe = tmp_path / "local.yaml"
    local_recipe.write_text(yaml.safe_dump({**yaml.safe_load(hub_recipe.read_text()), "publish": {"target": "local"}}))
    assert main(["release", str(local_recipe), "--out", str(out), "--executor", "ray"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --executor ray: node node-b") and "with the local target every node needs" in error
    assert recording.calls == [] and not (out / "manifests").exists()


def test_each_task_asks_for_the_most_its_own_shared_work_needs(release_recipe):
    data = yaml.safe_load(release_recipe.read_text())
    data["gguf"]["imatrix"] = True
    release_recipe.write_text(yaml.safe_dump(data))
    recipe = load_recipe(release_recipe)
    plan = build_plan(recipe, inspect_source(recipe))
    shared = {t.name: t for t in build_graph(plan, plan.variants)}
    alone = build_graph(plan, plan.variants, shared=False)
    assert [t.name for t in alone] == [v.id for v in plan.variants] and all(t.needs == () for t in alone)
    for task in alone:
        variant = next(v for v in plan.variants if v.id == task.name)
        steps = [shared[task.name].resources.memory] + [shared[a.name].resources.memory for a in variant.needs]
        assert task.resources.memory >= max(steps)
    assert any(t.resources.memory > shared[t.name].resources.memory for t in alone)  # the f16 GGUF is bigger
