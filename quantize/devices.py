"""Which device GPTQ/AWQ compute on, and in which dtypes: one pure decision from the machine's facts.

`--device` (or the recipe's `compute.device`) is `auto`, `cpu`, `cuda` or `cuda:N`; `auto` is
cuda:0 when CUDA is available, else the CPU. On a CPU, GPTQ and AWQ compute in float32 (exact
for fp16 and bf16 sources, and on CPUs without native half precision ~90x faster than fp16 or
bf16), or in bfloat16 for a bf16 source where the CPU computes bfloat16 natively; evaluation
runs in bfloat16 where the CPU has it, else float32. On a GPU, both compute in float16, or in
bfloat16 when the source is bf16 and the GPU supports it.

`resolve` takes every fact as an argument (tests inject them); `detect` asks torch for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import BadInput

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CHOICES = "auto, cpu, cuda or cuda:N"


def device_problem(requested: str) -> str | None:
    """Why `requested` is not a device name quantize accepts (syntax only), or None."""
    if not isinstance(requested, str) or not DEVICE_PATTERN.match(requested):
        return f"must be {CHOICES} (got {requested!r})"
    return None


@dataclass(frozen=True)
class Device:
    name: str  # "cpu" or "cuda:N": where GPTQModel and transformers put the model
    compute_dtype: str  # the dtype GPTQ/AWQ quantize in ("float32", "float16", "bfloat16")
    eval_dtype: str  # the dtype verification and perplexity run in
    requested: str = "auto"  # what the recipe or --device asked for
    problem: str | None = None  # why this machine can't give it (plans and cards still show it; a release refuses)

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")

    def torch_dtype(self, which: str = "eval"):
        import torch

        return getattr(torch, self.eval_dtype if which == "eval" else self.compute_dtype)

    def measured(self) -> dict[str, Any]:
        """What a manifest's `measured` records of it."""
        return {"device": self.name, "quantize_dtype": self.compute_dtype, "eval_dtype": self.eval_dtype}


def resolve(requested: str, cuda_available: bool, device_count: int, source_dtype: str = "float16",
            cpu_has_native_bf16: bool = False, gpu_supports_bf16: bool = False, strict: bool = True) -> Device:
    """The device and dtypes for `requested`, given the machine's facts.

    A device this machine can't give is a BadInput (one line) with `strict`; without, the device is
    returned as asked with its `problem` (a plan made on a laptop for a GPU machine)."""
    problem = device_problem(requested)
    if problem:
        raise BadInput(f"device: {problem}")
    name, missing = requested, None
    if requested == "auto":
        name = "cuda:0" if cuda_available and device_count > 0 else "cpu"
    elif requested.startswith("cuda"):
        index = int(requested.partition(":")[2] or 0)
        name = f"cuda:{index}"
        if not cuda_available or device_count < 1:
            missing = f"device: {requested} asked for, but CUDA is not available here (use --device cpu or auto)"
        elif index >= device_count:
            missing = (f"device: {requested} asked for, but this machine has {device_count} CUDA device(s) "
                       f"(cuda:0 to cuda:{device_count - 1})")
        if missing and strict:
            raise BadInput(missing)
    bf16_source = source_dtype == "bfloat16"
    if name == "cpu":
        compute = "bfloat16" if bf16_source and cpu_has_native_bf16 else "float32"
        evaluate = "bfloat16" if cpu_has_native_bf16 else "float32"
    else:
        compute = evaluate = "bfloat16" if bf16_source and gpu_supports_bf16 else "float16"
    return Device(name, compute, evaluate, requested, missing)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch._C._cpu._is_avx512_bf16_supported() or torch._C._cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def detect(requested: str = "auto", source_dtype: str = "float16", strict: bool = True) -> Device:
    """`resolve` with this machine's facts (CUDA asked only when a GPU could be used)."""
    problem = device_problem(requested)
    if problem:
        raise BadInput(f"device: {problem}")
    import torch

    available = requested != "cpu" and torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    gpu_bf16 = bool(available and torch.cuda.is_bf16_supported())
    return resolve(requested, available, count, source_dtype, cpu_has_native_bf16(), gpu_bf16, strict)


def source_dtype(config: dict[str, Any] | None) -> str:
    """The source model's weight dtype from its config.json: bfloat16 or float16 (anything else: float16)."""
    config = config or {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "float16").removeprefix("torch.")
    return name if name in ("float16", "bfloat16") else "float16"
