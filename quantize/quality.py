"""The quality figures every variant's manifest carries, the same for every format and engine
(measured as quantize/evaluate.py describes), and the recipe's gate on them (`quality.max_kld`).

Kept free of torch: the runner and publishing read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Quality:
    """One model's figures on the reference's scored tokens."""

    perplexity: float
    baseline_perplexity: float  # the fp16 reference's, on the same tokens
    kld_mean: float  # nats
    kld_p99: float
    top1_agreement: float  # fraction of scored positions where both models' most likely token is the same
    eval_tokens: int  # scored tokens
    eval_windows: int
    eval_window: int


def quality_record(quality: Quality, engine: str, **extra: Any) -> dict[str, Any]:
    """The manifest's `quality`: the same keys for every format."""
    return {"perplexity": round(quality.perplexity, 4), "baseline_perplexity": round(quality.baseline_perplexity, 4),
            "kld_mean": round(quality.kld_mean, 6), "kld_p99": round(quality.kld_p99, 6),
            "top1_agreement": round(quality.top1_agreement, 5), "engine": engine,
            "eval_tokens": quality.eval_tokens, "eval_windows": quality.eval_windows,
            "eval_window": quality.eval_window, **extra}


def gate_problem(quality: dict[str, Any] | None, max_kld: float) -> str | None:
    """Why a variant's measured quality keeps it from being published (recipe `quality.max_kld`), or None.

    A variant whose format measures no KL divergence (a plugin without an evaluation) is not gated."""
    kld = (quality or {}).get("kld_mean")
    if kld is None:
        return None
    if not kld <= max_kld:  # a NaN fails too
        return f"quality gate: mean KL divergence {kld:.4f} nats is above quality.max_kld {max_kld:g}"
    return None
