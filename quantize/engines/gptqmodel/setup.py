"""Importing GPTQModel with settings that work on small CPU machines, and what it supports."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

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


# Calibration tokens per forward pass of a decoder layer in AWQ's loop and of a block in its scale
# search. One 512-token sample at a time (GPTQModel's default) keeps the matrix products well below
# this CPU's speed; 4,096 tokens per pass made AWQ 9% faster, and the transient MLP activations are 8x
# one 512-token sample's (plan: memory.py). GPTQ keeps one sample per pass (WeightFormat.batched_forwards).
FORWARD_TOKENS = 4096


def samples_per_forward(seq_len: int) -> int:
    """Calibration samples per forward pass (whole samples, at least one)."""
    return max(1, FORWARD_TOKENS // seq_len)
