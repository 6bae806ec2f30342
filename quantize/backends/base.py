"""The one small interface between the runner and each format's backend.

A backend is made once per release. `check` runs for every backend before any work starts and
raises BadInput for what it cannot do (unsupported architecture, missing tools). `produce` makes
one variant's files in an empty staging folder, verifies they load, measures their quality, and
returns what it made; the runner moves the files into place and writes the manifest.
Expensive shared work (loading the fp16 model, converting to GGUF, tokenizing calibration text)
is done once, lazily, and reused across variants.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..calibration import CalibrationText, load_texts
from ..plan import Plan, Variant


@dataclass
class Produced:
    files: list[Path]  # every file of the variant, inside the staging folder
    quality: dict[str, Any] = field(default_factory=dict)  # perplexity, baseline_perplexity, ...
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # facts of the calibration actually used
    params: dict[str, Any] = field(default_factory=dict)  # measured facts added to the manifest's params


@dataclass
class ReleaseContext:
    """What every backend of one release shares."""

    plan: Plan
    out_dir: Path
    log: Callable[[str], None] = print
    shared: dict[str, Any] = field(default_factory=dict)  # state backends of one release share, by name

    @property
    def recipe(self):
        return self.plan.recipe

    @property
    def work_dir(self) -> Path:
        """Intermediate files kept between runs (f16 GGUF, imatrix, tokenized calibration)."""
        path = self.out_dir / ".work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def model_path(self) -> Path:
        """The fp16 model as a local folder (a Hub source is downloaded once, weights included)."""
        if self.plan.source.local_path is not None:
            return self.plan.source.local_path
        from huggingface_hub import snapshot_download

        source = self.recipe.source
        return Path(snapshot_download(source.hub, revision=source.revision))

    @cached_property
    def texts(self) -> CalibrationText:
        return load_texts(self.recipe)


class Backend(ABC):
    format: ClassVar[str]

    def __init__(self, context: ReleaseContext):
        self.context = context

    @abstractmethod
    def check(self, variants: list[Variant]) -> None:
        """Raise BadInput for anything that would fail later; must not start any work."""

    @abstractmethod
    def produce(self, variant: Variant, staging: Path) -> Produced:
        """Make, verify and measure one variant in `staging` (an empty folder)."""

    def tool_versions(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        """Release what was kept between variants (models in memory, temp files)."""


def backend_class(fmt: str) -> type[Backend]:
    """The backend of a format: the class named `BACKEND` in module quantize.backends.<fmt>."""
    module = importlib.import_module(f"{__package__}.{fmt}")
    return module.BACKEND
