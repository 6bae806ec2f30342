"""AWQ: one complete model folder per permutation (GEMM layout, the one AutoAWQ, vLLM and
transformers load), made with GPTQModel from the same calibration windows as GPTQ.
"""

from __future__ import annotations

from typing import Any

from .gptqmodel_common import GPTQModelBackend, WeightFormat


def awq_settings(params: dict[str, Any]) -> dict[str, Any]:
    # GPTQModel spells AWQ's zero point as asymmetric quantization.
    return {"quant_method": "awq", "format": "gemm", "bits": params["bits"],
            "group_size": params["group_size"], "sym": not params["zero_point"]}


def awq_fields(params: dict[str, Any]) -> dict[str, Any]:
    return {"quant_method": "awq", "version": "gemm", "bits": params["bits"],
            "group_size": params["group_size"], "zero_point": params["zero_point"]}


# GPTQModel's AWQ kernels take fp16/bf16 only: AWQ computes in the source's own dtype.
AWQ = WeightFormat(name="awq", quantize_dtype=None, quantize_backend="awq_torch", load_backend="torch_awq",
                   quantize_settings=awq_settings, release_fields=awq_fields)


class AWQBackend(GPTQModelBackend):
    format = "awq"
    weight_format = AWQ


BACKEND = AWQBackend
