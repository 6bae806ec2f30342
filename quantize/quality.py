"""The quality figures every variant's manifest carries, the same for every format and engine
(measured as quantize/evaluate.py describes), and the recipe's gate on them (`quality.max_kld`).

Kept free of torch: the runner and publishing read it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
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
    # each scored window's mean negative log-likelihood (nats per token), where the engine reports it:
    # two variants scored on the same windows are then compared pairwise (`paired_change`)
    window_nll: tuple[float, ...] = ()


def paired_change(base: Sequence[float], other: Sequence[float]) -> tuple[float, float]:
    """`other`'s perplexity relative to `base`'s, in percent, and that change's standard error, from
    their per-window NLLs on the same windows (`Quality.window_nll`). Each window scores as many
    tokens, so the perplexity ratio is exp(mean of the windows' NLL differences); its error comes
    from how those differences spread over the windows (a paired comparison: the windows' own
    difficulty, which both variants share, cancels)."""
    if len(base) != len(other) or len(base) < 2:
        raise ValueError(f"paired_change needs the same windows, two or more: got {len(base)} and {len(other)}")
    differences = [b - a for a, b in zip(base, other)]
    ratio = math.exp(statistics.fmean(differences))
    return 100 * (ratio - 1), 100 * ratio * statistics.stdev(differences) / math.sqrt(len(differences))


def quality_record(quality: Quality, engine: str, **extra: Any) -> dict[str, Any]:
    """The manifest's `quality`: the same keys for every format."""
    return {"perplexity": round(quality.perplexity, 4), "baseline_perplexity": round(quality.baseline_perplexity, 4),
            "kld_mean": round(quality.kld_mean, 6), "kld_p99": round(quality.kld_p99, 6),
            "top1_agreement": round(quality.top1_agreement, 5), "engine": engine,
            "eval_tokens": quality.eval_tokens, "eval_windows": quality.eval_windows,
            "eval_window": quality.eval_window,
            **({"window_nll": [round(value, 6) for value in quality.window_nll]} if quality.window_nll else {}),
            **extra}


def gate_problem(quality: dict[str, Any] | None, max_kld: float) -> str | None:
    """Why a variant's measured quality keeps it from being published (recipe `quality.max_kld`), or None.

    A variant whose format measures no KL divergence (a plugin without an evaluation) is not gated."""
    kld = (quality or {}).get("kld_mean")
    if kld is None:
        return None
    if not kld <= max_kld:  # a NaN fails too
        return f"quality gate: mean KL divergence {kld:.4f} nats is above quality.max_kld {max_kld:g}"
    return None
