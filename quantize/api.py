"""The Python API: what the CLI calls and what a CI job can import.

    from quantize import api
    plan = api.plan("recipes/demo.yaml")
    result = api.release("recipes/demo.yaml", out="out/demo", publish=False)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from huggingface_hub import get_token

from .calibration import CalibrationTextArtifact, check_available
from .card import RenderedCard, card_assets, check_cards, render_cards
from .card.original import prompt_template
from .errors import BadInput, WorkFailed
from .executors import Executor, Publishing, make_executor
from .formats import format_names
from .plan import Plan, build_plan
from .publish import (PublishedBranch, carried_manifests, claim, local_manifests, make_target, publish_release,
                      read_states)
from .publish.ownership import write_release_id
from .recipe import Recipe, load_recipe, with_compute, with_model_path
from .memory import check_resources
from .runner import NoCapture, Outcome, is_finished, output_lock
from .stages import WORK_DIR
from .source import inspect_source, settle_repo_id

if TYPE_CHECKING:
    from .capture import LibraryOutput


def load(recipe_path: str | Path, model: str | Path | None = None, device: str | None = None,
         offload: str | None = None) -> Recipe:
    recipe = load_recipe(recipe_path)
    recipe = with_model_path(recipe, model) if model else recipe
    return with_compute(recipe, device=device, offload=offload)


def plan(recipe_path: str | Path, model: str | Path | None = None, only: list[str] | None = None,
         variants: list[str] | None = None, device: str | None = None, offload: str | None = None) -> Plan:
    """The release's plan: every variant with repo, branch or file, parameters, estimated size and
    the peak memory of each stage.

    `device` (auto, cpu, cuda, cuda:N) replaces the recipe's `compute.device`, `offload` (none,
    disk) its `compute.offload`."""
    recipe = load(recipe_path, model, device, offload)
    source = inspect_source(recipe)
    recipe = settle_repo_id(recipe, source)  # the cards need the original repo: given, or named by the model
    return _select(build_plan(recipe, source), only, variants)


def _select(full: Plan, only: list[str] | None, variants: list[str] | None) -> Plan:
    unknown = [fmt for fmt in only or [] if fmt not in format_names()]
    if unknown:
        raise BadInput(f"--only: unknown format {unknown[0]!r} (choose from {', '.join(format_names())})")
    if only is not None and not only:
        raise BadInput(f"--only: no format named (choose from {', '.join(format_names())})")
    return full.select(only, variants) if (only or variants is not None) else full


def default_out_dir(recipe: Recipe) -> Path:
    return Path.cwd() / "out" / recipe.release.basename


def output_folder(out: str | Path | None, recipe: Recipe) -> Path:
    """The release's output folder; BadInput when the path is taken by something that is not a folder."""
    out_dir = Path(out).expanduser().resolve() if out else default_out_dir(recipe)
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise BadInput(f"--out: {path} is a file, not a folder")
            break
    return out_dir


def check_before_work(full: Plan, chosen: Plan, out_dir: Path, executor: Executor | None = None) -> list[RenderedCard]:
    """Everything that can be checked before any work, so that a release fails at the start, not the end.

    The recipe, the source config and the selection are checked by then; this adds the calibration
    text and a full render of every card from the plan (the final cards' checks, nothing written):
    templates, header and footer, the original card and its front matter, the prompt template; and
    the executor's own checks (the device on this machine, or the Ray cluster).
    """
    (executor or make_executor()).check(chosen)
    for artifact in chosen.artifacts.values():
        if isinstance(artifact, CalibrationTextArtifact):
            check_available(artifact.calib)
    cards = check_cards(full, out_dir)
    check_resources(chosen, out_dir, [v.id for v in chosen.variants if is_finished(out_dir, v) is None])
    return cards


