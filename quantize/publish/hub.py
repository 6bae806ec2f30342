"""Publish to the Hugging Face Hub with huggingface_hub: repos, one branch per variant, verified.

Every step is idempotent: a branch is synced (files whose size and hash already match are not sent,
files quantize made that are no longer the variant's are deleted, files it didn't make stay), so a
rerun after any interruption finishes the job. Each commit names the head it was computed on
(`parent_commit`): when the branch moved meanwhile the Hub refuses it (412) and the branch is read
again. Transient failures (5xx, 408, 429, timeouts, dropped connections) are retried with backoff,
429 after the Retry-After the Hub asks for; anything else (a 4xx, a local file that can't be read)
fails at once. The token comes from HF_TOKEN or the huggingface_hub login and is never printed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from ..errors import BadInput, WorkFailed
from ..killpoints import kill_point
from . import BranchMoved
from .layout import RECORD_FILE, BranchContent, BranchState, RemoteFile, plan_changes

RETRIES = 6
RETRY_BASE_SECONDS = float(os.environ.get("QUANTIZE_RETRY_BASE_SECONDS", "2"))
MAX_RETRY_AFTER_SECONDS = 3600  # a 429 asking for longer fails (rerun later) rather than hang the job
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
PRECONDITION_FAILED = 412  # create_commit's parent_commit is no longer the branch's head


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: Exception) -> bool:
    """Worth retrying: the Hub or the network failing for a while, never a local file or a 4xx."""
    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in TRANSIENT_STATUS or (_status(exc) is None and exc.__cause__ is not None
                                                    and _is_transient(exc.__cause__))
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def retry_after(exc: Exception) -> float | None:
    """The seconds a 429's Retry-After asks for (delay-seconds or an HTTP date), None without one."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    value = str(headers.get("Retry-After") or headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _explain(exc: Exception, repo_id: str) -> str:
    status = _status(exc)
    if status == 401:
        return "the Hugging Face token was rejected (401): check HF_TOKEN or `hf auth login`"
    if status == 403:
        return f"the token may not write to {repo_id} (403): it needs write access to its namespace"
    if status == 409:
        return f"{repo_id}: name collision on the Hub (409): {type(exc).__name__}"
    return f"{repo_id}: {type(exc).__name__} (HTTP {status})" if status else f"{repo_id}: {type(exc).__name__}"


def _sleep(seconds: float) -> None:
    """How retries wait (tests replace it, so a long Retry-After costs them nothing)."""
    time.sleep(seconds)


