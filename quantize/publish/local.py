"""Publish to local bare git repositories: one per release repo, one branch per variant.

Files are stored the way the Hub stores them: weights, files from 10 MB and binary files as Git LFS
pointers with the object under `<repo>.git/lfs/objects/` (a copy of the output file, or a reflink
where the filesystem has them, checked against the manifest's sha256), which lets `git clone` (with
git-lfs) check out real files and `git push` the repo to the Hub. A branch is changed with git
plumbing on top of the head it was read at: files quantize made are replaced or deleted, any other
file stays. The ref moves in a transaction that fails when the branch moved meanwhile.

One publisher at a time per repo: `<repo>.git/quantize.lock` (flock) holds its pid while it works,
so git lock files (`refs/heads/main.lock`, ...) found when the previous holder did not finish are
its own, left by a killed run, and are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import subprocess
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BadInput, WorkFailed
from ..killpoints import kill_point
from ..manifest import HASH_CHUNK, sha256_file
from ..toolenv import tool_env
from . import BranchMoved
from .layout import (GITATTRIBUTES, LFS_THRESHOLD, RECORD_FILE, BranchContent, BranchState, RemoteFile, is_lfs,
                     plan_changes)

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "quantize", "GIT_AUTHOR_EMAIL": "quantize@localhost",
                "GIT_COMMITTER_NAME": "quantize", "GIT_COMMITTER_EMAIL": "quantize@localhost",
                "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
INITIAL_MESSAGE = "initial commit"
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1\n"
POINTER_MAX = 200
ZERO_OID = "0" * 40
REPO_LOCK = "quantize.lock"
GIT_LOCKS = ("HEAD.lock", "config.lock", "index.lock", "packed-refs.lock", "shallow.lock")
FICLONE = 0x40049409  # Linux ioctl: share the source's blocks (btrfs, XFS, ...)


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def parse_pointer(data: bytes) -> tuple[str, int] | None:
    if not data.startswith(LFS_POINTER_PREFIX) or len(data) > POINTER_MAX:
        return None
    fields = dict(line.split(" ", 1) for line in data.decode(errors="replace").splitlines() if " " in line)
    try:
        return fields["oid"].removeprefix("sha256:"), int(fields["size"])
    except (KeyError, ValueError):
        return None


def needs_lfs(path: str, local: Path | bytes, size: int) -> bool:
    """As on the Hub: the usual weight suffixes, files from 10 MB, and binary files (a NUL byte)."""
    if is_lfs(path) or size >= LFS_THRESHOLD:
        return True
    if isinstance(local, bytes):
        return b"\0" in local
    with open(local, "rb") as handle:
        return b"\0" in handle.read()


def lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line.split()[1:]]


def attribute_matches(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(path, pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name if not pattern.startswith("/") else path, pattern.lstrip("/")):
            return True
    return False


def copy_verified(source: Path, target: Path) -> str:
    """Copy (or reflink) `source` to `target`; the sha256 of what `target` holds."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError:  # no reflinks here: a plain copy, hashed as it is written
            digest = hashlib.sha256()
            while chunk := src.read(HASH_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
            return digest.hexdigest()
    return sha256_file(target)


class LocalGitTarget:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.where = f"in {self.root}"
        self._hashes: dict[tuple[str, int, int], str] = {}  # (object, size, mtime_ns) -> sha256, this run

    def check(self, repo_ids: list[str]) -> None:
        if shutil.which("git") is None:
            raise BadInput("publish: the local target needs git on PATH (or use publish.target: none)")

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / f"{repo_id.split('/')[-1]}.git"

    # --- git ------------------------------------------------------------------------------

    def _env(self, extra: dict | None = None) -> dict[str, str]:
        return tool_env({**GIT_IDENTITY, **(extra or {})})

    def _git_bytes(self, repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> bytes:
        result = subprocess.run(["git", f"--git-dir={repo}", *args], input=input, capture_output=True,
                                env=self._env(env))
        if result.returncode != 0:
            raise WorkFailed(f"git {args[0]} in {repo} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def _git(self, repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        return self._git_bytes(repo, *args, input=input, env=env).decode().strip()

    def _blob(self, repo: Path, data: bytes) -> str:
        return self._git(repo, "hash-object", "-w", "--stdin", input=data)

    def _ref(self, repo: Path, branch: str) -> str | None:
        result = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", "--verify", "--quiet",
                                 f"refs/heads/{branch}"], capture_output=True, env=self._env())
        return result.stdout.decode().strip() or None

    def _initial_commit(self, repo: Path) -> str:
        return self._git(repo, "rev-list", "--max-parents=0", "refs/heads/main").splitlines()[-1]

    def _update_ref(self, repo: Path, branch: str, new: str, old: str | None) -> None:
        """Move the branch from `old` (None: it must not exist) to `new`, in one transaction."""
        process = subprocess.Popen(["git", f"--git-dir={repo}", "update-ref", "--stdin"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env())
        process.stdin.write(f"start\nupdate refs/heads/{branch} {new} {old or ZERO_OID}\nprepare\n".encode())
        process.stdin.flush()
        answers = [process.stdout.readline(), process.stdout.readline()]
        if answers[-1].strip() != b"prepare: ok":
            _, error = process.communicate()
            message = error.decode(errors="replace").strip()
            if "but expected" in message or "already exists" in message:
                raise BranchMoved(branch)
            raise WorkFailed(f"git update-ref in {repo} failed: {message}")
        kill_point("update-ref")  # the ref is locked now (refs/heads/<branch>.lock)
        _, error = process.communicate(b"commit\n")
        if process.returncode != 0:
            raise WorkFailed(f"git update-ref in {repo} failed: {error.decode(errors='replace').strip()}")

    # --- one publisher per repo, and what a killed one left --------------------------------

    def _git_lock_files(self, repo: Path) -> list[Path]:
        found = [repo / name for name in GIT_LOCKS if (repo / name).exists()]
        return found + sorted((repo / "refs").rglob("*.lock")) if (repo / "refs").is_dir() else found

    @contextlib.contextmanager
    def _repo_lock(self, repo: Path, log: Callable[[str], None]) -> Iterator[None]:
        fd = os.open(repo / REPO_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another release publishing to this repo: wait for it
            previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
            for lock in self._git_lock_files(repo):
                if not previous:
                    raise WorkFailed(f"publish: {lock} exists: a git command is using {repo.name} (remove the file "
                                     "if none is running)")
                lock.unlink(missing_ok=True)  # the previous publisher was killed while git held it
                log(f"{repo.name}: removed {lock.relative_to(repo)}, left by a killed run (pid {previous})")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
            os.ftruncate(fd, 0)  # finished: whatever lock files appear later are not ours
        finally:
            os.close(fd)

    def prepare_repo(self, repo_id: str, log: Callable[[str], None] = print) -> bool:
        """The bare repo with main at an initial commit holding .gitattributes; True when it was made now."""
        repo = self.repo_dir(repo_id)
        created = not (repo / "HEAD").is_file()
        if created:
            repo.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(repo)], check=True,
                           capture_output=True, env=self._env())
        with self._repo_lock(repo, log):
            if not self._ref(repo, "main"):
                tree = self._tree(repo, None, {".gitattributes": self._blob(repo, GITATTRIBUTES.encode())}, [])
                commit = self._git(repo, "commit-tree", tree, "-m", INITIAL_MESSAGE)
                self._update_ref(repo, "main", commit, None)
        return created

    # --- reading ---------------------------------------------------------------------------

    def read_states(self, repo_id: str) -> dict[str, BranchState]:
        repo = self.repo_dir(repo_id)
        if not (repo / "HEAD").is_file():
            return {}
        branches = self._git(repo, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/heads").split()
        return {branch: self._state(repo, branch) for branch in branches}

    def branch_state(self, repo_id: str, branch: str) -> BranchState:
        repo = self.repo_dir(repo_id)
        return self._state(repo, branch) if (repo / "HEAD").is_file() else BranchState(None)

    def _state(self, repo: Path, branch: str) -> BranchState:
        head = self._ref(repo, branch)
        if head is None:
            return BranchState(None)
        files, blobs = self._files(repo, head)
        record = None
        if RECORD_FILE in blobs:
            try:
                record = json.loads(self._git_bytes(repo, "cat-file", "blob", blobs[RECORD_FILE]))
            except ValueError:
                record = None
        return BranchState(head, files, record if isinstance(record, dict) else None)

    def _files(self, repo: Path, commit: str, check_objects: bool = False) -> tuple[dict[str, RemoteFile], dict]:
        """path -> RemoteFile at `commit` (LFS: from the pointer, or with `check_objects` from the stored
        object, hashed), and path -> blob id."""
        files, blobs = {}, {}
        for line in self._git(repo, "ls-tree", "-r", "-l", commit).splitlines():
            meta, path = line.split("\t", 1)
            _, _, blob, size = meta.split()
            blobs[path] = blob
            pointer = parse_pointer(self._git_bytes(repo, "cat-file", "blob", blob)) \
                if int(size) <= POINTER_MAX else None
            if pointer is None:
                files[path] = RemoteFile(int(size), blob_id=blob)
            elif check_objects:
                stored = self._object(repo, pointer[0])
                files[path] = RemoteFile(stored.stat().st_size, self._object_sha(stored)) if stored.is_file() \
                    else RemoteFile(-1, "missing")
            else:
                files[path] = RemoteFile(pointer[1], pointer[0])
        return files, blobs

    def remote_files(self, content: BranchContent) -> dict[str, RemoteFile]:
        """What the branch holds, LFS objects hashed (each at most once per run)."""
        repo = self.repo_dir(content.repo_id)
        return self._files(repo, f"refs/heads/{content.branch}", check_objects=True)[0]

    # --- LFS objects -------------------------------------------------------------------------

    @staticmethod
    def _object(repo: Path, sha256: str) -> Path:
        return repo / "lfs" / "objects" / sha256[:2] / sha256[2:4] / sha256

    def _object_sha(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]

    def _store_lfs(self, repo: Path, local: Path | bytes, sha256: str, path: str) -> bool:
        """The object (a file's copy, or generated bytes such as the card's chart) in the repo's LFS store,
        verified; False when an intact copy was already there."""
        target = self._object(repo, sha256)
        if target.is_file() and self._object_sha(target) == sha256:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{sha256}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        try:
            if isinstance(local, bytes):
                partial.write_bytes(local)
                digest = hashlib.sha256(local).hexdigest()
            else:
                digest = copy_verified(local, partial)
            if digest != sha256:
                raise WorkFailed(f"publish: {path}: the file's sha256 differs from its manifest: not published "
                                 "(rerun: the variant is made again)")
            os.chmod(partial, 0o444)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        stat = target.stat()
        self._hashes[(str(target), stat.st_size, stat.st_mtime_ns)] = sha256
        return True

    # --- writing -----------------------------------------------------------------------------

    def _tree(self, repo: Path, base: str | None, blobs: dict[str, str], deletes: list[str],
              lfs_paths: list[str] = ()) -> str:
        """`base`'s tree with `deletes` removed and `blobs` (path -> blob id) added; .gitattributes
        gains a line for each LFS path its patterns don't cover."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if base:
                self._git(repo, "read-tree", base, env=env)
            if lfs_paths and base:
                current = subprocess.run(["git", f"--git-dir={repo}", "cat-file", "blob", f"{base}:.gitattributes"],
                                         capture_output=True, env=self._env()).stdout.decode(errors="replace")
                text = current or GITATTRIBUTES
                missing = [p for p in lfs_paths if not attribute_matches(p, lfs_patterns(text))]
                if missing:
                    text = text + ("" if text.endswith("\n") or not text else "\n") + "".join(
                        f"/{p.replace(' ', '[[:space:]]')} filter=lfs diff=lfs merge=lfs -text\n" for p in missing)
                    blobs = {**blobs, ".gitattributes": self._blob(repo, text.encode())}
            listing = "".join(f"0 {ZERO_OID}\t{path}\n" for path in deletes)  # mode 0: remove
            listing += "".join(f"100644 {sha} 0\t{path}\n" for path, sha in sorted(blobs.items()))
            if listing:
                self._git(repo, "update-index", "--add", "--index-info", input=listing.encode(), env=env)
            return self._git(repo, "write-tree", env=env)

    def publish(self, content: BranchContent, state: BranchState, log: Callable[[str], None] = print) -> list[str]:
        """Apply the branch's changes on top of `state.head`; the paths whose bytes were newly stored.
        BranchMoved when the branch is no longer at `state.head`."""
        repo = self.repo_dir(content.repo_id)
        with self._repo_lock(repo, log):
            if self._ref(repo, content.branch) != state.head:
                raise BranchMoved(content.branch)
            changes = plan_changes(content, state)
            blobs, stored, lfs_paths = {}, [], []
            for path, local in sorted(content.files.items()):
                size, sha256 = content.expected[path]
                held = state.files.get(path)
                if needs_lfs(path, local, size):
                    lfs_paths.append(path)
                    if self._store_lfs(repo, local, sha256, path):
                        stored.append(path)
                    if path in changes.adds or (held is not None and held.sha256 is None):
                        blobs[path] = self._blob(repo, lfs_pointer(sha256, size))
                elif path in changes.adds:
                    data = local.read_bytes()
                    if hashlib.sha256(data).hexdigest() != sha256:
                        raise WorkFailed(f"publish: {path}: the file's sha256 differs from its manifest: not "
                                         "published (rerun: the variant is made again)")
                    blobs[path] = self._blob(repo, data)
            for path, data in sorted(content.generated.items()):
                if needs_lfs(path, data, len(data)):  # the card's chart (a PNG)
                    sha256 = hashlib.sha256(data).hexdigest()
                    lfs_paths.append(path)
                    if self._store_lfs(repo, data, sha256, path):
                        stored.append(path)
                    if path in changes.adds:
                        blobs[path] = self._blob(repo, lfs_pointer(sha256, len(data)))
                elif path in changes.adds:
                    blobs[path] = self._blob(repo, data)
            kill_point("publish-objects")
            base = state.head or self._initial_commit(repo)
            tree = self._tree(repo, base, blobs, changes.deletes, lfs_paths)
            if tree == self._git(repo, "rev-parse", f"{base}^{{tree}}"):
                return stored
            commit = self._git(repo, "commit-tree", tree, "-p", base, "-m", f"Upload {content.branch}")
            kill_point("publish-commit")
            self._update_ref(repo, content.branch, commit, state.head)
        return stored
