"""One evaluation for every file of every format: the same tokens, the same scored positions, the
same fp16 reference.

The release's fp16 reference (`FP16Reference`, artifact `fp16_reference`) is computed once with
transformers on the source model, on the release's device in its evaluation dtype
(quantize/devices.py): the held-out text's tokens (the source's tokenizer) cut into consecutive
windows of EVAL_WINDOW tokens (`quality.windows` of them at most), each window's first token
replaced by BOS when the tokenizer adds one, and the second half of each window scored, the
first half being context. That is exactly what llama.cpp's `llama-perplexity` does, and the
reference is written in llama.cpp's own `--kl-divergence-base` file format (the tokens, then
per scored position the reference log-probabilities of the whole vocabulary, stored as uint16),
so that:

- GGUF files are scored by llama.cpp itself (`llama-perplexity --kl-divergence`, which reads the
  tokens from that file), and
- GPTQ/AWQ folders by transformers (kept packed, one layer at a time computing in the evaluation
  dtype: `compute_layer_by_layer`, `unpack_on_use`), against the same file read here
  (`read_reference`, `score_windows`),

each giving perplexity, mean and 99th-percentile KL divergence to the fp16 model, and top-1
agreement (the share of scored positions where both predict the same token), under the
manifest keys of `quality_record`.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .calibration import TokensArtifact
from .devices import cpu_has_native_bf16
from .errors import BadInput
from .memory import give_back
from .quality import Quality
from .schema import QualityOptions
from .stages import Artifact, ArtifactStore

if TYPE_CHECKING:
    from .recipe import Recipe
    from .source import SourceModel

ENGINE = "transformers"
EVAL_WINDOW = 512  # tokens per window: llama-perplexity's default context
DEFAULT_WINDOWS = QualityOptions().windows  # 20: 5,100 scored tokens; ~0.5 GB of reference log-probs for a 49k vocabulary
REFERENCE_FILE = "reference.kld"  # llama.cpp's --kl-divergence-base format
MAGIC = b"_logits_"
HEADER_BYTES = len(MAGIC) + 3 * 4  # magic, then n_ctx, n_vocab, n_chunk as int32
KLD_FLOOR = -16.0  # llama.cpp leaves reference log-probs at or below this out of the KL sum

EVAL_DTYPE = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # on the CPU (devices.resolve)


def first_scored(window: int) -> int:
    """llama.cpp scores the second half of each window: logits from position window/2 on."""
    return window // 2


def scored_per_window(window: int) -> int:
    """Tokens scored per window: positions window/2 + 1 .. window - 1."""
    return window - 1 - first_scored(window)


def row_width(n_vocab: int) -> int:
    """uint16 values per scored position in the file: two float32 (scale, minimum) and the vocabulary, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def reference_bytes(windows: int, n_vocab: int, window: int = EVAL_WINDOW) -> int:
    return HEADER_BYTES + 4 * window * windows + 2 * windows * scored_per_window(window) * row_width(n_vocab)


