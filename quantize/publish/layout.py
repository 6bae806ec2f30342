"""What each branch of each release repo must hold, from the manifests and the cards, and what to
change on a branch to get there. Pure.

GPTQ/AWQ: one branch per variant, holding that variant's folder, the repo's card and the
reproducibility record. GGUF: every file side by side on main, with the card and the record.
The record lists the files quantize made on the branch: only those are ever replaced or deleted,
so files added by hand stay.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..card.context import CardAssets
from ..card.original import PromptTemplate
from ..manifest import Manifest
from ..plan import Plan

CARD_FILE = "README.md"
RECORD_FILE = "quantize-release.json"
RECORD_VERSION = 3  # 3: the release's identity and the files quantize made on the branch
# Files the Hub (and our local target) treat as LFS, as the Hub's default .gitattributes does.
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                ".model", ".npy", ".npz", ".zip", ".tar", ".gz", ".7z", ".arrow", ".parquet")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files from this size on (and binary ones) with LFS
# Recipe fields holding local paths: the record keeps only their names.
LOCAL_PATHS = {"source": ("path", "card"), "calibration": ("path",), "card": ("header", "footer", "templates"),
               "publish": ("path",)}


@dataclass(frozen=True)
class ReleaseIdentity:
    """Whose release a branch is: proven by the random id kept in the output folder (`.release-id`)."""

    id: str
    source: str  # the source model's repo id (or its folder's name)
    basename: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "source": self.source, "basename": self.basename}


@dataclass(frozen=True)
class RemoteFile:
    """A file as a branch holds it."""

    size: int
    sha256: str | None = None  # LFS files: the object's sha256
    blob_id: str | None = None  # regular files: the git blob id


@dataclass
class BranchState:
    """What a branch holds now: its head commit (None: no such branch), files and our record."""

    head: str | None
    files: dict[str, RemoteFile] = field(default_factory=dict)
    record: dict[str, Any] | None = None

    @property
    def release(self) -> dict[str, Any] | None:
        return (self.record or {}).get("release")

    def owned(self) -> set[str]:
        """The files quantize made on this branch, as its record lists them (a record written before
        the list existed: its variants' files, the card and the record)."""
        if not self.record:
            return set()
        if "files" in self.record:
            return set(self.record["files"] or [])
        owned = {CARD_FILE, RECORD_FILE}
        for variant in self.record.get("variants") or []:
            for entry in variant.get("files") or []:
                path, subdir = Path(entry.get("path", "")), Path(variant.get("subdir", ""))
                owned.add((path.relative_to(subdir) if path.is_relative_to(subdir) else path).as_posix())
        return owned

    def foreign_files(self) -> set[str]:
        return set(self.files) - {".gitattributes"}


@dataclass
class BranchContent:
    repo_id: str
    branch: str
    files: dict[str, Path]  # path in the repo -> local file (weights, configs, tokenizer)
    generated: dict[str, bytes] = field(default_factory=dict)  # README.md, the record
    expected: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (size, sha256) from manifests
    kept: dict[str, tuple[int, str]] = field(default_factory=dict)  # published files of variants not made here

    def all_paths(self) -> list[str]:
        return sorted({*self.files, *self.kept, *self.generated})


@dataclass
class Changes:
    adds: list[str]  # paths (in `files` or `generated`) the branch lacks or holds differently
    deletes: list[str]  # files quantize made on the branch that are no longer part of it


def is_lfs(path: str) -> bool:
    return path.lower().endswith(LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub) gives a regular file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def same_file(remote: RemoteFile | None, size: int, sha256: str, read_bytes: Callable[[], bytes]) -> bool:
    """Whether the branch already holds this content (LFS: size and sha256; regular: git blob id)."""
    if remote is None or remote.size != size:
        return False
    if remote.sha256 is not None:
        return remote.sha256 == sha256
    return remote.blob_id is not None and remote.blob_id == git_blob_id(read_bytes())


def plan_changes(content: BranchContent, state: BranchState) -> Changes:
    """What to send and what to delete: never a file quantize didn't make (the record says which)."""
    adds = [path for path, local in sorted(content.files.items())
            if not same_file(state.files.get(path), *content.expected[path], local.read_bytes)]
    adds += [path for path, data in sorted(content.generated.items())
             if not same_file(state.files.get(path), len(data), hashlib.sha256(data).hexdigest(), lambda d=data: d)]
    stale = (state.owned() & set(state.files)) - set(content.all_paths()) - {".gitattributes"}
    return Changes(adds, sorted(stale))


def branch_mismatches(content: BranchContent, remote: dict[str, RemoteFile], owned_before: set[str]) -> list[str]:
    """What the branch holds that differs from what it should hold (files not ours are not judged)."""
    problems = []
    for path in content.all_paths():
        held = remote.get(path)
        if held is None:
            problems.append(f"{path}: missing on the remote")
            continue
        if path in content.generated:
            data = content.generated[path]
            size, sha256, blob = len(data), hashlib.sha256(data).hexdigest(), git_blob_id(data)
        else:
            (size, sha256), blob = content.expected[path], None
        if held.size != size:
            problems.append(f"{path}: remote size {held.size} != {size}")
        elif held.sha256 is not None and held.sha256 != sha256:
            problems.append(f"{path}: remote sha256 differs from the manifest")
        elif held.sha256 is None and blob is not None and held.blob_id not in (None, blob):
            problems.append(f"{path}: remote content differs")
    left = (owned_before & set(remote)) - set(content.all_paths()) - {".gitattributes"}
    problems += [f"{path}: made by quantize, no longer part of the branch, still there" for path in sorted(left)]
    return problems


def _name_only(value: Any) -> Any:
    return Path(value).name if isinstance(value, str) and value else value


def public_recipe(recipe) -> dict[str, Any]:
    """The recipe as the record publishes it: local paths reduced to file or folder names."""
    data = json.loads(recipe.model_dump_json(exclude={"base_dir"}))
    for section, keys in LOCAL_PATHS.items():
        for key in keys:
            if (data.get(section) or {}).get(key):
                data[section][key] = _name_only(data[section][key])
    return data


def public_manifest(manifest: Manifest) -> dict[str, Any]:
    """A manifest as the record publishes it: no local paths, no local file times."""
    data = json.loads(manifest.model_dump_json())
    for entry in data["files"]:
        entry.pop("mtime_ns", None)
    if (data.get("calibration") or {}).get("path"):
        data["calibration"]["path"] = _name_only(data["calibration"]["path"])
    return data


def release_record(plan: Plan, manifests: list[Manifest], prompt: PromptTemplate, assets: CardAssets,
                   identity: ReleaseIdentity | None = None, files: list[str] | None = None) -> bytes:
    """Everything needed to rebuild or audit the branch (recipe, parameters, tools, seeds, hashes),
    to re-render its card later without the source model (`quantize card --from-hub`), whose
    release it is, and which of the branch's files quantize made (the only ones it ever replaces
    or deletes)."""
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "release": identity.to_dict() if identity else None,
        "files": files or [],
        "recipe": public_recipe(plan.recipe),
        "source_config": plan.source.facts.config if plan.source.facts else None,
        "prompt_template": {"name": prompt.name, "text": prompt.text},
        "card": assets.to_dict(),  # header, footer and template overrides, for regenerating the card
        "release_variants": [v.id for v in plan.variants],  # the whole release, in card order
        "variants": [public_manifest(m) for m in manifests],
    }
    return (json.dumps(record, indent=2, sort_keys=False) + "\n").encode()


