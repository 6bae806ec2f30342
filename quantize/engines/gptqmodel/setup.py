"""Importing GPTQModel with settings that work on small CPU machines, and what it supports."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ...errors import BadInput

OFFLOAD_SUBDIR = "offload"  # <out>/.work/offload/<variant id or artifact>: GPTQModel's lazy shell and finished layers
# GPTQModel loads a model with quantization settings; a model loaded only to be read (its layers' outputs,
# the fp16 Hessians) gets these, which change nothing it computes
READING_SETTINGS = {"bits": 4, "group_size": 128}


def import_gptqmodel():
    """GPTQModel, imported with settings that work on small CPU machines; BadInput when missing."""
    # GPTQModel's default is half the cores, and its loader needs 2 workers: 1 on a 2-core machine fails.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    try:
        import gptqmodel
    except ImportError as exc:
        raise BadInput(f"GPTQ/AWQ need the gptqmodel package (pip install '.[backends]'): {exc}") from None
    return gptqmodel


def supported_model_types() -> frozenset[str]:
    import_gptqmodel()
    from gptqmodel.models.auto import SUPPORTED_MODELS

    return frozenset(SUPPORTED_MODELS)


@contextmanager
def eager_torch() -> Iterator[None]:
    """Run GPTQModel's kernels eagerly: its torch kernel compiles itself, ~20 s per load on a CPU."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def release_model(model) -> None:
    """Free a GPTQModel model's tensors now, whatever still refers to the model.

    GPTQModel keeps references to a quantized model after `quantize` returns: it stops each
    calibration forward by raising one module-level exception instance (`STOP_FORWARD_EXCEPTION`),
    whose traceback keeps the last raise's frames, and its worker pool keeps the last layer's
    finalize closures. So the tensors are moved to the meta device (their storage freed) and the
    traceback dropped, rather than waiting for the model to be collected."""
    from gptqmodel.nn_modules import hooked_linear

    stop = getattr(hooked_linear, "STOP_FORWARD_EXCEPTION", None)
    if isinstance(stop, BaseException):
        stop.__traceback__ = stop.__context__ = stop.__cause__ = None
    model.model.to("meta")


