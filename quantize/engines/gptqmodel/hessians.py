"""GPTQ from shared Hessians: one calibration pass for every permutation of a release.

GPTQ needs, per linear layer, the Hessian H = 2/N · Σ xᵀx of that layer's inputs over the
calibration tokens. Bits, group size, act order and damp only change the solve, not H, so every
permutation with the same calibration can share one pass. In `shared` mode the inputs come from
the fp16 model itself (one forward pass, hooks on every decoder linear; layers that read the
same tensor, such as q/k/v and gate/up, share one Hessian). `sequential` mode is GPTQModel's
own loop, where each layer's inputs come from the already-quantized earlier layers.

The solve, the packing and the saving are GPTQModel's own (`GPTQ.quantize`, `create_quant_module`,
`pack_module`, `save`): the folder is the same classic GPTQ checkpoint either way.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...stages import Artifact, ArtifactStore

HESSIANS_FILE = "hessians.safetensors"
ALIASES_FILE = "hessians.json"
BYTES_PER_VALUE = 4  # float32


def decoder_linears(gptq_model) -> dict[str, Any]:
    """The Linear layers GPTQ quantizes: every nn.Linear inside the decoder layers, by full name."""
    import torch

    layers_node = gptq_model.extract_layers_node()
    prefixes = layers_node if isinstance(layers_node, (list, tuple)) else [layers_node]
    found = {}
    for prefix in prefixes:
        container = gptq_model.model.get_submodule(prefix)
        for name, module in container.named_modules():
            if isinstance(module, torch.nn.Linear) and name:
                found[f"{prefix}.{name}"] = module
    return found


def hessian_bytes(config: dict[str, Any] | None) -> int:
    """Disk for the Hessians of a decoder: per layer, one float32 matrix per distinct input
    (attention input, attention output, MLP input, MLP hidden). 70B Llama: ~0.55 GB per layer."""
    text = (config or {}).get("text_config") or config or {}
    try:
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        attention_out = heads * int(text.get("head_dim") or hidden // heads)
        intermediate = int(text.get("intermediate_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    return layers * (2 * hidden ** 2 + attention_out ** 2 + intermediate ** 2) * BYTES_PER_VALUE


@dataclass(frozen=True)
class Hessians:
    matrices: dict[str, Any]  # leader module name -> H (float32, columns x columns)
    aliases: dict[str, str]  # module name -> the leader whose input it shares
    tokens: int

    def of(self, name: str):
        return self.matrices[self.aliases.get(name, name)]


def capture_hessians(gptq_model, windows: list[list[int]]) -> Hessians:
    """One forward pass of the unquantized model over the windows, accumulating xᵀx per layer input."""
    import torch

    linears = decoder_linears(gptq_model)
    sums: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, tuple[Any, str]] = {}  # id(input) -> (input kept alive, leader) within one layer
    tokens = 0

    def hook(name):
        def accumulate(module, args, output):
            x = args[0]
            if id(x) in seen and seen[id(x)][0] is x:
                aliases[name] = seen[id(x)][1]
                return
            seen[id(x)] = (x, name)
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in sums:
                sums[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=flat.device)
            sums[name].addmm_(flat.t(), flat)
        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    layer_names = sorted({name.rsplit(".", 2)[0] for name in linears})
    for layer_name in layer_names:  # forget inputs between layers: ids may be reused
        handles.append(gptq_model.model.get_submodule(layer_name).register_forward_pre_hook(lambda *_: seen.clear()))
    model = gptq_model.model
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in windows:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                tokens += len(ids)
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    matrices = {name: (2.0 / tokens) * total for name, total in sums.items()}
    return Hessians(matrices, aliases, tokens)


def save_hessians(hessians: Hessians, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: matrix.contiguous().cpu() for name, matrix in hessians.matrices.items()},
              str(folder / HESSIANS_FILE))
    (folder / ALIASES_FILE).write_text(json.dumps({"aliases": hessians.aliases, "tokens": hessians.tokens}, indent=1))


def load_hessians(folder: Path) -> Hessians:
    from safetensors.torch import load_file

    meta = json.loads((folder / ALIASES_FILE).read_text())
    return Hessians(load_file(str(folder / HESSIANS_FILE)), meta["aliases"], meta["tokens"])


def quantize_with_hessians(gptq_model, hessians: Hessians, backend: str = "auto") -> list[dict[str, Any]]:
    """GPTQModel's solve and packing for every decoder linear, from the given Hessians."""
    from gptqmodel.quantization.config import METHOD, resolve_quant_format
    from gptqmodel.utils.backend import normalize_backend
    from gptqmodel.utils.importer import select_quant_linear
    from gptqmodel.utils.model import create_quant_module, pack_module

    qcfg = gptq_model.quantize_config
    quant_format = resolve_quant_format(qcfg.format, qcfg.method)
    kernel = select_quant_linear(
        bits=qcfg.runtime_bits, group_size=qcfg.group_size, desc_act=qcfg.desc_act, sym=qcfg.sym, pack=True,
        dynamic=qcfg.dynamic, device=qcfg.device, pack_dtype=qcfg.pack_dtype, multi_select=False,
        backend=normalize_backend(backend, quant_method=qcfg.method), format=quant_format, quant_method=qcfg.method)
    gptq_model.qlinear_kernel = kernel
    lock = threading.Lock()
    log = []
    linears = decoder_linears(gptq_model)
    for group in input_groups(linears, hessians):
        results = solve_group([linears[name] for name in group], hessians.of(group[0]), hessians.tokens, qcfg)
        for name, (weights, scales, zeros, g_idx) in zip(group, results["parts"]):
            linear = linears[name]
            linear.weight.data = weights.to(linear.weight.dtype)
            create_quant_module(name=name, linear_cls=kernel, bits=qcfg.runtime_bits, desc_act=qcfg.desc_act,
                                dynamic=qcfg.dynamic, group_size=qcfg.group_size, module=gptq_model.model,
                                submodule=linear, sym=qcfg.sym, device=qcfg.device, lm_head_name=gptq_model.lm_head,
                                pack_dtype=qcfg.pack_dtype, format=quant_format, register_buffers=False)
            packed = gptq_model.model.get_submodule(name)
            pack_module(name=name, qModules={name: packed}, q_scales=scales, q_zeros=zeros, q_g_idx=g_idx,
                        layers={name: linear}, quant_linear_cls=kernel, lock=lock, quantize_config=qcfg)
            log.append({"module": name, "damp": results["damp"], "loss": results["loss"], "time": results["time"]})
    gptq_model.quantized = True
    qcfg.method = METHOD.GPTQ
    gptq_model.quant_log = log
    return log