def evaluation_windows(token_ids: Sequence[int], window: int = EVAL_WINDOW,
                       max_windows: int = DEFAULT_WINDOWS) -> list[list[int]]:
    """Consecutive, non-overlapping full windows from the start of the held-out text."""
    count = min(len(token_ids) // window, max_windows)
    return [list(token_ids[i * window:(i + 1) * window]) for i in range(count)]


def adds_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text (llama.cpp does the same in each window), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


# --- the reference file (llama.cpp's --kl-divergence-base format) --------------------------------

def encode_log_probs(logits: torch.Tensor) -> np.ndarray:
    """llama.cpp's log_softmax for the base file: per row (scale, min log-prob) as float32, then each
    logit's offset from max(min logit, max logit - 16) in units of scale, rounded to uint16."""
    logits = logits.float()
    n_rows, n_vocab = logits.shape
    top = logits.max(dim=-1).values
    bottom = torch.maximum(logits.min(dim=-1).values, top - 16)
    log_sum_exp = torch.logsumexp(logits - top[:, None], dim=-1)
    min_log_prob = bottom - top - log_sum_exp
    scale = (top - bottom) / 65535
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    steps = torch.round(inverse[:, None] * (logits - bottom[:, None])).clamp_(0, 65535)
    steps = torch.where(logits > bottom[:, None], steps, torch.zeros_like(steps))
    rows = np.zeros((n_rows, row_width(n_vocab)), dtype=np.uint16)
    rows[:, :4] = torch.stack([scale, min_log_prob], dim=-1).numpy().astype(np.float32).view(np.uint16)
    rows[:, 4:4 + n_vocab] = steps.to(torch.int32).numpy().astype(np.uint16)
    return rows


@dataclass(frozen=True)
class ReferenceFile:
    """A --kl-divergence-base file, memory-mapped: its windows' tokens and each window's scored rows."""

    path: Path
    window: int
    n_vocab: int
    windows: int

    @property
    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.int32, mode="r", offset=HEADER_BYTES,
                         shape=(self.windows, self.window))

    def rows(self, index: int) -> torch.Tensor:
        """Window `index`'s reference log-probs, decoded: (scored positions × vocabulary), float32."""
        per_window, width = scored_per_window(self.window), row_width(self.n_vocab)
        offset = HEADER_BYTES + 4 * self.window * self.windows + 2 * index * per_window * width
        raw = np.memmap(self.path, dtype=np.uint16, mode="r", offset=offset, shape=(per_window, width))
        header = np.ascontiguousarray(raw[:, :4]).view(np.float32)  # (rows, 2): scale, min log-prob
        steps = torch.from_numpy(raw[:, 4:4 + self.n_vocab].astype(np.int32)).float()
        scale, minimum = torch.from_numpy(header[:, 0].copy()), torch.from_numpy(header[:, 1].copy())
        return scale[:, None] * steps + minimum[:, None]


def reference_rows(model: torch.nn.Module, windows: list[list[int]], bos: int | None,
                   nll: list[float]) -> Iterator[np.ndarray]:
    """Each window's encoded reference rows, one window at a time; appends each window's NLL to `nll`."""
    for ids in windows:
        logits = window_logits(model, with_bos(ids, bos))
        nll.append(target_nll(torch.log_softmax(logits, dim=-1), ids))
        yield encode_log_probs(logits)


def write_reference(path: Path, window: int, n_vocab: int, windows: list[list[int]],
                    rows: Iterator[np.ndarray]) -> None:
    """The header and tokens, then each window's encoded rows as `rows` yields them (one window at a time)."""
    with open(path, "wb") as out:
        out.write(MAGIC)
        out.write(np.array([window, n_vocab, len(windows)], dtype=np.int32).tobytes())
        out.write(np.array(windows, dtype=np.int32).tobytes())
        for block in rows:
            out.write(np.ascontiguousarray(block, dtype=np.uint16).tobytes())


def read_reference(path: Path) -> ReferenceFile:
    with open(path, "rb") as source:
        head = source.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a llama.cpp log-probabilities file")
    window, n_vocab, windows = (int(v) for v in np.frombuffer(head[len(MAGIC):], dtype=np.int32))
    expected = reference_bytes(windows, n_vocab, window)
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {expected}")
    return ReferenceFile(path, window, n_vocab, windows)


# --- scoring ---------------------------------------------------------------------------------

def percentile(values: torch.Tensor, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation between the sorted values around fraction × (n - 1)."""
    ordered = values.sort().values
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float((1 - (position - low)) * ordered[low] + (position - low) * ordered[high])


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """A window as llama.cpp feeds it: its first token replaced by BOS when the vocabulary adds one."""
    return [bos, *ids[1:]] if bos is not None else list(ids)


def target_nll(log_probs: torch.Tensor, ids: Sequence[int]) -> float:
    """The negative log-likelihood of a window's scored tokens."""
    targets = torch.tensor(list(ids[first_scored(len(ids)) + 1:]), dtype=torch.long)
    return -float(log_probs.gather(1, targets[:, None]).sum())


@torch.inference_mode()
def window_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The logits that predict a window's scored tokens, in float32."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    first = first_scored(len(ids))
    logits = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device)).logits[0]
    return logits[first:len(ids) - 1].float().cpu()


