"""AWQ through GPTQModel 7.6 in float32, and fast on a CPU: its scale and clipping searches, packing
and block references replaced by the same algorithms computed with fewer operations (`awq_fixes`)."""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .hessians import GramSum
from .setup import samples_per_forward

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
            fp16_output = torch.cat(fp16_output) if fp16_output else None  # none: see CapturedReferences
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
            reference = reference.to(output.device, output.dtype).float()
            squares = torch.nn.functional.mse_loss(output.float(), reference, reduction="sum").item()
            if not math.isfinite(squares):  # as GPTQModel: an overflowing output counts as the dtype's largest
                limits = torch.finfo(output.dtype)
                squares = (reference - output.clip(limits.min, limits.max).float()).pow(2).sum().item()
            total, count = total + squares, count + output.numel()
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


def gram_is_cheaper(x, module2inspect, linears2scale, evaluations: int) -> bool:
    """Whether the search scores this block through its inputs' Gram matrix (`_linear_input_gram`)."""
    if len(linears2scale) != 1 or module2inspect is not linears2scale[0]:
        return False
    rows, columns = module2inspect.weight.shape
    tokens = x.numel() // columns
    return columns * (tokens + evaluations * rows) < evaluations * tokens * rows


def _linear_input_gram(x, module2inspect, linears2scale, evaluations: int) -> InputGram | None:
    """Where the scaled block is one linear layer (the down projection), its output change is
    X·ΔWᵀ, whose mean square is tr(ΔW XᵀX ΔWᵀ) over tokens x rows: the same loss without a forward
    pass. Returned where that is cheaper over the search's evaluations (tokens·in² once, then
    rows·in² each, against tokens·in·rows each: small widths, e.g. SmolLM2's), else None.
    """
    import torch

    if not gram_is_cheaper(x, module2inspect, linears2scale, evaluations):
        return None
    columns = module2inspect.weight.shape[1]
    x = x.reshape(-1, columns)
    tokens = x.shape[0]
    summed = GramSum()
    for chunk in x.split(4096):
        summed.add(chunk.to(module2inspect.weight.device, torch.float32))
    return InputGram(summed.total, tokens)


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


def pack_awq_layer(self, linear, scales, zeros, g_idx=None) -> None:
    """GPTQModel 7.6's `AwqTorchLinear.pack` with its codes computed in one tensor expression instead
    of one column at a time (576 to 1,536 small operations per layer): the same arithmetic, so the
    same packed tensors (tested)."""
    import torch
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq

    scales, zeros = scales.t().contiguous(), zeros.t().contiguous()  # [groups, out]
    scale_zeros = zeros * scales
    scale_dtype = scales.dtype if scales.dtype in (torch.float16, torch.bfloat16) else torch.float16
    self.register_buffer("scales", scales.clone().to(scale_dtype))
    if linear.bias is not None:
        bias_dtype = linear.bias.dtype if linear.bias.dtype in (torch.float16, torch.bfloat16) else scale_dtype
        self.register_buffer("bias", linear.bias.clone().to(bias_dtype))
    else:
        self.bias = None
    group = torch.arange(self.in_features, device=scales.device) // self.group_size  # each input column's
    codes = torch.round((linear.weight.data + scale_zeros[group].t()) / self.scales[group].t()).to(torch.int32)
    qweight, qzeros = pack_awq(codes.t().contiguous(), zeros.to(torch.int32), self.bits)
    self.register_buffer("qweight", qweight)
    self.register_buffer("qzeros", qzeros)


NO_REFERENCE = object()  # a pending search whose loss needs no reference output (the Gram matrix's)


