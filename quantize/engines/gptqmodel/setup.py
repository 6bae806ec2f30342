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
