"""The Hub stand-in, driven by the real huggingface_hub client (LFS protocol, Xet off)."""

from __future__ import annotations

import hashlib
import os

from unittest import mock

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import get_session

from tests.hub_server import LFS_UPLOAD_PREFIX, HubStandIn, capped_client_backoff, git_blob_oid, hub  # noqa: F401

# huggingface_hub itself PUTs LFS bytes with httpx2's deprecated `data=<file>`: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "tester/Tiny-GPTQ"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights(size: int = 4096, seed: int = 0) -> bytes:
    """Binary test content (NUL bytes make the Hub choose LFS whatever the name)."""
    block = hashlib.sha256(str(seed).encode()).digest() + b"\0"
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token)


@pytest.fixture
def repo(api) -> str:
    api.create_repo(REPO)
    return REPO


def commit(api: HfApi, files: dict[str, bytes], revision: str | None = None, repo_id: str = REPO):
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    return api.create_commit(repo_id, operations=operations, commit_message="add files", revision=revision)


def status_of(error: HfHubHTTPError) -> int:
    return error.response.status_code


# --- repos -----------------------------------------------------------------------------------------


def test_create_repo_public_private_and_exist_ok(hub, api):
    url = api.create_repo("tester/Public-AWQ")
    assert url.repo_id == "tester/Public-AWQ" and url.startswith(hub.endpoint)
    api.create_repo("test-org/Secret-GGUF", private=True)

    assert api.model_info("tester/Public-AWQ").private is False
    assert api.model_info("test-org/Secret-GGUF").private is True
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("tester/Public-AWQ")
    assert status_of(conflict.value) == 409
    assert api.create_repo("tester/Public-AWQ", exist_ok=True).repo_id == "tester/Public-AWQ"

    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    assert anonymous.repo_exists("tester/Public-AWQ")
    assert not anonymous.repo_exists("test-org/Secret-GGUF")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("test-org/Secret-GGUF")
    assert not api.repo_exists("tester/Missing")


def test_new_repo_has_an_initial_commit_with_gitattributes(api, repo):
    info = api.model_info(repo)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert len(info.sha) == 40
    commits = api.list_repo_commits(repo)
    assert [c.title for c in commits] == ["initial commit"] and commits[0].commit_id == info.sha


def test_auth_errors_map_to_client_errors(hub, api, repo):
    bad = HfApi(endpoint=hub.endpoint, token="hf_not_a_real_token")
    with pytest.raises(HfHubHTTPError) as unauthorized:
        bad.create_repo("tester/Nope")
    assert status_of(unauthorized.value) == 401
    with pytest.raises(HfHubHTTPError) as bad_whoami:
        bad.whoami()
    assert status_of(bad_whoami.value) == 401

    reader = HfApi(endpoint=hub.endpoint, token=hub.read_token)
    for forbidden_write in (lambda: reader.create_repo("tester/Nope"),
                            lambda: reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo),
                            lambda: reader.create_branch(repo, branch="b")):
        with pytest.raises(HfHubHTTPError) as forbidden:
            forbidden_write()
        assert status_of(forbidden.value) == 403

    outsider = HfApi(endpoint=hub.endpoint, token=hub.add_token("hf_other", "someone", write=("someone",)))
    with pytest.raises(HfHubHTTPError) as other_namespace:
        outsider.create_repo("test-org/Nope")
    assert status_of(other_namespace.value) == 403
    assert api.whoami()["name"] == "tester" and [o["name"] for o in api.whoami()["orgs"]] == ["test-org"]


