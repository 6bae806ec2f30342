"""Where a release's variants are made: `local` (one process, one variant after another: the runner)
or `ray` (the stage graph as tasks on a Ray cluster, `quantize/executors/ray_cluster.py`).

Both keep the runner's guarantees with the runner's own code (finished variants skipped, staging,
manifests written last, shared artifacts computed once): an executor only decides where
`runner.run_variant` and `ArtifactStore.get` run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import BadInput
from ..plan import Plan
from ..publish.layout import ReleaseIdentity
from ..runner import Outcome, run_plan

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Publishing:
    """What a task needs to publish its own variant to the Hub (the Ray executor without shared storage):
    the whole release's plan (for the cards), the release's identity and the driver's Hub token."""

    plan: Plan
    identity: ReleaseIdentity
    token: str | None = None

    def target(self):
        from ..publish.hub import HubTarget

        return HubTarget(private=self.plan.recipe.release.private, token=self.token)


class Executor(Protocol):
    name: str

    def check(self, plan: Plan) -> None:
        """BadInput for what would fail later (the device, the cluster); starts no work."""

    published_by_tasks: bool  # after run: the variants were published by the tasks that made them

    def run(self, plan: Plan, out_dir: Path, log: Callable[[str], None], on_outcome: Callable[[Outcome], None] | None,
            check_hashes: bool, output, publishing: Publishing | None = None) -> list[Outcome]:
        """Make every unfinished variant of `plan`; `publishing`: the Hub target's, when tasks may publish."""

    def close(self) -> None: ...


class LocalExecutor:
    """Every variant in this process, one after another (`runner.run_plan`)."""

    name = "local"
    published_by_tasks = False

    def check(self, plan: Plan) -> None:
        require_device(plan)

    def run(self, plan, out_dir, log, on_outcome, check_hashes, output, publishing=None) -> list[Outcome]:
        return run_plan(plan, out_dir, log=log, on_outcome=on_outcome, check_hashes=check_hashes, output=output)

    def close(self) -> None:
        pass


def require_device(plan: Plan) -> None:
    """BadInput (one line) when the device the recipe or --device asks for is not on this machine."""
    from ..devices import detect

    device = plan.device
    if device is None:  # no variant computes on it (GGUF only): the request is still checked
        detect(plan.recipe.compute.device)
    elif device.problem:
        raise BadInput(device.problem)


def make_executor(name: str = "local", address: str | None = None, task_cpus: float | None = None) -> Executor:
    """The executor called `name`; BadInput for an unknown one, or `ray` when Ray is not installed."""
    if name not in EXECUTORS:
        raise BadInput(f"--executor: unknown executor {name!r} (choose from {', '.join(EXECUTORS)})")
    if name == "local":
        if address is not None:
            raise BadInput("--address: only with --executor ray")
        if task_cpus is not None:
            raise BadInput("--task-cpus: only with --executor ray")
        return LocalExecutor()
    if importlib.util.find_spec("ray") is None:
        raise BadInput("--executor ray: the ray package is not installed (pip install 'quantize[ray]')")
    if task_cpus is not None and task_cpus <= 0:
        raise BadInput(f"--task-cpus: must be a positive number (got {task_cpus:g})")
    from .ray_cluster import RayExecutor

    return RayExecutor(address, task_cpus or 1)