def check(recipe_path: str | Path, out: str | Path | None = None, only: list[str] | None = None,
          variants: list[str] | None = None, model: str | Path | None = None, device: str | None = None,
          executor: str = "local", address: str | None = None, task_cpus: float | None = None,
          offload: str | None = None) -> Plan:
    """What `release --dry-run` does: the plan of this selection, after every check made before work."""
    runner = make_executor(executor, address, task_cpus)
    try:
        full = plan(recipe_path, model, device=device, offload=offload)
        chosen = _select(full, only, variants)
        check_before_work(full, chosen, output_folder(out, full.recipe), runner)
    finally:
        runner.close()
    return chosen


@dataclass
class ReleaseResult:
    plan: Plan
    out_dir: Path
    outcomes: list[Outcome]
    cards: list[RenderedCard] = field(default_factory=list)
    published: list[PublishedBranch] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_dict(self) -> dict:
        return {
            "status": "failed" if self.failed else "ok",
            "out_dir": str(self.out_dir),
            "variants": [{
                "id": o.variant.id, "repo_id": o.variant.repo_id, "branch": o.variant.branch,
                "status": o.status, "error": o.error, "seconds": round(o.seconds, 2),
                "node": o.node, "started_at": o.started_at, "finished_at": o.finished_at,
                "size": o.manifest.total_size if o.manifest else None,
                "perplexity": o.manifest.quality.get("perplexity") if o.manifest else None,
                "files": [f.path for f in o.manifest.files] if o.manifest else [],
            } for o in self.outcomes],
            "cards": [{"repo_id": c.repo_id, "path": str(c.path), "variants": c.produced} for c in self.cards],
            "published": [{"repo_id": p.repo_id, "branch": p.branch, "files": p.files, "uploaded": p.uploaded}
                          for p in self.published],
        }


def release(recipe_path: str | Path, out: str | Path | None = None, only: list[str] | None = None,
            variants: list[str] | None = None, model: str | Path | None = None, publish: bool = True,
            log: Callable[[str], None] = print, on_outcome: Callable[[Outcome], None] | None = None,
            on_start: Callable[[Plan], None] | None = None, device: str | None = None,
            library_output: "LibraryOutput | None" = None, executor: str = "local", address: str | None = None,
            task_cpus: float | None = None, offload: str | None = None) -> ReleaseResult:
    """Plan, produce every unfinished variant, render the cards (and publish, when asked).

    `device` and `offload` replace the recipe's `compute.device` and `compute.offload`; with
    `library_output` (capture.LibraryOutput) the libraries' output goes to `<out>/.work/logs/`
    instead of the terminal. `executor` is where the variants are made: "local" (this process) or
    "ray" (tasks on the Ray cluster at `address`, `task_cpus` CPUs each; see quantize/executors/).

    Before any work: the target accepts us, no repo or branch belongs to another release, and no
    other run uses the output folder (its lock is held to the end). Publishing verifies every
    file's sha256 first (a variant that no longer matches its manifest is made again), keeps the
    published variants this run did not make, and verifies each branch after.
    """
    runner = make_executor(executor, address, task_cpus)
    try:
        return _release(recipe_path, out, only, variants, model, publish, log, on_outcome, on_start, device,
                        library_output, runner, offload)
    finally:
        runner.close()


