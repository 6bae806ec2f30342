"""Publishing: put every produced variant on its repo and branch, with the cards, and verify it.

layout.py says what each branch must hold and what to change to get there (pure); ownership.py
proves the repos are this release's; local.py (bare git repos on disk) and hub.py (the Hugging
Face Hub through huggingface_hub) read a branch's state and apply the changes, committing only on
top of the head they read; the same verification runs for both.

Only files quantize made (listed in each branch's record) are ever replaced or deleted. A run that
made only some variants (`--variants`, or a fresh output folder) keeps the published files and
record entries of the others, so the card and the record describe the whole branch.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from pydantic import ValidationError

from ..card import card_assets, render_cards
from ..card.context import CardAssets
from ..card.original import PromptTemplate, prompt_template
from ..errors import WorkFailed
from ..killpoints import kill_point
from ..manifest import Manifest, mismatches, read_manifest
from ..plan import Plan
from ..quality import gate_problem
from .layout import BranchContent, BranchState, ReleaseIdentity, RemoteFile, branch_contents, branch_mismatches, is_lfs
from .ownership import claim_release

__all__ = ["BranchMoved", "PublishedBranch", "Target", "branch_mismatches", "carried_manifests", "claim",
           "is_lfs", "local_manifests", "make_target", "publish_release", "publish_variant", "published_manifests",
           "read_states"]


class BranchMoved(Exception):
    """The branch's head is no longer the commit its state was read at (someone committed meanwhile)."""


class Target(Protocol):
    where: str  # for messages: "on the Hub", "in <folder>"

    def check(self, repo_ids: list[str]) -> None: ...

    def read_states(self, repo_id: str) -> dict[str, BranchState]: ...  # {} when the repo doesn't exist

    def branch_state(self, repo_id: str, branch: str) -> BranchState: ...

    def prepare_repo(self, repo_id: str, log: Callable[[str], None]) -> bool: ...  # True when it was created

    def publish(self, content: BranchContent, state: BranchState, log: Callable[[str], None]) -> list[str]: ...

    def remote_files(self, content: BranchContent) -> dict[str, RemoteFile]: ...


@dataclass
class PublishedBranch:
    repo_id: str
    branch: str
    files: list[str]
    uploaded: list[str]  # paths whose bytes were sent (or stored) in this run


def make_target(plan: Plan, out_dir: Path) -> Target:
    publish = plan.recipe.publish
    if publish.target == "local":
        from .local import LocalGitTarget

        return LocalGitTarget(plan.recipe.resolve(publish.path) or Path(out_dir) / "repos")
    from .hub import HubTarget

    return HubTarget(private=plan.recipe.release.private)


def written_branches(plan: Plan) -> dict[str, set[str]]:
    branches: dict[str, set[str]] = {}
    for variant in plan.variants:
        branches.setdefault(variant.repo_id, set()).add(variant.branch)
    return branches


def read_states(target: Target, plan: Plan) -> dict[str, dict[str, BranchState]]:
    """Every branch of every existing release repo: head, files, record."""
    return {repo_id: states for repo_id in written_branches(plan) if (states := target.read_states(repo_id))}


def claim(plan: Plan, out_dir: Path, target: Target) -> ReleaseIdentity:
    """Before any work: this release's identity; BadInput when a repo or branch belongs to someone else."""
    return claim_release(plan, out_dir, read_states(target, plan), written_branches(plan), target.where)


def local_manifests(plan: Plan, out_dir: Path, verified: set[str], log: Callable[[str], None]) -> dict[str, Manifest]:
    """The manifests of the output folder whose files all match them (sha256); `verified` were checked already."""
    found = {}
    for variant in plan.variants:
        manifest = read_manifest(out_dir, variant.id)
        if manifest is None:
            continue
        problem = gate_problem(manifest.quality, plan.recipe.quality.max_kld)
        if problem:
            log(f"{variant.id}: not published: {problem}")
            continue
        if variant.id not in verified:
            problems = mismatches(out_dir, manifest, check_hashes=True)
            if problems:
                log(f"{variant.id}: not published: {problems[0]} (run with --variants {variant.name} to make it again)")
                continue
        found[variant.id] = manifest
    return found


def carried_manifests(plan: Plan, local: dict[str, Manifest],
                      states: dict[str, dict[str, BranchState]]) -> dict[str, Manifest]:
    """Published variants of the plan that this output folder did not make, whose files are all still on
    their branch: they stay as they are, in the record and on the card."""
    variants = {v.id: v for v in plan.variants}
    carried = {}
    for repo_id, branches in states.items():
        for branch, state in branches.items():
            for raw in (state.record or {}).get("variants") or []:
                try:
                    manifest = Manifest.model_validate(raw)
                except ValidationError:
                    continue
                variant = variants.get(manifest.variant_id)
                if variant is None or variant.id in local or (variant.repo_id, variant.branch) != (repo_id, branch):
                    continue
                held = [state.files.get(manifest.repo_path(entry)) for entry in manifest.files]
                if all(h is not None and h.size == e.size and h.sha256 in (None, e.sha256)
                       for h, e in zip(held, manifest.files)):
                    carried[variant.id] = manifest
    return carried


