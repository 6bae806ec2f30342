"""Publishing that never destroys (local target, quick backend): other people's files, partial releases,
ownership, integrity, the lock, and a kill -9 at every stage boundary followed by a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from quantize import api
from quantize.cli import main
from quantize.manifest import Manifest, read_manifest, sha256_file
from quantize.publish.layout import RECORD_FILE
from quantize.publish.ownership import RELEASE_ID_FILE

from .conftest import REPO, RecordingBackend

IDENTITY = {"GIT_AUTHOR_NAME": "someone", "GIT_AUTHOR_EMAIL": "someone@example.invalid",
            "GIT_COMMITTER_NAME": "someone", "GIT_COMMITTER_EMAIL": "someone@example.invalid"}
GPTQ_8BIT = "gptq-8bit--1g-actorder_True"
QUIET = {"log": lambda message: None}
# A release in a separate process, with the quick backend (as tests/test_publish_hub.py does).
RELEASE_SCRIPT = ("import sys; from tests.conftest import RecordingBackend; import quantize.runner as r; "
                  "r.backend_class = lambda fmt: RecordingBackend; from quantize.cli import main; "
                  "sys.exit(main(sys.argv[1:]))")


def git(repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", *args], input=input, capture_output=True, check=True,
                          env={**os.environ, **IDENTITY, **(env or {})}).stdout.decode()


def branch_files(repo: Path, branch: str) -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", f"refs/heads/{branch}").split("\n")) - {""}


def show(repo: Path, branch: str, path: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={repo}", "cat-file", "blob", f"refs/heads/{branch}:{path}"],
                          capture_output=True, check=True).stdout


def user_commit(repo: Path, branch: str, files: dict[str, bytes]) -> None:
    """Someone adds files to a branch by hand (what a clone, commit and push does)."""
    head = git(repo, "rev-parse", f"refs/heads/{branch}").strip()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "read-tree", head, env=env)
        for path, data in files.items():
            blob = git(repo, "hash-object", "-w", "--stdin", input=data).strip()
            git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = git(repo, "write-tree", env=env).strip()
    commit = git(repo, "commit-tree", tree, "-p", head, "-m", "added by hand").strip()
    git(repo, "update-ref", f"refs/heads/{branch}", commit, head)


def set_recipe(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def lfs_object(repo: Path, pointer: bytes) -> Path:
    oid = next(line for line in pointer.decode().splitlines() if line.startswith("oid ")).split(":")[1]
    return repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def content_sha(repo: Path, branch: str, path: str) -> str:
    """sha256 of a file as a clone (with git-lfs) checks it out: the LFS object's, else the blob's."""
    data = show(repo, branch, path)
    if data.startswith(b"version https://git-lfs.github.com/spec/v1\n"):
        return sha256_file(lfs_object(repo, data))
    import hashlib

    return hashlib.sha256(data).hexdigest()


def assert_release_intact(out: Path, repos: Path) -> None:
    """Every local file matches its manifest; every published file matches its record and the local
    manifest; git is consistent; no lock is left behind."""
    manifests = {}
    for path in sorted((out / "manifests").rglob("*.json")):
        manifest = Manifest.model_validate_json(path.read_bytes())
        manifests[manifest.variant_id] = manifest
        for entry in manifest.files:
            assert sha256_file(out / entry.path) == entry.sha256, entry.path
    assert manifests, "no manifest at all"
    for repo in sorted(repos.glob("*.git")):
        subprocess.run(["git", f"--git-dir={repo}", "fsck", "--no-progress"], check=True, capture_output=True)
        left = [p for p in repo.rglob("*.lock") if p.name != "quantize.lock"]
        assert not left, left
        assert (repo / "quantize.lock").read_text() == ""
        for branch in git(repo, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/heads").split():
            if RECORD_FILE not in branch_files(repo, branch):
                continue
            record = json.loads(show(repo, branch, RECORD_FILE))
            for variant in record["variants"]:
                local = manifests.get(variant["variant_id"])
                for entry in variant["files"]:
                    in_repo = Path(entry["path"]).relative_to(variant["subdir"]).as_posix()
                    assert content_sha(repo, branch, in_repo) == entry["sha256"], (repo.name, branch, in_repo)
                if local is not None:
                    assert {(f.path, f.sha256) for f in local.files} == \
                           {(f["path"], f["sha256"]) for f in variant["files"]}


@pytest.fixture
def shared_repos(release_recipe) -> Path:
    """The recipe publishes to repos outside the output folder (so several output folders can share them)."""
    repos = release_recipe.parent / "shared-repos"
    set_recipe(release_recipe, lambda d: d.update(publish={"target": "local", "path": str(repos)}))
    return repos


# --- other people's files and partial releases ------------------------------------------------


def test_hand_added_files_survive_reruns_and_only_our_stale_files_go(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, **QUIET)
    gguf, gptq = out / "repos" / "Tiny-Llama-GGUF.git", out / "repos" / "Tiny-Llama-GPTQ.git"
    chart = b"\x89PNG\r\n\x1a\n\0\0chart"
    user_commit(gguf, "main", {"NOTES.md": b"# our notes\n", "images/chart.png": chart})
    user_commit(gptq, GPTQ_8BIT, {"NOTES.md": b"8-bit notes\n"})
    api.release(release_recipe, out=out, **QUIET)  # a rerun
    set_recipe(release_recipe, lambda d: (d["gguf"].update(types=["Q8_0"]), d["gptq"][1].update(damp=0.05)))
    result = api.release(release_recipe, out=out, **QUIET)  # Q4_K_M dropped, the 8-bit branch made again
    assert not result.failed
    assert branch_files(gguf, "main") == {".gitattributes", "README.md", RECORD_FILE, "NOTES.md", "images/chart.png",
                                          "Tiny-Llama.Q8_0.gguf"}
    assert show(gguf, "main", "images/chart.png") == chart and show(gguf, "main", "NOTES.md") == b"# our notes\n"
    assert show(gptq, GPTQ_8BIT, "NOTES.md") == b"8-bit notes\n"
    record = json.loads(show(gguf, "main", RECORD_FILE))
    assert record["files"] == ["README.md", "Tiny-Llama.Q8_0.gguf", RECORD_FILE]  # what quantize owns
    card = show(gguf, "main", "README.md").decode()
    assert "Q4_K_M.gguf" not in card and "NOTES.md" not in card and "Tiny-Llama.Q8_0.gguf" in card
    assert_release_intact(out, out / "repos")


def test_a_partial_release_from_a_fresh_folder_keeps_the_other_variants(tmp_path, recording, release_recipe,
                                                                          shared_repos):
    first = tmp_path / "first"
    api.release(release_recipe, out=first, **QUIET)
    gguf, gptq = shared_repos / "Tiny-Llama-GGUF.git", shared_repos / "Tiny-Llama-GPTQ.git"
    gptq_heads = git(gptq, "for-each-ref", f"refs/heads/{GPTQ_8BIT}")
    fresh = tmp_path / "fresh"  # a CI job without the kept output folder
    recording.calls.clear()
    assert main(["release", str(release_recipe), "--out", str(fresh), "--variants", "Q8_0"]) == 0
    assert recording.calls == ["gguf/Q8_0"]
    assert branch_files(gguf, "main") == {".gitattributes", "README.md", RECORD_FILE, "Tiny-Llama.Q4_K_M.gguf",
                                          "Tiny-Llama.Q8_0.gguf"}
    record = json.loads(show(gguf, "main", RECORD_FILE))
    assert sorted(v["variant_id"] for v in record["variants"]) == ["gguf/Q4_K_M", "gguf/Q8_0"]
    assert record["files"] == ["README.md", "Tiny-Llama.Q4_K_M.gguf", "Tiny-Llama.Q8_0.gguf", RECORD_FILE]
    card = show(gguf, "main", "README.md").decode()
    assert "[Tiny-Llama.Q4_K_M.gguf]" in card and "[Tiny-Llama.Q8_0.gguf]" in card
    assert (fresh / "cards" / "Tiny-Llama-GGUF" / "README.md").read_text() == card  # the local card says the same
    assert (fresh / RELEASE_ID_FILE).read_text() == (first / RELEASE_ID_FILE).read_text()  # adopted
    assert git(gptq, "for-each-ref", f"refs/heads/{GPTQ_8BIT}") == gptq_heads  # GPTQ: nothing selected, untouched
    assert_release_intact(fresh, shared_repos)
    # and the first folder still publishes the whole release on top
    assert main(["release", str(release_recipe), "--out", str(first)]) == 0
    assert_release_intact(first, shared_repos)


# --- ownership --------------------------------------------------------------------------------


def test_a_repo_holding_only_the_users_readme_is_a_collision(tmp_path, recording, release_recipe, shared_repos,
                                                             capsys):
    repo = shared_repos / "Tiny-Llama-GGUF.git"
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(repo)], check=True)
    blob = git(repo, "hash-object", "-w", "--stdin", input=b"# My own model\n").strip()
    tree = git(repo, "mktree", input=f"100644 blob {blob}\tREADME.md\n".encode()).strip()
    git(repo, "update-ref", "refs/heads/main", git(repo, "commit-tree", tree, "-m", "mine").strip())
    code = main(["release", str(release_recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Tiny-Llama-GGUF already exists" in err and "not made by quantize" in err
    assert len(err.strip().splitlines()) == 1
    assert recording.calls == [] and not (tmp_path / "out").exists()
    assert show(repo, "main", "README.md") == b"# My own model\n"


def test_another_release_in_the_repos_is_a_collision(tmp_path, recording, release_recipe, shared_repos, capsys):
    api.release(release_recipe, out=tmp_path / "first", **QUIET)
    heads = git(shared_repos / "Tiny-Llama-GGUF.git", "for-each-ref")
    other = tmp_path / "other"  # an output folder of another release of the same model
    other.mkdir()
    (other / RELEASE_ID_FILE).write_text("0123456789abcdef\n")
    recording.calls.clear()
    assert main(["release", str(release_recipe), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds another release of test-lab/tiny-llama" in err and "this output folder's is 0123456789abcdef" in err
    set_recipe(release_recipe, lambda d: d["source"].update(repo_id="someone/different-model"))
    assert main(["release", str(release_recipe), "--out", str(tmp_path / "fresh")]) == 2  # another model, same names
    assert "holds another release (of test-lab/tiny-llama" in capsys.readouterr().err
    assert recording.calls == [] and git(shared_repos / "Tiny-Llama-GGUF.git", "for-each-ref") == heads


def test_the_record_holds_no_local_paths(tmp_path, recording, release_recipe):
    folder = release_recipe.parent
    (folder / "header.md").write_text("header")
    (folder / "text.txt").write_text("some calibration text " * 200)
    set_recipe(release_recipe, lambda d: (d.update(card={"header": str(folder / "header.md")}),
                                          d["calibration"].update(dataset="file", path=str(folder / "text.txt"))))
    out = tmp_path / "out"
    assert main(["release", str(release_recipe), "--out", str(out), "--model", str(folder / "model")]) == 0

    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    for repo in (out / "repos").glob("*.git"):
        record = json.loads(show(repo, "main", RECORD_FILE))
        leaks = [s for s in strings(record) if str(tmp_path) in s]
        assert not leaks, leaks
        assert record["recipe"]["source"]["path"] == "model"
        assert record["recipe"]["calibration"]["path"] == "text.txt"


# --- integrity ----------------------------------------------------------------------------------


def flip_a_byte(path: Path, keep_time: bool) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_time:  # as bit rot, or `cp -p` of another copy, would leave it
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_same_size_corruption_is_made_again_never_published(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, **QUIET)
    weights = out / "gptq" / "main" / "model.safetensors"
    good = sha256_file(weights)
    flip_a_byte(weights, keep_time=True)
    recording.calls.clear()
    result = api.release(release_recipe, out=out, **QUIET)
    assert recording.calls == ["gptq/main"] and not result.failed
    recorded = next(f for f in read_manifest(out, "gptq/main").files if f.path.endswith("model.safetensors"))
    assert sha256_file(weights) == good == recorded.sha256
    repo = out / "repos" / "Tiny-Llama-GPTQ.git"
    assert content_sha(repo, "main", "model.safetensors") == good
    assert_release_intact(out, out / "repos")


def test_a_changed_file_is_found_by_its_time_without_publishing(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, publish=False, **QUIET)
    flip_a_byte(out / "gguf" / "Tiny-Llama.Q8_0.gguf", keep_time=False)
    recording.calls.clear()
    api.release(release_recipe, out=out, publish=False, **QUIET)
    assert recording.calls == ["gguf/Q8_0"]


def test_a_copied_output_folder_is_not_made_again(tmp_path, recording, release_recipe):
    import shutil

    api.release(release_recipe, out=tmp_path / "out", publish=False, **QUIET)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", copy, copy_function=shutil.copyfile)  # new modification times
    recording.calls.clear()
    api.release(release_recipe, out=copy, publish=False, **QUIET)
    assert recording.calls == []  # the hashes matched; the manifests now carry the new times
    manifest = read_manifest(copy, "gptq/main")
    assert all((copy / f.path).stat().st_mtime_ns == f.mtime_ns for f in manifest.files)


def test_lfs_objects_are_verified_copies_not_links(tmp_path, recording, release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, **QUIET)
    weights = out / "gguf" / "Tiny-Llama.Q8_0.gguf"
    repo = out / "repos" / "Tiny-Llama-GGUF.git"
    stored = lfs_object(repo, show(repo, "main", "Tiny-Llama.Q8_0.gguf"))
    assert stored.stat().st_ino != weights.stat().st_ino and stored.stat().st_nlink == 1
    published = sha256_file(stored)
    with open(weights, "r+b") as handle:  # an edit in place of the output file
        handle.write(b"edited")
    assert sha256_file(stored) == published


class LargeFilesBackend(RecordingBackend):
    """GPTQ folders with an 11 MB tokenizer.json and a small binary file, as some models have."""

    def produce(self, variant, staging):
        produced = super().produce(variant, staging)
        if not variant.file_name:
            big, binary, small = staging / "tokenizer.json", staging / "vocab.dat", staging / "special_tokens_map.json"
            big.write_text('{"model": "' + "a" * (11 * 1024 * 1024) + '"}')
            binary.write_bytes(b"\0\1\2" * 100)
            small.write_text("{}")
            produced.files += [big, binary, small]
        return produced


def test_large_and_binary_files_are_lfs_in_the_local_target(tmp_path, recording, release_recipe, monkeypatch):
    monkeypatch.setattr("quantize.runner.backend_class", lambda fmt: LargeFilesBackend)
    out = tmp_path / "out"
    api.release(release_recipe, out=out, **QUIET)
    repo = out / "repos" / "Tiny-Llama-GPTQ.git"
    for path in ("tokenizer.json", "vocab.dat"):
        pointer = show(repo, "main", path)
        assert pointer.startswith(b"version https://git-lfs.github.com/spec/v1\n"), path
        assert sha256_file(lfs_object(repo, pointer)) == sha256_file(out / "gptq" / "main" / path)
    assert show(repo, "main", "special_tokens_map.json") == b"{}"
    attributes = show(repo, "main", ".gitattributes").decode()
    assert "/tokenizer.json filter=lfs" in attributes and "/vocab.dat filter=lfs" in attributes
    assert "special_tokens_map" not in attributes
    assert_release_intact(out, out / "repos")


# --- one run at a time, and what a killed one leaves ---------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, recording, release_recipe, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from quantize.runner import output_lock\n"
                               "with output_lock(sys.argv[1]):\n print('locked', flush=True); sys.stdin.read()",
                               str(out)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert main(["release", str(release_recipe), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"another quantize run (pid {holder.pid}) is using this output folder" in err
        assert recording.calls == [] and sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()  # the holder dies without unlocking: its lock is stale
        holder.wait()
    logs = []
    result = api.release(release_recipe, out=out, log=logs.append)
    assert not result.failed and len(recording.calls) == 4
    assert any(f"took over the lock of an earlier run (pid {holder.pid})" in line for line in logs)


def run_killed(recipe: Path, out: Path, point: str) -> None:
    """`quantize release` in its own process group, killed with SIGKILL at `point`."""
    env = {**os.environ, "QUANTIZE_TEST_KILL_AT": point}
    done = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, "release", str(recipe), "--out", str(out)],
                          cwd=REPO, env=env, start_new_session=True, capture_output=True, timeout=300)
    assert done.returncode == -9, (point, done.returncode, done.stderr.decode()[-2000:])


@pytest.mark.parametrize("point", ["produced", "placed", "manifest", "publish-objects", "publish-commit",
                                   "update-ref", "published"])
def test_killed_at_a_stage_boundary_then_rerun_ends_intact(tmp_path, recording, release_recipe, point):
    out = tmp_path / "out"
    run_killed(release_recipe, out, point)
    if point == "update-ref":  # git was killed holding the ref lock, as `kill -9` of the job leaves it
        assert list((out / "repos").rglob("refs/heads/*.lock"))
    logs = []
    result = api.release(release_recipe, out=out, log=logs.append)
    assert not result.failed and len(result.published) == 3
    assert_release_intact(out, out / "repos")
    if point == "update-ref":
        assert any("left by a killed run" in line for line in logs)


@pytest.mark.parametrize("point", ["publish-objects", "update-ref", "published"])
def test_killed_while_publishing_changes_then_rerun_ends_intact(tmp_path, recording, release_recipe, point):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, **QUIET)
    user_commit(out / "repos" / "Tiny-Llama-GGUF.git", "main", {"NOTES.md": b"mine\n"})
    set_recipe(release_recipe, lambda d: (d["gguf"].update(types=["Q8_0", "Q5_K_M"]), d["gptq"][0].update(damp=0.05)))
    run_killed(release_recipe, out, point)
    result = api.release(release_recipe, out=out, **QUIET)
    assert not result.failed
    assert_release_intact(out, out / "repos")
    gguf = out / "repos" / "Tiny-Llama-GGUF.git"
    assert branch_files(gguf, "main") == {".gitattributes", "README.md", RECORD_FILE, "NOTES.md",
                                          "Tiny-Llama.Q8_0.gguf", "Tiny-Llama.Q5_K_M.gguf"}


def test_a_git_lock_not_left_by_us_is_not_removed(tmp_path, recording, release_recipe, capsys):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, **QUIET)
    lock = out / "repos" / "Tiny-Llama-GGUF.git" / "refs" / "heads" / "main.lock"
    lock.write_text("someone's git is writing\n")  # our last run finished cleanly: this is not ours
    set_recipe(release_recipe, lambda d: d["gguf"].update(types=["Q8_0"]))
    assert main(["release", str(release_recipe), "--out", str(out)]) == 1
    assert "main.lock exists: a git command is using Tiny-Llama-GGUF.git" in capsys.readouterr().err
    assert lock.exists()


def rewrite_record(repo: Path, branch: str, change) -> None:
    record = json.loads(show(repo, branch, RECORD_FILE))
    change(record)
    user_commit(repo, branch, {RECORD_FILE: (json.dumps(record, indent=2) + "\n").encode()})


def test_a_record_from_before_release_ids_is_ours_only_with_our_files(tmp_path, recording, release_recipe,
                                                                     shared_repos, capsys):
    first = tmp_path / "first"
    api.release(release_recipe, out=first, **QUIET)
    gguf = shared_repos / "Tiny-Llama-GGUF.git"
    for repo in shared_repos.glob("*.git"):
        for branch in git(repo, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/heads").split():
            rewrite_record(repo, branch, lambda r: (r.pop("release"), r.pop("files"), r.update(record_version=2)))
    assert main(["release", str(release_recipe), "--out", str(tmp_path / "elsewhere")]) == 2  # not this folder's
    assert "without a release id that this output folder did not make" in capsys.readouterr().err
    set_recipe(release_recipe, lambda d: d["gguf"].update(types=["Q8_0"]))
    assert main(["release", str(release_recipe), "--out", str(first)]) == 0  # the folder that made it
    assert branch_files(gguf, "main") == {".gitattributes", "README.md", RECORD_FILE, "Tiny-Llama.Q8_0.gguf"}
    assert json.loads(show(gguf, "main", RECORD_FILE))["release"]["id"] == (first / RELEASE_ID_FILE).read_text().strip()
