"""GPTQ outside GPTQModel's loop: from shared Hessians (one calibration pass for every permutation of a
release), or with the loop's own Hessians from one batched forward per decoder layer (`hessian: batched`).

GPTQ needs, per linear layer, the Hessian H = 2/N · Σ xᵀx of that layer's inputs over the
calibration tokens. Bits, group size, act order and damp only change the solve, not H, so every
permutation with the same calibration can share one pass. In `shared` mode the inputs come from
the fp16 model itself (hooks on every decoder linear; layers that read the same tensor, such as
q/k/v and gate/up, share one Hessian). `sequential` mode is GPTQModel's own loop, where each
layer's inputs come from the already-quantized earlier layers.

Both halves stream the model as GPTQModel's loop does, so neither holds more than one decoder
layer in the compute dtype: the capture runs every calibration window through one layer at a time
(its lazy loader reading that layer from the checkpoint), and writes that layer's Hessians to a
file of their own; a permutation's solve reads one layer and its Hessians at a time, and its
packed layers stay in memory or, with `offload: disk`, go to disk as in GPTQModel's loop.

`batched` mode (quantize_batched) is the loop's algorithm — each group's inputs from the quantized
earlier layers and groups — with every calibration window run through a layer in one forward, each
group solved in a pre-hook when its input arrives: one forward per layer where the loop runs five.
Its Hessians are summed window by window in window order, as the loop accumulates them, so on a CPU
it makes the loop's very files (tested against GPTQModel's own loop).

The solve, the packing and the saving are GPTQModel's own (`GPTQ.quantize`, `create_quant_module`,
`pack_module`, `save`): the folder is the same classic GPTQ checkpoint every way.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import WorkFailed
from ...stages import Artifact, ArtifactStore

INDEX_FILE = "hessians.json"  # the aliases, the token count and the layers, in order
BYTES_PER_VALUE = 4  # float32
MAX_SOLVE_THREADS = 4  # a decoder layer's groups: q/k/v, o, gate/up, down
GRAM_BLOCKS = 4  # column blocks of xᵀx: the product of the upper ones, the lower mirrored (README: profile)


class FirstLayerReached(Exception):
    """Stops the model's forward where the decoder layers begin: their inputs are all the capture needs."""


def decoder_layers(gptq_model) -> list[tuple[str, Any]]:
    """(full name, module) of every decoder layer, in model order."""
    layers_node = gptq_model.extract_layers_node()
    prefixes = layers_node if isinstance(layers_node, (list, tuple)) else [layers_node]
    found = []
    for prefix in prefixes:
        container = gptq_model.model.get_submodule(prefix)
        found.extend((f"{prefix}.{name}", layer) for name, layer in container.named_children())
    return found


def layer_linears(layer_name: str, layer) -> dict[str, Any]:
    """The Linear layers GPTQ quantizes inside one decoder layer, by full name."""
    import torch

    return {f"{layer_name}.{name}": module for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear) and name}


def decoder_linears(gptq_model) -> dict[str, Any]:
    """The Linear layers GPTQ quantizes: every nn.Linear inside the decoder layers, by full name."""
    return {name: linear for layer_name, layer in decoder_layers(gptq_model)
            for name, linear in layer_linears(layer_name, layer).items()}


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


def layer_file(folder: Path, layer_name: str) -> Path:
    return folder / f"{layer_name}.safetensors"


@dataclass(frozen=True)
class Hessians:
    """The Hessians of a capture on disk, one file per decoder layer: read one layer at a time."""

    folder: Path
    aliases: dict[str, str]  # module name -> the leader whose input it shares
    tokens: int

    def leader(self, name: str) -> str:
        return self.aliases.get(name, name)

    def of_layer(self, layer_name: str) -> dict[str, Any]:
        """Leader module name -> H (float32, columns x columns) for one decoder layer."""
        from safetensors.torch import load_file

        return load_file(str(layer_file(self.folder, layer_name)))


def load_hessians(folder: Path) -> Hessians:
    index = json.loads((folder / INDEX_FILE).read_text())
    return Hessians(folder, index["aliases"], index["tokens"])


def materialize(gptq_model, module, device):
    """A module of GPTQModel's lazy shell with its weights read from the checkpoint (GPTQModel's own
    lazy loader, in the model's compute dtype); a module already in memory is moved to `device`."""
    import torch

    return gptq_model.shell_module_materialize(target_submodule=module, device=torch.device(device))


