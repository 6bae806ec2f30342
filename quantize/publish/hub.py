"""Publish to the Hugging Face Hub with huggingface_hub: repos, one branch per variant, verified.

Every step is idempotent: a branch is synced (files whose size and hash already match are not
sent, files that are not the variant's are deleted), so a rerun after any interruption finishes
the job. Transient failures (5xx, 429, timeouts, dropped connections) are retried with backoff.
The token comes from HF_TOKEN or the huggingface_hub login and is never printed.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from ..errors import BadInput, WorkFailed
from ..manifest import sha256_file
from .layout import RECORD_FILE, BranchContent, is_lfs

RETRIES = 6
RETRY_BASE_SECONDS = float(os.environ.get("QUANTIZE_RETRY_BASE_SECONDS", "2"))
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub) gives a regular file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in TRANSIENT_STATUS or _status(exc) is None
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__module__.startswith(("httpx", "httpcore"))


def _explain(exc: Exception, repo_id: str) -> str:
    status = _status(exc)
    if status == 401:
        return "the Hugging Face token was rejected (401): check HF_TOKEN or `hf auth login`"
    if status == 403:
        return f"the token may not write to {repo_id} (403): it needs write access to its namespace"
    if status == 409:
        return f"{repo_id}: name collision on the Hub (409): {type(exc).__name__}"
    return f"{repo_id}: {type(exc).__name__} (HTTP {status})" if status else f"{repo_id}: {type(exc).__name__}"


class HubTarget:
    def __init__(self, private: bool = False, endpoint: str | None = None, token: str | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.api = HfApi(endpoint=endpoint, token=token)
        disable_progress_bars()  # our own log says what is uploaded; per-file bars flood CI logs
        self.private = private
        self.sleep = sleep

    def _retrying(self, what: str, repo_id: str, action: Callable):
        for attempt in range(RETRIES):
            try:
                return action()
            except Exception as exc:
                if not _is_transient(exc) or attempt == RETRIES - 1:
                    raise WorkFailed(f"publish: {_explain(exc, repo_id)} while {what}") from None
                self.sleep(RETRY_BASE_SECONDS * 2 ** attempt)

    def check(self, repo_ids: list[str]) -> None:
        """Before any work: a token that works, write access to the namespaces, no foreign repos."""
        if not self.api.token and not _stored_token():
            raise BadInput("publish: no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                           "(or use publish.target: local)")
        try:
            identity = self.api.whoami()
        except HfHubHTTPError as exc:
            raise BadInput(f"publish: {_explain(exc, repo_ids[0])}") from None
        except Exception as exc:
            raise BadInput(f"publish: the Hub cannot be reached ({type(exc).__name__})") from None
        allowed = {identity.get("name")} | {org.get("name") for org in identity.get("orgs", [])}
        role = ((identity.get("auth") or {}).get("accessToken") or {}).get("role")
        for repo_id in repo_ids:
            namespace = repo_id.split("/")[0]
            if role == "read" or namespace not in allowed:
                raise BadInput(f"publish: the token ({identity.get('name')}) cannot write to namespace {namespace!r}")
            self._check_not_foreign(repo_id)

    def _check_not_foreign(self, repo_id: str) -> None:
        try:
            files = [f.path for f in self.api.list_repo_tree(repo_id, recursive=True)]
        except RepositoryNotFoundError:
            return
        except HfHubHTTPError as exc:
            raise BadInput(f"publish: {_explain(exc, repo_id)}") from None
        if set(files) - {".gitattributes", "README.md"} and RECORD_FILE not in files:
            raise BadInput(f"publish: {repo_id} already exists on the Hub and was not made by quantize "
                           "(name collision): choose another release.basename or namespace")

    def _tree(self, content: BranchContent) -> dict:
        return {entry.path: entry for entry in self.api.list_repo_tree(
            content.repo_id, revision=content.branch, recursive=True, expand=False) if hasattr(entry, "size")}

    def _ensure_branch(self, content: BranchContent) -> None:
        self.api.create_repo(content.repo_id, private=self.private, exist_ok=True)
        if content.branch != "main":
            self.api.create_branch(content.repo_id, branch=content.branch, exist_ok=True)

    def _operations(self, content: BranchContent, remote: dict) -> list:
        """Adds for what the branch lacks or holds differently, deletes for what isn't the variant's."""
        operations = []
        for path, local in sorted(content.files.items()):
            size, sha256 = content.expected.get(path) or (local.stat().st_size, sha256_file(local))
            if not _same_file(remote.get(path), size, sha256, local.read_bytes if not is_lfs(path) else None):
                operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)))
        for path, data in sorted(content.generated.items()):
            if not _same_file(remote.get(path), len(data), hashlib.sha256(data).hexdigest(), lambda d=data: d):
                operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=data))
        wanted = set(content.all_paths()) | {".gitattributes"}
        operations += [CommitOperationDelete(path_in_repo=path) for path in sorted(set(remote) - wanted)]
        return operations

    def _sync(self, content: BranchContent) -> list[str]:
        self._ensure_branch(content)
        operations = self._operations(content, self._tree(content))
        if operations:
            self.api.create_commit(content.repo_id, operations=operations, revision=content.branch,
                                   commit_message=f"quantize: upload {content.branch}")
        return [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]

    def publish(self, content: BranchContent, log: Callable[[str], None] = print) -> list[str]:
        return self._retrying(f"uploading {content.branch}", content.repo_id, lambda: self._sync(content))

    def remote_files(self, content: BranchContent) -> dict[str, tuple[int, str | None]]:
        tree = self._retrying(f"listing {content.branch}", content.repo_id, lambda: self._tree(content))
        return {path: (entry.lfs.size if entry.lfs else entry.size, entry.lfs.sha256 if entry.lfs else None)
                for path, entry in tree.items()}


def _same_file(entry, size: int, sha256: str, read_bytes: Callable[[], bytes] | None) -> bool:
    """Whether a remote tree entry already holds this content (LFS: sha256; regular: git blob id)."""
    if entry is None:
        return False
    if entry.lfs is not None:
        return entry.lfs.size == size and entry.lfs.sha256 == sha256
    return entry.size == size and read_bytes is not None and entry.blob_id == git_blob_id(read_bytes())


def _stored_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()