def test_not_found_errors_carry_the_hub_error_codes(hub, api, repo, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/Missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_tree(repo, revision="no-such-branch").__next__()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.json", endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path)


# --- uploads and downloads -------------------------------------------------------------------------


def test_regular_and_lfs_files_round_trip(hub, api, repo, tmp_path):
    readme = b"---\nlicense: apache-2.0\n---\n# Tiny\n"
    model = weights(4096)
    api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo)
    info = commit(api, {"model.safetensors": model, "config/config.json": b'{"bits": 4}'})

    stored = hub.repo(repo).resolve("main").files
    assert stored["README.md"].content == readme and not stored["README.md"].is_lfs
    assert stored["model.safetensors"].is_lfs and stored["config/config.json"].content is not None
    assert sha256(model) in hub.lfs_object_ids()

    tree = {entry.path: entry for entry in api.list_repo_tree(repo, recursive=True, expand=True)}
    assert set(tree) == {".gitattributes", "README.md", "config", "config/config.json", "model.safetensors"}
    lfs_entry = tree["model.safetensors"]
    assert isinstance(lfs_entry, RepoFile) and lfs_entry.size == len(model)
    assert lfs_entry.lfs.sha256 == sha256(model) and lfs_entry.lfs.size == len(model)
    assert lfs_entry.last_commit.oid == info.oid and tree["README.md"].last_commit.oid != info.oid
    assert tree["README.md"].blob_id == git_blob_oid(readme) and tree["README.md"].lfs is None
    assert [e.path for e in api.list_repo_tree(repo)] == ["config", ".gitattributes", "README.md",
                                                         "model.safetensors"]
    assert [e.path for e in api.list_repo_tree(repo, path_in_repo="config")] == ["config/config.json"]

    siblings = {s.rfilename: s for s in api.model_info(repo, files_metadata=True).siblings}
    assert siblings["model.safetensors"].lfs.sha256 == sha256(model)
    assert api.model_info(repo).card_data["license"] == "apache-2.0"

    metadata = api.get_hf_file_metadata(url=f"{hub.endpoint}/{repo}/resolve/main/model.safetensors")
    assert (metadata.etag, metadata.size, metadata.commit_hash) == (sha256(model), len(model), info.oid)
    for name, data in (("model.safetensors", model), ("README.md", readme)):
        local = hf_hub_download(repo, name, endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "cache")
        assert sha256(open(local, "rb").read()) == sha256(data)


def test_small_text_file_goes_lfs_by_gitattributes_and_large_ones_by_size(hub, api, repo):
    commit(api, {"tokenizer.model": b"tiny", "notes.txt": b"a" * 2000, "small.txt": b"b" * 10})
    files = hub.repo(repo).resolve("main").files
    assert files["tokenizer.model"].is_lfs  # *.model is in the Hub's default .gitattributes
    assert files["notes.txt"].is_lfs  # at least lfs_threshold (1 KiB in the fixture)
    assert not files["small.txt"].is_lfs


def test_branch_from_initial_commit_holds_only_its_files(hub, api, repo):
    initial = api.model_info(repo).sha
    commit(api, {"README.md": b"# main\n"})
    api.create_branch(repo, branch="4bit-32g-actorder", revision=initial)
    commit(api, {"model.safetensors": weights(2048), "README.md": b"# 4bit\n"}, revision="4bit-32g-actorder")

    assert set(api.list_repo_files(repo, revision="4bit-32g-actorder")) == {
        ".gitattributes", "model.safetensors", "README.md"}
    assert set(api.list_repo_files(repo)) == {".gitattributes", "README.md"}
    assert hub.files(repo, "main")["README.md"] == b"# main\n"
    assert hub.files(repo, "4bit-32g-actorder")["README.md"] == b"# 4bit\n"

    refs = api.list_repo_refs(repo)
    heads = {branch.name: branch.target_commit for branch in refs.branches}
    assert set(heads) == {"main", "4bit-32g-actorder"}
    assert heads["4bit-32g-actorder"] == api.model_info(repo, revision="4bit-32g-actorder").sha
    assert [c.commit_id for c in api.list_repo_commits(repo, revision="4bit-32g-actorder")][-1] == initial

    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch(repo, branch="4bit-32g-actorder")
    assert status_of(exists.value) == 409
    api.create_branch(repo, branch="4bit-32g-actorder", exist_ok=True)
    with pytest.raises(RevisionNotFoundError):
        api.create_branch(repo, branch="other", revision="0" * 40)


def test_branch_without_revision_starts_at_main_head_and_can_be_deleted(api, repo):
    head = commit(api, {"README.md": b"# main\n"}).oid
    api.create_branch(repo, branch="copy")
    assert api.model_info(repo, revision="copy").sha == head
    api.create_tag(repo, tag="v1", revision="copy")
    assert [t.target_commit for t in api.list_repo_refs(repo).tags] == [head]
    api.delete_branch(repo, branch="copy")
    assert [b.name for b in api.list_repo_refs(repo).branches] == ["main"]


