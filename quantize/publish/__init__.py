"""Publishing: put every produced variant on its repo and branch, with the cards, and verify it.

layout.py says what each branch must hold (pure); local.py (bare git repos on disk) and hub.py
(the Hugging Face Hub through huggingface_hub) make a branch hold exactly that and report what
it holds, so the same verification runs for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import WorkFailed
from ..card.context import CardAssets
from ..card.original import PromptTemplate
from ..manifest import Manifest
from ..plan import Plan
from .layout import BranchContent, branch_contents, is_lfs


class Target(Protocol):
    def check(self, repo_ids: list[str]) -> None: ...

    def publish(self, content: BranchContent, log: Callable[[str], None]) -> list[str]: ...

    def remote_files(self, content: BranchContent) -> dict[str, tuple[int, str | None]]: ...


@dataclass
class PublishedBranch:
    repo_id: str
    branch: str
    files: list[str]
    uploaded: list[str]  # paths whose bytes were sent (or stored) in this run


def branch_mismatches(content: BranchContent, remote: dict[str, tuple[int, str | None]]) -> list[str]:
    """What the remote branch holds that differs from what it should hold."""
    wanted = set(content.all_paths())
    present = set(remote) - {".gitattributes"}
    problems = [f"{path}: missing on the remote" for path in sorted(wanted - present)]
    problems += [f"{path}: on the remote but not part of the variant" for path in sorted(present - wanted)]
    for path in sorted(wanted & present):
        size, sha256 = remote[path]
        if path in content.generated:
            expected_size, expected_sha = len(content.generated[path]), None
        else:
            expected_size, expected_sha = content.expected.get(path, (content.files[path].stat().st_size, None))
        if size != expected_size:
            problems.append(f"{path}: remote size {size} != {expected_size}")
        elif is_lfs(path) and expected_sha and sha256 != expected_sha:
            problems.append(f"{path}: remote sha256 differs from the manifest")
    return problems


def make_target(plan: Plan, out_dir: Path) -> Target:
    publish = plan.recipe.publish
    if publish.target == "local":
        from .local import LocalGitTarget

        return LocalGitTarget(plan.recipe.resolve(publish.path) or Path(out_dir) / "repos")
    from .hub import HubTarget

    return HubTarget(private=plan.recipe.release.private)


def publish_release(plan: Plan, out_dir: Path, manifests: dict[str, Manifest], cards: dict[str, str],
                    prompt: PromptTemplate, assets: CardAssets, target: Target,
                    log: Callable[[str], None] = print) -> list[PublishedBranch]:
    """Publish every produced variant's branch, then verify each one against its manifest."""
    published = []
    for content in branch_contents(plan, out_dir, manifests, cards, prompt, assets):
        uploaded = target.publish(content, log)
        problems = branch_mismatches(content, target.remote_files(content))
        if problems:
            raise WorkFailed(f"{content.repo_id}@{content.branch}: verification failed: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        log(f"{content.repo_id}@{content.branch}: published and verified ({len(uploaded)} file(s) sent)")
        published.append(PublishedBranch(content.repo_id, content.branch, content.all_paths(), uploaded))
    return published
