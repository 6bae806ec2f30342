"""GPTQ: one complete model folder per permutation the recipe lists, made with GPTQModel.

Classic GPTQ (v1 checkpoint format): act order is GPTQ's `desc_act`, and GPTQModel's own
group-aware reordering is off, so every loader that reads GPTQ folders runs them.
"""

from __future__ import annotations

from typing import Any

from .gptqmodel_common import GPTQ_LEGACY_KEYS, GPTQModelBackend, WeightFormat


def gptq_settings(params: dict[str, Any]) -> dict[str, Any]:
    return {"quant_method": "gptq", "format": "gptq", "bits": params["bits"],
            "group_size": params["group_size"] or -1, "desc_act": params["act_order"],
            "act_group_aware": False, "damp_percent": params["damp"], "sym": params["sym"],
            "true_sequential": True}


def gptq_fields(params: dict[str, Any]) -> dict[str, Any]:
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": params["bits"],
            "group_size": params["group_size"] or -1, "desc_act": params["act_order"],
            "damp_percent": params["damp"], "sym": params["sym"], "true_sequential": True}


# float32: exact for fp16 and bf16 sources, and on CPUs without bf16 units ~90x faster than either.
GPTQ = WeightFormat(name="gptq", quantize_dtype="float32", quantize_backend="auto", load_backend="torch",
                    quantize_settings=gptq_settings, release_fields=gptq_fields, legacy_keys=GPTQ_LEGACY_KEYS)


class GPTQBackend(GPTQModelBackend):
    format = "gptq"
    weight_format = GPTQ


BACKEND = GPTQBackend