def _check_owner(content: BranchContent, state: BranchState, identity: ReleaseIdentity, where: str) -> None:
    """The branch still belongs to this release (it could have changed since the check before the work)."""
    at = f"{content.repo_id}@{content.branch}"
    release = state.release or {}
    if state.record is None and state.foreign_files():
        raise WorkFailed(f"publish: {at} now holds files not made by quantize {where}: not published (name collision)")
    if release.get("id") and release["id"] != identity.id:
        raise WorkFailed(f"publish: {at} now holds another release (release id {release['id']}): not published")


def publish_release(plan: Plan, out_dir: Path, manifests: dict[str, Manifest], cards: dict[str, dict[str, bytes]],
                    prompt: PromptTemplate, assets: CardAssets, target: Target,
                    log: Callable[[str], None] = print, identity: ReleaseIdentity | None = None,
                    carried: dict[str, Manifest] | None = None,
                    states: dict[str, dict[str, BranchState]] | None = None) -> list[PublishedBranch]:
    """Publish every produced variant's branch on top of the state read, then verify each one.

    A branch that moved meanwhile is read again and the changes recomputed, once; a second move
    fails naming the branch.
    """
    identity = identity or ReleaseIdentity("unset", "", plan.recipe.release.basename)
    carried = carried or {}
    states = dict(states if states is not None else read_states(target, plan))
    contents = branch_contents(plan, out_dir, {**carried, **manifests}, cards, prompt, assets, identity, set(carried))
    for repo_id in dict.fromkeys(content.repo_id for content in contents):
        if target.prepare_repo(repo_id, log) or repo_id not in states:
            states[repo_id] = target.read_states(repo_id)
    published = []
    for content in contents:
        def reread(attempt: int, content=content) -> tuple[BranchContent, BranchState]:
            return content, target.branch_state(content.repo_id, content.branch)

        state = states[content.repo_id].get(content.branch) or BranchState(None)
        published.append(_publish_branch(content, state, target, identity, log, reread, attempts=2))
    return published


def _publish_branch(content: BranchContent, state: BranchState, target: Target, identity: ReleaseIdentity,
                    log: Callable[[str], None], reread: Callable[[int], tuple[BranchContent, BranchState]],
                    attempts: int) -> PublishedBranch:
    """Commit `content` on top of `state`, then verify the branch. When the branch moved meanwhile,
    `reread(attempt)` gives the content and state to try again with, up to `attempts` tries in all."""
    for attempt in range(attempts):
        _check_owner(content, state, identity, target.where)
        try:
            uploaded = target.publish(content, state, log)
            break
        except BranchMoved:
            if attempt == attempts - 1:
                times = "twice" if attempts == 2 else f"{attempts} times"
                raise WorkFailed(f"publish: {content.repo_id}@{content.branch} changed while it was being "
                                 f"published, {times} (someone else commits to it): not published; rerun") from None
            log(f"{content.repo_id}@{content.branch}: changed meanwhile: reading it again")
            content, state = reread(attempt)
    problems = branch_mismatches(content, target.remote_files(content), state.owned())
    if problems:
        raise WorkFailed(f"{content.repo_id}@{content.branch}: verification failed: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    log(f"{content.repo_id}@{content.branch}: published and verified ({len(uploaded)} file(s) sent)")
    kill_point("published")
    return PublishedBranch(content.repo_id, content.branch, content.all_paths(), uploaded)


def published_manifests(plan: Plan, states: dict[str, dict[str, BranchState]]) -> dict[str, Manifest]:
    """The plan's variants published with the same fingerprint (what they would be made with now), every
    file still on its branch: finished, wherever they were made."""
    variants = {v.id: v for v in plan.variants}
    return {variant_id: manifest for variant_id, manifest in carried_manifests(plan, {}, states).items()
            if manifest.params_digest == variants[variant_id].digest}


def publish_variant(plan: Plan, out_dir: Path, manifest: Manifest, target: Target, identity: ReleaseIdentity,
                    log: Callable[[str], None] = print, attempts: int = 10,
                    pause: Callable[[int], None] | None = None) -> PublishedBranch:
    """Publish one variant made in `out_dir` (a Ray task's own folder) to its branch, with the card of
    every variant published so far.

    Other tasks publish to the same branch (GGUF files side by side on main) at the same time: when the
    branch moved, its state is read again and the record and card are rebuilt from it, so no other
    variant's files or record entries are lost; a random pause between tries spreads the racers out.
    """
    variant = next(v for v in plan.variants if v.id == manifest.variant_id)
    prompt, assets = prompt_template(plan.recipe), card_assets(plan.recipe)
    pause = pause or (lambda attempt: time.sleep(random.uniform(0.2, 1.0) * (attempt + 1)))
    target.prepare_repo(variant.repo_id, log)

    def build(attempt: int | None = None) -> tuple[BranchContent, BranchState]:
        if attempt is not None:
            pause(attempt)
        states = {variant.repo_id: target.read_states(variant.repo_id)}
        own = {variant.id: manifest}
        carried = carried_manifests(plan, own, states)
        cards = render_cards(plan, out_dir, manifests={**carried, **own})
        contents = branch_contents(plan, out_dir, {**carried, **own}, {c.repo_id: c.files() for c in cards},
                                   prompt, assets, identity, set(carried))
        content = next(c for c in contents if (c.repo_id, c.branch) == (variant.repo_id, variant.branch))
        return content, states[variant.repo_id].get(variant.branch) or BranchState(None)

    content, state = build()
    return _publish_branch(content, state, target, identity, log, build, attempts)