def is_lazy(gptq_model) -> bool:
    """Whether the model is GPTQModel's lazy shell, whose layers can be put back on the meta device."""
    return getattr(gptq_model, "turtle_model", None) is not None


def first_layer_inputs(gptq_model, windows: list[list[int]], device: str) -> list[tuple[Any, tuple, dict[str, Any]]]:
    """Each window's input to the first decoder layer, with the other arguments the model gives its layers
    (positional, keyword: position embeddings, attention mask). Everything outside the layers is
    materialized except the output head; the forward stops where the layers begin."""
    import torch

    model = gptq_model.model
    layers = decoder_layers(gptq_model)
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        inside_layers = any(name == prefix or name.startswith(prefix + ".") for prefix, _ in layers)
        if not inside_layers and module is not head and (any(t.is_meta for t in module.parameters(recurse=False))
                                                         or any(t.is_meta for t in module.buffers(recurse=False))):
            materialize(gptq_model, module, device)
    captured: list[tuple[Any, tuple, dict[str, Any]]] = []

    def stop(module, args, kwargs):
        if not args:
            args = (kwargs.pop("hidden_states"),)
        captured.append((args[0], tuple(args[1:]), dict(kwargs)))
        raise FirstLayerReached

    handle = layers[0][1].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in windows:
                try:
                    model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                except FirstLayerReached:
                    pass
    finally:
        handle.remove()
    return captured