class HubTarget:
    def __init__(self, private: bool = False, endpoint: str | None = None, token: str | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.api = HfApi(endpoint=endpoint, token=token)
        disable_progress_bars()  # our own log says what is uploaded; per-file bars flood CI logs
        self.private = private
        self.sleep = sleep
        self.where = "on the Hub"
        self._initial: dict[str, str] = {}

    def _retrying(self, what: str, repo_id: str, action: Callable, branch: str | None = None):
        for attempt in range(RETRIES):
            try:
                return action()
            except BranchMoved:
                raise
            except Exception as exc:
                if branch is not None and _status(exc) == PRECONDITION_FAILED:
                    raise BranchMoved(branch) from None
                if not _is_transient(exc) or attempt == RETRIES - 1:
                    raise WorkFailed(f"publish: {_explain(exc, repo_id)} while {what}") from None
                wait = retry_after(exc) if _status(exc) == 429 else None
                if wait is not None and wait > MAX_RETRY_AFTER_SECONDS:
                    raise WorkFailed(f"publish: {repo_id}: the Hub asks to wait {wait:.0f} s before more requests "
                                     f"(429) while {what}: rerun later") from None
                (self.sleep or _sleep)(wait if wait is not None else RETRY_BASE_SECONDS * 2 ** attempt)

    def check(self, repo_ids: list[str]) -> None:
        """Before any work: a token that works and write access to the namespaces."""
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

    # --- reading ---------------------------------------------------------------------------

    def _heads(self, repo_id: str) -> dict[str, str] | None:
        """branch -> head commit; None when the repo doesn't exist."""
        def read():
            try:
                return {ref.name: ref.target_commit for ref in self.api.list_repo_refs(repo_id).branches}
            except RepositoryNotFoundError:
                return None
        return self._retrying("reading its branches", repo_id, read)

    def _download(self, repo_id: str, path: str, revision: str) -> bytes:
        with tempfile.TemporaryDirectory() as cache:
            return Path(self.api.hf_hub_download(repo_id, path, revision=revision, cache_dir=cache)).read_bytes()

    def _files_at(self, repo_id: str, revision: str) -> dict[str, RemoteFile]:
        entries = self._retrying(f"listing {revision}", repo_id, lambda: list(self.api.list_repo_tree(
            repo_id, revision=revision, recursive=True, expand=False)))
        return {entry.path: RemoteFile(entry.lfs.size, entry.lfs.sha256) if entry.lfs else
                RemoteFile(entry.size, blob_id=entry.blob_id) for entry in entries if hasattr(entry, "blob_id")}

    def _state_at(self, repo_id: str, head: str) -> BranchState:
        files = self._files_at(repo_id, head)
        record = None
        if RECORD_FILE in files:
            data = self._retrying(f"reading {RECORD_FILE}", repo_id, lambda: self._download(repo_id, RECORD_FILE, head))
            try:
                record = json.loads(data)
            except ValueError:
                record = None
        return BranchState(head, files, record if isinstance(record, dict) else None)

    def read_states(self, repo_id: str) -> dict[str, BranchState]:
        heads = self._heads(repo_id)
        return {branch: self._state_at(repo_id, head) for branch, head in (heads or {}).items()}

    def branch_state(self, repo_id: str, branch: str) -> BranchState:
        head = (self._heads(repo_id) or {}).get(branch)
        return self._state_at(repo_id, head) if head else BranchState(None)

    def remote_files(self, content: BranchContent) -> dict[str, RemoteFile]:
        return self._files_at(content.repo_id, content.branch)

    # --- writing -----------------------------------------------------------------------------

    def prepare_repo(self, repo_id: str, log: Callable[[str], None] = print) -> bool:
        """The repo exists (made private if the recipe says so, also when it existed); True when made now."""
        def ensure() -> bool:
            try:
                info = self.api.repo_info(repo_id)
            except RepositoryNotFoundError:
                self.api.create_repo(repo_id, private=self.private, exist_ok=True)
                return True
            if self.private and not info.private:
                self.api.update_repo_settings(repo_id, private=True)
                log(f"{repo_id}: made private (release.private)")
            return False
        return self._retrying("creating the repo", repo_id, ensure)

    def _initial_commit(self, repo_id: str) -> str:
        """main's first commit: where a new branch starts, so it holds nothing of another branch."""
        if repo_id not in self._initial:
            commits = self._retrying("reading main's history", repo_id,
                                     lambda: self.api.list_repo_commits(repo_id, revision="main"))
            self._initial[repo_id] = commits[-1].commit_id
        return self._initial[repo_id]

    def _create_branch(self, repo_id: str, branch: str, start: str) -> None:
        try:
            self.api.create_branch(repo_id, branch=branch, revision=start, exist_ok=False)
        except HfHubHTTPError as exc:
            if _status(exc) == 409:
                raise BranchMoved(branch) from None  # made meanwhile: read it
            raise

    def _operations(self, content: BranchContent, state: BranchState) -> list:
        changes = plan_changes(content, state)
        operations = []
        for path in changes.adds:
            if path in content.generated:
                operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=content.generated[path]))
                continue
            try:
                operation = CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(content.files[path]))
            except (OSError, ValueError) as exc:
                raise WorkFailed(f"publish: {path}: cannot read {content.files[path]} ({exc})") from None
            if operation.upload_info.sha256.hex() != content.expected[path][1]:  # hashed just now, as sent
                raise WorkFailed(f"publish: {path}: the file's sha256 differs from its manifest: not published "
                                 "(rerun: the variant is made again)")
            operations.append(operation)
        return operations + [CommitOperationDelete(path_in_repo=path) for path in changes.deletes]

    def publish(self, content: BranchContent, state: BranchState, log: Callable[[str], None] = print) -> list[str]:
        """Commit the branch's changes on top of `state.head`; BranchMoved when it moved meanwhile."""
        repo_id, branch = content.repo_id, content.branch
        if state.head is None:
            start = self._initial_commit(repo_id)
            self._retrying(f"creating branch {branch}", repo_id, lambda: self._create_branch(repo_id, branch, start),
                           branch)
            kill_point("hub-branch")
            state = BranchState(start, self._files_at(repo_id, start), None)
        operations = self._operations(content, state)
        if operations:
            self._retrying(f"uploading {branch}", repo_id, lambda: self.api.create_commit(
                repo_id, operations=operations, revision=branch, parent_commit=state.head,
                commit_message=f"quantize: upload {branch}"), branch)
            kill_point("hub-commit")
        return [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]


def _stored_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()
