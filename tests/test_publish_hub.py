"""Publishing to the Hub, against the local stand-in driven by the real huggingface_hub client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, hf_hub_download

from quantize import api
from quantize.cli import main
from quantize.manifest import read_manifest, sha256_file
from quantize.publish.layout import RECORD_FILE

from .conftest import REPO
from .hub_server import LFS_UPLOAD_PREFIX, capped_client_backoff, hub  # noqa: F401  (hub: fixture)

QUIET = {"log": lambda message: None}


@pytest.fixture
def hub_recipe(release_recipe, monkeypatch) -> Path:
    data = yaml.safe_load(release_recipe.read_text())
    data["publish"] = {"target": "hub"}
    release_recipe.write_text(yaml.safe_dump(data))
    monkeypatch.setattr("quantize.publish.hub.RETRY_BASE_SECONDS", 0.01)
    return release_recipe


def files_on(hub, repo_id: str, branch: str) -> set[str]:
    return set(hub.files(repo_id, branch))


def test_release_creates_repos_branches_and_exact_files(hub, recording, hub_recipe, tmp_path):
    out = tmp_path / "out"
    result = api.release(hub_recipe, out=out, **QUIET)
    assert not result.failed and len(result.published) == 3
    refs = HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_refs("tester/Tiny-Llama-GPTQ")
    assert {b.name for b in refs.branches} == {"main", "gptq-8bit--1g-actorder_True"}
    expected = {".gitattributes", "README.md", RECORD_FILE, "model.safetensors", "config.json"}
    assert files_on(hub, "tester/Tiny-Llama-GPTQ", "main") == expected
    assert files_on(hub, "tester/Tiny-Llama-GPTQ", "gptq-8bit--1g-actorder_True") == expected
    assert files_on(hub, "tester/Tiny-Llama-GGUF", "main") == {
        ".gitattributes", "README.md", RECORD_FILE, "Tiny-Llama.Q4_K_M.gguf", "Tiny-Llama.Q8_0.gguf"}
    manifest = read_manifest(out, "gptq/gptq-8bit--1g-actorder_True")
    for entry in manifest.files:
        path = hf_hub_download("tester/Tiny-Llama-GPTQ", manifest.repo_path(entry), revision=manifest.branch,
                               endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "cache")
        assert sha256_file(Path(path)) == entry.sha256
    readme = hub.files("tester/Tiny-Llama-GPTQ", "gptq-8bit--1g-actorder_True")["README.md"].decode()
    assert "| [gptq-8bit--1g-actorder_True]" in readme and readme.startswith("---\n")


def test_rerun_uploads_nothing_and_commits_nothing(hub, recording, hub_recipe, tmp_path):
    api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    puts, commits = len(hub.lfs_upload_puts()), len(hub.requests("POST", "/commit/"))
    recording.calls.clear()
    result = api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    assert recording.calls == [] and all(p.uploaded == [] for p in result.published)
    assert len(hub.lfs_upload_puts()) == puts and len(hub.requests("POST", "/commit/")) == commits


def test_transient_errors_and_a_dropped_upload_are_survived(hub, recording, hub_recipe, tmp_path):
    hub.fail_next(2, status=503, path_contains="/commit/")  # the client does not retry commits; we do
    hub.fail_next(1, status=500, path_contains="/api/repos/create")
    hub.drop_connection(path_contains=LFS_UPLOAD_PREFIX, after_bytes=100, times=7)  # beyond the client's own retries
    with capped_client_backoff():
        result = api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    assert not result.failed and len(result.published) == 3
    assert any(r.dropped for r in hub.requests("PUT", LFS_UPLOAD_PREFIX))
    assert [r.status for r in hub.requests("POST", "/commit/")][:2] == [503, 503]
    completed = [r.path.split("?")[0] for r in hub.lfs_upload_puts()]
    assert len(completed) == len(set(completed))  # no object finished uploading twice


def test_killed_mid_upload_then_rerun_finishes_without_uploading_twice(hub, recording, hub_recipe, tmp_path):
    """A separate process is killed while an upload hangs; the rerun completes and verifies."""
    out = tmp_path / "out"
    api.release(hub_recipe, out=out, publish=False, **QUIET)  # quantization done; publishing not yet
    hub.drop_connection(path_contains=LFS_UPLOAD_PREFIX, after_bytes=10**9, times=1)  # never answers
    script = ("import sys; from tests.conftest import RecordingBackend; import quantize.runner as r; "
              "r.backend_class = lambda fmt: RecordingBackend; from quantize.cli import main; "
              f"sys.exit(main(['release', {str(hub_recipe)!r}, '--out', {str(out)!r}]))")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if hub.requests("PUT", LFS_UPLOAD_PREFIX) or process.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
    finally:
        process.kill()
        process.wait()
    assert hub.requests("PUT", LFS_UPLOAD_PREFIX), "the first run never reached an upload"
    recording.calls.clear()
    result = api.release(hub_recipe, out=out, **QUIET)
    assert recording.calls == [] and not result.failed and len(result.published) == 3
    completed = [r.path.split("?")[0] for r in hub.lfs_upload_puts()]
    assert len(completed) == len(set(completed))


def test_bad_token_is_one_line_before_any_work(hub, recording, hub_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    code = main(["release", str(hub_recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "token was rejected (401)" in err and "hf_not_a_real_token" not in err
    assert recording.calls == [] and not (tmp_path / "out").exists()


def test_token_without_write_permission(hub, recording, hub_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    code = main(["release", str(hub_recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to namespace 'tester'" in err and hub.read_token not in err
    assert recording.calls == []


def test_name_collision_with_a_foreign_repo(hub, recording, hub_recipe, tmp_path, capsys):
    hf = HfApi(endpoint=hub.endpoint, token=hub.token)
    hf.create_repo("tester/Tiny-Llama-GGUF")
    hf.upload_file(path_or_fileobj=b"somebody else's model", path_in_repo="weights.bin", repo_id="tester/Tiny-Llama-GGUF")
    code = main(["release", str(hub_recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "tester/Tiny-Llama-GGUF already exists on the Hub and was not made by quantize" in err
    assert len(err.strip().splitlines()) == 1 and recording.calls == []


def test_card_from_hub_rebuilds_and_pushes_only_readme(hub, recording, hub_recipe, tmp_path, capsys):
    api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    hf = HfApi(endpoint=hub.endpoint, token=hub.token)
    repo = "tester/Tiny-Llama-GPTQ"
    good = hub.files(repo, "main")["README.md"]
    for branch in ("main", "gptq-8bit--1g-actorder_True"):  # someone edits the cards by hand
        hf.upload_file(path_or_fileobj=good.replace(b"| Branch |", b"| BRANCH |"), path_in_repo="README.md",
                       repo_id=repo, revision=branch)
    puts = len(hub.lfs_upload_puts())

    assert main(["card", "--from-hub", repo, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "-| BRANCH |" in captured.out and "+| Branch |" in captured.out and "dry run: not pushed" in captured.err
    assert hub.files(repo, "main")["README.md"] != good

    assert main(["card", "--from-hub", repo]) == 0
    for branch in ("main", "gptq-8bit--1g-actorder_True"):
        assert hub.files(repo, branch)["README.md"] == good
    assert len(hub.lfs_upload_puts()) == puts  # no weights sent
    assert main(["card", "--from-hub", repo]) == 0
    assert "card (README.md, chart) unchanged" in capsys.readouterr().err


def test_card_from_hub_on_a_repo_without_records(hub, capsys):
    HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("tester/plain")
    assert main(["card", "--from-hub", "tester/plain"]) == 2
    assert "no branch of tester/plain has quantize-release.json" in capsys.readouterr().err


def test_card_from_hub_keeps_header_footer_and_template_overrides(hub, recording, hub_recipe, tmp_path):
    """One card path: a card regenerated from the Hub alone equals the one the release rendered locally."""
    folder = hub_recipe.parent
    (folder / "header.md").write_text("**Sponsored by the Test Lab.**")
    (folder / "footer.md").write_text("_Thanks to our supporters._")
    overrides = folder / "my-templates" / "partials"
    overrides.mkdir(parents=True)
    builtin = (REPO / "templates" / "partials" / "title.md.j2").read_text()
    (overrides / "title.md.j2").write_text(builtin + "\nOUR OWN TITLE PARTIAL\n")
    data = yaml.safe_load(hub_recipe.read_text())
    data["card"] = {"header": "header.md", "footer": "footer.md", "templates": "my-templates"}
    hub_recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    api.release(hub_recipe, out=out, **QUIET)
    for repo in ("tester/Tiny-Llama-GPTQ", "tester/Tiny-Llama-GGUF"):
        published = hub.files(repo, "main")["README.md"].decode()
        local = (out / "cards" / repo.split("/")[1] / "README.md").read_text()
        assert published == local
        for text in ("**Sponsored by the Test Lab.**", "_Thanks to our supporters._", "OUR OWN TITLE PARTIAL"):
            assert published.count(text) == 1, (repo, text)
        hf = HfApi(endpoint=hub.endpoint, token=hub.token)
        edited = published.replace("**Sponsored by the Test Lab.**", "edited by hand").replace("OUR OWN", "NOT OUR")
        hf.upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id=repo, revision="main")
        (folder / "header.md").unlink()  # regeneration needs nothing local: the record carries it
        assert main(["card", "--from-hub", repo]) == 0
        assert hub.files(repo, "main")["README.md"].decode() == local
        (folder / "header.md").write_text("**Sponsored by the Test Lab.**")


# --- publishing that never destroys (issue 11) ------------------------------------------------

GPTQ_REPO, GGUF_REPO, GPTQ_8BIT = "tester/Tiny-Llama-GPTQ", "tester/Tiny-Llama-GGUF", "gptq-8bit--1g-actorder_True"


def set_recipe(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def assert_hub_matches_manifests(hub, out: Path) -> None:
    """Every local file matches its manifest; every published file its branch's record and the local manifest."""
    import hashlib

    manifests = {}
    for path in (out / "manifests").rglob("*.json"):
        manifest = read_manifest(out, f"{path.parent.name}/{path.stem}")
        manifests[manifest.variant_id] = manifest
        for entry in manifest.files:
            assert sha256_file(out / entry.path) == entry.sha256
    for repo_id in (GPTQ_REPO, GGUF_REPO):
        for branch in HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_refs(repo_id).branches:
            files = hub.files(repo_id, branch.name)
            for variant in json.loads(files[RECORD_FILE])["variants"]:
                for entry in variant["files"]:
                    in_repo = Path(entry["path"]).relative_to(variant["subdir"]).as_posix()
                    assert hashlib.sha256(files[in_repo]).hexdigest() == entry["sha256"], (repo_id, in_repo)
                local = manifests.get(variant["variant_id"])
                if local is not None:
                    assert {(f.path, f.sha256) for f in local.files} == \
                           {(f["path"], f["sha256"]) for f in variant["files"]}


