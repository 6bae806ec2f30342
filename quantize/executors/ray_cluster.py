"""`--executor ray`: the release's stage graph as tasks on a Ray cluster.

Two ways to place the data, chosen by what the nodes see (`storage_mode`):
- shared storage (every node sees the output folder): as below, outputs in the output folder;
- node-local (the output folder is not shared, and the release publishes to the Hub): each variant
  task works in a folder of its own node (`<out>/.work/nodes/<node>/`), makes there the shared work it
  needs (once per node), publishes its own branch or files (`publish.publish_variant`) and returns
  only its manifest; finished means published with the same fingerprint (read from the Hub).

Shared storage: one task per shared artifact (after the tasks of the artifacts it is made from) and one per
variant (after its artifacts), each with its resources (`graph.py`), retried by Ray when its
worker or node dies. Every node must see the output folder (shared storage: NFS, a cluster file
system) and the source model (the same local path, or the Hub, cached per node); this is checked
on every node before any work. Tasks compute with the runner's and the store's own code:
`ArtifactStore.get` (one flock per artifact, so two tasks never make it twice) and
`runner.run_variant` (staging, move into place, manifest last). A variant task holds a lock per
variant and first checks whether the variant is already finished (a retry after the worker died
once the manifest was written returns that manifest). The driver skips finished variants before
submitting, checks every backend before any work (as the local runner does), collects each
outcome with the node that made it, and publishes from the output folder as usual.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from ..capture import LibraryOutput
from ..devices import detect, device_problem, source_dtype
from ..errors import BadInput, WorkFailed
from ..formats import ReleaseContext
from ..plan import Plan, Variant
from ..publish import publish_variant, published_manifests, read_states
from ..publish.ownership import write_release_id
from ..runner import (STAGING_DIR, NoCapture, Outcome, check_backends, close_backends, error_line, finished_variants,
                      is_finished, quality_gate, run_variant, utc_now)
from ..stages import WORK_DIR, file_lock
from . import Publishing
from .graph import ARTIFACT, Task, build_graph, unplaceable

MAX_RETRIES = 3  # attempts after a system failure (worker or node died); a task's own error is not retried
PROBE_TIMEOUT_S = 120
POLL_S = 0.5
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_XET", "TOKENIZERS_PARALLELISM",
                 "GPTQMODEL_CPU_WORKERS")
FORWARDED_PREFIX = "QUANTIZE_"
STORAGE_ENV = "QUANTIZE_RAY_STORAGE"  # shared | node; default: shared when every node sees the output folder
SHARED, NODE = "shared", "node"
NODES_DIR = "nodes"  # <out>/.work/nodes/<node>/: a node's own output folder (node-local storage)


def forwarded_env() -> dict[str, str]:
    """The driver's settings every task gets (llama.cpp location, WikiText folder, offline mode...)."""
    return {name: value for name, value in os.environ.items()
            if name.startswith(FORWARDED_PREFIX) or name in FORWARDED_ENV}


