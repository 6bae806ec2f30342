"""`--executor ray` on a real two-node Ray cluster started on this machine (slow): a tiny release
with GPTQ, AWQ and GGUF variants spread over both nodes, byte-identical to a local run; a rerun
skips everything; a worker killed in the middle of a variant is retried and nothing is duplicated."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantize.cli import main
from quantize.manifest import read_manifest, sha256_file

from .conftest import REPO, tiny_recipe

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")]

WORKER_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "GPTQMODEL_CPU_WORKERS", "QUANTIZE_WIKITEXT_DIR")


@pytest.fixture(scope="module")
def cluster():
    from local_ray_cluster import LocalRayCluster

    env = {"PYTHONPATH": str(REPO), **{k: os.environ[k] for k in WORKER_ENV if k in os.environ}}
    with LocalRayCluster(nodes=2, cpus=1, env=env) as started:
        yield started


@pytest.fixture(scope="module")
def recipe(tiny_model, tmp_path_factory) -> Path:
    from quantize.engines.llamacpp import find_llama_cpp

    try:
        find_llama_cpp()
    except Exception as exc:
        pytest.skip(f"llama.cpp tools not built: {exc}")
    data = tiny_recipe(tiny_model, gptq=[{"bits": 4, "group_size": 128}], awq=[{"bits": 4, "group_size": 128}],
                       gguf={"types": ["Q4_K_M", "Q8_0"], "imatrix": True, "imatrix_chunks": 8})
    data["calibration"]["held_out"] = 0.02
    path = tmp_path_factory.mktemp("ray-release") / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def release(recipe: Path, out: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    code = main(["release", str(recipe), "--out", str(out), "--no-publish", "--json", *extra])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    return summary


def staged_files(out: Path) -> list[Path]:
    """What is left in `.staging/` besides the variants' lock files: nothing, after a release that completed."""
    return [p for p in (out / ".staging").rglob("*") if p.is_file() and p.suffix != ".lock"]


def hashes(out: Path, summary: dict) -> dict[str, str]:
    """Every file of every variant -> its sha256, read from the disk (and checked against its manifest)."""
    found = {}
    for variant in summary["variants"]:
        manifest = read_manifest(out, variant["id"])
        for entry in manifest.files:
            found[entry.path] = sha256_file(out / entry.path)
            assert found[entry.path] == entry.sha256, entry.path
    return found


@pytest.fixture(scope="module")
def local_run(recipe, tmp_path_factory):
    """The reference: the local executor in a fresh process, torch on one thread like each one-CPU
    Ray task (thread counts can change float32 results; so can what earlier tests left in this
    process: a fresh process starts from the state a Ray worker starts from)."""
    out = tmp_path_factory.mktemp("local") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", "import sys; from quantize.cli import main; sys.exit(main(sys.argv[1:]))",
               "release", str(recipe), "--out", str(out), "--no-publish"]
    assert subprocess.run(command, env=env, cwd=REPO).returncode == 0
    return out


def test_ray_release_spreads_over_both_nodes_and_matches_a_local_run(cluster, recipe, local_run, tmp_path,
                                                                     capsys):
    out = tmp_path / "out"
    summary = release(recipe, out, capsys, "--executor", "ray", "--address", cluster.address)
    variants = summary["variants"]
    assert [v["status"] for v in variants] == ["done"] * 4
    assert len({v["node"]["node_id"] for v in variants}) == 2, [v["node"] for v in variants]
    assert all(v["node"]["hostname"] and v["node"]["ip"] and v["started_at"] and v["finished_at"] for v in variants)
    local = {"variants": [{"id": v["id"]} for v in variants]}
    assert hashes(out, summary) == hashes(local_run, local)
    assert not staged_files(out)

    again = release(recipe, out, capsys, "--executor", "ray", "--address", cluster.address)
    assert [v["status"] for v in again["variants"]] == ["skipped"] * 4


@pytest.mark.parametrize("point", ["produced", "manifest"])
def test_a_worker_killed_mid_variant_is_retried_and_nothing_is_duplicated(cluster, recipe, local_run, tmp_path,
                                                                         capsys, monkeypatch, point):
    once = tmp_path / "killed"
    monkeypatch.setenv("QUANTIZE_TEST_KILL_AT", point)  # forwarded to every task
    monkeypatch.setenv("QUANTIZE_TEST_KILL_ONCE", str(once))
    out = tmp_path / "out"  # the shared work (f16 GGUF, imatrix) reused from the local run: only the variants run
    shutil.copytree(local_run / ".work", out / ".work", ignore=shutil.ignore_patterns("logs", "*.lock"))
    summary = release(recipe, out, capsys, "--executor", "ray", "--address", cluster.address, "--only", "gguf")
    assert once.exists(), "no worker was killed"
    assert [(v["id"], v["status"]) for v in summary["variants"]] == [("gguf/Q4_K_M", "done"), ("gguf/Q8_0", "done")]
    made = hashes(out, summary)
    local = hashes(local_run, {"variants": [{"id": v["id"]} for v in summary["variants"]]})
    assert made == local
    files = sorted(p.relative_to(out).as_posix() for p in (out / "gguf").rglob("*") if p.is_file())
    assert files == sorted(made)  # each file once, nothing half-made left beside them
    assert not staged_files(out)
    assert sorted(p.name for p in (out / "manifests" / "gguf").iterdir()) == ["Q4_K_M.json", "Q8_0.json"]