def test_hand_added_files_on_the_hub_survive_reruns(hub, recording, hub_recipe, tmp_path):
    out = tmp_path / "out"
    api.release(hub_recipe, out=out, **QUIET)
    hf = HfApi(endpoint=hub.endpoint, token=hub.token)
    chart = b"\x89PNG\r\n\x1a\n\0\0" + b"chart" * 300
    hf.upload_file(path_or_fileobj=b"# notes\n", path_in_repo="NOTES.md", repo_id=GGUF_REPO)
    hf.upload_file(path_or_fileobj=chart, path_in_repo="images/chart.png", repo_id=GGUF_REPO)
    hf.upload_file(path_or_fileobj=b"# 8-bit notes\n", path_in_repo="NOTES.md", repo_id=GPTQ_REPO, revision=GPTQ_8BIT)
    set_recipe(hub_recipe, lambda d: (d["gguf"].update(types=["Q8_0"]), d["gptq"][1].update(damp=0.05)))
    result = api.release(hub_recipe, out=out, **QUIET)
    assert not result.failed
    files = hub.files(GGUF_REPO, "main")
    assert set(files) == {".gitattributes", "README.md", RECORD_FILE, "NOTES.md", "images/chart.png",
                          "Tiny-Llama.Q8_0.gguf"}
    assert files["images/chart.png"] == chart and files["NOTES.md"] == b"# notes\n"
    assert hub.files(GPTQ_REPO, GPTQ_8BIT)["NOTES.md"] == b"# 8-bit notes\n"
    assert_hub_matches_manifests(hub, out)


