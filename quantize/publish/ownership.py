"""Whose release a repo holds: a release id kept in the output folder and recorded on every branch.

A branch belongs to this release when its record (`quantize-release.json`) names the same release
id, source model and basename. A branch holding anything else (files without a record, or another
release's record) is a collision, found before any work starts. An output folder without an id
(a fresh `--out`, as in a CI job) adopts the id of the published release when every record agrees
and names the same source and basename; with nothing published, a new random id is made.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Iterable

from ..errors import BadInput
from ..manifest import read_manifest
from ..plan import Plan
from .layout import RECORD_FILE, BranchState, ReleaseIdentity

RELEASE_ID_FILE = ".release-id"


def read_release_id(out_dir: Path) -> str | None:
    try:
        value = (Path(out_dir) / RELEASE_ID_FILE).read_text().strip()
    except OSError:
        return None
    return value or None


def write_release_id(out_dir: Path, release_id: str) -> None:
    path = Path(out_dir) / RELEASE_ID_FILE
    if read_release_id(out_dir) != release_id:
        path.write_text(release_id + "\n")


def source_name(plan: Plan) -> str:
    """The source model as the record names it: its repo id, else its folder's name."""
    source = plan.recipe.source
    return source.base_model or (source.path.name if source.path else "model")


def _legacy_is_ours(record: dict, plan: Plan, out_dir: Path) -> bool:
    """A record written before release ids: ours when this folder's manifests hold the same files."""
    for raw in record.get("variants") or []:
        local = read_manifest(out_dir, raw.get("variant_id", ""))
        published = {(f.get("path"), f.get("sha256")) for f in raw.get("files") or []}
        if local is not None and published and {(f.path, f.sha256) for f in local.files} == published:
            return True
    return False


def claim_release(plan: Plan, out_dir: Path, states: dict[str, dict[str, BranchState]],
                  written: dict[str, Iterable[str]], where: str) -> ReleaseIdentity:
    """This release's identity, after checking every repo and branch it will write; BadInput on a collision.

    `states` maps repo id -> branch -> state (missing repos: no entry), `written` repo id -> the
    branches this release writes, `where` names the target in messages ("on the Hub").
    """
    local_id = read_release_id(out_dir)
    source, basename = source_name(plan), plan.recipe.release.basename
    found: dict[str, str] = {}  # published release id -> "repo@branch" where it was seen first
    for repo_id, branches in states.items():
        for branch, state in branches.items():
            at = f"{repo_id}@{branch}"
            if state.record is None:
                if branch in set(written.get(repo_id, ())) | {"main"} and state.foreign_files():
                    raise BadInput(f"publish: {repo_id} already exists {where} and was not made by quantize "
                                   f"({branch} holds {', '.join(sorted(state.foreign_files())[:3])}): name collision, "
                                   "choose another release.basename or namespace")
                continue
            release = state.release or {}
            if not release.get("id"):
                if _legacy_is_ours(state.record, plan, out_dir):
                    continue
                raise BadInput(f"publish: {at} holds a {RECORD_FILE} without a release id that this output folder "
                               "did not make (name collision): choose another release.basename or namespace")
            if release.get("source") != source or release.get("basename") != basename:
                raise BadInput(f"publish: {at} holds another release (of {release.get('source')}, basename "
                               f"{release.get('basename')}): name collision, choose another release.basename "
                               "or namespace")
            found.setdefault(release["id"], at)
    if local_id is not None:
        other = next(((rid, at) for rid, at in found.items() if rid != local_id), None)
        if other:
            raise BadInput(f"publish: {other[1]} holds another release of {source} (release id {other[0]}; this "
                           f"output folder's is {local_id}): publish from that release's output folder, or remove "
                           f"{Path(out_dir) / RELEASE_ID_FILE} to continue that release from here")
        return ReleaseIdentity(local_id, source, basename)
    if len(found) > 1:
        places = ", ".join(f"{at} ({rid})" for rid, at in found.items())
        raise BadInput(f"publish: the repos hold {len(found)} different releases of {source} ({places}): "
                       "name collision")
    return ReleaseIdentity(next(iter(found)) if found else secrets.token_hex(8), source, basename)