def node_facts() -> dict[str, Any]:
    """Where this task runs: Ray's node id, the node's IP, the hostname, the worker's pid."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid()}


def node_label(node: dict[str, Any] | None) -> str:
    if not node:
        return "an unknown node"
    return f"{node.get('hostname')} {node.get('ip')} (node {str(node.get('node_id'))[:8]})"


def pin_threads(cpus: float) -> None:
    """torch uses as many threads as CPUs the task was given (Ray sets OMP_NUM_THREADS the same way)."""
    threads = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # a worker reused from an earlier task
        sys.modules["torch"].set_num_threads(threads)


def node_folder(out_dir: Path, node_id: str) -> Path:
    return Path(out_dir) / WORK_DIR / NODES_DIR / node_id[:12]


class _Task:
    """What both task kinds set up on the worker: where, the forwarded log, the libraries' log files
    (in the output folder, or with node-local storage this node's own folder)."""

    def __init__(self, name: str, out_dir: str, cpus: float, events, per_node: bool = False) -> None:
        self.node = node_facts()
        self.events = events
        self.out_dir = node_folder(Path(out_dir), self.node["node_id"]) if per_node else Path(out_dir)
        self.started_at = utc_now()
        events.put(("start", name, self.node))
        pin_threads(cpus)
        self.output = LibraryOutput()
        self.output.start(self.out_dir / WORK_DIR)

    def log(self, message: str) -> None:
        self.events.put(("log", message, self.node))


def compute_artifact(plan: Plan, name: str, out_dir: str, cpus: float, events, *made_before) -> dict[str, Any]:
    """Ray task: one shared artifact, in the release's store (reused when another task made it)."""
    task = _Task(name, out_dir, cpus, events)
    context = ReleaseContext(plan, task.out_dir, task.log, output=task.output)
    try:
        result = context.store.get(plan.artifacts[name])
    except Exception as exc:
        raise WorkFailed(f"shared work {name} failed on {node_label(task.node)}: {error_line(exc)}") from None
    return {"name": name, "seconds": result.seconds, "reused": result.reused, "node": task.node}


def make_variant(plan: Plan, variant_id: str, out_dir: str, check_hashes: bool, cpus: float, events,
                 publishing: Publishing | None, *made_before) -> Outcome:
    """Ray task: one variant, with the runner's code; its failure is an Outcome naming the node. With
    `publishing` (node-local storage) it is made in this node's folder and published from there."""
    task = _Task(variant_id, out_dir, cpus, events, per_node=publishing is not None)
    variant = next(v for v in plan.variants if v.id == variant_id)
    lock = task.out_dir / STAGING_DIR / f"{variant_id.replace('/', '_')}.lock"
    try:
        target = publishing.target() if publishing else None
        published = _published_before(publishing, target, variant)
        if published is not None:  # an earlier attempt published it, then its worker died
            task.log(f"{variant_id}: already published by an earlier attempt")
            outcome = Outcome(variant, "done", published, started_at=task.started_at, finished_at=utc_now())
        else:
            with file_lock(lock):  # a second attempt of the same task (Ray thought the first lost) waits here
                finished = is_finished(task.out_dir, variant, check_hashes)
                if finished is not None:  # an earlier attempt wrote the manifest, then its worker died
                    task.log(f"{variant_id}: already made by an earlier attempt")
                    outcome = Outcome(variant, "done", finished, started_at=task.started_at, finished_at=utc_now())
                else:
                    outcome = _produce(plan, variant, task)
            outcome = quality_gate(outcome, plan.recipe.quality.max_kld)
            if target is not None and outcome.status == "done":
                outcome.published = publish_variant(publishing.plan, task.out_dir, outcome.manifest, target,
                                                    publishing.identity, task.log)
    except Exception as exc:
        outcome = Outcome(variant, "failed", error=error_line(exc), started_at=task.started_at,
                          finished_at=utc_now())
    outcome.node = task.node
    if outcome.error:
        outcome.error = f"on {node_label(task.node)}: {outcome.error}"
    return outcome


def _published_before(publishing: Publishing | None, target, variant: Variant):
    if publishing is None:
        return None
    states = {variant.repo_id: target.read_states(variant.repo_id)}
    return published_manifests(publishing.plan.select(names=[variant.id]), states).get(variant.id)


def _produce(plan: Plan, variant: Variant, task: _Task) -> Outcome:
    check_device_here(plan, variant)
    context = ReleaseContext(plan, task.out_dir, task.log, output=task.output,
                             scratch_name=f"quantized-{variant.id.replace('/', '_')}")
    with task.output.section("shared"):
        backends = check_backends(plan.select(names=[variant.id]), context)
    try:
        return run_variant(variant, None, backends[variant.format], task.out_dir, task.log, task.output)
    finally:
        close_backends(backends, task.output)


def check_device_here(plan: Plan, variant: Variant) -> None:
    """The node must give the device and dtypes the plan (made on the driver) assumed: they change the bytes."""
    planned = variant.device
    if planned is None:
        return
    here = detect(planned.requested, source_dtype(plan.source.facts.config if plan.source.facts else None),
                  strict=False)
    if here.problem:
        raise WorkFailed(here.problem)
    if (here.name, here.compute_dtype, here.eval_dtype) != (planned.name, planned.compute_dtype, planned.eval_dtype):
        raise WorkFailed(f"this node computes on {here.name} in {here.compute_dtype}/{here.eval_dtype}, the plan "
                         f"(made on the driver) on {planned.name} in {planned.compute_dtype}/{planned.eval_dtype}")


def missing_paths(paths: list[str]) -> list[str]:
    """Ray task (one per node): which of `paths` this node cannot see."""
    return [path for path in paths if not os.path.exists(path)]


class RayExecutor:
    """The release's tasks on the Ray cluster at `address` (None: Ray's own choice: RAY_ADDRESS, a
    cluster started on this machine, else a new local one)."""

    name = "ray"

    def __init__(self, address: str | None = None, task_cpus: float = 1):
        self.address = address
        self.task_cpus = task_cpus
        self._connected_here = False
        self.published_by_tasks = False  # after run: node-local storage, each task published its variant

    # before any work

    def check(self, plan: Plan) -> None:
        device = plan.device
        requested = device.requested if device else plan.recipe.compute.device
        problem = device_problem(requested)
        if problem:
            raise BadInput(f"device: {problem}")
        if device is not None and device.problem and not device.is_cuda:
            raise BadInput(device.problem)
        if device is not None and device.is_cuda and device.name != "cuda:0":
            raise BadInput(f"--executor ray: a task sees only the GPU Ray gives it (cuda:0): use --device cuda, "
                           f"not {device.name}")
        self._connect()
        nodes = self.nodes()
        if not nodes:
            raise BadInput(f"--executor ray: the Ray cluster{self._where()} has no live node")
        if device is not None and device.is_cuda and not any(n["Resources"].get("GPU", 0) >= 1 for n in nodes):
            raise BadInput(f"--executor ray: {device.name} asked for, but no node of the Ray cluster{self._where()} "
                           "has a GPU")

    def _where(self) -> str:
        return f" at {self.address}" if self.address else ""

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        env = forwarded_env()
        try:
            ray.init(address=self.address, runtime_env={"env_vars": env} if env else None, log_to_driver=False,
                     logging_level="ERROR", include_dashboard=False)
        except Exception as exc:  # ConnectionError, ValueError (bad address), RuntimeError...
            raise BadInput(f"--executor ray: cannot connect to the Ray cluster{self._where()}: "
                           f"{error_line(exc)}") from None
        self._connected_here = True

    @staticmethod
    def nodes() -> list[dict[str, Any]]:
        import ray

        return [node for node in ray.nodes() if node.get("Alive")]

    def close(self) -> None:
        if self._connected_here:
            import ray

            ray.shutdown()
            self._connected_here = False

    # the work

    def run(self, plan: Plan, out_dir: Path, log: Callable[[str], None] = print,
            on_outcome: Callable[[Outcome], None] | None = None, check_hashes: bool = False,
            output=None, publishing: Publishing | None = None) -> list[Outcome]:
        out_dir = Path(out_dir).resolve()
        output = output if output is not None else NoCapture()
        self._connect()
        nodes = self.nodes()
        node_local = self.storage_mode(plan, out_dir, nodes, publishing, log) == NODE
        self.published_by_tasks = node_local
        if node_local:  # finished: published with the same fingerprint, wherever it was made
            published = published_manifests(plan, read_states(publishing.target(), publishing.plan))
            finished = {v.id: published.get(v.id) for v in plan.variants}
        else:
            finished = finished_variants(plan, out_dir, log, check_hashes)
        pending = [v for v in plan.variants if finished[v.id] is None]
        max_kld = plan.recipe.quality.max_kld
        outcomes = {v.id: quality_gate(Outcome(v, "skipped", finished[v.id]), max_kld)
                    for v in plan.variants if finished[v.id]}
        for outcome in outcomes.values():
            if on_outcome:
                on_outcome(outcome)
        if pending:
            tasks = build_graph(plan, pending, self.task_cpus, shared=not node_local)
            refused = unplaceable(tasks, [node["Resources"] for node in nodes])
            if refused:
                task, why = refused[0]
                raise BadInput(f"--executor ray: {task.name} needs {task.resources.describe()}, but {why}"
                               + (" (lower --task-cpus)" if "CPUs" in why else ""))
            context = ReleaseContext(plan, out_dir, log, output=output)
            with output.section("shared"):  # every backend checked before any work, as the local runner does
                close_backends(check_backends(plan.select(names=[v.id for v in pending]), context), output)
            if node_local:
                write_release_id(out_dir, publishing.identity.id)  # a rerun from this folder continues this release
                for repo_id in dict.fromkeys(v.repo_id for v in pending):  # made once, before the tasks race
                    publishing.target().prepare_repo(repo_id, log)
            outcomes.update(self._run_graph(plan, tasks, out_dir, check_hashes, log, on_outcome,
                                            publishing if node_local else None))
        return [outcomes[v.id] for v in plan.variants]

    def storage_mode(self, plan: Plan, out_dir: Path, nodes: list[dict[str, Any]], publishing: Publishing | None,
                     log: Callable[[str], None] = print) -> str:
        """SHARED when every node sees the output folder (or QUANTIZE_RAY_STORAGE=shared), NODE when it is not
        shared and the release publishes to the Hub (or QUANTIZE_RAY_STORAGE=node); BadInput otherwise, or when
        a node cannot see the local source model or calibration file."""
        forced = os.environ.get(STORAGE_ENV, "").strip().lower() or None
        if forced not in (None, SHARED, NODE):
            raise BadInput(f"{STORAGE_ENV}: {forced!r} is not a storage mode (choose from {SHARED}, {NODE})")
        if forced == NODE and publishing is None:
            raise BadInput(f"{STORAGE_ENV}=node: each task publishes its own variant, which needs the Hub target "
                           "(publish.target: hub, without --no-publish)")
        unseen = self.unseen_paths(plan, out_dir, nodes, check_output=forced != NODE)
        if forced == NODE:
            return NODE
        if not unseen:
            return SHARED
        where, _ = unseen[0]
        if forced is None and publishing is not None:
            log(f"ray: node {where} does not see the output folder {out_dir}: each task works on its own node and "
                "publishes its variant to the Hub itself")
            return NODE
        target = plan.recipe.publish.target
        if publishing is not None:
            without = f"with {STORAGE_ENV}=shared"
        else:
            without = "with --no-publish" if target == "hub" else f"with the {target} target"
        raise BadInput(f"--executor ray: node {where} cannot see the output folder {out_dir}: {without} every node "
                       "needs the output folder on shared storage (or publish to the Hub: each task then publishes "
                       "its own variant)")

    def unseen_paths(self, plan: Plan, out_dir: Path, nodes: list[dict[str, Any]],
                     check_output: bool = True) -> list[tuple[str, str]]:
        """(node, path) for each node that cannot see the output folder; BadInput naming the first node that
        cannot see the local source model or the calibration file (every mode needs them at the same path)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        marker = out_dir / WORK_DIR / f"ray-probe-{uuid.uuid4().hex}"
        needed = {}
        if check_output:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("written by the driver; every node must see it\n")
            needed[str(marker)] = f"the output folder {out_dir}"
        if plan.source.local_path is not None:
            needed[str(plan.source.local_path)] = f"the source model {plan.source.local_path}"
        calibration = plan.recipe.resolved_calibration().path
        if calibration is not None:
            needed[str(calibration)] = f"the calibration file {calibration}"
        if not needed:
            return []
        probe = ray.remote(num_cpus=0, max_retries=0)(missing_paths)
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(list(needed)): node for node in nodes}
        try:
            answers = ray.get(list(refs), timeout=PROBE_TIMEOUT_S)
        except Exception as exc:
            raise BadInput(f"--executor ray: checking what the nodes see failed: {error_line(exc)}") from None
        finally:
            marker.unlink(missing_ok=True)
        unseen = []
        for missing, node in zip(answers, refs.values()):
            where = f"{node.get('NodeManagerHostname')} {node.get('NodeManagerAddress')} (node {node['NodeID'][:8]})"
            for path in missing:
                if path == str(marker):
                    unseen.append((where, path))
                else:
                    raise BadInput(f"--executor ray: node {where} cannot see {needed[path]}: every node needs it "
                                   "at the same path (shared storage), or take the source model from the Hub")
        return unseen

    def _run_graph(self, plan: Plan, tasks: list[Task], out_dir: Path, check_hashes: bool,
                   log: Callable[[str], None], on_outcome: Callable[[Outcome], None] | None,
                   publishing: Publishing | None = None) -> dict[str, Outcome]:
        import ray
        from ray.util.queue import Queue

        events = Queue(actor_options={"num_cpus": 0})
        artifact_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(compute_artifact)
        variant_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(make_variant)
        plan_ref, publishing_ref = ray.put(plan), ray.put(publishing)
        refs: dict[str, Any] = {}
        variant_of: dict[Any, Variant] = {}
        variants = {v.id: v for v in plan.variants}
        for task in tasks:
            options = {**task.resources.ray_options(), "name": task.name}
            made_before = [refs[key] for key in task.needs]
            if task.kind == ARTIFACT:
                refs[task.key] = artifact_task.options(**options).remote(
                    plan_ref, task.name, str(out_dir), task.resources.cpus, events, *made_before)
            else:
                refs[task.key] = variant_task.options(**options).remote(
                    plan_ref, task.name, str(out_dir), check_hashes, task.resources.cpus, events, publishing_ref,
                    *made_before)
                variant_of[refs[task.key]] = variants[task.name]
        log(f"ray: {len(tasks)} task(s) submitted ({len(variant_of)} variant(s)) to "
            f"{len(self.nodes())} node(s)")
        where: dict[str, dict[str, Any]] = {}
        results: dict[str, Outcome] = {}
        waiting = list(variant_of)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=POLL_S)
                self._drain(events, where, log)
                for ref in ready:
                    variant = variant_of[ref]
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # its worker died every attempt, or shared work it needs failed
                        outcome = failed_outcome(variant, exc, where.get(variant.id))
                    results[variant.id] = outcome = quality_gate(outcome, plan.recipe.quality.max_kld)
                    if on_outcome:
                        on_outcome(outcome)
            self._drain(events, where, log)
        except BaseException:
            for ref in refs.values():
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(events.actor)
        return results

    @staticmethod
    def _drain(events, where: dict[str, dict[str, Any]], log: Callable[[str], None]) -> None:
        while not events.empty():
            for kind, what, node in events.get_nowait_batch(events.qsize()):
                if kind == "start":
                    where[what] = node
                    log(f"{what}: running on {node_label(node)}")
                else:
                    log(f"{what} [{node_label(node)}]")


def failed_outcome(variant: Variant, exc: BaseException, node: dict[str, Any] | None) -> Outcome:
    """A variant whose task raised: the shared work it needs failed (the cause names its node), or every attempt's
    worker died (named by the node it last ran on)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, WorkFailed):
        error = error_line(cause)
    else:
        error = f"on {node_label(node)}: {error_line(exc)} (after {MAX_RETRIES} retries)"
    return Outcome(variant, "failed", error=error, node=node, finished_at=utc_now())