def input_groups(linears: dict[str, Any], hessians: Hessians) -> list[list[str]]:
    """The linears that read the same input (q/k/v, gate/up), leader first, in model order."""
    groups: dict[str, list[str]] = {}
    for name in linears:
        groups.setdefault(hessians.aliases.get(name, name), []).append(name)
    return list(groups.values())


def solve_group(members: list[Any], hessian, tokens: int, qcfg) -> dict[str, Any]:
    """One GPTQModel solve for layers that share a Hessian, their rows stacked.

    GPTQ treats each output row on its own given H (the column order, the damping and the error
    feedback depend on H alone), so stacking q, k and v gives each the result of its own solve
    at the cost of one pass over the columns instead of three.
    """
    import torch
    from gptqmodel.quantization.gptq import GPTQ

    stacked = members[0] if len(members) == 1 else torch.nn.Linear(
        members[0].in_features, sum(m.out_features for m in members), bias=False, dtype=torch.float32)
    if len(members) > 1:
        stacked.weight.data = torch.cat([m.weight.data.to(torch.float32) for m in members])
    task = GPTQ(stacked, qcfg)  # as GPTQModel's GPTQProcessor.preprocess sets one up
    task.quantizer.configure(perchannel=True)
    task.expected_nsamples = tokens
    task.H = hessian.to(device=stacked.weight.device, dtype=torch.float32).clone()
    task.nsamples = tokens
    weights, scales, zeros, g_idx, seconds, loss, damp, _ = task.quantize()
    rows = [m.out_features for m in members]
    # copies, one per layer: the results may live in GPTQModel's leased workspaces (free() hands them
    # back), and a tensor shared between layers would be saved once for all of them
    parts = [(w.detach().clone(), s.detach().cpu().clone(), z.detach().cpu().clone(),
              g_idx.detach().cpu().clone() if g_idx is not None else None)
             for w, s, z in zip(weights.split(rows), scales.split(rows), zeros.split(rows))]
    task.free()
    return {"parts": parts, "damp": damp, "loss": loss, "time": seconds}


@dataclass(frozen=True, repr=False)
class GPTQHessians(Artifact):
    """Every decoder linear's Hessian over one set of calibration windows, from the fp16 model."""

    windows: Artifact  # calibration.WindowsArtifact
    source_identity: str
    estimated: int = 0
    dtype: str = "float32"  # the dtype the model computes in (the device's compute dtype; sums are float32)
    device: str = "cpu"  # where: not an input (the same dtype gives the same Hessians)
    peak: Any = field(default=None, compare=False)  # memory.StageMemory: the capture's peak memory, for the plan

    @property
    def name(self) -> str:
        return f"gptq_hessians_{self.windows.seq_len}"

    def memory(self):
        return self.peak

    def inputs(self) -> dict[str, Any]:
        return {"model": self.source_identity, "dtype": self.dtype, "version": 1}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.windows,)

    def estimated_bytes(self) -> int:
        return self.estimated

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        from .setup import load_unquantized

        model = load_unquantized(store.context.model_path, self.dtype, trust_remote_code=store.context.trust_remote_code,
                                 device=self.device)
        hessians = capture_hessians(model, store.value(self.windows))
        save_hessians(hessians, folder)
        return {"tokens": hessians.tokens, "matrices": len(hessians.matrices), "modules": len(decoder_linears(model))}

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Path:
        return folder  # loaded per variant (load_hessians), not held in memory between variants
