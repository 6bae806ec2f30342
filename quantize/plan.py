"""Recipe -> plan: every variant the release will produce, its repo, branch or file, and size.

Pure: takes the recipe and the source model's facts; reads nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import BadInput
from .manifest import output_subdir, params_digest
from .quant_types import (GGUF_TYPES, awq_default_description, exllama_compatible,
                          gguf_file_name, gptq_default_description, quantized_bits_per_weight)
from .recipe import AWQVariant, GPTQVariant, Recipe, assign_branches
from .source import ModelFacts, SourceModel

FORMATS = ("gptq", "awq", "gguf")
FLOAT_BITS = 16


@dataclass(frozen=True)
class Variant:
    id: str  # "gptq/main", "awq/main", "gguf/Q4_K_M": also the manifest's name
    format: str
    repo_id: str
    branch: str  # GGUF files all live on main
    name: str  # the branch (GPTQ/AWQ) or the GGUF type
    params: dict[str, Any]
    calibration: dict[str, Any] | None
    description: str
    estimated_bytes: int | None
    file_name: str | None = None  # GGUF only

    @property
    def digest(self) -> str:
        return params_digest({"params": self.params, "calibration": self.calibration})

    @property
    def output_subdir(self) -> str:
        """Where the variant's files go, below the release's output folder."""
        return output_subdir(self.format, self.branch)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "format": self.format, "repo_id": self.repo_id, "branch": self.branch,
                "file_name": self.file_name, "params": self.params, "calibration": self.calibration,
                "description": self.description, "estimated_bytes": self.estimated_bytes}


@dataclass
class Plan:
    recipe: Recipe
    source: SourceModel
    variants: list[Variant]
    working_bytes: int | None  # intermediate files (the f16 GGUF) kept while the release runs
    warnings: list[str] = field(default_factory=list)

    def of_format(self, fmt: str) -> list[Variant]:
        return [v for v in self.variants if v.format == fmt]

    @property
    def formats(self) -> list[str]:
        return [fmt for fmt in FORMATS if self.of_format(fmt)]

    def repo_ids(self) -> dict[str, str]:
        return {fmt: self.recipe.release.repo_id(fmt) for fmt in self.formats}

    def estimated_total(self, fmt: str | None = None) -> int | None:
        sizes = [v.estimated_bytes for v in self.variants if fmt in (None, v.format)]
        return None if any(s is None for s in sizes) else sum(sizes)

    def estimated_disk(self) -> int | None:
        total = self.estimated_total()
        if total is None or (self.of_format("gguf") and self.working_bytes is None):
            return None
        return total + (self.working_bytes or 0)

    def select(self, formats: list[str] | None = None, names: list[str] | None = None) -> "Plan":
        """The plan restricted to some formats and/or variants (by id, branch or GGUF type)."""
        chosen = [v for v in self.variants
                  if (not formats or v.format in formats)
                  and (not names or v.id in names or v.name in names or (v.file_name in names))]
        if not chosen:
            raise BadInput("the selection matches no variant of the recipe")
        return Plan(self.recipe, self.source, chosen, self.working_bytes, list(self.warnings))

    def to_dict(self) -> dict[str, Any]:
        facts = self.source.facts
        return {
            "release": {"namespace": self.recipe.release.namespace, "basename": self.recipe.release.basename,
                        "repos": self.repo_ids()},
            "source": {"path": str(self.source.local_path) if self.source.local_path else None,
                       "hub": self.recipe.source.hub, "model_type": self.source.model_type,
                       "parameters": facts.param_count if facts else None},
            "variants": [v.to_dict() for v in self.variants],
            "totals": {**{fmt: self.estimated_total(fmt) for fmt in self.formats},
                       "working_files": self.working_bytes, "disk": self.estimated_disk()},
            "warnings": self.warnings,
        }


def _weight_bytes(facts: ModelFacts | None, bits: int, group_size: int | None) -> int | None:
    """Quantized decoder Linear layers at `bits` (+ group scales/zeros); everything else fp16."""
    if not facts or not facts.param_count:
        return None
    width = max(facts.linear_in_features)
    linear_bits = facts.linear_param_count * quantized_bits_per_weight(bits, group_size, width)
    other_bits = (facts.param_count - facts.linear_param_count) * FLOAT_BITS
    return int((linear_bits + other_bits) / 8)


def _check_group_divides(fmt: str, index: int, group_size: int | None, facts: ModelFacts | None) -> None:
    if group_size is None or not facts or not facts.linear_in_features:
        return
    bad = [w for w in facts.linear_in_features if w % group_size]
    if bad:
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in facts.linear_in_features)]
        hint = f"; sizes that fit: {', '.join(map(str, fits))} or none" if fits else "; use group_size: none"
        raise BadInput(f"{fmt}[{index}].group_size: {group_size} does not divide the layer width "
                       f"{bad[0]} of this model{hint}")


def _calibration(recipe: Recipe, seq_len: int | None) -> dict[str, Any]:
    summary = recipe.calibration.summary()
    if seq_len:
        summary["seq_len"] = seq_len
    return summary


def _weight_variants(recipe: Recipe, fmt: str, specs: list[GPTQVariant] | list[AWQVariant],
                     source: SourceModel) -> list[Variant]:
    repo_id = recipe.release.repo_id(fmt)
    variants = []
    for index, (spec, branch) in enumerate(zip(specs, assign_branches(fmt, specs))):
        _check_group_divides(fmt, index, spec.group_size, source.facts)
        if fmt == "gptq":
            params = {"bits": spec.bits, "group_size": spec.group_size, "act_order": spec.act_order,
                      "damp": spec.damp, "sym": spec.sym,
                      "exllama": exllama_compatible(spec.bits, source.model_type)}
            description = spec.description or gptq_default_description(spec.bits, spec.group_size, spec.act_order)
        else:
            params = {"bits": spec.bits, "group_size": spec.group_size, "zero_point": spec.zero_point,
                      "version": "gemm"}
            description = spec.description or awq_default_description(spec.bits, spec.group_size)
        variants.append(Variant(
            id=f"{fmt}/{branch}", format=fmt, repo_id=repo_id, branch=branch, name=branch, params=params,
            calibration=_calibration(recipe, spec.seq_len), description=description,
            estimated_bytes=_weight_bytes(source.facts, spec.bits, spec.group_size)))
    return variants


def _gguf_variants(recipe: Recipe, source: SourceModel) -> list[Variant]:
    spec = recipe.gguf
    repo_id = recipe.release.repo_id("gguf")
    params_count = source.facts.param_count if source.facts else None
    variants = []
    for name in spec.types:
        facts = GGUF_TYPES[name]
        calibration = recipe.calibration.summary() if spec.imatrix else None
        variants.append(Variant(
            id=f"gguf/{name}", format="gguf", repo_id=repo_id, branch="main", name=name,
            params={"type": name, "imatrix": spec.imatrix, "imatrix_chunks": spec.imatrix_chunks,
                    "outtype": spec.outtype},
            calibration=calibration, description=facts.use_case,
            estimated_bytes=int(params_count * facts.bpw / 8) if params_count else None,
            file_name=gguf_file_name(recipe.release.basename, name)))
    return variants


def build_plan(recipe: Recipe, source: SourceModel) -> Plan:
    """Every variant of the release, in recipe order; BadInput for what the model can't take."""
    variants: list[Variant] = []
    if recipe.gptq:
        variants += _weight_variants(recipe, "gptq", recipe.gptq, source)
    if recipe.awq:
        variants += _weight_variants(recipe, "awq", recipe.awq, source)
    if recipe.gguf:
        variants += _gguf_variants(recipe, source)
    facts = source.facts
    working = None
    if recipe.gguf and facts and facts.param_count:
        working = int(facts.param_count * FLOAT_BITS / 8)
    warnings = list(source.warnings)
    seq_lens = {v.calibration["seq_len"] for v in variants if v.calibration}
    if facts and facts.context_length and seq_lens and max(seq_lens) > facts.context_length:
        warnings.append(f"calibration seq_len {max(seq_lens)} exceeds the model's context "
                        f"({facts.context_length} tokens)")
    return Plan(recipe, source, variants, working, warnings)
