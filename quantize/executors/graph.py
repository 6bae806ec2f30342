"""The release as a task graph (pure): one task per shared artifact, after the artifacts it is made
from, then one task per variant, after the artifacts it needs; each with the resources it needs.

Resources come from the plan alone, without a format's name: a task computing on a CUDA device
(a variant's `device`, or an artifact's, such as the fp16 reference or GPTQ Hessians) needs one
GPU; every task needs `cpus` CPUs; a task that loads the model in torch needs the plan's peak
memory for its stages (quantize/memory.py), or without one the whole model in its compute dtype
(the fp16 weights on the host for a GPU) plus its own output; any other task (llama.cpp's tools,
tokenizing) the largest file it reads or writes, plus a margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..memory import DTYPE_BYTES
from ..plan import Plan, Variant
from ..stages import Artifact

GIB = 1024 ** 3
MEMORY_MARGIN = GIB // 2  # per task, on top of the estimate: the interpreter, libraries, buffers
ARTIFACT, VARIANT = "artifact", "variant"


@dataclass(frozen=True)
class Resources:
    cpus: float = 1
    gpus: float = 0
    memory: int | None = None  # bytes; None: not estimated (no parameter count)

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory:
            options["memory"] = self.memory
        return options

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"] + ([f"{self.gpus:g} GPU"] if self.gpus else [])
        if self.memory:
            parts.append(f"{self.memory / GIB:.1f} GiB")
        return ", ".join(parts)


@dataclass(frozen=True)
class Task:
    key: str  # "artifact:gguf_convert", "variant:gptq/main"
    kind: str  # ARTIFACT or VARIANT
    name: str  # the artifact's name or the variant's id
    needs: tuple[str, ...]  # keys of the tasks it runs after
    resources: Resources


def artifact_key(name: str) -> str:
    return f"{ARTIFACT}:{name}"


def variant_key(variant_id: str) -> str:
    return f"{VARIANT}:{variant_id}"


def device_name(thing: Variant | Artifact) -> str | None:
    device = getattr(thing, "device", None)
    return getattr(device, "name", device)


def on_gpu(thing: Variant | Artifact) -> bool:
    return str(device_name(thing) or "").startswith("cuda")


def model_bytes(plan: Plan, dtype: str) -> int | None:
    facts = plan.source.facts
    return facts.param_count * DTYPE_BYTES.get(dtype, 2) if facts and facts.param_count else None


def loads_model(thing: Variant | Artifact) -> bool:
    """Whether the task holds the source model in torch: it computes on a device."""
    return device_name(thing) is not None


def planned_peak(thing: Variant | Artifact) -> int | None:
    """The plan's largest peak-memory estimate among the stages a task runs in memory (quantize/memory.py)."""
    stages = thing.memory() if isinstance(thing, Artifact) else thing.memory
    stages = stages if isinstance(stages, tuple) else (stages,)
    return max((m.bytes for m in stages if m is not None and not m.mapped), default=None)


def task_memory(plan: Plan, thing: Variant | Artifact, needs: tuple[Artifact, ...], output: int | None) -> int | None:
    if plan.source.facts is None or not plan.source.facts.param_count:
        return None
    if loads_model(thing):
        planned = planned_peak(thing)
        if planned:
            return planned
        device = getattr(thing, "device", None)
        dtype = (getattr(device, "compute_dtype", None) or getattr(thing, "dtype", None)
                 or getattr(thing, "eval_dtype", None) or "float32")
        held = model_bytes(plan, "float16" if on_gpu(thing) else dtype) or 0
        return held + (output or 0) + MEMORY_MARGIN
    files = [a.estimated_bytes() for a in needs] + [output or 0]
    return max(files) + MEMORY_MARGIN


def resources_of(plan: Plan, thing: Variant | Artifact, cpus: float = 1) -> Resources:
    if isinstance(thing, Artifact):
        memory = task_memory(plan, thing, thing.needs(), thing.estimated_bytes())
    else:
        memory = task_memory(plan, thing, thing.needs, thing.estimated_bytes)
    return Resources(cpus=cpus, gpus=1 if on_gpu(thing) else 0, memory=memory)


def build_graph(plan: Plan, pending: list[Variant], cpus: float = 1, shared: bool = True) -> list[Task]:
    """The tasks that make `pending` (variants of `plan`), in an order where each comes after its needs.

    Not `shared` (each node keeps its own output folder): no artifact tasks; each variant task makes the
    shared work it needs itself, so it asks for the most any of those steps needs."""
    if not shared:
        return [Task(variant_key(v.id), VARIANT, v.id, (), _with_needs(plan, v, cpus)) for v in pending]
    artifacts = Plan(plan.recipe, plan.source, list(pending)).artifacts
    tasks = [Task(artifact_key(a.name), ARTIFACT, a.name, tuple(artifact_key(n.name) for n in a.needs()),
                  resources_of(plan, a, cpus)) for a in artifacts.values()]
    tasks += [Task(variant_key(v.id), VARIANT, v.id, tuple(artifact_key(a.name) for a in v.needs),
                   resources_of(plan, v, cpus)) for v in pending]
    return tasks


def _with_needs(plan: Plan, variant: Variant, cpus: float) -> Resources:
    steps, seen = [resources_of(plan, variant, cpus)], set()
    todo = list(variant.needs)
    while todo:
        artifact = todo.pop()
        if artifact.name not in seen:
            seen.add(artifact.name)
            steps.append(resources_of(plan, artifact, cpus))
            todo.extend(artifact.needs())
    memories = [r.memory for r in steps if r.memory]
    return Resources(cpus=cpus, gpus=max(r.gpus for r in steps), memory=max(memories) if memories else None)


def unplaceable(tasks: list[Task], nodes: list[dict[str, float]]) -> list[tuple[Task, str]]:
    """Tasks no node can take (each node: its total CPU, GPU, memory resources), with what is missing."""
    found = []
    for task in tasks:
        need = task.resources
        fits = [n for n in nodes if n.get("CPU", 0) >= need.cpus and n.get("GPU", 0) >= need.gpus
                and (not need.memory or n.get("memory", 0) >= need.memory)]
        if fits:
            continue
        if need.gpus and not any(n.get("GPU", 0) >= need.gpus for n in nodes):
            why = f"no node has {need.gpus:g} GPU"
        elif not any(n.get("CPU", 0) >= need.cpus for n in nodes):
            why = f"no node has {need.cpus:g} CPUs (most: {max((n.get('CPU', 0) for n in nodes), default=0):g})"
        else:
            most = max((n.get("memory", 0) for n in nodes), default=0)
            why = f"no node offers {need.memory / GIB:.1f} GiB of memory (most: {most / GIB:.1f} GiB)"
        found.append((task, why))
    return found