def test_a_partial_release_from_a_fresh_folder_keeps_the_published_gguf_files(hub, recording, hub_recipe, tmp_path):
    api.release(hub_recipe, out=tmp_path / "first", **QUIET)
    before = hub.files(GGUF_REPO, "main")["Tiny-Llama.Q4_K_M.gguf"]
    recording.calls.clear()
    fresh = tmp_path / "fresh"  # a CI job: no output folder kept from the first run
    assert main(["release", str(hub_recipe), "--out", str(fresh), "--variants", "Q8_0"]) == 0
    assert recording.calls == ["gguf/Q8_0"]
    files = hub.files(GGUF_REPO, "main")
    assert files["Tiny-Llama.Q4_K_M.gguf"] == before and "Tiny-Llama.Q8_0.gguf" in files
    record = json.loads(files[RECORD_FILE])
    assert sorted(v["variant_id"] for v in record["variants"]) == ["gguf/Q4_K_M", "gguf/Q8_0"]
    assert "[Tiny-Llama.Q4_K_M.gguf]" in files["README.md"].decode()
    assert (fresh / ".release-id").read_text() == (tmp_path / "first" / ".release-id").read_text()
    assert {b.name for b in HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_refs(GPTQ_REPO).branches} == {
        "main", GPTQ_8BIT}


