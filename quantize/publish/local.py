"""Publish to local bare git repositories: one per release repo, one branch per variant.

Weights are stored the way the Hub stores them: a Git LFS pointer in the tree and the object under
`<repo>.git/lfs/objects/` (hard-linked from the output folder, so no extra disk), which lets
`git clone` (with git-lfs) check out real files and `git push` the repo to the Hub.
Branches are written with git plumbing from an empty index, so each holds exactly its files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BadInput, WorkFailed
from ..manifest import sha256_file
from .layout import GITATTRIBUTES, BranchContent, is_lfs

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "quantize", "GIT_AUTHOR_EMAIL": "quantize@localhost",
                "GIT_COMMITTER_NAME": "quantize", "GIT_COMMITTER_EMAIL": "quantize@localhost"}
INITIAL_MESSAGE = "initial commit"


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class LocalGitTarget:
    def __init__(self, root: Path):
        self.root = Path(root)

    def check(self, repo_ids: list[str]) -> None:
        if shutil.which("git") is None:
            raise BadInput("publish: the local target needs git on PATH (or use publish.target: none)")

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / f"{repo_id.split('/')[-1]}.git"

    def _git(self, repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        result = subprocess.run(["git", f"--git-dir={repo}", *args], input=input, capture_output=True,
                                env={**os.environ, **GIT_IDENTITY, **(env or {})})
        if result.returncode != 0:
            raise WorkFailed(f"git {args[0]} in {repo} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode().strip()

    def _blob(self, repo: Path, data: bytes) -> str:
        return self._git(repo, "hash-object", "-w", "--stdin", input=data)

    def _ensure_repo(self, repo_id: str) -> Path:
        repo = self.repo_dir(repo_id)
        if not (repo / "HEAD").is_file():
            repo.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(repo)], check=True,
                           capture_output=True)
        if not self._ref(repo, "main"):
            tree = self._tree(repo, {".gitattributes": self._blob(repo, GITATTRIBUTES.encode())})
            commit = self._git(repo, "commit-tree", tree, "-m", INITIAL_MESSAGE)
            self._git(repo, "update-ref", "refs/heads/main", commit)
        return repo

    def _ref(self, repo: Path, branch: str) -> str | None:
        result = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", "--verify", "--quiet",
                                 f"refs/heads/{branch}"], capture_output=True)
        return result.stdout.decode().strip() or None

    def _initial_commit(self, repo: Path) -> str:
        return self._git(repo, "rev-list", "--max-parents=0", "refs/heads/main").splitlines()[-1]

    def _tree(self, repo: Path, blobs: dict[str, str]) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            listing = "".join(f"100644 {sha} 0\t{path}\n" for path, sha in sorted(blobs.items()))
            self._git(repo, "update-index", "--add", "--index-info", input=listing.encode(), env=env)
            return self._git(repo, "write-tree", env=env)

    def _store_lfs(self, repo: Path, source: Path, sha256: str) -> bool:
        """Hard-link (or copy) a file into the repo's LFS store; False when it was already there."""
        target = repo / "lfs" / "objects" / sha256[:2] / sha256[2:4] / sha256
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)
        except OSError:
            shutil.copy2(source, partial)
        partial.rename(target)
        return True

    def publish(self, content: BranchContent, log=print) -> list[str]:
        """Make the branch hold exactly `content`; returns the paths whose bytes were newly stored."""
        repo = self._ensure_repo(content.repo_id)
        blobs = {".gitattributes": self._blob(repo, GITATTRIBUTES.encode())}
        stored = []
        for path, local in sorted(content.files.items()):
            if is_lfs(path):
                size, sha256 = content.expected.get(path) or (local.stat().st_size, sha256_file(local))
                if self._store_lfs(repo, local, sha256):
                    stored.append(path)
                blobs[path] = self._blob(repo, lfs_pointer(sha256, size))
            else:
                blobs[path] = self._blob(repo, local.read_bytes())
        for path, data in content.generated.items():
            blobs[path] = self._blob(repo, data)
        tree = self._tree(repo, blobs)
        head = self._ref(repo, content.branch)
        parent = head or self._initial_commit(repo)
        if self._git(repo, "rev-parse", f"{parent}^{{tree}}") != tree:
            commit = self._git(repo, "commit-tree", tree, "-p", parent, "-m", f"Upload {content.branch}")
            self._git(repo, "update-ref", f"refs/heads/{content.branch}", commit)
        return stored

    def remote_files(self, content: BranchContent) -> dict[str, tuple[int, str | None]]:
        """path -> (size, sha256 for LFS files) as the branch holds them."""
        repo = self.repo_dir(content.repo_id)
        files = {}
        for line in self._git(repo, "ls-tree", "-r", "-l", f"refs/heads/{content.branch}").splitlines():
            meta, path = line.split("\t", 1)
            _, _, sha, size = meta.split()
            if is_lfs(path):
                pointer = dict(row.split(" ", 1) for row in self._git(repo, "cat-file", "-p", sha).splitlines())
                oid = pointer["oid"].removeprefix("sha256:")
                stored = repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
                files[path] = (stored.stat().st_size if stored.is_file() else -1, oid)
            else:
                files[path] = (int(size), None)
        return files
