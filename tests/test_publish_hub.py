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
    assert "README.md unchanged" in capsys.readouterr().err


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