def test_delete_operations_and_unchanged_files_are_skipped(hub, api, repo):
    commit(api, {"a.txt": b"a", "dir/b.txt": b"b", "dir/c.bin": weights(1500)})
    commits_before = len(hub.requests("POST", "/commit/"))
    commit(api, {"a.txt": b"a", "dir/c.bin": weights(1500)})  # identical: the client skips the commit
    assert len(hub.requests("POST", "/commit/")) == commits_before

    api.create_commit(repo, operations=[CommitOperationDelete("dir/")], commit_message="rm dir")
    assert set(api.list_repo_files(repo)) == {".gitattributes", "a.txt"}
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo, operations=[CommitOperationDelete("missing.txt")], commit_message="rm")


def test_invalid_readme_metadata_is_refused_before_upload(api, repo):
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\n- a list\n---\n", path_in_repo="README.md", repo_id=repo)


def test_lfs_object_already_stored_is_not_uploaded_again(hub, api, repo):
    model = weights(3000)
    commit(api, {"model.safetensors": model})
    api.create_branch(repo, branch="other")
    commit(api, {"renamed.safetensors": model}, revision="other")
    assert len(hub.lfs_upload_puts()) == 1
    assert len(hub.requests("POST", "info/lfs/objects/batch")) == 2

    api.create_repo("tester/Other-Repo")  # objects are scoped to a repo, like a git-LFS server
    commit(api, {"model.safetensors": model}, repo_id="tester/Other-Repo")
    assert len(hub.lfs_upload_puts()) == 2


def test_multipart_upload(tmp_path):
    data = weights(5000, seed=3)
    with HubStandIn(tmp_path / "hub", lfs_threshold=1024, multipart_chunk_size=2048) as stand_in, \
            stand_in.client_env():
        api = HfApi(endpoint=stand_in.endpoint, token=stand_in.token)
        api.create_repo(REPO)
        commit(api, {"model.gguf": data})
        assert len(stand_in.requests("PUT", "/part/")) == 3
        assert [e.status for e in stand_in.requests("POST", "/complete")] == [200]
        assert stand_in.files(REPO)["model.gguf"] == data


# --- faults ----------------------------------------------------------------------------------------


def test_injected_5xx_is_retried_where_the_client_retries(hub, api, repo):
    with capped_client_backoff():
        hub.fail_next(2, status=503, path_contains="/preupload/")
        hub.fail_next(1, status=500, path_contains="info/lfs/objects/batch")
        hub.fail_next(1, status=503, path_contains=LFS_UPLOAD_PREFIX)
        commit(api, {"model.safetensors": weights(2000)})
        hub.fail_next(1, status=500, path_contains="/tree/")
        assert ".gitattributes" in api.list_repo_files(repo)

    assert [e.status for e in hub.requests("POST", "/preupload/")] == [503, 503, 200]
    assert [e.status for e in hub.requests("PUT", LFS_UPLOAD_PREFIX)] == [503, 200]
    assert [e.status for e in hub.requests("GET", "/tree/")] == [500, 200]


def test_commit_on_a_stale_parent_commit_is_refused_with_412(hub, api, repo):
    head = api.list_repo_refs(repo).branches[0].target_commit
    commit(api, {"notes.txt": b"someone else's edit"})
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(repo, operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"a")],
                          commit_message="on a stale head", parent_commit=head)
    assert status_of(stale.value) == 412 and "A commit has happened since" in str(stale.value)
    assert "a.txt" not in hub.files(repo)
    current = api.list_repo_refs(repo).branches[0].target_commit
    api.create_commit(repo, operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"a")],
                      commit_message="on the head", parent_commit=current)
    assert set(hub.files(repo)) == {".gitattributes", "notes.txt", "a.txt"}


def test_injected_429_carries_retry_after(hub, api, repo):
    hub.fail_next(1, status=429, path_contains="/commit/", headers={"Retry-After": "900"})
    with pytest.raises(HfHubHTTPError) as limited:
        commit(api, {"a.txt": b"a"})
    assert status_of(limited.value) == 429 and limited.value.response.headers["Retry-After"] == "900"


