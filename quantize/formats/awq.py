"""AWQ: one complete model folder per permutation (GEMM layout, the one AutoAWQ, vLLM and
transformers load), made with GPTQModel from the same calibration windows as GPTQ.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

from pydantic import field_validator

from ..engines.gptqmodel.awq import SCALE_SEARCHES, awq_fixes
from ..engines.gptqmodel.weights import GPTQModelBackend, WeightFormat
from ..quant_types import AWQ_BITS, awq_branch_name, awq_default_description
from ._weights import WeightFormatPlugin, WeightVariantSpec


class AWQVariant(WeightVariantSpec):
    """One AWQ permutation: the recipe's `awq:` list items, and the variant's parameters."""

    bits: int = 4
    zero_point: bool = True
    # how the per-channel scale is searched on AWQ's grid of 20 exponents: coarse_to_fine tries
    # 9 of them (every 4th, then the best one's neighbours), full every one, as GPTQModel does
    scale_search: Literal[tuple(SCALE_SEARCHES)] = "coarse_to_fine"  # type: ignore[valid-type]

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in AWQ_BITS:
            raise ValueError(f"AWQ supports {', '.join(map(str, AWQ_BITS))}-bit only (got {value})")
        return value

    @field_validator("group_size")
    @classmethod
    def _needs_group(cls, value: int | None) -> int | None:
        if value is None:
            raise ValueError("AWQ needs a group size (e.g. 128)")
        return value

    def generated_branch(self) -> str:
        return awq_branch_name(self.bits, self.group_size)

    def default_description(self) -> str:
        return awq_default_description(self.bits, self.group_size)


def awq_settings(spec: AWQVariant) -> dict[str, Any]:
    # GPTQModel spells AWQ's zero point as asymmetric quantization. AWQ quantizes a decoder layer
    # only once the inputs of all its linears are captured from the unquantized layer, so one
    # capture forward per layer serves them all (true_sequential off); GPTQModel's default, one
    # capture per group of linears, computes the same inputs again and adds a per-layer hint that
    # moves the scales only through AWQ's 1e-4 guard, which AutoAWQ's search does not have.
    return {"quant_method": "awq", "format": "gemm", "bits": spec.bits, "group_size": spec.group_size,
            "sym": not spec.zero_point, "true_sequential": False}


def awq_fields(spec: AWQVariant) -> dict[str, Any]:
    return {"quant_method": "awq", "version": "gemm", "bits": spec.bits, "group_size": spec.group_size,
            "zero_point": spec.zero_point}


def awq_quantizing(spec: AWQVariant) -> AbstractContextManager:
    return awq_fixes(spec.scale_search)


# Computed in the device's dtype like GPTQ: float32 on a CPU (the scale search only needs a
# floating-point forward; engines/gptqmodel/awq.py), fp16/bf16 on a GPU.
AWQ = WeightFormat(name="awq", quantize_backend="awq_torch", load_backend="torch_awq",
                   quantize_settings=awq_settings, release_fields=awq_fields, quantizing=awq_quantizing,
                   batched_forwards=True)


class AWQFormat(WeightFormatPlugin):
    name = "awq"
    title = "AWQ"
    order = 20
    card_order = 10
    section = list[AWQVariant] | None
    spec_type = AWQVariant
    # transformers 5 loads AWQ GEMM files through GPTQModel (earlier versions went through AutoAWQ).
    requirements = (("transformers", "5.0.0", "loads the model"), ("gptqmodel", None, "the AWQ kernels"),
                    ("accelerate", None, "device_map"))

    weight_format = AWQ

    def backend(self, context) -> GPTQModelBackend:
        return GPTQModelBackend(context, self.weight_format)

    def describe_more(self, spec: AWQVariant) -> str:
        return f", {'zero point' if spec.zero_point else 'symmetric'}, {spec.scale_search.replace('_', '-')} scale search"

    def card_row(self, entry, model_type: str | None) -> dict[str, Any]:
        return self.weight_row(entry, model_type)

    def repository_label(self, section: list[AWQVariant]) -> str:
        return "AWQ model(s) for GPU inference"


FORMAT = AWQFormat()