@torch.inference_mode()
def score_windows(model: torch.nn.Module, reference: ReferenceFile, bos: int | None,
                  baseline_perplexity: float) -> Quality:
    """The model on the reference's windows, against its log-probs, as llama.cpp's kl_divergence computes it."""
    window_nll, klds, same = [], [], 0
    for index in range(reference.windows):
        ids = reference.tokens[index].tolist()
        logits = window_logits(model, with_bos(ids, bos))
        log_q = torch.log_softmax(logits, dim=-1)
        log_p = reference.rows(index)
        window_nll.append(target_nll(log_q, ids) / len(logits))
        terms = torch.where(log_p > KLD_FLOOR, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
        klds.append(terms.sum(dim=-1))
        same += int((logits.argmax(dim=-1) == log_p.argmax(dim=-1)).sum())
    values = torch.cat(klds)
    count = len(values)
    return Quality(math.exp(sum(window_nll) / len(window_nll)), baseline_perplexity,
                   float(values.mean()), percentile(values, 0.99), same / count, count, reference.windows,
                   reference.window, tuple(window_nll))


# --- quantized layers as dense ones (GPTQ/AWQ evaluation) ---------------------------------------

def is_quantized_linear(module: torch.nn.Module) -> bool:
    return hasattr(module, "qweight") and hasattr(module, "in_features") and hasattr(module, "out_features")


# For a quantized layer, a function of the dtype giving the [out, in] weight its kernel multiplies
# by, where the engine can read it (engines/gptqmodel/verify.weight_reader); else None.
WeightReader = Callable[[torch.nn.Module], Callable[[torch.dtype], torch.Tensor] | None]


@torch.inference_mode()
def dense_linear(module: torch.nn.Module, dtype: torch.dtype = EVAL_DTYPE,
                 weight_reader: WeightReader | None = None) -> torch.nn.Linear:
    """A Linear with the weights the quantized kernel computes with in `dtype`: read by
    `weight_reader` where it can, else the kernel's outputs for the identity matrix."""
    device = next((t.device for t in (*module.buffers(), *module.parameters())), torch.device("cpu"))
    read = weight_reader(module) if weight_reader is not None else None
    has_bias = getattr(module, "bias", None) is not None
    if read is None:
        identity = torch.eye(module.in_features, dtype=dtype, device=device)
        zeros = torch.zeros(1, module.in_features, dtype=dtype, device=device)
        bias = module(zeros)[0]
        weight = (module(identity) - bias).t().contiguous()
    else:
        weight, bias = read(dtype), module.bias if has_bias else None
    dense = torch.nn.Linear(module.in_features, module.out_features, bias=has_bias, dtype=dtype, device=device)
    dense.weight.copy_(weight)
    if has_bias:
        dense.bias.copy_(bias)
    return dense


def replace_quantized_linears(model: torch.nn.Module, replacement: Callable[[torch.nn.Module], torch.nn.Module | None]
                              ) -> int:
    """Put `replacement(layer)` in place of every quantized linear layer it gives one for; returns how many."""
    replaced = 0
    for name, module in [(n, m) for n, m in model.named_modules() if is_quantized_linear(m)]:
        new = replacement(module)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            replaced += 1
    return replaced


def densify_quantized_linears(model: torch.nn.Module, dtype: torch.dtype = EVAL_DTYPE,
                              weight_reader: WeightReader | None = None) -> int:
    """Replace every quantized linear layer by its dense equivalent (`dense_linear`); returns how many."""
    return replace_quantized_linears(model, lambda layer: dense_linear(layer, dtype, weight_reader))


class UnpackedOnUse(torch.nn.Module):
    """A quantized layer kept packed that multiplies by its weights unpacked in `dtype` on each call:
    one layer's dense weights at a time, where the kernel's own arithmetic is slow here."""

    def __init__(self, packed: torch.nn.Module, dtype: torch.dtype, read: Callable[[torch.dtype], torch.Tensor]):
        super().__init__()
        self.packed, self.dtype, self.read = packed, dtype, read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.packed.bias.to(self.dtype) if getattr(self.packed, "bias", None) is not None else None
        return torch.nn.functional.linear(x.to(self.dtype), self.read(self.dtype).to(self.dtype), bias).to(x.dtype)


def unpack_on_use(model: torch.nn.Module, dtype: torch.dtype, weight_reader: WeightReader) -> int:
    """Wrap every quantized linear layer whose weights `weight_reader` reads in `UnpackedOnUse`; the
    others keep their kernels. Returns how many were wrapped."""
    def wrapped(layer):
        read = weight_reader(layer)
        return UnpackedOnUse(layer, dtype, read) if read is not None else None

    return replace_quantized_linears(model, wrapped)


# --- one layer at a time in the evaluation dtype -------------------------------------------------

HEAD_CHUNK_BYTES = 64 * 1024 * 1024  # the output head is cast to the compute dtype this many bytes at a time


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of decoder layers, and its name: its ModuleList of `num_hidden_layers` entries."""
    config = getattr(model, "config", None)
    count = getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError("the model has no list of decoder layers")


def _own_float_tensors(module: torch.nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """A module's own floating-point parameters and buffers (not its children's), with the dict each is in."""
    for store in (module._parameters, module._buffers):
        for name, tensor in list(store.items()):
            if tensor is not None and tensor.is_floating_point():
                yield store, name, tensor


def _cast_tensors(module: torch.nn.Module, dtype: torch.dtype) -> list[tuple[dict, str, torch.Tensor]]:
    """A module's own floating-point parameters and buffers to `dtype` (new Parameters: meta ones of a
    streamed layer too); returns the tensors replaced, with where each was."""
    replaced = []
    for store, name, tensor in _own_float_tensors(module):
        if tensor.dtype != dtype:
            replaced.append((store, name, tensor))
            store[name] = torch.nn.Parameter(tensor.data.to(dtype), requires_grad=False) \
                if isinstance(tensor, torch.nn.Parameter) else tensor.to(dtype)
    return replaced


def _unpacked_parts(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """A layer's modules except quantized kernels and what is inside them: those compute as their
    kernels do (GPTQ's dequantizes with its fp16 scales; AWQ's layers unpack in `UnpackedOnUse`)."""
    packed = [m for m in layer.modules() if is_quantized_linear(m)]
    inside = {id(c) for m in packed for c in m.modules()}
    return [m for m in layer.modules() if id(m) not in inside]


def _cast_for_forward(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hooks that give `layer` copies of its tensors in `dtype` for its forward pass and put the
    originals back after: nothing new is allocated in the stored dtype (the originals may be the
    checkpoint's memory-mapped pages) and nothing is rounded."""
    parts = _unpacked_parts(layer)
    originals: list[tuple[dict, str, torch.Tensor]] = []

    def before(*_):
        for part in parts:
            originals.extend(_cast_tensors(part, dtype))

    def after(*_):
        for store, name, tensor in originals:
            store[name] = tensor
        originals.clear()

    layer.register_forward_pre_hook(before)
    layer.register_forward_hook(after)


