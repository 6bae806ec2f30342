"""What the GPTQ and AWQ plugins share: a list of permutations in the recipe, one branch each,
made from the release's calibration windows and compared with the fp16 reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from .. import memory
from ..calibration import WindowsArtifact
from ..errors import BadInput
from ..quant_types import quantized_bits_per_weight
from ..schema import GroupSize, Strict, branch_name_problem, group_size_label
from .base import PRESENTATION, Format, Variant

if TYPE_CHECKING:
    from ..devices import Device
    from ..engines.gptqmodel.weights import WeightFormat
    from ..recipe import Recipe
    from ..source import ModelFacts, SourceModel

FLOAT_BITS = 16
HUB = "https://huggingface.co"


def presentation(default: Any = None) -> Any:
    """A recipe field that changes how a variant is shown (branch, description), not its files."""
    return Field(default, json_schema_extra={PRESENTATION: True})


class WeightVariantSpec(Strict):
    """The recipe keys every GPTQ/AWQ permutation has."""

    group_size: GroupSize = 128
    seq_len: int | None = Field(None, ge=16)  # overrides calibration.seq_len for this variant
    branch: str | None = presentation()  # default: main for the default (else first) one, else generated
    default: bool = presentation(False)  # publish this one on `main`
    description: str | None = presentation()

    def generated_branch(self) -> str:
        raise NotImplementedError

    def default_description(self) -> str:
        raise NotImplementedError


def assign_branches(fmt: str, variants: list[WeightVariantSpec]) -> list[str]:
    """Branch per variant: explicit names win; the `default` (else the first) unnamed one is main."""
    explicit_main = any(v.branch == "main" for v in variants)
    marked = [i for i, v in enumerate(variants) if v.default]
    if len(marked) > 1:
        raise ValueError(f"{fmt}: only one variant can be `default: true` (found {len(marked)})")
    main_index = None if explicit_main else (marked[0] if marked else 0)
    branches = []
    for index, variant in enumerate(variants):
        if variant.branch:
            branches.append(variant.branch)
        elif index == main_index:
            branches.append("main")
        else:
            branches.append(variant.generated_branch())
    return branches


def weight_bytes(facts: "ModelFacts | None", bits: int, group_size: int | None) -> int | None:
    """Quantized decoder Linear layers at `bits` (+ group scales/zeros); everything else fp16."""
    if not facts or not facts.param_count:
        return None
    width = max(facts.linear_in_features)
    linear_bits = facts.linear_param_count * quantized_bits_per_weight(bits, group_size, width)
    other_bits = (facts.param_count - facts.linear_param_count) * FLOAT_BITS
    return int((linear_bits + other_bits) / 8)


def check_group_divides(fmt: str, index: int, group_size: int | None, facts: "ModelFacts | None") -> None:
    if group_size is None or not facts or not facts.linear_in_features:
        return
    bad = [w for w in facts.linear_in_features if w % group_size]
    if bad:
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in facts.linear_in_features)]
        hint = f"; sizes that fit: {', '.join(map(str, fits))} or none" if fits else "; use group_size: none"
        raise BadInput(f"{fmt}[{index}].group_size: {group_size} does not divide the layer width "
                       f"{bad[0]} of this model{hint}")


def yes_no(value: bool) -> str:
    return "Yes" if value else "No"


class WeightFormatPlugin(Format):
    """GPTQ and AWQ: `section` is a list of permutations, each on its own branch."""

    one_branch_per_variant = True
    library_name = "transformers"
    spec_type: type[WeightVariantSpec]
    weight_format: "WeightFormat"

    def check_section(self, section: list[WeightVariantSpec] | None) -> None:
        if section is None:
            return
        if not section:
            raise ValueError(f"{self.name}: empty list: remove the key or list at least one variant")
        seen: dict[str, int] = {}
        for index, branch in enumerate(assign_branches(self.name, section)):
            problem = branch_name_problem(branch)
            if problem:
                raise ValueError(f"{self.name}[{index}].branch: not a branch name git accepts: it {problem}")
            if branch in seen:
                raise ValueError(f"{self.name}[{index}]: branch {branch!r} is also used by {self.name}[{seen[branch]}]")
            seen[branch] = index

    def expand(self, recipe: "Recipe", source: "SourceModel") -> list[Variant]:
        specs: list[WeightVariantSpec] = getattr(recipe, self.name)
        repo_id = recipe.release.repo_id(self.title)
        calibration = recipe.resolved_calibration()
        from ..devices import detect, source_dtype
        from ..evaluate import EVAL_WINDOW, fp16_reference

        device = detect(recipe.compute.device, source_dtype(source.facts.config if source.facts else None),
                        strict=False)  # a release refuses a device it can't have (executors.require_device)
        offload = recipe.compute.offload
        reference = fp16_reference(recipe, source)
        tokens = reference.tokens
        variants = []
        for index, (spec, branch) in enumerate(zip(specs, assign_branches(self.name, specs))):
            check_group_divides(self.name, index, spec.group_size, source.facts)
            calib = calibration.model_copy(update={"seq_len": spec.seq_len or calibration.seq_len})
            windows = WindowsArtifact(tokens, calib.samples, calib.seq_len, calib.seed)
            variant_id = f"{self.name}/{branch}"
            size = weight_bytes(source.facts, spec.bits, spec.group_size)
            packed = max(0, (size or 0) - memory.unquantized_bytes(source.facts))
            spec = self.resolved(spec, calib, source, device, offload, packed)
            stages = (self.quantize_memory(variant_id, index, spec, calib, source, device, offload, packed),
                      memory.evaluation(f"{variant_id}: verify", source.facts, device.eval_dtype, EVAL_WINDOW,
                                        offload, size or 0))
            variants.append(Variant(
                id=variant_id, format=self.name, repo_id=repo_id, branch=branch, name=branch,
                spec=spec, calibration=calib, description=spec.description or spec.default_description(),
                estimated_bytes=size, subdir=self.output_subdir(branch), source_identity=source.identity,
                needs=(windows, *self.shared_work(spec, windows, source, device), reference), device=device,
                offload=offload, memory=tuple(m for m in stages if m is not None)))
        return variants

    def resolved(self, spec: WeightVariantSpec, calib, source: "SourceModel", device: "Device", offload: str,
                 packed_bytes: int) -> WeightVariantSpec:
        """The spec with the choices it leaves to the plan made for this model and machine (GPTQ's
        `hessian: auto`); as the recipe gives it where there are none."""
        return spec

    def quantize_memory(self, variant_id: str, index: int, spec: WeightVariantSpec, calib, source: "SourceModel",
                        device: "Device", offload: str, packed_bytes: int = 0):
        """The peak memory of quantizing one permutation (memory.StageMemory): GPTQModel's layer loop,
        `packed_bytes` its quantized layers."""
        return memory.gptq_quantize(variant_id, source.facts, device.compute_dtype, calib.samples, calib.seq_len,
                                    offload, packed_bytes, self.weight_format.samples_per_forward(calib.seq_len))

    def shared_work(self, spec: WeightVariantSpec, windows: WindowsArtifact, source: "SourceModel",
                    device: "Device") -> tuple:
        """Artifacts besides the windows and the fp16 reference that a permutation is made from."""
        return ()

    def method(self, variant: Variant) -> str:
        return self.title

    def describe(self, variant: Variant) -> str:
        spec = variant.spec
        return (f"{spec.bits}-bit, gs {group_size_label(spec.group_size).lower()}{self.describe_more(spec)}, "
                f"seq {variant.calibration.seq_len}")

    def describe_more(self, spec: Any) -> str:
        """Format-specific parameters for the plan's Parameters column."""
        return ""

    # (package, the oldest version known to load these files, what it is for), for the card's requirements
    requirements: tuple[tuple[str, str | None, str], ...] = ()

    def card_extras(self, entries: list) -> dict[str, Any]:
        """Which branch users get by default and which one the examples show, and the library versions.

        A repo may have no `main` variant (every branch named in the recipe) or a single one: the card
        then names the branch there is, and says nothing about "another branch".
        """
        branches = [e.branch for e in entries]
        default = "main" if "main" in branches else (branches[0] if branches else "main")
        other = next((b for b in branches if b != default), None)
        made_with = next((e.tools for e in entries if e.tools), {})
        requirements = [{"package": package, "minimum": minimum, "made_with": made_with.get(package), "use": use}
                        for package, minimum, use in self.requirements]
        return {"branches": branches, "default_branch": default, "has_main": "main" in branches,
                "other_branch": other, "example_branch": other or default, "requirements": requirements,
                "pip_packages": " ".join(r["package"] for r in requirements)}

    def short_label(self, entry: Any) -> str:
        params = entry.params
        group = f" g{params['group_size']}" if params["group_size"] else ""
        return f"{params['bits']}-bit{group}{self.short_label_more(params)}"

    def short_label_more(self, params: dict[str, Any]) -> str:
        """Format-specific parameters for the short label."""
        return ""

    def weight_row(self, entry: Any, model_type: str | None) -> dict[str, Any]:
        from ..card.context import dataset_cell, size_cell

        params = entry.params
        calibration = entry.calibration
        return {
            "branch": entry.branch, "url": f"{HUB}/{entry.repo_id}/tree/{entry.branch}",
            "bits": params["bits"], "group_size": group_size_label(params["group_size"]),
            "dataset": dataset_cell(calibration), "seq_len": calibration["seq_len"] if calibration else "",
            "size": size_cell(entry), "description": entry.description,
        }
