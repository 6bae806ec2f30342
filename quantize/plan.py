"""Recipe -> plan: every variant the release will produce, its repo, branch or file, its size,
and the shared artifacts it is made from.

Pure: takes the recipe and the source model's facts; reads nothing itself. Each format plugin
expands its own section (quantize/formats/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import BadInput
from .formats import all_formats, get_format
from .formats.base import Variant
from .memory import StageMemory
from .recipe import Recipe
from .source import SourceModel
from .stages import Artifact

__all__ = ["Plan", "Variant", "build_plan"]


def _artifacts(variants: list[Variant]) -> dict[str, Artifact]:
    """Every artifact the variants need, directly or through another one, by name."""
    found: dict[str, Artifact] = {}

    def visit(artifact: Artifact) -> None:
        for needed in artifact.needs():
            visit(needed)
        found.setdefault(artifact.name, artifact)

    for variant in variants:
        for artifact in variant.needs:
            visit(artifact)
    return found


@dataclass
class Plan:
    recipe: Recipe
    source: SourceModel
    variants: list[Variant]
    warnings: list[str] = field(default_factory=list)

    def of_format(self, fmt: str) -> list[Variant]:
        return [v for v in self.variants if v.format == fmt]

    @property
    def formats(self) -> list[str]:
        return [plugin.name for plugin in all_formats() if self.of_format(plugin.name)]

    @property
    def artifacts(self) -> dict[str, Artifact]:
        """The shared work of the plan's variants, in the order it can be made."""
        return _artifacts(self.variants)

    @property
    def working_bytes(self) -> int | None:
        """Disk the cached shared work takes (the f16 GGUF above all); None when it can't be estimated."""
        sizes = [a.estimated_bytes() for a in self.artifacts.values()]
        return sum(sizes) if sizes else 0

    def memory(self) -> list[StageMemory]:
        """The peak memory of every stage: the shared work, then each variant's own stages (in the
        order they run); stages that can't be estimated (no config) are left out."""
        stages = [a.memory() for a in self.artifacts.values()] + [m for v in self.variants for m in v.memory]
        return [m for m in stages if m is not None]

    def peak_memory(self) -> StageMemory | None:
        """The stage that needs the most memory (memory-mapped llama.cpp stages only when nothing else)."""
        stages = self.memory()
        held = [m for m in stages if not m.mapped] or stages
        return max(held, key=lambda m: m.bytes, default=None)

    @property
    def device(self):
        """Where the variants that use a device (GPTQ, AWQ) are computed (devices.Device), or None."""
        return next((v.device for v in self.variants if v.device is not None), None)

    def repo_ids(self) -> dict[str, str]:
        return {fmt: self.recipe.release.repo_id(get_format(fmt).title) for fmt in self.formats}

    def estimated_total(self, fmt: str | None = None) -> int | None:
        sizes = [v.estimated_bytes for v in self.variants if fmt in (None, v.format)]
        return None if any(s is None for s in sizes) else sum(sizes)

    def estimated_disk(self) -> int | None:
        total = self.estimated_total()
        return None if total is None else total + (self.working_bytes or 0)

    def matching(self, name: str) -> list[Variant]:
        """The variants `name` means: an id, a branch, a GGUF type or a file name (GGUF types in any case)."""
        exact = [v for v in self.variants if name in (v.id, v.name, v.file_name)]
        if exact:
            return exact
        folded = name.casefold()
        return [v for v in self.variants if get_format(v.format).case_insensitive_names
                and folded in (v.id.casefold(), v.name.casefold(), (v.file_name or "").casefold())]

    def select(self, formats: list[str] | None = None, names: list[str] | None = None) -> "Plan":
        """The plan restricted to some formats and/or variants (by id, branch or GGUF type).

        BadInput naming any name that matches no variant (rather than silently ignoring it)."""
        wanted: set[str] | None = None
        if names is not None:
            if not names:
                raise BadInput("--variants: no variant named (give ids, branches or GGUF types, comma separated)")
            wanted = set()
            for name in names:
                found = self.matching(name)
                if not found:
                    known = [v.id for v in self.variants]
                    shown = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
                    raise BadInput(f"--variants: {name!r} is not a variant of this release (known: {shown})")
                wanted.update(v.id for v in found)
        chosen = [v for v in self.variants
                  if (not formats or v.format in formats) and (wanted is None or v.id in wanted)]
        if not chosen:
            raise BadInput("the selection matches no variant of the recipe")
        about_others = set(variant_warnings(self.variants))
        kept = [warning for warning in self.warnings if warning not in about_others]
        return Plan(self.recipe, self.source, chosen, kept + variant_warnings(chosen))

    def to_dict(self) -> dict[str, Any]:
        facts = self.source.facts
        return {
            "release": {"namespace": self.recipe.release.namespace, "basename": self.recipe.release.basename,
                        "repos": self.repo_ids()},
            "source": {"path": str(self.source.local_path) if self.source.local_path else None,
                       "hub": self.source.hub, "model_type": self.source.model_type,
                       "parameters": facts.param_count if facts else None},
            "variants": [v.to_dict() for v in self.variants],
            "artifacts": [{"name": a.name, "needs": [n.name for n in a.needs()], "estimated_bytes": a.estimated_bytes()}
                          for a in self.artifacts.values()],
            "totals": {**{fmt: self.estimated_total(fmt) for fmt in self.formats},
                       "working_files": self.working_bytes, "disk": self.estimated_disk()},
            "memory": {"stages": [m.to_dict() for m in self.memory()],
                       "peak": self.peak_memory().to_dict() if self.peak_memory() else None,
                       "offload": self.recipe.compute.offload},
            "device": ({"name": self.device.name, "requested": self.device.requested,
                        "compute_dtype": self.device.compute_dtype, "eval_dtype": self.device.eval_dtype,
                        "problem": self.device.problem} if self.device else None),
            "warnings": self.warnings,
        }


def variant_warnings(variants: list[Variant]) -> list[str]:
    """What each format plugin says about its variants' settings (`Format.plan_warnings`)."""
    return [warning for plugin in all_formats()
            for warning in plugin.plan_warnings([v for v in variants if v.format == plugin.name])]


def build_plan(recipe: Recipe, source: SourceModel) -> Plan:
    """Every variant of the release, in format then recipe order; BadInput for what the model can't take."""
    variants: list[Variant] = []
    for plugin in all_formats():
        if getattr(recipe, plugin.name) is not None:
            variants += plugin.expand(recipe, source)
    facts = source.facts
    warnings = list(source.warnings) + variant_warnings(variants)
    seq_lens = {v.calibration.seq_len for v in variants if v.calibration}
    if facts and facts.context_length and seq_lens and max(seq_lens) > facts.context_length:
        warnings.append(f"calibration seq_len {max(seq_lens)} exceeds the model's context "
                        f"({facts.context_length} tokens)")
    return Plan(recipe, source, variants, warnings)
