"""Importing GPTQModel with settings that work on small CPU machines, and what it supports."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ...errors import BadInput


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

    config = config or quantize_config({"bits": 4, "group_size": 128}, device)
    return GPTQModel.load(str(model_path), config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                          **on_gpu(device))


def quantize_config(settings: dict, device: str | None = None, offload_folder=None):
    """GPTQModel's QuantizeConfig for a variant's settings, computing on `device` when it is a GPU.

    With `offload_folder` the layers stream from disk (its offload_to_disk: a meta-device shell whose
    layers its lazy "turtle" source reads from the checkpoint one at a time, and finished layers
    written to `offload_folder`)."""
    from gptqmodel import QuantizeConfig

    offload = ({"offload_to_disk": True, "offload_to_disk_path": str(offload_folder)} if offload_folder
               else {"offload_to_disk": False})
    return QuantizeConfig(**settings, **offload, **on_gpu(device))


AWQ_GRID = 20  # GPTQModel's grid of scale exponents


def awq_best_scale(processor, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs=None):
    """AWQ's scale search (GPTQModel 7.6's `_compute_best_scale`), restoring the weights from real copies.

    For each exponent r on a grid, scales s = x_mean^r / w_mean^(1-r) (or x_mean^r), normalised;
    the layers' weights W become Q(W·s)/s and the block's output is compared with the fp reference.
    """
    import torch

    with torch.inference_mode():
        return _awq_grid(processor, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs or {})


def _awq_grid(processor, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs):
    import torch

    originals = {fc: fc.weight.detach().clone() for fc in linears2scale}
    device = next(module2inspect.parameters(), x).device
    x_mean, w_mean = x_mean.view(-1).to(device), w_mean.view(-1).to(device)
    prev_scale = getattr(processor._scale_context, "prev_scale", None)
    if prev_scale is not None:
        w_mean = w_mean * float(prev_scale)
    best = (float("inf"), None)
    try:
        for step in range(AWQ_GRID):
            ratio = step / AWQ_GRID
            if processor.duo_scaling:
                scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            else:
                scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales[torch.isinf(scales) | torch.isnan(scales)] = 1
            for fc in linears2scale:
                fc.weight.mul_(scales.view(1, -1))
                processor._pseudo_quantize_tensor_into(fc.weight, fc.weight)
                fc.weight.div_(scales.view(1, -1))
            total, count = 0.0, 0
            for reference, output in zip(processor._iter_reference_output_chunks(x, fp16_output),
                                         processor._iter_module_forward_outputs(x, module2inspect, kwargs)):
                limits = torch.finfo(output.dtype)
                diff = (reference.to(output.device, output.dtype) - output.clip(limits.min, limits.max)).float()
                total, count = total + diff.pow(2).sum().item(), count + diff.numel()
            loss = total / max(count, 1)
            if loss < best[0]:
                best = (loss, scales.clone())
            for fc in linears2scale:
                fc.weight.copy_(originals[fc])
    finally:
        for fc in linears2scale:
            fc.weight.copy_(originals[fc])
    if best[1] is None:
        raise RuntimeError("AWQ scale search found no finite loss")
    return best[1].detach().cpu(), best[0]


def awq_best_clip(processor, w, input_feat, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """AWQ's clipping search (GPTQModel 7.6's `_compute_best_clip`: the same tokens, grid and error),
    with each group's share of the layer's output computed as one batched matrix product.

    GPTQModel forms the elementwise product of every sampled token with every weight
    ([rows, tokens, groups, group size], 450M floats per grid point for a 576 x 1536 layer) and
    sums it; on a CPU that was most of AWQ's time. Returns the best clipping bound per row and
    group, [rows, groups, 1], as `apply_clip` takes it.
    """
    import torch

    rows, columns = w.shape
    group_size = processor.qcfg.group_size if processor.qcfg.group_size > 0 else columns
    groups = columns // group_size
    x = input_feat.reshape(-1, columns)
    x = x[:: max(1, x.shape[0] // n_sample_token)].to(w.device, w.dtype)
    x = x.reshape(-1, groups, group_size).permute(1, 0, 2).contiguous()  # [groups, tokens, group size]
    w = w.reshape(rows, groups, group_size)
    reference = torch.bmm(x, w.permute(1, 2, 0))  # [groups, tokens, rows]
    original_max = w.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
    best_max, least_error = original_max.clone(), torch.full_like(original_max, 1e9)
    clamped, quantized = torch.empty_like(w), torch.empty_like(w)
    for step in range(int(max_shrink * n_grid)):
        max_val = original_max * (1 - step / n_grid)
        torch.clamp(w, -max_val, max_val, out=clamped)
        processor._pseudo_quantize_tensor_into(clamped, quantized)
        error = (torch.bmm(x, quantized.permute(1, 2, 0)) - reference).pow(2).mean(dim=1).t().unsqueeze(-1)
        better = error < least_error
        least_error[better] = error[better]
        best_max[better] = max_val[better]
    return best_max


@contextmanager
def awq_fixes() -> Iterator[None]:
    """Let GPTQModel 7.6's AWQ run in float32, and fast on a CPU (pinned version; the AWQ tests
    check the result).

    1. Its scale search stashes each weight with `.to(float32).cpu().contiguous()` to restore it
       after every grid point; for a weight that already is a contiguous float32 CPU tensor that is
       the weight itself, so nothing is restored and the grid points compound (a 4-bit tiny model's
       logit error doubles). The search is run by `awq_best_scale`, the same algorithm with copies.
    2. It builds the packed layer with the model's dtype as its compute dtype, which its torch AWQ
       kernel accepts only as fp16/bf16. The packed weights, scales (fp16) and zeros don't depend on
       it, so the packed layer is made with fp16 as its compute dtype.
    3. Its clipping search is run by `awq_best_clip`: the same search, 10-20x faster.
    """
    import torch
    from gptqmodel.looper import awq_processor

    processor = awq_processor.AWQProcessor
    search, clip, create = processor._compute_best_scale, processor._compute_best_clip, awq_processor.create_quant_module

    def create_quant_module(*args, dtype=None, **kwargs):
        return create(*args, dtype=torch.float16 if dtype == torch.float32 else dtype, **kwargs)

    processor._compute_best_scale, processor._compute_best_clip = awq_best_scale, awq_best_clip
    awq_processor.create_quant_module = create_quant_module
    try:
        yield
    finally:
        processor._compute_best_scale, processor._compute_best_clip = search, clip
        awq_processor.create_quant_module = create
