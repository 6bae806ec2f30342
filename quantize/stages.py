"""The stage layer: shared work as artifacts with content keys, cached under `<out>/.work/`.

An artifact is a piece of work several variants need (calibration tokens, the f16 GGUF, the
importance matrix, an fp16 reference evaluation). It is plain data: its `inputs` are everything
that changes its result, `needs` the artifacts it is made from. Its content key is the digest of
its inputs, the keys of what it needs and the versions of the tools that make it. The plan
declares which artifacts each variant needs; an `ArtifactStore` computes each one at most once
per release, in a temporary folder renamed into place when complete, and reuses it in later runs
while its key and files are unchanged.

One digest (`content_key`), one timer (`Stopwatch`), one cache (`ArtifactStore.get`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .memory import bound_heap

WORK_DIR = ".work"
RECORD_FILE = "artifact.json"


def content_key(*parts: Any) -> str:
    """The one digest of the project: stable JSON of `parts`, sha256, 16 hex digits."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def folder_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of a folder's files (hidden ones left out)."""
    folder = Path(folder)
    entries = [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
               for p in sorted(folder.rglob("*"))
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return content_key(entries)


class Stopwatch:
    """Seconds per named stage, summed over repeats."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - started)

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 2)


class Artifact(ABC):
    """Shared work: computed at most once per release, cached under `<out>/.work/<name>/`."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Unique within a release; also the cache folder's name."""

    @abstractmethod
    def inputs(self) -> dict[str, Any]:
        """Everything (besides `needs` and tool versions) that changes the result."""

    def needs(self) -> tuple["Artifact", ...]:
        return ()

    def tool_versions(self, store: "ArtifactStore") -> dict[str, str]:
        return {}

    def estimated_bytes(self) -> int:
        """Disk the cached result takes, for the plan."""
        return 0

    def memory(self):
        """The peak memory computing it takes (memory.StageMemory), for the plan; None: nothing notable."""
        return None

    @abstractmethod
    def compute(self, store: "ArtifactStore", folder: Path) -> Any:
        """Write the result's files into `folder` (empty); return a JSON-able value."""

    def load(self, store: "ArtifactStore", folder: Path, value: Any) -> Any:
        """The in-memory result from the cached files and value (default: the value)."""
        return value

    def __repr__(self) -> str:
        return f"<artifact {self.name}>"


@dataclass(frozen=True)
class Result:
    """A computed (or reused) artifact."""

    name: str
    key: str
    folder: Path
    value: Any  # what `load` returned
    seconds: float  # what computing it cost (also when reused from an earlier run)
    reused: bool


@dataclass
class ArtifactStore:
    """Computes artifacts on demand, once per release, cached on disk between runs."""

    out_dir: Path
    log: Callable[[str], None] = print
    context: Any = None  # the release context, for artifacts that need the source model or tools
    output: Any = None  # capture.LibraryOutput: the libraries' output while computing goes to shared.log
    _results: dict[str, Result] = field(default_factory=dict)
    _failures: dict[str, Exception] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def work_dir(self) -> Path:
        return Path(self.out_dir) / WORK_DIR

    def folder(self, artifact: Artifact) -> Path:
        return self.work_dir / artifact.name

    def key(self, artifact: Artifact) -> str:
        needed = {a.name: self.key(a) for a in artifact.needs()}
        return content_key(artifact.name, artifact.inputs(), needed, artifact.tool_versions(self))

    def get(self, artifact: Artifact) -> Result:
        """The artifact's result: from this release's memory, the disk cache, or computed now."""
        with self._lock:
            if artifact.name in self._failures:  # fails every variant that needs it, without retrying
                raise self._failures[artifact.name]
            if artifact.name not in self._results:
                try:
                    self._results[artifact.name] = self._resolve(artifact)
                except Exception as exc:
                    self._failures[artifact.name] = exc
                    raise
            return self._results[artifact.name]

    def value(self, artifact: Artifact) -> Any:
        return self.get(artifact).value

    def _resolve(self, artifact: Artifact) -> Result:
        for needed in artifact.needs():
            self.get(needed)
        key = self.key(artifact)
        folder = self.folder(artifact)
        with file_lock(folder.with_name(folder.name + ".lock")):  # another process (a Ray task) may be making it
            record = _read_record(folder)
            if record and record.get("key") == key and _files_intact(folder, record.get("files", {})):
                value = artifact.load(self, folder, record.get("value"))
                return Result(artifact.name, key, folder, value, record.get("seconds", 0.0), True)
            return self._compute(artifact, key, folder)

    def _compute(self, artifact: Artifact, key: str, folder: Path) -> Result:
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.log(f"{artifact.name}: computing (shared work, once per release)")
        started = time.monotonic()
        bound_heap()
        with self.output.section("shared") if self.output is not None else nullcontext():
            value = artifact.compute(self, partial)
        seconds = round(time.monotonic() - started, 2)
        files = {p.relative_to(partial).as_posix(): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        record = {"name": artifact.name, "key": key, "inputs": artifact.inputs(),
                  "tools": artifact.tool_versions(self), "value": value, "seconds": seconds, "files": files}
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        return Result(artifact.name, key, folder, artifact.load(self, folder, value), seconds, False)

    def timings(self, artifacts: tuple[Artifact, ...]) -> dict[str, float]:
        """What the shared work behind a variant cost, as `<name>_shared` timings for its manifest."""
        found: dict[str, float] = {}

        def visit(artifact: Artifact) -> None:
            for needed in artifact.needs():
                visit(needed)
            if artifact.name in self._results:
                found[f"{artifact.name}_shared"] = self._results[artifact.name].seconds

        for artifact in artifacts:
            visit(artifact)
        return found


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, waited for: one process computes an artifact, the others then reuse it.
    The kernel drops the lock of a process that dies, so a killed one never blocks the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _files_intact(folder: Path, files: dict[str, int]) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