class GramSum:
    """Σ xᵀx of [tokens, columns] matrices, each product added in the order given: on torch's CPU BLAS
    bitwise the sum of `x.t() @ x` products.

    xᵀx is symmetric, so only the blocks on and above the diagonal are multiplied (GRAM_BLOCKS block
    rows), the rest mirrored: 10 of 16 blocks' arithmetic, each element the same dot product over the
    tokens. Each block row goes into one scratch buffer and is added into the total from there: no
    allocation per product. Under the runner's bounded heap every allocation this size is a fresh
    mapping whose pages fault in (1,536 wide, 32 windows of 512 tokens: 518 ms a sum with a product
    allocated per window, 328 ms this way; README: profile)."""

    def __init__(self) -> None:
        self.total = None
        self._scratch = None

    def add(self, x) -> None:
        import torch

        columns = x.shape[1]
        step = -(-columns // GRAM_BLOCKS)
        first = self.total is None
        if first:
            self.total = torch.empty(columns, columns, dtype=x.dtype, device=x.device)
            self._scratch = torch.empty(step * columns, dtype=x.dtype, device=x.device)
        for start in range(0, columns, step):
            stop = min(start + step, columns)
            block_row = self._scratch[:(stop - start) * (columns - start)].view(stop - start, columns - start)
            torch.mm(x[:, start:stop].t(), x[:, start:], out=block_row)
            upper, lower = self.total[start:stop, start:], self.total[stop:, start:stop]
            if first:
                upper.copy_(block_row)
                lower.copy_(block_row[:, stop - start:].t())
            else:
                upper.add_(block_row)
                lower.add_(block_row[:, stop - start:].t())


def window_gram_sum(batch) -> Any:
    """Σ xᵀx over the windows of a [windows, tokens, columns] batch, one window's product at a time and
    added in window order: the sum GPTQModel's loop forms, one window per forward, to the bit."""
    import torch

    sums = GramSum()
    for window in batch.reshape(-1, batch.shape[-2], batch.shape[-1]):
        sums.add(window.to(torch.float32))
    return sums.total


def hidden_states(output) -> Any:
    """A decoder layer's output hidden states: some layers return them alone, others first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def deduplicated(values: list[Any]) -> list[Any]:
    """The values with one object for values that are equal (tensors, tuples, lists and dicts compared by
    content): windows of one length get the same positions and mask, so one copy of a [seq, seq] mask is
    kept, not one per window."""
    import torch

    def equal(a, b) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(equal(a[key], b[key]) for key in a)
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b

    kept: list[Any] = []
    result = []
    for value in values:
        same = next((k for k in kept if equal(k, value)), None)
        if same is None:
            kept.append(value)
        result.append(value if same is None else same)
    return result


def capture_hessians(gptq_model, windows: list[list[int]], folder: Path, device: str = "cpu") -> Hessians:
    """The fp16 model's layer inputs over the windows, one decoder layer at a time, accumulating xᵀx per
    layer input; each layer's Hessians are written to `folder` before the next layer is read.

    Every layer gets the arguments the model gives the first one (positions, mask), as in GPTQModel's
    own loop."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    inputs = first_layer_inputs(gptq_model, windows, device)
    hidden = [state for state, _, _ in inputs]
    arguments = deduplicated([(extra, kwargs) for _, extra, kwargs in inputs])
    del inputs
    tokens = sum(len(ids) for ids in windows)
    aliases: dict[str, str] = {}
    lazy = is_lazy(gptq_model)
    layers = decoder_layers(gptq_model)
    for layer_name, layer in layers:
        layer = materialize(gptq_model, layer, device)
        sums: dict[str, GramSum] = {}
        seen: dict[int, tuple[Any, str]] = {}  # id(input) -> (input kept alive, leader), within one window

        def hook(name):
            def accumulate(module, args, output):
                x = args[0]
                if id(x) in seen and seen[id(x)][0] is x:
                    aliases[name] = seen[id(x)][1]
                    return
                seen[id(x)] = (x, name)
                sums.setdefault(name, GramSum()).add(x.detach().reshape(-1, x.shape[-1]).to(torch.float32))
            return accumulate

        handles = [module.register_forward_hook(hook(name)) for name, module in layer_linears(layer_name, layer).items()]
        try:
            with torch.inference_mode():
                for index, (extra, kwargs) in enumerate(arguments):
                    output = layer(hidden[index], *extra, **kwargs)
                    hidden[index] = hidden_states(output)
                    seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        save_file({name: ((2.0 / tokens) * summed.total).contiguous().cpu() for name, summed in sums.items()},
                  str(layer_file(folder, layer_name)))
        del sums
        if lazy:
            layer.to("meta")
    (folder / INDEX_FILE).write_text(json.dumps({"aliases": aliases, "tokens": tokens,
                                                 "layers": [name for name, _ in layers]}, indent=1))
    return Hessians(folder, aliases, tokens)


def quantize_with_hessians(gptq_model, hessians: Hessians, backend: str = "auto", device: str = "cpu",
                           offload_folder: Path | None = None, solvers: int | None = None) -> list[dict[str, Any]]:
    """GPTQModel's solve and packing for every decoder linear, from the given Hessians, one decoder layer
    at a time: read from the checkpoint (a lazy shell), solved, packed, and with `offload_folder` each
    packed layer written there (GPTQModel's offload_to_disk, as its own loop does).

    On a CPU a layer's groups (q/k/v, o, gate/up, down) are solved `solvers` at a time (default:
    `solve_threads`), the cores shared out between them; on a GPU one at a time.
    """
    import torch

    packer = Packer.for_model(gptq_model, backend, offload_folder)
    qcfg = gptq_model.quantize_config
    cores = torch.get_num_threads()
    solvers = solvers or solve_threads(device, cores)
    torch.set_num_threads(max(1, cores // solvers))
    try:
        with ThreadPoolExecutor(solvers) as pool:
            for layer_name, layer in decoder_layers(gptq_model):
                layer = materialize(gptq_model, layer, device)
                matrices = hessians.of_layer(layer_name)
                linears = layer_linears(layer_name, layer)
                groups = input_groups(linears, hessians)
                solves = [pool.submit(solve_group, [linears[name] for name in group],
                                      matrices[hessians.leader(group[0])], hessians.tokens, qcfg)
                          for group in groups]
                for group, solve in zip(groups, solves):
                    packer.pack({name: linears[name] for name in group}, solve.result())
                del matrices, solves
    finally:
        torch.set_num_threads(cores)
    return packer.finish()


def quantize_batched(gptq_model, windows: list[list[int]], backend: str = "auto", device: str = "cpu",
                     offload_folder: Path | None = None) -> list[dict[str, Any]]:
    """GPTQModel's algorithm (`hessian: sequential`) with one forward per decoder layer: every calibration
    window goes through the layer at once, in one batch, and each group of linears that reads one input
    (q/k/v, o, gate/up, down) is solved in a pre-hook when that input arrives, its quantized weights
    then computing the rest of the layer. So each group's Hessian comes from the already-quantized
    earlier layers and earlier groups of its own layer, as in GPTQModel's loop, which runs each layer
    once per group and once more for its outputs: about five forward passes of the model to this one.
    Each group's Hessian is summed window by window (window_gram_sum), as the loop forms it, so with the
    same thread count the files are the loop's to the bit on a CPU. The price is memory: one layer's
    activations for all windows at once (the plan counts them).

    The solve, the packing and the saving are GPTQModel's own, as in `quantize_with_hessians`."""
    import torch

    packer = Packer.for_model(gptq_model, backend, offload_folder)
    inputs = first_layer_inputs(gptq_model, windows, device)
    arguments = deduplicated([(extra, kwargs) for _, extra, kwargs in inputs])
    if any(argument is not arguments[0] for argument in arguments):
        raise ValueError("hessian: batched needs calibration windows of one length")
    extra, kwargs = arguments[0]
    hidden = torch.cat([state for state, _, _ in inputs])
    del inputs, arguments
    relative_groups = None
    for layer_name, layer in decoder_layers(gptq_model):
        layer = materialize(gptq_model, layer, device)
        if relative_groups is None:  # every decoder layer has the first one's structure
            relative_groups = shared_inputs(layer, hidden[:1], extra, kwargs)
        groups = [[f"{layer_name}.{name}" for name in group] for group in relative_groups]
        linears = layer_linears(layer_name, layer)
        hidden, results = run_solving(layer, hidden, extra, kwargs, groups, linears, gptq_model.quantize_config)
        unseen = [group[0] for group in groups if group[0] not in results]
        if unseen:  # a layer the calibration never reaches (an expert no token was routed to)
            raise WorkFailed(f"hessian: batched: {', '.join(unseen)} got no calibration input; "
                             "use hessian: sequential")
        for group in groups:
            packer.pack({name: linears[name] for name in group}, results[group[0]])
        del results
    return packer.finish()


def run_solving(layer, hidden, extra: tuple, kwargs: dict[str, Any], groups: list[list[str]], linears: dict[str, Any],
                qcfg) -> tuple[Any, dict[str, dict[str, Any]]]:
    """One forward of the decoder layer over the batch `hidden`, each group of linears solved and given its
    quantized weights when its input arrives: the layer's output, and each group's solve by its leader.

    The groups are solved one at a time on all cores: they depend on each other, and splitting a solve's
    rows over two threads measured slower on a CPU (two column loops contending for Python's lock)."""
    import torch

    tokens = hidden.shape[0] * hidden.shape[1]
    results: dict[str, dict[str, Any]] = {}

    def solve_on_arrival(members: list[str]):
        def solve(module, args):
            with torch.inference_mode(False):  # as quantize_with_hessians solves: outside inference mode
                hessian = window_gram_sum(args[0]).mul_(2.0 / tokens)
                result = solve_group([linears[name] for name in members], hessian, tokens, qcfg)
                for name, (weights, *_rest) in zip(members, result["parts"]):  # for the rest of the forward
                    linears[name].weight = torch.nn.Parameter(weights.to(linears[name].weight.dtype),
                                                              requires_grad=False)
            results[members[0]] = result
        return solve

    handles = [linears[group[0]].register_forward_pre_hook(solve_on_arrival(group)) for group in groups]
    try:
        with torch.inference_mode():
            output = layer(hidden, *extra, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return hidden_states(output), results


def shared_inputs(layer, sample, extra: tuple, kwargs: dict[str, Any]) -> list[list[str]]:
    """The layer's linears (names relative to the layer) grouped by the input tensor they read, in the
    order the layer calls them: a forward of one window watches which call reuses a tensor."""
    import torch

    names = {module: name for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear) and name}
    groups: list[list[str]] = []
    seen: list[tuple[Any, list[str]]] = []

    def watch(module, args):
        x = args[0]
        group = next((members for tensor, members in seen if tensor is x), None)
        if group is None:
            group = []
            seen.append((x, group))
            groups.append(group)
        group.append(names[module])

    handles = [module.register_forward_pre_hook(watch) for module in names]
    try:
        with torch.inference_mode():
            layer(sample, *extra, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return groups


def solve_threads(device: str, cores: int) -> int:
    """How many of a layer's solves run at once. GPTQ's column loop is thousands of small tensor
    operations whose cost is mostly Python's and the dispatcher's, so on a CPU two solves with one
    core each are faster than one with two (SmolLM2, 2 cores: 24 s a permutation against 31–35 s);
    a layer has four groups to solve. A GPU keeps one solve at a time, as before."""
    return max(1, min(cores, MAX_SOLVE_THREADS)) if device == "cpu" else 1


class Packer:
    """GPTQModel's packing of solved layers into its quantized Linear (`create_quant_module`,
    `pack_module`), in model order, with `offload_folder` each written to disk as its loop does."""

    def __init__(self, gptq_model, kernel, quant_format, offload_folder: Path | None):
        self.gptq_model, self.kernel, self.quant_format = gptq_model, kernel, quant_format
        self.offload_folder = offload_folder
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []

    @classmethod
    def for_model(cls, gptq_model, backend: str, offload_folder: Path | None) -> "Packer":
        """A packer into the quantized Linear GPTQModel selects for the model's config and `backend`."""
        from gptqmodel.quantization.config import resolve_quant_format
        from gptqmodel.utils.backend import normalize_backend
        from gptqmodel.utils.importer import select_quant_linear

        qcfg = gptq_model.quantize_config
        quant_format = resolve_quant_format(qcfg.format, qcfg.method)
        kernel = select_quant_linear(
            bits=qcfg.runtime_bits, group_size=qcfg.group_size, desc_act=qcfg.desc_act, sym=qcfg.sym, pack=True,
            dynamic=qcfg.dynamic, device=qcfg.device, pack_dtype=qcfg.pack_dtype, multi_select=False,
            backend=normalize_backend(backend, quant_method=qcfg.method), format=quant_format,
            quant_method=qcfg.method)
        gptq_model.qlinear_kernel = kernel
        return cls(gptq_model, kernel, quant_format, offload_folder)

    def finish(self) -> list[dict[str, Any]]:
        """Marks the model quantized, as GPTQModel's own `quantize` does; the log of every solve."""
        from gptqmodel.quantization.config import METHOD

        self.gptq_model.quantized = True
        self.gptq_model.quantize_config.method = METHOD.GPTQ
        self.gptq_model.quant_log = self.log
        return self.log

    def pack(self, linears: dict[str, Any], results: dict[str, Any]) -> None:
        import torch
        from gptqmodel.utils.model import create_quant_module, pack_module
        from gptqmodel.utils.offload import offload_to_disk

        qcfg, model = self.gptq_model.quantize_config, self.gptq_model.model
        for (name, linear), (weights, scales, zeros, g_idx) in zip(linears.items(), results["parts"]):
            # a new Parameter: the lazy loader materializes weights as inference tensors, which
            # GPTQModel's 3-bit packer cannot slice outside inference mode
            linear.weight = torch.nn.Parameter(weights.to(linear.weight.dtype), requires_grad=False)
            create_quant_module(name=name, linear_cls=self.kernel, bits=qcfg.runtime_bits, desc_act=qcfg.desc_act,
                                dynamic=qcfg.dynamic, group_size=qcfg.group_size, module=model,
                                submodule=linear, sym=qcfg.sym, device=qcfg.device,
                                lm_head_name=self.gptq_model.lm_head, pack_dtype=qcfg.pack_dtype,
                                format=self.quant_format, register_buffers=False)
            packed = model.get_submodule(name)
            pack_module(name=name, qModules={name: packed}, q_scales=scales, q_zeros=zeros, q_g_idx=g_idx,
                        layers={name: linear}, quant_linear_cls=self.kernel, lock=self.lock, quantize_config=qcfg)
            linear.weight.data = linear.weight.data.new_empty(0)  # its float32 copy is no longer needed
            if self.offload_folder is not None:
                offload_to_disk(module=packed, model=model, disk_path=str(self.offload_folder), force=True)
            self.log.append({"module": name, "damp": results["damp"], "loss": results["loss"],
                             "time": results["time"]})


def input_groups(linears: dict[str, Any], hessians: Hessians) -> list[list[str]]:
    """The linears that read the same input (q/k/v, gate/up), leader first, in model order."""
    groups: dict[str, list[str]] = {}
    for name in linears:
        groups.setdefault(hessians.leader(name), []).append(name)
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
        return {"model": self.source_identity, "dtype": self.dtype, "version": 2}  # 2: one file per layer

    def needs(self) -> tuple[Artifact, ...]:
        return (self.windows,)

    def estimated_bytes(self) -> int:
        return self.estimated

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        from .setup import OFFLOAD_SUBDIR, READING_SETTINGS, embeddings_in_stored_dtype, load_streaming, release_model

        model_path = store.context.model_path
        offload_folder = store.work_dir / OFFLOAD_SUBDIR / self.name
        try:
            model = load_streaming(model_path, self.dtype, READING_SETTINGS, offload_folder,
                                   store.context.trust_remote_code, self.device)
            with embeddings_in_stored_dtype(model, model_path):
                hessians = capture_hessians(model, store.value(self.windows), folder, self.device)
            modules = len(decoder_linears(model))
            release_model(model)
        finally:
            shutil.rmtree(offload_folder, ignore_errors=True)
        return {"tokens": hessians.tokens, "matrices": modules - len(hessians.aliases), "modules": modules}

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Path:
        return folder  # loaded per variant (load_hessians), not held in memory between variants
