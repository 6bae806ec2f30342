"""Perplexity with transformers on the held-out evaluation text.

One engine for the fp16 baseline and every GPTQ/AWQ variant, so their figures compare: the
held-out text is cut into consecutive windows of EVAL_WINDOW tokens (at most MAX_EVAL_WINDOWS),
and the model predicts every token of each window after the first, on the release's device in
its evaluation dtype (quantize/devices.py): on a CPU in bfloat16 where it computes it natively,
else in float32 (on AVX2-only CPUs bfloat16 and float16 matrix products are about 90 times
slower than float32); on a GPU in float16 or bfloat16. Quantized layers are first turned into
plain Linear layers holding exactly the weights their kernel computes with: the same loss, far
faster than the packed kernels on a CPU. The fp16 baseline is an artifact of the release
(`TransformersReference`), computed once and cached in its work folder.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .calibration import TokensArtifact
from .memory import give_back
from .stages import Artifact, ArtifactStore

ENGINE = "transformers"
EVAL_WINDOW = 512  # tokens per window
MAX_EVAL_WINDOWS = 40  # at most 20,480 tokens: a few seconds per variant for a small model


from .devices import cpu_has_native_bf16

EVAL_DTYPE = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # on the CPU (devices.resolve)


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    eval_tokens: int  # tokens predicted (each window's first token has no context and is not scored)
    windows: int
    window: int

    def as_quality(self, baseline: "Perplexity | None" = None, text: str | None = None,
                   dtype: torch.dtype = EVAL_DTYPE) -> dict[str, Any]:
        quality: dict[str, Any] = {"perplexity": round(self.perplexity, 4)}
        if baseline is not None:
            quality["baseline_perplexity"] = round(baseline.perplexity, 4)
        quality.update({"engine": ENGINE, "eval_tokens": self.eval_tokens, "eval_windows": self.windows,
                        "eval_window": self.window, "eval_dtype": str(dtype).removeprefix("torch.")})
        if text:
            quality["eval_text"] = text
        return quality


def evaluation_windows(token_ids: Sequence[int], window: int = EVAL_WINDOW,
                       max_windows: int = MAX_EVAL_WINDOWS) -> list[list[int]]:
    """Consecutive, non-overlapping windows from the start of the text; a short text gives one shorter window."""
    if len(token_ids) < 2:
        return []
    if len(token_ids) < window:
        return [list(token_ids)]
    count = min(len(token_ids) // window, max_windows)
    return [list(token_ids[i * window:(i + 1) * window]) for i in range(count)]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: list[list[int]]) -> Perplexity:
    """exp(mean negative log-likelihood) of every token after the first of each window."""
    total_nll, total_tokens = 0.0, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for ids in windows:
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum").item()
        total_tokens += len(ids) - 1
    value = math.exp(total_nll / total_tokens) if total_tokens else math.nan
    return Perplexity(value, total_tokens, len(windows), max((len(w) for w in windows), default=0))


def is_quantized_linear(module: torch.nn.Module) -> bool:
    return hasattr(module, "qweight") and hasattr(module, "in_features") and hasattr(module, "out_features")


@torch.inference_mode()
def dense_linear(module: torch.nn.Module, dtype: torch.dtype = EVAL_DTYPE) -> torch.nn.Linear:
    """A Linear with the weights the quantized kernel computes with: its outputs for the identity matrix."""
    device = next((t.device for t in (*module.buffers(), *module.parameters())), torch.device("cpu"))
    identity = torch.eye(module.in_features, dtype=dtype, device=device)
    zeros = torch.zeros(1, module.in_features, dtype=dtype, device=device)
    bias = module(zeros)[0]
    weight = (module(identity) - bias).t().contiguous()
    has_bias = getattr(module, "bias", None) is not None
    dense = torch.nn.Linear(module.in_features, module.out_features, bias=has_bias, dtype=dtype, device=device)
    dense.weight.copy_(weight)
    if has_bias:
        dense.bias.copy_(bias)
    return dense


def densify_quantized_linears(model: torch.nn.Module, dtype: torch.dtype = EVAL_DTYPE) -> int:
    """Replace every quantized linear layer by its dense equivalent; returns how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if is_quantized_linear(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dense_linear(module, dtype))
    return len(targets)


def load_fp16_model(model_path: Path, trust_remote_code: bool = False, dtype: torch.dtype = EVAL_DTYPE,
                    device: str = "cpu", offload_folder: Path | None = None) -> torch.nn.Module:
    """The source model for evaluation; with `offload_folder` its decoder layers stay on disk there
    (accelerate's disk offload: each layer is read in for its forward pass), the rest on `device`."""
    from transformers import AutoModelForCausalLM

    device_map: Any = device
    if offload_folder is not None:
        device_map = streamed_device_map(model_path, device, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device_map,
                                                offload_folder=offload_folder, trust_remote_code=trust_remote_code).eval()


def streamed_device_map(model_path: Path, device: str, trust_remote_code: bool = False) -> dict[str, str]:
    """Every decoder layer on "disk", everything else on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        shell = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers = next(name for name, module in shell.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and len(module) == config.num_hidden_layers)
    return _leaves(shell, {f"{layers}.{index}": "disk" for index in range(config.num_hidden_layers)}, device)


def _leaves(shell: torch.nn.Module, layer_map: dict[str, str], device: str) -> dict[str, str]:
    """A device map covering the whole model: the layers as given, every other top-level part on `device`."""
    layers_prefix = next(iter(layer_map)).rpartition(".")[0]
    found = dict(layer_map)

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full == layers_prefix:
                continue
            if layers_prefix.startswith(full + "."):
                visit(full, child)
            else:
                found[full] = device
        for name, _ in module.named_parameters(recurse=False):
            found[f"{prefix}.{name}" if prefix else name] = device

    visit("", shell)
    return found


@dataclass(frozen=True, repr=False)
class TransformersReference(Artifact):
    """The fp16 model's perplexity on the held-out windows: what every GPTQ/AWQ variant is compared with."""

    tokens: TokensArtifact
    source_identity: str
    eval_dtype: str = str(EVAL_DTYPE).removeprefix("torch.")  # the device's evaluation dtype
    device: str = "cpu"  # where: not an input (the dtype is)
    offload: str = "none"  # disk: the decoder layers stream from disk (not an input: the same figures)
    peak: Any = field(default=None, compare=False)  # memory.StageMemory: its peak memory, for the plan

    @property
    def name(self) -> str:
        return "fp16_reference"

    def memory(self):
        return self.peak

    def inputs(self) -> dict[str, Any]:
        return {"model": self.source_identity, "engine": ENGINE, "window": EVAL_WINDOW,
                "max_windows": MAX_EVAL_WINDOWS, "dtype": f"torch.{self.eval_dtype}"}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.tokens,)

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        windows = evaluation_windows(store.value(self.tokens).evaluation)
        offload_folder = folder / "offload" if self.offload == "disk" else None
        model = load_fp16_model(store.context.model_path, store.context.trust_remote_code,
                                getattr(torch, self.eval_dtype), self.device, offload_folder)
        result = perplexity(model, windows)
        del model
        give_back()
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)
        return asdict(result)

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Perplexity:
        return Perplexity(**value)