class CapturedReferences:
    """The unquantized output of a block AWQ's scale search looks through, from GPTQModel's capture
    pass instead of a forward of the block.

    The search compares each grid point's block output with the block's unquantized output, which
    GPTQModel computes with one more forward of the block. Its capture pass has already recorded the
    inputs of every linear of the layer, and a block whose output is its last linear's (a Llama
    attention's o_proj, its MLP's down_proj) has that output one matrix product away. Each kind of
    block is checked once, on the first layer, against its forward (that search uses the forward's
    output), and a kind whose output differs keeps the forward. A block that is one linear layer
    scored through its inputs' Gram matrix needs no reference at all.
    """

    def __init__(self, evaluations: int):
        import threading

        self.evaluations = evaluations
        self.matches: dict[type, bool] = {}  # block class -> its output is its last linear's
        self.local = threading.local()  # GPTQModel quantizes a layer in one of its worker threads

    def remember_inputs(self, features: dict) -> None:
        import weakref

        self.local.features = weakref.WeakValueDictionary(features)  # GPTQModel decides how long they live

    def prepare(self, processor, layer, block, linears2scale, x) -> None:
        """Before the search of `block`: how to have its reference without a forward, if there is a way."""
        import torch
        from gptqmodel.quantization.awq.utils.module import get_op_name

        self.local.pending = None
        if isinstance(block, torch.nn.Linear):
            if gram_is_cheaper(x, block, linears2scale, self.evaluations):
                self.local.pending = NO_REFERENCE
            return
        if self.matches.get(type(block)) is False:
            return
        linears = [module for module in block.modules() if isinstance(module, torch.nn.Linear)]
        features = getattr(self.local, "features", {})
        captured = features.get(get_op_name(layer, linears[-1])) if linears else None
        if captured is not None and x.dim() >= 2 and captured.shape[:-1] == x.shape[:-1]:
            samples = getattr(processor, "_quant_batch_size", None) or captured.shape[0]  # as its forwards split
            self.local.pending = (type(block), linears[-1], captured.split(samples))

    def block_outputs(self, forward, processor, x, module, kwargs):
        """GPTQModel's `_iter_module_forward_outputs`; its first call in a search (the reference) yields
        the prepared outputs, one chunk at a time as the forward would."""
        import torch

        pending, self.local.pending = getattr(self.local, "pending", None), None
        if pending is None:
            yield from forward(processor, x, module, kwargs)
            return
        if pending is NO_REFERENCE:
            return
        kind, linear, parts = pending
        ours = (torch.nn.functional.linear(part.to(linear.weight.device, linear.weight.dtype), linear.weight,
                                           linear.bias) for part in parts)
        if self.matches.get(kind):
            yield from ours
            return
        difference = size = 0.0
        same = True
        for forwarded, computed in itertools.zip_longest(forward(processor, x, module, kwargs), ours):
            if forwarded is None:
                same = False
                break
            if computed is None or computed.shape != forwarded.shape:
                same = False
            else:
                expected = forwarded.float()
                difference += float((expected - computed.float()).pow(2).sum())
                size += float(expected.pow(2).sum())
            yield forwarded
        self.matches[kind] = same and math.sqrt(difference) <= rounding_tolerance(linear.weight.dtype) * math.sqrt(size)


def rounding_tolerance(dtype) -> float:
    """A relative difference two computations of one output may show from rounding alone."""
    import torch

    return max(1e-5, 4 * torch.finfo(dtype).eps)


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
    4. Its packing (`AwqTorchLinear.pack`) is run by `pack_awq_layer`, in whole-tensor operations.
    5. The scale search's reference outputs come from the capture pass (`CapturedReferences`).
    """
    if scale_search not in SCALE_SEARCHES:
        raise ValueError(f"scale_search must be one of {', '.join(SCALE_SEARCHES)} (got {scale_search!r})")
    import inspect

    import torch
    from gptqmodel.looper import awq_processor
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    processor = awq_processor.AWQProcessor
    strides = SCALE_SEARCHES[scale_search]
    references = CapturedReferences(grid_evaluations(AWQ_GRID, strides))
    create, features, search_group = (awq_processor.create_quant_module, processor._layer_input_features,
                                      processor._search_best_scale)
    forward, group_arguments = processor._iter_module_forward_outputs, inspect.signature(search_group)

    def create_quant_module(*args, dtype=None, **kwargs):
        return create(*args, dtype=torch.float16 if dtype == torch.float32 else dtype, **kwargs)

    # functions, so that the class binds them as methods
    def search_scale(self, *args, **kwargs):
        return awq_best_scale(self, *args, **kwargs, strides=strides)

    def layer_input_features(self, state):
        captured = features(self, state)
        references.remember_inputs(captured)
        return captured

    def search_best_scale(self, *args, **kwargs):
        group = group_arguments.bind(self, *args, **kwargs)
        group.apply_defaults()
        layer, linears, block = group.arguments["module"], group.arguments["layers"], group.arguments["module2inspect"]
        references.prepare(self, layer, block if block is not None else linears[0], linears, group.arguments["inp"])
        try:
            return search_group(*group.args, **group.kwargs)
        finally:
            references.local.pending = None

    def block_outputs(self, x, module, kwargs):
        return references.block_outputs(forward, self, x, module, kwargs)

    patches = [(processor, "_compute_best_scale", search_scale), (processor, "_compute_best_clip", awq_best_clip),
               (awq_processor, "create_quant_module", create_quant_module), (AwqTorchLinear, "pack", pack_awq_layer),
               (processor, "_layer_input_features", layer_input_features),
               (processor, "_search_best_scale", search_best_scale),
               (processor, "_iter_module_forward_outputs", block_outputs)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
