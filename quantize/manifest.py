"""One manifest per produced variant: what was made, from what, with which tools, and how good it is.

Manifests are JSON files under `<out>/manifests/<format>/<name>.json`, written atomically and last:
a variant counts as finished only when its manifest exists and its files match it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2
MANIFEST_DIR = "manifests"
HASH_CHUNK = 8 * 1024 * 1024


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # relative to the release's output folder
    size: int
    sha256: str
    mtime_ns: int | None = None  # when the file was recorded: with the size, what "finished" is judged by


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    variant_id: str  # "gptq/main", "awq/main", "gguf/Q4_K_M"
    format: str
    repo_id: str
    branch: str
    name: str  # the branch (GPTQ/AWQ) or the GGUF type
    subdir: str  # the variant's folder below the output folder: paths in the repo are relative to it
    description: str = ""
    requested: dict[str, Any]  # the variant's parameters as the recipe asked for them
    measured: dict[str, Any] = Field(default_factory=dict)  # facts of the result: bpw, compute dtype, ...
    params_digest: str  # changes when anything that changes the variant's bytes does: then it is redone
    calibration: dict[str, Any] | None = None
    files: list[FileEntry]
    tools: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per stage
    quality: dict[str, Any] = Field(default_factory=dict)  # perplexity, baseline, evaluation text
    notes: list[str] = Field(default_factory=list)  # facts a reader should know (e.g. fallbacks)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def repo_path(self, entry: FileEntry) -> str:
        """A file's path inside its Hub repo/branch."""
        return Path(entry.path).relative_to(self.subdir).as_posix()

    def weight_files(self) -> list[FileEntry]:
        return [f for f in self.files if f.path.endswith((".safetensors", ".gguf", ".bin"))]


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def package_versions(packages) -> dict[str, str]:
    """The installed versions of `packages`, for a manifest's `tools` (missing ones left out)."""
    found = {name: installed_version(name) for name in packages}
    return {name: found_version for name, found_version in found.items() if found_version}


def manifest_path(out_dir: Path, variant_id: str) -> Path:
    return Path(out_dir) / MANIFEST_DIR / f"{variant_id}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(out_dir: Path, paths: list[Path]) -> list[FileEntry]:
    """Size, modification time and sha256 of each file, recorded relative to the output folder."""
    out_dir = Path(out_dir)
    entries = []
    for path in sorted(paths):
        stat = path.stat()
        entries.append(FileEntry(path=path.relative_to(out_dir).as_posix(), size=stat.st_size,
                                 sha256=sha256_file(path), mtime_ns=stat.st_mtime_ns))
    return entries


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it: done under a lock, and put back at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush to disk, then rename over it.

    The file gets the mode an ordinary write would give it (0666 less the umask: 0644 usually), not
    mkstemp's private 0600: cards and manifests are meant to be read by others.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    path = manifest_path(out_dir, manifest.variant_id)
    write_atomic(path, (manifest.model_dump_json(indent=2) + "\n").encode())
    return path


def read_manifest(out_dir: Path, variant_id: str) -> Manifest | None:
    """The variant's manifest, or None when there is none (or it is unreadable: then it is redone)."""
    path = manifest_path(out_dir, variant_id)
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def mismatches(out_dir: Path, manifest: Manifest, check_hashes: bool = False) -> list[str]:
    """What no longer matches the manifest: missing files, other sizes, other hashes.

    A file whose modification time differs from the recorded one is hashed (a copied folder keeps
    its bytes but not its times); with `check_hashes` every file is.
    """
    problems = []
    for entry in manifest.files:
        path = Path(out_dir) / entry.path
        if path.is_symlink() or not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        stat = path.stat()
        if stat.st_size != entry.size:
            problems.append(f"{entry.path}: size {stat.st_size} != {entry.size}")
        elif (check_hashes or stat.st_mtime_ns != entry.mtime_ns) and sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
    return problems


def refresh_times(out_dir: Path, manifest: Manifest) -> Manifest:
    """The manifest with its files' current modification times (after their hashes were found equal)."""
    files = [entry.model_copy(update={"mtime_ns": (Path(out_dir) / entry.path).stat().st_mtime_ns})
             for entry in manifest.files]
    return manifest.model_copy(update={"files": files})