@dataclass
class ParameterPlace:
    """One parameter of a model and every (module, attribute) holding it: tied weights have several."""

    param: Any
    holders: list[tuple[Any, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def key(self) -> int:
        return id(self.param)

    def replace(self, tensor) -> None:
        """Put `tensor` in the parameter's place, in every module that holds it."""
        import torch

        self.param = torch.nn.Parameter(tensor, requires_grad=False)
        for module, attribute in self.holders:
            module._parameters[attribute] = self.param


def unquantized_parameters(model) -> list[ParameterPlace]:
    """The floating-point parameters outside GPTQModel's packed layers (embeddings, norms, head)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    places: dict[int, ParameterPlace] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, BaseQuantLinear):
            continue
        for attribute, param in module._parameters.items():
            if param is not None and param.is_floating_point():
                place = places.setdefault(id(param), ParameterPlace(param))
                place.holders.append((module, attribute))
                place.names.append(f"{module_name}.{attribute}".lstrip("."))
    return list(places.values())


@contextmanager
def embeddings_in_stored_dtype(model, source_folder) -> Iterator[None]:
    """While GPTQModel's loop reads the source lazily, its input embeddings (tied head included) are
    read in the dtype the checkpoint stores them in (fp16, bf16) and their output cast to the compute
    dtype.

    The lazy loader materializes a meta parameter in that parameter's dtype. Left in the compute
    dtype (float32 on a CPU) the embeddings took twice their stored size plus the read while the
    layer inputs were captured: +1.1 GB at that moment for a 0.2 GB embedding matrix. fp16 and bf16
    values are float32 values, so the layers get exactly the inputs they had."""
    import torch

    from .folder import checkpoint_dtype

    shell = model.model
    embeddings = shell.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    place = next((p for p in unquantized_parameters(shell) if p.param is weight), None)
    stored = checkpoint_dtype(source_folder, place.names) if place is not None and weight.is_meta else None
    if stored is None or not stored.is_floating_point or stored.itemsize >= weight.dtype.itemsize:
        yield
        return
    compute = weight.dtype
    place.replace(torch.empty(weight.shape, dtype=stored, device="meta"))
    handle = embeddings.register_forward_hook(lambda module, args, output: output.to(compute))
    try:
        yield
    finally:
        handle.remove()


def quantize_in_loop(model, batch: list, backend: str, source_folder, samples_per_forward: int = 1) -> None:
    """GPTQModel's layer-by-layer loop over the calibration batch, `samples_per_forward` samples per
    forward pass, the embeddings held in the dtype the source stores them in while it reads the source
    lazily (embeddings_in_stored_dtype)."""
    with embeddings_in_stored_dtype(model, source_folder):
        model.quantize(batch, batch_size=samples_per_forward, backend=backend)


def on_gpu(device: str | None) -> dict[str, str]:
    """GPTQModel's `device` keyword for a GPU; nothing on the CPU, whose path stays exactly as it always was."""
    return {"device": device} if device and device.startswith("cuda") else {}


def load_unquantized(model_path, dtype: str, config=None, trust_remote_code: bool = False,
                     device: str | None = None):
    """The fp16 model from disk as GPTQModel's wrapper, computing in `dtype` (on `device` when it is a GPU);
    `config` is GPTQModel's QuantizeConfig (`quantize_config`), else 4-bit g128 settings."""
    import torch

    import_gptqmodel()
    from gptqmodel import GPTQModel

    config = config or quantize_config(READING_SETTINGS, device)
    return GPTQModel.load(str(model_path), config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                          **on_gpu(device))


def load_streaming(model_path, dtype: str, settings: dict, offload_folder, trust_remote_code: bool = False,
                   device: str | None = None, keep_on_disk: bool = False):
    """GPTQModel's lazy shell of the fp16 model: on the meta device, each layer read from the checkpoint
    when it is materialized (its "turtle" source comes with its offload, so `offload_folder` is needed).
    With `keep_on_disk` finished layers go to `offload_folder`; else they stay in memory, packed."""
    model = load_unquantized(model_path, dtype, quantize_config(settings, device, offload_folder), trust_remote_code,
                             device)
    model.quantize_config.offload_to_disk = keep_on_disk
    return model


def quantize_config(settings: dict, device: str | None = None, offload_folder=None):
    """GPTQModel's QuantizeConfig for a variant's settings, computing on `device` when it is a GPU.

    With `offload_folder` the layers stream from disk (its offload_to_disk: a meta-device shell whose
    layers its lazy "turtle" source reads from the checkpoint one at a time, and finished layers
    written to `offload_folder`)."""
    from gptqmodel import QuantizeConfig

    offload = ({"offload_to_disk": True, "offload_to_disk_path": str(offload_folder)} if offload_folder
               else {"offload_to_disk": False})
    return QuantizeConfig(**settings, **offload, **on_gpu(device))


AWQ_GRID = 20  # GPTQModel's grid of scale exponents: r = 0, 1/20, ..., 19/20
# The coarse-to-fine search's strides over that grid: every 4th point, then the best one's
# neighbours 2 and 1 away. 9 forwards of the block instead of 20, and the same point as the
# exhaustive search wherever the loss falls and then rises along the grid.
COARSE_TO_FINE = (4, 2, 1)
SCALE_SEARCHES = {"coarse_to_fine": COARSE_TO_FINE, "full": (1,)}  # the recipe's awq scale_search -> strides


def grid_minimum(loss_at: Callable[[int], float], size: int, strides: tuple[int, ...]) -> tuple[int, dict[int, float]]:
    """The grid point in range(size) with the least loss, and every loss evaluated.

    The first stride walks the whole grid; each later one looks only at the best point so far and
    its neighbours that far away. `(1,)` is the exhaustive search. On ties the lower point wins,
    as in a left-to-right scan.
    """
    losses: dict[int, float] = {}

    def loss(point: int) -> float:
        if point not in losses:
            losses[point] = loss_at(point)
        return losses[point]

    best = min(range(0, size, strides[0]), key=lambda point: (loss(point), point))
    for stride in strides[1:]:
        around = [point for point in (best - stride, best, best + stride) if 0 <= point < size]
        best = min(around, key=lambda point: (loss(point), point))
    return best, losses


# Calibration tokens per forward pass of a decoder layer in AWQ's loop and of a block in its scale
# search. One 512-token sample at a time (GPTQModel's default) keeps the matrix products well below
# this CPU's speed; 4,096 tokens per pass made AWQ 9% faster, and the transient MLP activations are 8x
# one 512-token sample's (plan: memory.py). GPTQ keeps one sample per pass (WeightFormat.batched_forwards).
FORWARD_TOKENS = 4096


def samples_per_forward(seq_len: int) -> int:
    """Calibration samples per forward pass (whole samples, at least one)."""
    return max(1, FORWARD_TOKENS // seq_len)


def awq_best_scale(processor, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs=None,
                   strides: tuple[int, ...] = COARSE_TO_FINE):
    """AWQ's scale search (GPTQModel 7.6's `_compute_best_scale`), restoring the weights from real copies.

    For each exponent r on a grid, scales s = x_mean^r / w_mean^(1-r) (or x_mean^r), normalised;
    the layers' weights W become Q(W·s)/s and the block's output is compared with the fp reference.
    `strides` chooses which grid points are tried (`grid_minimum`). The block runs on
    FORWARD_TOKENS tokens' worth of whole samples at a time.
    """
    import torch

    batch_size = getattr(processor, "_quant_batch_size", None)  # samples per forward, None: all
    if x.dim() == 3 and batch_size:
        processor._quant_batch_size = max(batch_size, samples_per_forward(x.shape[1]))
        if isinstance(fp16_output, list):  # GPTQModel's reference, one chunk per `batch_size` samples
            fp16_output = torch.cat(fp16_output)
    try:
        with torch.inference_mode():
            return _awq_grid(processor, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output,
                             kwargs or {}, strides)
    finally:
        if batch_size:
            processor._quant_batch_size = batch_size


def _awq_grid(processor, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs, strides):
    import torch

    originals = {fc: fc.weight.detach().clone() for fc in linears2scale}
    device = next(module2inspect.parameters(), x).device
    x_mean, w_mean = x_mean.view(-1).to(device), w_mean.view(-1).to(device)
    prev_scale = getattr(processor._scale_context, "prev_scale", None)
    if prev_scale is not None:
        w_mean = w_mean * float(prev_scale)
    gram = _linear_input_gram(x, module2inspect, linears2scale, grid_evaluations(AWQ_GRID, strides))

    def scales_at(step: int):
        ratio = step / AWQ_GRID
        if processor.duo_scaling:
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales[torch.isinf(scales) | torch.isnan(scales)] = 1
        return scales

    def output_error() -> float:  # the block's mean squared output change, with the weights as they are now
        if gram is not None:
            (linear,) = linears2scale
            change = (linear.weight - originals[linear]).float()
            return (change @ gram.matrix * change).sum().item() / (gram.tokens * change.shape[0])
        total, count = 0.0, 0
        for reference, output in zip(processor._iter_reference_output_chunks(x, fp16_output),
                                     processor._iter_module_forward_outputs(x, module2inspect, kwargs)):
            limits = torch.finfo(output.dtype)
            diff = (reference.to(output.device, output.dtype) - output.clip(limits.min, limits.max)).float()
            total, count = total + diff.pow(2).sum().item(), count + diff.numel()
        return total / max(count, 1)

    def loss_at(step: int) -> float:
        scales = scales_at(step)
        try:
            for fc in linears2scale:
                fc.weight.mul_(scales.view(1, -1))
                processor._pseudo_quantize_tensor_into(fc.weight, fc.weight)
                fc.weight.div_(scales.view(1, -1))
            loss = output_error()
        finally:
            for fc in linears2scale:
                fc.weight.copy_(originals[fc])
        return loss if math.isfinite(loss) else math.inf

    best, losses = grid_minimum(loss_at, AWQ_GRID, strides)
    if not math.isfinite(losses[best]):
        raise RuntimeError("AWQ scale search found no finite loss")
    return scales_at(best).detach().cpu(), losses[best]


def grid_evaluations(size: int, strides: tuple[int, ...]) -> int:
    """How many grid points `grid_minimum` evaluates at most."""
    return len(range(0, size, strides[0])) + 2 * (len(strides) - 1)


@dataclass(frozen=True)
class InputGram:
    matrix: Any  # XᵀX over the block's input tokens X, float32 [in, in]
    tokens: int


def _linear_input_gram(x, module2inspect, linears2scale, evaluations: int) -> InputGram | None:
    """Where the scaled block is one linear layer (the down projection), its output change is
    X·ΔWᵀ, whose mean square is tr(ΔW XᵀX ΔWᵀ) over tokens x rows: the same loss without a forward
    pass. Returned where that is cheaper over the search's evaluations (tokens·in² once, then
    rows·in² each, against tokens·in·rows each: small widths, e.g. SmolLM2's), else None.
    """
    import torch

    if len(linears2scale) != 1 or module2inspect is not linears2scale[0]:
        return None
    rows, columns = module2inspect.weight.shape
    x = x.reshape(-1, columns)
    tokens = x.shape[0]
    if columns * (tokens + evaluations * rows) >= evaluations * tokens * rows:
        return None
    matrix = torch.zeros(columns, columns, dtype=torch.float32, device=module2inspect.weight.device)
    for chunk in x.split(4096):
        chunk = chunk.to(matrix.device, torch.float32)
        matrix.addmm_(chunk.t(), chunk)
    return InputGram(matrix, tokens)


def awq_best_clip(processor, w, input_feat, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """AWQ's clipping search (GPTQModel 7.6's `_compute_best_clip`: the same tokens, grid and error),
    with the error computed from the weights' change instead of from the outputs.

    The error of a row's group is the mean over the sampled tokens x of (x · Δw)², Δw the change
    that clipping and quantizing made to the group's weights. GPTQModel forms the elementwise
    product of every sampled token with every weight ([rows, tokens, groups, group size], 450M
    floats per grid point for a 576 x 1536 layer); here it is Δw G Δwᵀ with G the group's inputs'
    mean outer product (group size², computed once), or, where a group is wider than the tokens are
    many, one batched product of the tokens with Δw. Returns the best clipping bound per row and
    group, [rows, groups, 1], as `apply_clip` takes it.
    """
    import torch

    rows, columns = w.shape
    group_size = processor.qcfg.group_size if processor.qcfg.group_size > 0 else columns
    groups = columns // group_size
    x = input_feat.reshape(-1, columns)
    x = x[:: max(1, x.shape[0] // n_sample_token)].to(w.device, torch.float32)
    x = x.reshape(-1, groups, group_size).permute(1, 0, 2).contiguous()  # [groups, tokens, group size]
    gram = torch.bmm(x.transpose(1, 2), x).div_(x.shape[1]) if group_size < x.shape[1] else None

    def output_error(change):  # [groups, rows, group size] -> mean squared output change, [groups, rows]
        if gram is not None:
            return (torch.bmm(change, gram) * change).sum(dim=-1)
        return torch.bmm(x, change.transpose(1, 2)).pow(2).mean(dim=1)

    w = w.reshape(rows, groups, group_size)
    w_float = w.float()
    original_max = w.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
    best_max = original_max.clone()
    least_error = torch.full(original_max.shape, 1e9, dtype=torch.float32, device=w.device)
    clamped, quantized = torch.empty_like(w), torch.empty_like(w)
    for step in range(int(max_shrink * n_grid)):
        max_val = original_max * (1 - step / n_grid)
        torch.clamp(w, -max_val, max_val, out=clamped)
        processor._pseudo_quantize_tensor_into(clamped, quantized)
        change = (quantized.float() - w_float).permute(1, 0, 2)
        error = output_error(change).t().unsqueeze(-1)
        better = error < least_error
        least_error[better] = error[better]
        best_max[better] = max_val[better]
    return best_max


@contextmanager
def awq_fixes(scale_search: str = "coarse_to_fine") -> Iterator[None]:
    """Let GPTQModel 7.6's AWQ run in float32, and fast on a CPU (pinned version; the AWQ tests
    check the result). `scale_search`: "full" tries every point of its scale grid, as GPTQModel
    does; "coarse_to_fine" 9 of the 20 (`grid_minimum`).

    1. Its scale search stashes each weight with `.to(float32).cpu().contiguous()` to restore it
       after every grid point; for a weight that already is a contiguous float32 CPU tensor that is
       the weight itself, so nothing is restored and the grid points compound (a 4-bit tiny model's
       logit error doubles). The search is run by `awq_best_scale`, the same algorithm with copies.
    2. It builds the packed layer with the model's dtype as its compute dtype, which its torch AWQ
       kernel accepts only as fp16/bf16. The packed weights, scales (fp16) and zeros don't depend on
       it, so the packed layer is made with fp16 as its compute dtype.
    3. Its clipping search is run by `awq_best_clip`: the same search, computed from the weights'
       change through the inputs' Gram matrix.
    """
    if scale_search not in SCALE_SEARCHES:
        raise ValueError(f"scale_search must be one of {', '.join(SCALE_SEARCHES)} (got {scale_search!r})")
    import torch
    from gptqmodel.looper import awq_processor

    processor = awq_processor.AWQProcessor
    search, clip, create = processor._compute_best_scale, processor._compute_best_clip, awq_processor.create_quant_module

    def create_quant_module(*args, dtype=None, **kwargs):
        return create(*args, dtype=torch.float16 if dtype == torch.float32 else dtype, **kwargs)

    strides = SCALE_SEARCHES[scale_search]

    def search_scale(self, *args, **kwargs):  # a function, so that the class binds it as a method
        return awq_best_scale(self, *args, **kwargs, strides=strides)

    processor._compute_best_scale = search_scale
    processor._compute_best_clip = awq_best_clip
    awq_processor.create_quant_module = create_quant_module
    try:
        yield
    finally:
        processor._compute_best_scale, processor._compute_best_clip = search, clip
        awq_processor.create_quant_module = create
