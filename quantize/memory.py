"""How much memory each stage of a release needs at its peak, and whether this machine has it.

One place for the formulas (the plan shows them, `release` refuses to start when a stage can't
fit). They count the model's own bytes in the dtype each stage holds them in, from config.json's
shapes (source.ModelFacts), plus what every process pays regardless of the model (torch,
transformers, GPTQModel: RUNTIME_BYTES, measured) and the per-stage working set (Hessians,
calibration activations, logits). `scripts/bench_memory.py` measures them against real runs.

No stage holds a whole model in a wider dtype than its own. GPTQModel's lazy "turtle" source
reads one decoder layer at a time from the checkpoint and computes it in the compute dtype
(float32 on a CPU), the embeddings in the source's dtype; finished layers stay packed in memory, or
with `compute.offload: disk` go to disk, and the save reads the unquantized tensors from the source.
Evaluation holds the fp16 model in its own dtype (or, streaming, reads its layers from the
checkpoint) and a variant packed (or, streaming, memory-mapped, each layer paged out after use),
computing one layer at a time in the evaluation dtype (evaluate.compute_layer_by_layer).
`hessian: shared` streams the same way: its capture and each solve hold one decoder layer at a time.

llama.cpp's tools memory-map their model file: they run in less memory than its size (the kernel
pages it in and out, more slowly), so their stages are shown but never refused.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .errors import BadInput
from .quant_types import GB

if TYPE_CHECKING:
    from .plan import Plan
    from .source import ModelFacts

OFFLOADS = ("none", "disk")
# What a quantize process holds whatever the model's size: Python, torch, transformers, GPTQModel,
# the tokenizer and calibration text. Measured on this project's CPU machine: 0.65-0.75 GB before
# any model is loaded; with it, every stage estimate is at or above scripts/bench_memory.py's
# measured peaks (the largest gap between a peak and the rest of its estimate was 0.83 GB).
RUNTIME_BYTES = int(0.9 * GB)
TOOL_BYTES = 512 * 1024 * 1024  # a llama.cpp tool besides its model file (context, compute buffers)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SOURCE_BYTES_PER_WEIGHT = 2  # an fp16/bf16 source
HESSIAN_BYTES = 4  # GPTQ's Hessians and solves are float32 whatever the compute dtype
SKIP_CHECK_ENV = "QUANTIZE_SKIP_RESOURCE_CHECK"  # 1: start even when the estimates say it won't fit


@dataclass(frozen=True)
class StageMemory:
    """A stage's peak memory: `bytes` in all (RUNTIME_BYTES included) and what it is made of."""

    stage: str  # "gptq/main: quantize", "fp16_reference", "gguf/Q4_K_M: quantize"
    bytes: int
    parts: tuple[tuple[str, int], ...] = ()
    mapped: bool = False  # a memory-mapped model file (llama.cpp): runs in less, never refused
    remedy: str = ""  # what makes this stage fit, where offloading layers to disk does not

    def to_dict(self) -> dict:
        return {"stage": self.stage, "bytes": self.bytes, "parts": dict(self.parts), "mapped": self.mapped}


def stage(name: str, parts: dict[str, int], mapped: bool = False, runtime: int = RUNTIME_BYTES) -> StageMemory:
    """A stage of `parts` (name -> bytes) plus what its process holds anyway (`runtime`)."""
    parts = {k: int(v) for k, v in {"runtime": runtime, **parts}.items() if v}
    return StageMemory(name, sum(parts.values()), tuple(parts.items()), mapped)


@dataclass(frozen=True)
class Shapes:
    """The sizes the formulas need, from config.json."""

    params: int  # every weight
    linear_params: int  # the decoder's Linear layers
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    widest_input: int  # the widest Linear input (the largest Hessian's side)

    @property
    def other_params(self) -> int:
        """Embeddings, head and norms: what GPTQ/AWQ leave unquantized."""
        return self.params - self.linear_params

    @property
    def layer_params(self) -> int:
        return self.linear_params // max(self.layers, 1)