def _release(recipe_path, out, only, variants, model, publish, log, on_outcome, on_start, device, library_output,
             runner: Executor, offload: str | None = None) -> ReleaseResult:
    full = plan(recipe_path, model, device=device, offload=offload)  # cards describe the whole release
    chosen = _select(full, only, variants)
    out_dir = output_folder(out, full.recipe)
    check_before_work(full, chosen, out_dir, runner)  # local checks first (cheap), then the publishing target's
    target = make_target(full, out_dir) if publish and full.recipe.publish.target != "none" else None
    identity = None
    if target is not None:
        target.check(list(full.repo_ids().values()))
        try:
            identity = claim(full, out_dir, target)
        except WorkFailed as exc:  # the target could not be read: nothing was started
            raise BadInput(str(exc)) from None
    output = library_output if library_output is not None else NoCapture()
    on_hub = target is not None and full.recipe.publish.target == "hub"
    publishing = Publishing(full, identity, get_token()) if on_hub else None  # a Ray task may publish its variant
    with output_lock(out_dir, log), _logs_in(output, out_dir):
        if on_start:
            on_start(chosen)
        outcomes = runner.run(chosen, out_dir, log=log, on_outcome=on_outcome, check_hashes=target is not None,
                              output=output, publishing=publishing)
        failed = any(o.status == "failed" for o in outcomes)
        by_tasks = runner.published_by_tasks  # each Ray task published its variant: the cards are brought up to date
        if target is None or (failed and not by_tasks):
            return ReleaseResult(chosen, out_dir, outcomes, render_cards(full, out_dir))
        write_release_id(out_dir, identity.id)
        states = read_states(target, full)
        local = {} if by_tasks else local_manifests(full, out_dir, {o.variant.id for o in outcomes if o.manifest}, log)
        carried = carried_manifests(full, local, states)
        for variant_id in carried if not by_tasks else ():
            log(f"{variant_id}: not made in this output folder: kept as published")
        cards = render_cards(full, out_dir, manifests={**carried, **local})
        result = ReleaseResult(chosen, out_dir, outcomes, cards)
        result.published = publish_release(full, out_dir, local, {card.repo_id: card.files() for card in cards},
                                           prompt_template(full.recipe), card_assets(full.recipe), target, log,
                                           identity=identity, carried=carried, states=states)
        if by_tasks:
            result.published = with_task_uploads(result.published, [o.published for o in outcomes if o.published])
    return result


def with_task_uploads(final: list[PublishedBranch], by_tasks: list[PublishedBranch]) -> list[PublishedBranch]:
    """Each branch as the last publish left it, with what the tasks sent before (their files, then cards)."""
    sent: dict[tuple[str, str], list[str]] = {}
    for branch in [*by_tasks, *final]:
        sent.setdefault((branch.repo_id, branch.branch), []).extend(branch.uploaded)
    return [PublishedBranch(b.repo_id, b.branch, b.files, sorted(set(sent[(b.repo_id, b.branch)]))) for b in final]


@contextmanager
def _logs_in(output, out_dir: Path) -> Iterator[None]:
    """The libraries' output of the whole locked run in `<out>/.work/logs/` (shared.log unless a variant's)."""
    if hasattr(output, "start"):
        output.start(out_dir / WORK_DIR)
    with output.section("shared"):
        yield


def cards(recipe_path: str | Path, out: str | Path | None = None, model: str | Path | None = None,
          include_planned: bool = False, dry_run: bool = False) -> list[RenderedCard]:
    """Re-render every card from the manifests in `out` (no quantization); `dry_run`: write nothing.

    Every card is rendered and checked before any is written."""
    full = plan(recipe_path, model)
    out_dir = output_folder(out, full.recipe)
    if not include_planned:
        check_cards(full, out_dir)  # every card as it will be, planned variants included: fails now, not later
    return render_cards(full, out_dir, include_planned=include_planned, write=not dry_run)


def regenerate_hub_card(repo_id: str, dry_run: bool = False, endpoint: str | None = None,
                        token: str | None = None, log: Callable[[str], None] = print) -> list:
    """Re-render a published repo's card from the Hub alone; push README.md to every branch."""
    from .publish.hub import HubTarget
    from .publish.regenerate import HubCardRegenerator
    from .schema import hub_id_problem

    problem = hub_id_problem(repo_id)
    if problem:
        raise BadInput(f"card --from-hub: {repo_id!r} is not a Hub repo id: {problem}")
    return HubCardRegenerator(HubTarget(endpoint=endpoint, token=token), log).regenerate(repo_id, dry_run)