def branch_contents(plan: Plan, out_dir: Path, manifests: dict[str, Manifest], cards: dict[str, dict[str, bytes]],
                    prompt: PromptTemplate, assets: CardAssets, identity: ReleaseIdentity | None = None,
                    carried: set[str] = frozenset()) -> list[BranchContent]:
    """One BranchContent per (repo, branch) with a produced variant; `cards` maps repo_id -> the card's
    files (README.md and the release's chart, `RenderedCard.files()`), put on every branch of the repo.

    Variants in `carried` were not made in this output folder: their files stay as published.
    """
    contents: dict[tuple[str, str], BranchContent] = {}
    produced: dict[tuple[str, str], list[Manifest]] = {}
    for variant in plan.variants:
        manifest = manifests.get(variant.id)
        if manifest is None:
            continue
        key = (variant.repo_id, variant.branch)
        content = contents.setdefault(key, BranchContent(variant.repo_id, variant.branch, {}))
        produced.setdefault(key, []).append(manifest)
        for entry in manifest.files:
            in_repo = manifest.repo_path(entry)
            content.expected[in_repo] = (entry.size, entry.sha256)
            if variant.id in carried:
                content.kept[in_repo] = (entry.size, entry.sha256)
            else:
                content.files[in_repo] = Path(out_dir) / entry.path
    for key, content in contents.items():
        if content.repo_id not in cards:
            raise ValueError(f"no card rendered for {content.repo_id}")
        content.generated.update(cards[content.repo_id])
        owned = sorted({*content.files, *content.kept, *content.generated, RECORD_FILE})
        content.generated[RECORD_FILE] = release_record(plan, produced[key], prompt, assets, identity, owned)
    return list(contents.values())