@contextlib.contextmanager
def node_local_release(recipe: Path, tmp_path: Path, cluster, monkeypatch, *extra: str):
    """(the Hub stand-in, the command) of a release to the Hub with each node keeping its own folder."""
    from .hub_server import HubStandIn

    data = yaml.safe_load(recipe.read_text())
    data["publish"] = {"target": "hub"}
    hub_recipe = tmp_path / "recipe.yaml"
    hub_recipe.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("QUANTIZE_RAY_STORAGE", "node")  # the nodes share this disk, but act as if they didn't
    command = ["release", str(hub_recipe), "--out", str(tmp_path / "out"), "--json", "--executor", "ray",
               "--address", cluster.address, *extra]
    with HubStandIn(tmp_path / "hub", lfs_threshold=1024) as hub, hub.client_env():
        yield hub, command


def run_json(command: list[str], capsys) -> dict:
    capsys.readouterr()
    code = main(command)
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    return summary


def assert_published_as_made_locally(hub, variants: list[dict], local_run: Path) -> None:
    for variant in variants:
        manifest = read_manifest(local_run, variant["id"])
        held = hub.files(variant["repo_id"], variant["branch"])
        for entry in manifest.files:
            assert hashlib.sha256(held[manifest.repo_path(entry)]).hexdigest() == entry.sha256, entry.path


def test_without_shared_storage_each_task_publishes_to_the_hub_what_a_local_run_makes(cluster, recipe, local_run,
                                                                                      tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with node_local_release(recipe, tmp_path, cluster, monkeypatch) as (hub, command):
        variants = run_json(command, capsys)["variants"]
        assert [v["status"] for v in variants] == ["done"] * 4
        assert len({v["node"]["node_id"] for v in variants}) == 2, [v["node"] for v in variants]
        assert_published_as_made_locally(hub, variants, local_run)  # byte for byte what the local executor made
        for variant in variants:
            readme = hub.files(variant["repo_id"], variant["branch"])["README.md"].decode()
            for other in (v for v in variants if v["repo_id"] == variant["repo_id"]):  # the card lists them all
                assert f"[{other['branch']}]" in readme or all(Path(f).name in readme for f in other["files"])
        assert not (out / "manifests").exists()
        assert len(list((out / ".work" / "nodes").iterdir())) == 2  # each node made the shared work it needed

        commits = len(hub.requests("POST", "/commit/"))
        again = run_json(command, capsys)
        assert [v["status"] for v in again["variants"]] == ["skipped"] * 4
        assert len(hub.requests("POST", "/commit/")) == commits


def test_without_shared_storage_a_worker_killed_after_its_commit_is_retried_and_sends_nothing_again(
        cluster, recipe, local_run, tmp_path, capsys, monkeypatch):
    once = tmp_path / "killed"
    monkeypatch.setenv("QUANTIZE_TEST_KILL_AT", "hub-commit")  # its variant is on the Hub, the task never returned
    monkeypatch.setenv("QUANTIZE_TEST_KILL_ONCE", str(once))
    with node_local_release(recipe, tmp_path, cluster, monkeypatch, "--only", "gguf") as (hub, command):
        variants = run_json(command, capsys)["variants"]
        assert once.exists(), "no worker was killed"
        assert [(v["id"], v["status"]) for v in variants] == [("gguf/Q4_K_M", "done"), ("gguf/Q8_0", "done")]
        assert_published_as_made_locally(hub, variants, local_run)
        stored = [re.search(r"/lfs-upload/([0-9a-f]{64})", entry.path).group(1) for entry in hub.lfs_upload_puts()]
        for variant in variants:  # made once (in one node's folder) and sent once
            manifest = read_manifest(local_run, variant["id"])
            name = Path(manifest.files[0].path).name
            assert len(list((tmp_path / "out" / ".work" / "nodes").glob(f"*/gguf/{name}"))) == 1, name
            assert stored.count(manifest.files[0].sha256) == 1, name
