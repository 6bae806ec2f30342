"""Which file should I choose? The memory each file needs and the lowest-KLD file per budget. Pure.

Memory needed = the file's size + the fp16 KV cache at the context length:
layers x KV heads x head dim x 2 (K and V) x 2 bytes per token. A GGUF file runs in RAM (CPU) or,
every layer offloaded, in VRAM; GPTQ and AWQ in VRAM (each plugin's `memory_kinds`). Runtime buffers
(activations, the CUDA context, llama.cpp's compute buffers) come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..quant_types import GB
from ..source import config_value, context_length

KV_VALUE_BYTES = 2  # fp16 K and V, what llama.cpp and transformers keep by default
CONTEXTS = (4096, 32768)  # the context lengths the card sizes memory for (capped at the model's own)
# Memory budgets the card considers (decimal GB, as the sizes); it shows the ones the release's files span.
BUDGETS_GB = (0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 192, 256, 384, 512, 768, 1024)
MAX_BUDGET_ROWS = 8


@dataclass(frozen=True)
class KVCache:
    """The shape of a model's KV cache, from its config."""

    layers: int
    kv_heads: int
    head_dim: int
    value_bytes: int = KV_VALUE_BYTES

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * self.value_bytes

    def bytes(self, tokens: int) -> int:
        return self.bytes_per_token * tokens


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def kv_cache(config: dict[str, Any] | None) -> KVCache | None:
    """The KV cache shape (text config first); None when the config lacks the sizes.

    KV heads: `num_key_value_heads` (or its family's name), 1 for multi-query models, else one per
    attention head; head dim: `head_dim`, else hidden size / attention heads."""
    if not config:
        return None
    layers = _positive_int(config_value(config, "num_hidden_layers"))
    heads = _positive_int(config_value(config, "num_attention_heads"))
    if layers is None or heads is None:
        return None
    kv_heads = _positive_int(config_value(config, "num_key_value_heads"))
    if kv_heads is None:
        kv_heads = 1 if config_value(config, "multi_query") is True else heads
    head_dim = _positive_int(config_value(config, "head_dim"))
    if head_dim is None:
        hidden = _positive_int(config_value(config, "hidden_size"))
        if hidden is None:
            return None
        head_dim = hidden // heads
    return KVCache(layers, kv_heads, head_dim)


def contexts_for(config: dict[str, Any] | None) -> tuple[int, ...]:
    """4k and 32k tokens, each capped at the model's context length (a 2k model gets one column)."""
    limit = context_length(config)
    return tuple(sorted({min(tokens, limit) if limit else tokens for tokens in CONTEXTS}))


def context_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else f"{tokens:,}"


@dataclass(frozen=True)
class Candidate:
    """One file of the release as the choice sees it."""

    id: str
    label: str  # "GGUF Q4_K_M", "GPTQ 4-bit g128 act-order"
    url: str
    size: int | None  # bytes
    kld: float | None  # mean KL divergence from fp16 (nats per token)
    memory_kinds: tuple[str, ...]  # "RAM", "VRAM"
    estimated: bool = False  # size from the plan, not produced yet


@dataclass(frozen=True)
class Choice:
    """Everything the card's "Which file should I choose?" shows."""

    kv: KVCache | None
    contexts: tuple[int, ...]
    needs: list[tuple[Candidate, list[int | None]]]  # every file by size, with its memory need per context
    kinds: tuple[str, ...]  # the memory kinds some file runs in, RAM first
    budgets: list[tuple[float, dict[tuple[str, int], Candidate | None]]]  # GB -> (kind, context) -> pick
    best_per_gb: Candidate | None
    ranked: bool  # some file has a measured KLD


def memory_need(candidate: Candidate, kv: KVCache | None, tokens: int) -> int | None:
    if candidate.size is None or kv is None:
        return None
    return candidate.size + kv.bytes(tokens)


def lowest_kld_that_fits(candidates: list[Candidate], kind: str, budget_bytes: float, kv: KVCache,
                         tokens: int) -> Candidate | None:
    """The measured file of that memory kind with the lowest KLD whose need fits (ties: the smaller)."""
    fitting = [c for c in candidates if kind in c.memory_kinds and c.kld is not None
               and (need := memory_need(c, kv, tokens)) is not None and need <= budget_bytes]
    return min(fitting, key=lambda c: (c.kld, c.size), default=None)


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The measured files no other file beats on both size and KLD, by size."""
    front: list[Candidate] = []
    for candidate in sorted((c for c in candidates if c.kld is not None and c.size is not None),
                            key=lambda c: (c.size, c.kld)):
        if not front or candidate.kld < front[-1].kld:
            front.append(candidate)
    return front


def knee(candidates: list[Candidate]) -> Candidate | None:
    """Best quality per GB: the knee of the size/KLD Pareto front (Kneedle): with size and KLD scaled
    to 0..1 over the front, the file farthest below the straight line from the smallest file to the
    lowest-KLD one. Below it KLD climbs fast; above it each GB buys little. None under 3 front files."""
    front = pareto_front(candidates)
    if len(front) < 3:
        return None
    first, last = front[0], front[-1]
    size_span, kld_span = last.size - first.size, first.kld - last.kld

    def below_chord(c: Candidate) -> float:
        x = (c.size - first.size) / size_span
        y = (c.kld - last.kld) / kld_span
        return (1 - x) - y

    best = max(front[1:-1], key=below_chord)
    return best if below_chord(best) > 0 else None


def budgets(candidates: list[Candidate], kv: KVCache | None, contexts: tuple[int, ...]) -> list[float]:
    """The budgets worth a row: from the first where some measured file fits to the first where the
    lowest-KLD file fits at the longest context (at most MAX_BUDGET_ROWS)."""
    measured = [c for c in candidates if c.kld is not None and c.size is not None]
    if not measured or kv is None:
        return []
    smallest = min(memory_need(c, kv, contexts[0]) for c in measured)
    best = min(measured, key=lambda c: (c.kld, c.size))
    largest = memory_need(best, kv, contexts[-1])
    rows = []
    for gb in BUDGETS_GB:
        if gb * GB < smallest:
            continue
        rows.append(gb)
        if gb * GB >= largest:
            break
    return rows[:MAX_BUDGET_ROWS]


def choose(candidates: list[Candidate], config: dict[str, Any] | None) -> Choice:
    """The choice over every file of the release (all formats), from the measurements and the config."""
    kv = kv_cache(config)
    contexts = contexts_for(config)
    by_size = sorted(candidates, key=lambda c: (c.size is None, c.size or 0, c.label))
    needs = [(c, [memory_need(c, kv, tokens) for tokens in contexts]) for c in by_size]
    kinds = tuple(kind for kind in ("RAM", "VRAM") if any(kind in c.memory_kinds for c in candidates))
    rows = [(gb, {(kind, tokens): lowest_kld_that_fits(candidates, kind, gb * GB, kv, tokens)
                  for kind in kinds for tokens in contexts})
            for gb in budgets(candidates, kv, contexts)]
    return Choice(kv, contexts, needs, kinds, rows, knee(candidates),
                  any(c.kld is not None for c in candidates))