def shapes(facts: "ModelFacts | None") -> Shapes | None:
    from .source import config_value

    if not facts or not facts.param_count or not facts.linear_param_count:
        return None
    config = facts.config
    hidden = config_value(config, "hidden_size")
    layers = config_value(config, "num_hidden_layers")
    vocab = config_value(config, "vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, vocab)):
        return None
    intermediate = config_value(config, "intermediate_size") or 4 * hidden
    return Shapes(facts.param_count, facts.linear_param_count, layers, hidden, intermediate, vocab,
                  max(facts.linear_in_features or (hidden,)))


def activations(s: Shapes, samples: int, seq_len: int, dtype_bytes: int, forward_samples: int = 1) -> int:
    """GPTQModel's cached layer inputs and outputs for every calibration sample, and the MLP
    intermediates of the samples one forward pass runs on."""
    forward_tokens = min(samples, forward_samples) * seq_len
    return (2 * samples * seq_len * s.hidden + 3 * forward_tokens * s.intermediate) * dtype_bytes


def layer_solve(s: Shapes, concurrent: int = 1) -> int:
    """One decoder layer's GPTQ work: the Hessians of the Linear layers solved together (q/k/v read
    one input, each keeps its own H), their inverse and the float32 weights, quantized copy and error.
    `concurrent`: how many of the layer's groups are solved at once (hessians.solve_threads); each
    one beside the widest adds a hidden-wide H and inverse, and the whole layer's weights count."""
    hessians = max(3 * s.hidden ** 2, 2 * s.hidden ** 2, s.widest_input ** 2) * HESSIAN_BYTES
    weights = 3 * s.layer_params * HESSIAN_BYTES // (2 if concurrent == 1 else 1)  # half the layer's at a time, x3
    beside = (concurrent - 1) * 2 * s.hidden ** 2 * HESSIAN_BYTES
    return hessians + s.widest_input ** 2 * HESSIAN_BYTES + weights + beside


def unquantized_bytes(facts: "ModelFacts | None") -> int:
    """What GPTQ/AWQ files keep unquantized (embeddings, head, norms), in the source's dtype."""
    s = shapes(facts)
    return s.other_params * SOURCE_BYTES_PER_WEIGHT if s else 0


def logits(s: Shapes, window: int) -> int:
    return 2 * window * s.vocab * 4  # the logits and their float32 copy for the loss


def gptq_quantize(name: str, facts: "ModelFacts | None", compute_dtype: str, samples: int, seq_len: int,
                  offload: str, packed_bytes: int = 0, forward_samples: int = 1) -> StageMemory | None:
    """GPTQ or AWQ in GPTQModel's layer-by-layer loop. Its lazy loader reads the source one layer at a
    time, the embeddings in the source's dtype (setup.embeddings_in_stored_dtype); the finished layers
    stay in memory packed (`packed_bytes`: the quantized Linear layers), or with `offload: disk` go to
    disk. `forward_samples`: the most calibration samples one forward pass runs on (AWQ runs several)."""
    s = shapes(facts)
    if s is None:
        return None
    c = DTYPE_BYTES.get(compute_dtype, 4)
    embeddings = s.vocab * s.hidden
    parts = {"embeddings": embeddings * SOURCE_BYTES_PER_WEIGHT, "head, norms": (s.other_params - embeddings) * c,
             "two layers": 2 * s.layer_params * c,
             "packed layers": 0 if offload == "disk" else packed_bytes, "layer solve": layer_solve(s),
             "calibration activations": activations(s, samples, seq_len, c, forward_samples)}
    return stage(f"{name}: quantize", parts)


def hessian_capture(facts: "ModelFacts | None", compute_dtype: str, samples: int, seq_len: int,
                    hessian_bytes: int) -> StageMemory | None:
    """The shared-Hessian pass, one decoder layer at a time (hessians.capture_hessians): the embeddings
    in the source's dtype, one layer in the compute dtype, every window's layer inputs, and that layer's
    Hessian sums (each layer's go to disk before the next is read)."""
    s = shapes(facts)
    if s is None:
        return None
    c = DTYPE_BYTES.get(compute_dtype, 4)
    return stage(f"gptq_hessians_{seq_len}", {"embeddings": s.vocab * s.hidden * SOURCE_BYTES_PER_WEIGHT,
                                             "one layer": s.layer_params * c,
                                             "layer Hessians": hessian_bytes // max(s.layers, 1),
                                             "calibration activations": activations(s, samples, seq_len, c)})


def solve_from_hessians(name: str, facts: "ModelFacts | None", compute_dtype: str, hessian_bytes: int,
                        offload: str, packed_bytes: int = 0, concurrent_solves: int = 1) -> StageMemory | None:
    """A permutation solved from the shared Hessians, one decoder layer at a time
    (hessians.quantize_with_hessians): one layer in the compute dtype and its Hessians, the solves
    (`concurrent_solves` of the layer's groups at once), the finished layers packed in memory (with
    `offload: disk` on disk), and the unquantized tensors the save reads from the source."""
    s = shapes(facts)
    if s is None:
        return None
    c = DTYPE_BYTES.get(compute_dtype, 4)
    return stage(f"{name}: quantize", {"unquantized (save)": s.other_params * SOURCE_BYTES_PER_WEIGHT,
                                       "one layer": s.layer_params * c,
                                       "layer Hessians": hessian_bytes // max(s.layers, 1),
                                       "packed layers": 0 if offload == "disk" else packed_bytes,
                                       "layer solve": layer_solve(s, concurrent_solves)})


def evaluation(name: str, facts: "ModelFacts | None", eval_dtype: str, window: int, offload: str,
               quantized_bytes: int | None = None) -> StageMemory | None:
    """Perplexity with transformers, computing one decoder layer at a time in the evaluation dtype
    (evaluate.compute_layer_by_layer). The fp16 model (`quantized_bytes` None) is held in its own
    dtype, or with `offload: disk` its layers are read from the checkpoint one at a time; a variant
    is held as its files are (`quantized_bytes`: packed layers, the rest in the source's dtype), or
    with `offload: disk` memory-mapped with each layer paged out after use
    (evaluate.page_out_after_use): the unquantized tensors and one packed layer."""
    s = shapes(facts)
    if s is None:
        return None
    c = DTYPE_BYTES.get(eval_dtype, 4)
    if quantized_bytes is None and offload == "disk":
        parts = {"embeddings, head": s.other_params * SOURCE_BYTES_PER_WEIGHT, "one layer": s.layer_params * c}
    elif quantized_bytes is None:
        parts = {"model": s.params * SOURCE_BYTES_PER_WEIGHT, "one layer": s.layer_params * c}
    elif offload == "disk":
        unquantized = s.other_params * SOURCE_BYTES_PER_WEIGHT
        parts = {"embeddings, head": unquantized,
                 "one packed layer": max(0, quantized_bytes - unquantized) // max(s.layers, 1),
                 "one layer": s.layer_params * c}
    else:
        parts = {"model (packed)": quantized_bytes, "one layer": s.layer_params * c}
    return stage(name, {**parts, "logits": logits(s, window), "activations": activations(s, 1, window, c)})


def llama_tool(name: str, model_file_bytes: int | None) -> StageMemory | None:
    if not model_file_bytes:
        return None
    return stage(name, {"model file (memory-mapped)": model_file_bytes, "tool": TOOL_BYTES},
                 mapped=True, runtime=0)


def gguf_conversion(facts: "ModelFacts | None") -> StageMemory | None:
    """convert_hf_to_gguf.py: lazy tensors, written one at a time; the largest is the embedding."""
    s = shapes(facts)
    if s is None:
        return None
    return stage("gguf_convert", {"converter": TOOL_BYTES, "largest tensor": 3 * s.vocab * s.hidden * 4},
                 mapped=True, runtime=0)


def offload_scratch(facts: "ModelFacts | None") -> int:
    """Disk that streaming needs while it works: the decoder layers in float32 for accelerate's disk
    offload (written once, removed after the evaluation) and GPTQModel's finished layers."""
    s = shapes(facts)
    return s.linear_params * 4 if s else 0


@functools.cache
def libc_function(name: str):
    """A function of the C library this process runs with, looked up once (None where it has none:
    not glibc, not Linux)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None


MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold; fixed, so that it never rises with the tensors freed
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def bound_heap() -> None:
    """Have glibc serve every allocation over MMAP_THRESHOLD with its own mapping, returned to the
    system when freed.

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MB), after
    which torch's tensors of a layer's size come from its heaps, one per thread, where freed memory
    stays and fragments: a GPTQ run's RSS then grows with every layer it quantizes. Setting the
    threshold turns the raising off (what MALLOC_MMAP_THRESHOLD_ does from the environment)."""
    mallopt = libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


MADV_PAGEOUT = 21  # madvise's advice number (Linux 5.4 and later)


def file_mapped_ranges() -> list[tuple[int, int]]:
    """The address ranges of this process's memory mapped from files (/proc/self/maps; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            begin, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((begin, end))
    return ranges