def _cast_output(dtype: torch.dtype):
    def hook(module: torch.nn.Module, inputs, output):
        return output.to(dtype)
    return hook


def _chunked_head(head: torch.nn.Module, dtype: torch.dtype) -> None:
    """The head multiplies by its weight cast to `dtype` a block of rows at a time (the head of a big
    vocabulary is a large share of a small model: no whole copy of it in the compute dtype)."""
    rows = max(1, HEAD_CHUNK_BYTES // (head.weight.shape[1] * torch.finfo(dtype).bits // 8))

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        logits = torch.cat([torch.nn.functional.linear(x, block.to(dtype)) for block in head.weight.split(rows)], -1)
        return logits + head.bias.to(dtype) if getattr(head, "bias", None) is not None else logits

    head.forward = forward


def compute_layer_by_layer(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Keep the weights in the dtype they were loaded in (the source's fp16 or bf16, or packed) and
    compute in `dtype`: each decoder layer computes with copies of its weights in `dtype`, made for
    its forward pass and dropped after (`_cast_for_forward`), so one layer at a time is held in
    `dtype`; the embeddings' output is cast, the head multiplies
    in blocks of rows, and the small rest (norms, rotary tables) is cast once. fp16 and bf16 values
    are exact in float32, so this computes what the model loaded in `dtype` computes."""
    _, layers = decoder_layers(model)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    stored = embeddings.weight.dtype
    if dtype == stored:
        return model
    for layer in layers:
        _cast_for_forward(layer, dtype)
    embeddings.register_forward_hook(_cast_output(dtype))
    _chunked_head(head, dtype)
    kept = {id(t) for part in (layers, embeddings, head) for t in (*part.parameters(), *part.buffers())}
    for module in model.modules():
        if not any(id(tensor) in kept for _, _, tensor in _own_float_tensors(module)):
            _cast_tensors(module, dtype)
    return model


def page_out_after_use(model: torch.nn.Module) -> torch.nn.Module:
    """Page out each decoder layer's memory-mapped weights after its forward pass, and the head's
    after its product (`memory.page_out`), so a model loaded from a checkpoint by memory mapping (as
    transformers loads safetensors) holds about one layer's weights at a time instead of every page
    it has touched. Tensors not mapped from a file are left alone."""
    from .memory import file_mapped_ranges, page_out

    mapped = file_mapped_ranges()

    def spans(module: torch.nn.Module) -> list[tuple[int, int]]:
        found = []
        for tensor in (*module.parameters(), *module.buffers()):
            address = tensor.data_ptr()
            if tensor.device.type == "cpu" and any(begin <= address < end for begin, end in mapped):
                found.append((address, tensor.numel() * tensor.element_size()))
        return found

    _, layers = decoder_layers(model)
    for module in (*layers, model.get_output_embeddings()):
        if spans(module):
            module.register_forward_hook(lambda module, args, output: page_out(spans(module)))
    return model


def load_fp16_model(model_path: Path, trust_remote_code: bool = False, dtype: torch.dtype = EVAL_DTYPE,
                    device: str = "cpu", offload_folder: Path | None = None,
                    stored: torch.dtype | None = None) -> torch.nn.Module:
    """The source model for evaluation, computing in `dtype`. With `stored` (the source's dtype) its
    weights stay in that dtype and one layer at a time is cast (`compute_layer_by_layer`); with
    `offload_folder` its decoder layers stay on disk there (accelerate's disk offload: each layer is
    read in for its forward pass, in the dtype its parameters are cast to), the rest on `device`."""
    from transformers import AutoModelForCausalLM

    device_map: Any = device
    if offload_folder is not None:
        device_map = streamed_device_map(model_path, device, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=stored or dtype, device_map=device_map,
                                                 offload_folder=offload_folder,
                                                 trust_remote_code=trust_remote_code).eval()
    return compute_layer_by_layer(model, dtype) if stored else model


def streamed_device_map(model_path: Path, device: str, trust_remote_code: bool = False) -> dict[str, str]:
    """Every decoder layer on "disk", everything else on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        shell = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    name, layers = decoder_layers(shell)
    return _leaves(shell, {f"{name}.{index}": "disk" for index in range(len(layers))}, device)


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


# --- the artifact ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """The cached reference: its file and the fp16 model's own figures on the scored tokens."""

    file: ReferenceFile
    perplexity: float
    bos: int | None
    eval_dtype: str

    @property
    def eval_tokens(self) -> int:
        return self.file.windows * scored_per_window(self.file.window)


@dataclass(frozen=True, repr=False)
class FP16Reference(Artifact):
    """The fp16 model's log-probs on the held-out windows, in llama.cpp's --kl-divergence-base format:
    what every variant of every format is scored against."""

    tokens: TokensArtifact
    source_identity: str
    windows: int = DEFAULT_WINDOWS
    eval_dtype: str = str(EVAL_DTYPE).removeprefix("torch.")  # the device's evaluation dtype
    device: str = "cpu"  # where: not an input (the dtype is)
    n_vocab: int = 0  # for the plan's size estimate only
    offload: str = "none"  # disk: the decoder layers stream from disk (not an input: the same figures)
    stored_dtype: str = "float16"  # the source's weights, held so while evaluating (not an input: the same figures)
    peak: Any = field(default=None, compare=False)  # memory.StageMemory: its peak memory, for the plan

    @property
    def name(self) -> str:
        return "fp16_reference"

    def memory(self):
        return self.peak

    def inputs(self) -> dict[str, Any]:
        return {"model": self.source_identity, "engine": ENGINE, "window": EVAL_WINDOW, "max_windows": self.windows,
                "scored": "second half of each window, BOS first when the tokenizer adds it",
                "format": "llama.cpp kl-divergence-base", "dtype": f"torch.{self.eval_dtype}"}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.tokens,)

    def estimated_bytes(self) -> int:
        return reference_bytes(self.windows, self.n_vocab) if self.n_vocab else 0

    def check(self, store: ArtifactStore) -> None:
        """BadInput unless the held-out text holds at least one full window (before any work)."""
        count = len(store.value(self.tokens).evaluation)
        if count < EVAL_WINDOW:
            raise BadInput(f"calibration: the held-out evaluation text is {count} tokens long; the evaluation needs "
                           f"at least {EVAL_WINDOW} (one window): raise calibration.held_out")

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        windows = evaluation_windows(store.value(self.tokens).evaluation, max_windows=self.windows)
        bos = adds_bos(store.context.tokenizer)
        offload_folder = folder / "offload" if self.offload == "disk" else None
        model = load_fp16_model(store.context.model_path, store.context.trust_remote_code,
                                getattr(torch, self.eval_dtype), self.device, offload_folder,
                                stored=getattr(torch, self.stored_dtype))
        n_vocab = int(model.get_output_embeddings().weight.shape[0])
        nll: list[float] = []
        write_reference(folder / REFERENCE_FILE, EVAL_WINDOW, n_vocab, windows, reference_rows(model, windows, bos, nll))
        del model
        give_back()
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)
        scored = len(windows) * scored_per_window(EVAL_WINDOW)
        return {"perplexity": math.exp(sum(nll) / scored), "eval_tokens": scored, "windows": len(windows),
                "window": EVAL_WINDOW, "n_vocab": n_vocab, "bos": bos}

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Reference:
        return Reference(read_reference(folder / REFERENCE_FILE), value["perplexity"], value["bos"], self.eval_dtype)


def fp16_reference(recipe: "Recipe", source: "SourceModel") -> FP16Reference:
    """The release's one reference (the same artifact for every format that asks for it)."""
    from . import memory
    from .calibration import CalibrationTextArtifact
    from .devices import detect, source_dtype

    config = source.facts.config if source.facts else None
    device = detect(recipe.compute.device, source_dtype(config), strict=False)  # api.require_device refuses later
    tokens = TokensArtifact(CalibrationTextArtifact(recipe.resolved_calibration()), source.identity)
    n_vocab = int((config or {}).get("vocab_size") or (config or {}).get("text_config", {}).get("vocab_size") or 0)
    offload = recipe.compute.offload
    return FP16Reference(tokens, source.identity, recipe.quality.windows, device.eval_dtype, device.name, n_vocab,
                         offload, source_dtype(config),
                         memory.evaluation("fp16_reference", source.facts, device.eval_dtype, EVAL_WINDOW, offload))


__all__ = ["FP16Reference", "Quality", "Reference", "ReferenceFile", "dense_linear", "densify_quantized_linears",
           "evaluation_windows", "fp16_reference", "read_reference", "score_windows"]