def test_a_repo_holding_only_the_users_readme_is_a_collision(hub, recording, hub_recipe, tmp_path, capsys):
    hf = HfApi(endpoint=hub.endpoint, token=hub.token)
    hf.create_repo(GPTQ_REPO)
    hf.upload_file(path_or_fileobj=b"# My own card\n", path_in_repo="README.md", repo_id=GPTQ_REPO)
    assert main(["release", str(hub_recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{GPTQ_REPO} already exists on the Hub and was not made by quantize" in err
    assert recording.calls == [] and hub.files(GPTQ_REPO)["README.md"] == b"# My own card\n"


def test_another_models_release_with_the_same_names_is_a_collision(hub, recording, hub_recipe, tmp_path, capsys):
    api.release(hub_recipe, out=tmp_path / "first", **QUIET)
    commits = len(hub.requests("POST", "/commit/"))
    set_recipe(hub_recipe, lambda d: d["source"].update(repo_id="someone/another-model"))
    recording.calls.clear()
    assert main(["release", str(hub_recipe), "--out", str(tmp_path / "second")]) == 2
    assert "holds another release (of test-lab/tiny-llama" in capsys.readouterr().err
    assert recording.calls == [] and len(hub.requests("POST", "/commit/")) == commits


def test_release_private_is_applied_to_an_existing_repo(hub, recording, hub_recipe, tmp_path):
    api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    assert not hub.repo(GPTQ_REPO).private
    set_recipe(hub_recipe, lambda d: d["release"].update(private=True))
    api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    assert hub.repo(GPTQ_REPO).private and hub.repo(GGUF_REPO).private
    set_recipe(hub_recipe, lambda d: d["release"].update(private=False))
    api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    assert hub.repo(GPTQ_REPO).private  # never made public by a rerun


def edit_on_the_hub_before_committing(monkeypatch, hub, times: int):
    """Someone commits to the branch between our read and our commit, `times` times."""
    from quantize.publish.hub import HubTarget

    original = HubTarget._operations
    edits = []

    def racing(self, content, state):
        operations = original(self, content, state)
        if len(edits) < times and content.repo_id == GPTQ_REPO and content.branch == "main":
            edits.append(content.branch)
            HfApi(endpoint=hub.endpoint, token=hub.token).upload_file(
                path_or_fileobj=f"edit {len(edits)}\n".encode(), path_in_repo=f"EDIT{len(edits)}.md",
                repo_id=GPTQ_REPO, revision="main")
        return operations

    monkeypatch.setattr(HubTarget, "_operations", racing)
    return edits


def test_a_concurrent_edit_is_not_overwritten(hub, recording, hub_recipe, tmp_path, monkeypatch):
    api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    set_recipe(hub_recipe, lambda d: d["gptq"][0].update(damp=0.05))
    edit_on_the_hub_before_committing(monkeypatch, hub, times=1)
    result = api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    assert not result.failed
    assert 412 in [r.status for r in hub.requests("POST", f"{GPTQ_REPO}/commit/main")]
    files = hub.files(GPTQ_REPO, "main")
    assert files["EDIT1.md"] == b"edit 1\n"  # kept, and our variant is there too
    assert_hub_matches_manifests(hub, tmp_path / "out")


def test_a_branch_that_keeps_moving_fails_naming_it(hub, recording, hub_recipe, tmp_path, monkeypatch, capsys):
    api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    set_recipe(hub_recipe, lambda d: d["gptq"][0].update(damp=0.05))
    edit_on_the_hub_before_committing(monkeypatch, hub, times=2)
    assert main(["release", str(hub_recipe), "--out", str(tmp_path / "out")]) == 1
    assert f"{GPTQ_REPO}@main changed while it was being published, twice" in capsys.readouterr().err
    assert set(hub.files(GPTQ_REPO, "main")) >= {"EDIT1.md", "EDIT2.md"}


def test_a_429_waits_as_long_as_retry_after_says(hub, recording, hub_recipe, tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr("quantize.publish.hub._sleep", sleeps.append)
    hub.fail_next(1, status=429, path_contains="/commit/", headers={"Retry-After": "900"})
    result = api.release(hub_recipe, out=tmp_path / "out", **QUIET)
    assert not result.failed and sleeps == [900.0]
    assert [r.status for r in hub.requests("POST", "/commit/")][:2] == [429, 200]


def test_a_429_asking_for_hours_fails_instead_of_hanging(hub, recording, hub_recipe, tmp_path, monkeypatch, capsys):
    sleeps = []
    monkeypatch.setattr("quantize.publish.hub._sleep", sleeps.append)
    hub.fail_next(1, status=429, path_contains="/commit/", headers={"Retry-After": "86400"})
    assert main(["release", str(hub_recipe), "--out", str(tmp_path / "out")]) == 1
    assert "the Hub asks to wait 86400 s" in capsys.readouterr().err and sleeps == []


def test_non_transient_errors_fail_at_once(hub, recording, hub_recipe, tmp_path, monkeypatch, capsys):
    sleeps = []
    monkeypatch.setattr("quantize.publish.hub._sleep", sleeps.append)
    hub.fail_next(1, status=400, path_contains="/commit/")
    assert main(["release", str(hub_recipe), "--out", str(tmp_path / "out")]) == 1
    assert "HTTP 400" in capsys.readouterr().err
    assert len(hub.requests("POST", "/commit/")) == 1 and sleeps == []

    calls = []

    def unreadable(*args, **kwargs):
        calls.append(1)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(HfApi, "create_commit", unreadable)
    assert main(["release", str(hub_recipe), "--out", str(tmp_path / "out")]) == 1
    assert "PermissionError" in capsys.readouterr().err and calls == [1] and sleeps == []


def test_same_size_corruption_is_made_again_and_never_uploaded(hub, recording, hub_recipe, tmp_path):
    import os

    out = tmp_path / "out"
    api.release(hub_recipe, out=out, **QUIET)
    weights = out / "gptq" / GPTQ_8BIT / "model.safetensors"
    good, stat = weights.read_bytes(), weights.stat()
    weights.write_bytes(good[:5] + bytes([good[5] ^ 1]) + good[6:])
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    recording.calls.clear()
    result = api.release(hub_recipe, out=out, **QUIET)
    assert recording.calls == [f"gptq/{GPTQ_8BIT}"] and not result.failed
    assert hub.files(GPTQ_REPO, GPTQ_8BIT)["model.safetensors"] == good == weights.read_bytes()


@pytest.mark.parametrize("point", ["hub-branch", "hub-commit", "published"])
def test_killed_while_publishing_to_the_hub_then_rerun_ends_intact(hub, recording, hub_recipe, tmp_path, point):
    import os

    out = tmp_path / "out"
    script = ("import sys; from tests.conftest import RecordingBackend; import quantize.runner as r; "
              "r.backend_class = lambda fmt: RecordingBackend; from quantize.cli import main; "
              f"sys.exit(main(['release', {str(hub_recipe)!r}, '--out', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "QUANTIZE_TEST_KILL_AT": point},
                          start_new_session=True, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    result = api.release(hub_recipe, out=out, **QUIET)
    assert not result.failed and len(result.published) == 3
    assert_hub_matches_manifests(hub, out)