def test_injected_failure_on_a_call_without_retry_surfaces(hub, api, repo):
    hub.fail_request_number(hub.request_count + 1, status=503)
    with pytest.raises(HfHubHTTPError) as unavailable:
        api.model_info(repo)
    assert status_of(unavailable.value) == 503
    assert api.model_info(repo).id == repo  # one-shot


def test_failed_commit_resumes_without_uploading_again(hub, api, repo):
    model = weights(4000)
    hub.fail_next(1, status=500, path_contains="/commit/")
    with pytest.raises(HfHubHTTPError) as failed:
        commit(api, {"model.safetensors": model})
    assert status_of(failed.value) == 500
    assert hub.files(repo) == {".gitattributes": hub.files(repo)[".gitattributes"]}

    commit(api, {"model.safetensors": model})
    assert hub.files(repo)["model.safetensors"] == model
    assert len(hub.lfs_upload_puts()) == 1


def test_dropped_lfs_upload_is_retried_by_the_client(hub, api, repo):
    with capped_client_backoff():
        hub.drop_connection(path_contains=LFS_UPLOAD_PREFIX, after_bytes=100)
        commit(api, {"model.safetensors": weights(3000)})
    puts = hub.requests("PUT", LFS_UPLOAD_PREFIX)
    assert [(e.dropped, e.status) for e in puts] == [(True, None), (False, 200)]
    assert puts[0].body_bytes == 100


def test_dropped_lfs_upload_surfaces_then_a_retry_skips_stored_objects(hub, api, repo):
    first, second = weights(3000, seed=1), weights(3000, seed=2)
    attempts = 6  # the client's http_backoff tries 1 + 5 times
    with capped_client_backoff():
        hub.drop_connection(path_contains=LFS_UPLOAD_PREFIX + sha256(second), after_bytes=10, times=attempts)
        with pytest.raises(RuntimeError, match="Error while uploading 'second.safetensors'"):
            commit(api, {"first.safetensors": first, "second.safetensors": second})
    assert sha256(first) in hub.lfs_object_ids() and sha256(second) not in hub.lfs_object_ids()
    assert set(hub.files(repo)) == {".gitattributes"}

    commit(api, {"first.safetensors": first, "second.safetensors": second})
    uploads = [e.path.split("/")[-1] for e in hub.lfs_upload_puts()]
    assert sorted(uploads) == sorted([sha256(first), sha256(second)])  # `first` only once
    assert hub.files(repo)["second.safetensors"] == second


def test_dropped_download_resumes_with_a_range_request(hub, api, repo, tmp_path):
    model = weights(5000)
    commit(api, {"model.safetensors": model})
    hub.drop_connection(path_contains="/resolve/", method="GET", after_bytes=1000)
    # The client keeps what it received only per DOWNLOAD_CHUNK_SIZE (10 MB) chunk: shrink it to resume mid-file.
    with capped_client_backoff(), mock.patch.object(constants, "DOWNLOAD_CHUNK_SIZE", 500):
        local = hf_hub_download(repo, "model.safetensors", endpoint=hub.endpoint, token=hub.token,
                                cache_dir=tmp_path / "cache")
    assert open(local, "rb").read() == model
    assert [(e.dropped, e.status) for e in hub.requests("GET", "/resolve/")] == [(True, None), (False, 206)]


def test_range_requests(hub, api, repo):
    model = weights(3000)
    commit(api, {"model.safetensors": model})
    url = f"{hub.endpoint}/{repo}/resolve/main/model.safetensors"
    headers = {"authorization": f"Bearer {hub.token}"}
    partial = get_session().get(url, headers={**headers, "Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == model[10:20]
    assert partial.headers["Content-Range"] == "bytes 10-19/3000"
    assert get_session().get(url, headers={**headers, "Range": "bytes=-5"}).content == model[-5:]
    assert get_session().get(url, headers={**headers, "Range": "bytes=5000-"}).status_code == 416


def test_client_env_points_module_level_functions_at_the_stand_in(hub, repo, tmp_path):
    import huggingface_hub

    assert os.environ["HF_ENDPOINT"] == hub.endpoint
    huggingface_hub.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=repo)
    local = hf_hub_download(repo, "hello.txt", cache_dir=tmp_path / "cache")
    assert open(local, "rb").read() == b"hello"
