"""Checking a release folder as its users will load it: files, config fields, transformers, generation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import WorkFailed
from .setup import eager_torch

if TYPE_CHECKING:
    from ...devices import Device
    from .weights import WeightFormat

GENERATE_TOKENS = 8


def check_release_folder(folder: Path, fmt: WeightFormat, spec: Any) -> None:
    """The files and config fields mainstream loaders need; WorkFailed naming the first problem."""
    names = {p.name for p in folder.iterdir()}
    required = {"config.json", "quantize_config.json"}
    missing = sorted(required - names) or ([] if any(n.endswith(".safetensors") for n in names) else ["*.safetensors"])
    if missing:
        raise WorkFailed(f"{folder.name}: release folder lacks {', '.join(missing)}")
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        raise WorkFailed(f"{folder.name}: release folder holds pickled weights")
    wanted = {**fmt.release_fields(spec), **fmt.legacy_keys}
    for file_name, config in (("quantize_config.json", json.loads((folder / "quantize_config.json").read_text())),
                              ("config.json", json.loads((folder / "config.json").read_text()).get("quantization_config") or {})):
        wrong = {k: config.get(k) for k, v in wanted.items() if config.get(k) != v}
        if wrong:
            raise WorkFailed(f"{file_name}: quantization fields {wrong} differ from {({k: wanted[k] for k in wrong})}")


def load_quantized(folder: Path, fmt: WeightFormat, spec: Any, trust_remote_code: bool = False,
                   device: Device | None = None, stored=None):
    """The variant as a user loads it: transformers' AutoModelForCausalLM, on the device (default: the CPU),
    its unquantized weights in the evaluation dtype, or in `stored` (a torch dtype) when given."""
    from transformers import AutoModelForCausalLM

    from ...evaluate import EVAL_DTYPE

    name, dtype = (device.name, device.torch_dtype("eval")) if device is not None else ("cpu", EVAL_DTYPE)
    dtype = stored or dtype
    with eager_torch(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")  # we only pick the kernel
        model = AutoModelForCausalLM.from_pretrained(
            folder, device_map=name, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=fmt.transformers_loading_config(spec, device))
    if not any(hasattr(m, "qweight") for m in model.modules()):
        raise WorkFailed(f"{folder.name}: transformers loaded no quantized layer")
    return model.eval()


def generate_check(model, tokenizer, tokens: int = GENERATE_TOKENS) -> int:
    """Greedy-generate a few tokens; WorkFailed unless they come and the logits are finite."""
    import torch

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    prompt = prompt.to(next((p.device for p in model.parameters()), torch.device("cpu")))
    with eager_torch(), torch.inference_mode():
        logits = model(**prompt).logits
        output = model.generate(**prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if not torch.isfinite(logits).all():
        raise WorkFailed("the quantized model's logits are not finite")
    produced = output.shape[-1] - prompt["input_ids"].shape[-1]
    if produced != tokens:
        raise WorkFailed(f"the quantized model generated {produced} tokens instead of {tokens}")
    return produced


def weight_reader(module):
    """For GPTQModel's torch AWQ kernel, a function giving the [out, in] weight it multiplies by for
    an input in a dtype (its own `dequantize_gemm`, in fp16 unless that dtype is half precision);
    None for other kernels.

    That kernel computes in fp16 whatever its input, so making it dense through its outputs for the
    identity matrix is fp16 matrix work (~1 minute for SmolLM2 on a CPU without half-precision
    units), and so is evaluating it packed; reading the weight gives the same values at once."""
    import torch
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    if not isinstance(module, AwqTorchLinear):
        return None

    def weight(dtype):
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        return dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales.to(half),
                               bits=module.bits, group_size=module.group_size).t()

    return weight
