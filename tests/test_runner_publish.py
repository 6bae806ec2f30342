"""The runner's resume rules and the local git publisher, with a quick deterministic backend.

The real backends have their own (slow) tests; here a small backend writes known bytes so the
bookkeeping (staging, manifests, skipping, failures, branches holding exactly their files) is
checked in a second.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from quantize import api
from quantize.cli import main
from quantize.manifest import read_manifest, sha256_file
from quantize.publish.layout import RECORD_FILE



def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", *args], capture_output=True, text=True, check=True).stdout


def branch_files(repo: Path, branch: str) -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", branch).split())


def test_release_publishes_each_variant_on_its_own_branch(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    result = api.release(release_recipe, out=out, log=lambda m: None)
    assert [o.status for o in result.outcomes] == ["done"] * 4
    gptq_repo = out / "repos" / "Tiny-Llama-GPTQ.git"
    gguf_repo = out / "repos" / "Tiny-Llama-GGUF.git"
    assert set(git(gptq_repo, "for-each-ref", "--format=%(refname:short)").split()) == {
        "main", "gptq-8bit--1g-actorder_True"}
    expected = {".gitattributes", "README.md", RECORD_FILE, "model.safetensors", "config.json"}
    assert branch_files(gptq_repo, "main") == expected
    assert branch_files(gptq_repo, "gptq-8bit--1g-actorder_True") == expected
    assert branch_files(gguf_repo, "main") == {".gitattributes", "README.md", RECORD_FILE,
                                               "Tiny-Llama.Q4_K_M.gguf", "Tiny-Llama.Q8_0.gguf"}
    # weights are LFS pointers whose objects match the manifest
    manifest = read_manifest(out, "gptq/main")
    entry = next(f for f in manifest.files if f.path.endswith("model.safetensors"))
    pointer = git(gptq_repo, "show", "main:model.safetensors")
    assert f"oid sha256:{entry.sha256}" in pointer and f"size {entry.size}" in pointer
    stored = gptq_repo / "lfs" / "objects" / entry.sha256[:2] / entry.sha256[2:4] / entry.sha256
    assert sha256_file(stored) == entry.sha256
    readme = git(gptq_repo, "show", "gptq-8bit--1g-actorder_True:README.md")
    assert "gptq-8bit--1g-actorder_True" in readme and "# The original card" in readme
    record = json.loads(git(gptq_repo, "show", f"main:{RECORD_FILE}"))
    assert record["recipe"]["release"]["basename"] == "Tiny-Llama"
    assert record["variants"][0]["files"][0]["sha256"]
    assert [p.uploaded for p in result.published if p.branch == "main" and "GGUF" in p.repo_id] == [
        ["Tiny-Llama.Q4_K_M.gguf", "Tiny-Llama.Q8_0.gguf"]]


def test_rerun_does_nothing_and_uploads_nothing(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, log=lambda m: None)
    heads = git(out / "repos" / "Tiny-Llama-GPTQ.git", "for-each-ref")
    recording.calls.clear()
    result = api.release(release_recipe, out=out, log=lambda m: None)
    assert recording.calls == []
    assert [o.status for o in result.outcomes] == ["skipped"] * 4
    assert all(p.uploaded == [] for p in result.published)
    assert git(out / "repos" / "Tiny-Llama-GPTQ.git", "for-each-ref") == heads  # no new commits


def test_a_failed_variant_keeps_the_others_and_a_rerun_finishes(tmp_path, recording, release_recipe, capsys):
    out = tmp_path / "out"
    recording.fail_on = {"gptq/gptq-8bit--1g-actorder_True"}
    code = main(["release", str(release_recipe), "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["status"] == "failed"
    statuses = {v["id"]: v["status"] for v in summary["variants"]}
    assert statuses == {"gptq/main": "done", "gptq/gptq-8bit--1g-actorder_True": "failed",
                        "gguf/Q4_K_M": "done", "gguf/Q8_0": "done"}
    assert "simulated crash" in summary["variants"][1]["error"]
    assert not (out / "repos").exists()  # nothing is published from a failed run
    recording.fail_on, recording.calls = set(), []
    assert main(["release", str(release_recipe), "--out", str(out)]) == 0
    assert recording.calls == ["gptq/gptq-8bit--1g-actorder_True"]


def test_unfinished_work_is_never_taken_for_finished(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, publish=False, log=lambda m: None)
    # a crash after the files moved but before the manifest was written
    (out / "manifests" / "gguf" / "Q8_0.json").unlink()
    # a file truncated after the fact
    weights = out / "gptq" / "main" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    # a leftover staging folder from a killed run
    (out / ".staging" / "gptq" / "junk").mkdir(parents=True)
    recording.calls.clear()
    api.release(release_recipe, out=out, publish=False, log=lambda m: None)
    assert sorted(recording.calls) == ["gguf/Q8_0", "gptq/main"]


def test_changed_parameters_redo_the_variant(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, publish=False, log=lambda m: None)
    data = yaml.safe_load(release_recipe.read_text())
    data["gptq"][0]["damp"] = 0.01
    release_recipe.write_text(yaml.safe_dump(data))
    recording.calls.clear()
    api.release(release_recipe, out=out, publish=False, log=lambda m: None)
    assert recording.calls == ["gptq/main"]


def test_local_branch_loses_files_that_are_no_longer_part_of_it(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, log=lambda m: None)
    data = yaml.safe_load(release_recipe.read_text())
    data["gguf"]["types"] = ["Q8_0"]
    release_recipe.write_text(yaml.safe_dump(data))
    api.release(release_recipe, out=out, log=lambda m: None)
    files = branch_files(out / "repos" / "Tiny-Llama-GGUF.git", "main")
    assert "Tiny-Llama.Q4_K_M.gguf" not in files and "Tiny-Llama.Q8_0.gguf" in files