def page_out(spans: Iterable[tuple[int, int]]) -> None:
    """Have the kernel reclaim the pages of these (address, length) spans now (MADV_PAGEOUT).

    Meant for weights memory-mapped from a checkpoint: their pages count in the RSS once touched and
    stay until the file is unmapped; paged out, they are read again (from the page cache, as a rule)
    when next touched. Nothing can be lost: pages with data of their own (anonymous memory, written
    copies of a file's pages) only go to swap, where there is one. No effect where madvise or the
    advice is missing."""
    import ctypes
    import mmap

    madvise = libc_function("madvise")
    if madvise is None:
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    for address, length in spans:
        begin = address // page * page
        end = -(-(address + length) // page) * page
        if madvise(begin, end - begin, MADV_PAGEOUT) != 0:
            return  # EINVAL: a kernel without MADV_PAGEOUT


def give_back() -> None:
    """Free what the last model left (cycles included) and hand freed heap memory back to the system.

    glibc keeps freed blocks in its heap (torch's large CPU tensors come from it once its mmap
    threshold has risen), so without `malloc_trim` a variant's freed model stays in the process's
    RSS while the next variant loads its own."""
    import gc

    gc.collect()
    malloc_trim = libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


# --- what this machine has --------------------------------------------------------------------

def available_memory() -> int:
    """Memory a new allocation can get without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(folder: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `folder`."""
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return shutil.disk_usage("/").free


def gb(num_bytes: int | float) -> str:
    return f"{num_bytes / GB:.1f} GB" if num_bytes >= GB else f"{num_bytes / GB:.2f} GB"


def check_resources(plan: "Plan", out_dir: Path, pending: Iterable[str] | None = None) -> None:
    """BadInput (one line naming the figure) when a stage the run will make needs more memory than is
    available, or its files and work files more disk than is free where the output goes. `pending`:
    the ids of the variants not finished yet (default: all); work files already cached count as made.
    Skipped with QUANTIZE_SKIP_RESOURCE_CHECK=1."""
    from dataclasses import replace

    from .stages import RECORD_FILE, WORK_DIR

    if os.environ.get(SKIP_CHECK_ENV, "").strip() not in ("", "0"):
        return
    wanted = set(pending) if pending is not None else {v.id for v in plan.variants}
    todo = replace(plan, variants=[v for v in plan.variants if v.id in wanted])
    if not todo.variants:
        return
    held = [m for m in todo.memory() if not m.mapped]
    if held:
        top = max(held, key=lambda m: m.bytes)
        have = available_memory()
        if top.bytes > have:
            hint = top.remedy or ("free memory" if plan.recipe.compute.offload == "disk"
                                  else "set compute.offload: disk (or --offload disk) or free memory")
            raise BadInput(f"{top.stage} needs ~{gb(top.bytes)} of memory, {gb(have)} available; {hint} "
                           f"({SKIP_CHECK_ENV}=1 to try anyway)")
    files = todo.estimated_total()
    if files is None:
        return
    work = sum(a.estimated_bytes() for a in todo.artifacts.values()
               if not (Path(out_dir) / WORK_DIR / a.name / RECORD_FILE).is_file())
    if plan.recipe.compute.offload == "disk" and any(v.device is not None for v in todo.variants):
        work += offload_scratch(plan.source.facts)
    free = free_disk(out_dir)
    if files + work > free:
        raise BadInput(f"the release needs ~{gb(files + work)} of disk ({gb(files)} of files, {gb(work)} of work "
                       f"files), {gb(free)} free for {out_dir}; free space or choose another --out "
                       f"({SKIP_CHECK_ENV}=1 to try anyway)")
