"""GPTQ: one complete model folder per permutation the recipe lists, each on its own branch,
made with GPTQModel.

Classic GPTQ (v1 checkpoint format): act order is GPTQ's `desc_act`, and GPTQModel's own
group-aware reordering is off, so every loader that reads GPTQ folders runs them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from .. import memory
from ..engines.gptqmodel.hessians import MAX_SOLVE_THREADS, GPTQHessians, hessian_bytes, solve_threads
from ..engines.gptqmodel.weights import GPTQModelBackend, WeightFormat
from ..quant_types import GPTQ_BITS, exllama_compatible, gptq_branch_name, gptq_default_description
from ..schema import group_size_on_disk
from ..source import config_value
from ._weights import WeightFormatPlugin, WeightVariantSpec, yes_no
from .base import Variant

# Keys older GPTQ loaders (AutoGPTQ, text-generation-webui) read from quantize_config.json.
GPTQ_LEGACY_KEYS = {"model_name_or_path": None, "model_file_base_name": "model"}


class GPTQVariant(WeightVariantSpec):
    """One GPTQ permutation: the recipe's `gptq:` list items, and the variant's parameters."""

    bits: int = 4
    act_order: bool = True
    damp: float = 0.1
    sym: bool = True
    # sequential: GPTQModel's own loop, inputs from the already-quantized earlier layers;
    # batched: the same algorithm with every calibration window run through each layer in one forward,
    # each group solved when its input arrives: one forward per layer instead of GPTQModel's five, about
    # 0.4 of its time, and on a CPU the loop's very files (its Hessians summed window by window, as the
    # loop does); it holds one layer's activations for all windows at once (the plan counts them);
    # auto (the default): the plan picks batched where that memory fits, else sequential (plan_hessian);
    # shared: every permutation solves from one calibration pass over the fp16 model (its Hessians):
    # about a quarter of the quantization time of a 4-permutation sweep, in no more memory, within
    # about 1-2% on 4-bit grouped and 8-bit but 16-49% worse perplexity on 3-bit and ungrouped 4-bit
    # on the fair SmolLM2 (README; the plan warns: shared_measured_worse).
    hessian: Literal["auto", "sequential", "batched", "shared"] = "auto"

    # sequential, batched and auto make the same files: choosing between them redoes no finished variant
    SAME_FILES: ClassVar[dict[str, dict[str, str]]] = {"hessian": {"auto": "sequential", "batched": "sequential"}}

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in GPTQ_BITS:
            raise ValueError(f"must be one of {', '.join(map(str, GPTQ_BITS))} (got {value})")
        return value

    @field_validator("damp")
    @classmethod
    def _damp(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"must be between 0 and 1, exclusive (got {value})")
        return value

    def generated_branch(self) -> str:
        return gptq_branch_name(self.bits, self.group_size, self.act_order)

    def default_description(self) -> str:
        return gptq_default_description(self.bits, self.group_size, self.act_order)


def shared_measured_worse(spec: GPTQVariant) -> bool:
    """Where `hessian: shared` measured clearly worse than GPTQModel's loop (16-49% perplexity on the
    fair SmolLM2, README: the seven-permutation sweep): 3-bit, and 4-bit without groups (8-bit without
    groups measured the same as the loop's)."""
    return spec.bits <= 3 or (spec.bits <= 4 and spec.group_size is None)


# a mixture of experts' expert count: the sizes' name (its spellings in source.SIZE_KEYS) and DeepSeek's key
EXPERT_KEYS = ("num_local_experts", "n_routed_experts")


def plan_hessian(batched_peak: "memory.StageMemory | None", available: int, on_gpu: bool,
                 config: dict[str, Any] | None) -> str:
    """What `hessian: auto` runs: `batched` (GPTQModel's loop's files in about 0.4 of its time) where its
    peak memory (every window's activations at once) fits what is available, else `sequential`; also
    `sequential` where batched has not been checked or may not run: on a GPU (not run there yet), for
    a mixture of experts (an expert no calibration token reaches stops batched), and where the model's
    shapes are unknown."""
    experts = any((config_value(config or {}, key) or 0) > 1 for key in EXPERT_KEYS)
    fits = batched_peak is not None and batched_peak.bytes <= available
    return "batched" if fits and not on_gpu and not experts else "sequential"


def gptq_settings(spec: GPTQVariant) -> dict[str, Any]:
    return {"quant_method": "gptq", "format": "gptq", "bits": spec.bits,
            "group_size": group_size_on_disk(spec.group_size), "desc_act": spec.act_order,
            "act_group_aware": False, "damp_percent": spec.damp, "sym": spec.sym, "true_sequential": True}


def gptq_fields(spec: GPTQVariant) -> dict[str, Any]:
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": spec.bits,
            "group_size": group_size_on_disk(spec.group_size), "desc_act": spec.act_order,
            "damp_percent": spec.damp, "sym": spec.sym, "true_sequential": True}


# Computed in the device's dtype (quantize/devices.py): float32 on a CPU, exact for fp16 and bf16 sources.
GPTQ = WeightFormat(name="gptq", quantize_backend="auto", load_backend="torch",
                    quantize_settings=gptq_settings, release_fields=gptq_fields, legacy_keys=GPTQ_LEGACY_KEYS,
                    needs_optimum=True, solved_in_one_forward=lambda spec: spec.hessian == "batched")


class GPTQFormat(WeightFormatPlugin):
    name = "gptq"
    title = "GPTQ"
    order = 10
    card_order = 20
    section = list[GPTQVariant] | None
    spec_type = GPTQVariant
    # transformers loads GPTQ through optimum and GPTQModel; its GPTQ loader refuses gptqmodel < 1.4.3 and
    # optimum < 1.24.0, and 4.49.0 is the first transformers with GPTQModel support.
    requirements = (("transformers", "4.49.0", "loads the model"), ("optimum", "1.24.0", "transformers' GPTQ path"),
                    ("gptqmodel", "1.4.3", "the GPTQ kernels"), ("accelerate", None, "device_map"))

    weight_format = GPTQ

    def backend(self, context) -> GPTQModelBackend:
        return GPTQModelBackend(context, self.weight_format)

    def shared_work(self, spec: GPTQVariant, windows, source, device) -> tuple:
        if spec.hessian != "shared":
            return ()
        hessians = hessian_bytes(source.facts.config if source.facts else None)
        return (GPTQHessians(windows, source.identity, hessians, device.compute_dtype, device.name,
                             memory.hessian_capture(source.facts, device.compute_dtype, windows.samples, windows.seq_len,
                                                    hessians)),)

    def resolved(self, spec: GPTQVariant, calib, source, device, offload, packed_bytes) -> GPTQVariant:
        if spec.hessian != "auto":
            return spec
        batched = self.batched_memory("", calib, source, device, offload, packed_bytes)
        mode = plan_hessian(batched, memory.available_memory(), device.is_cuda,
                            source.facts.config if source.facts else None)
        return spec.model_copy(update={"hessian": mode})

    @staticmethod
    def batched_memory(variant_id, calib, source, device, offload, packed_bytes):
        """GPTQModel's loop's memory with every calibration window in one forward (`hessian: batched`)."""
        peak = memory.gptq_quantize(variant_id, source.facts, device.compute_dtype, calib.samples, calib.seq_len,
                                    offload, packed_bytes, forward_samples=calib.samples)
        return peak and replace(peak, remedy="use hessian: sequential (one window's activations at a time, "
                                          "the same files) or fewer calibration samples, or free memory")

    def quantize_memory(self, variant_id, index, spec: GPTQVariant, calib, source, device, offload, packed_bytes=0):
        if spec.hessian == "batched":
            return self.batched_memory(variant_id, calib, source, device, offload, packed_bytes)
        if spec.hessian != "shared":
            return super().quantize_memory(variant_id, index, spec, calib, source, device, offload, packed_bytes)
        hessians = hessian_bytes(source.facts.config if source.facts else None)
        return memory.solve_from_hessians(variant_id, source.facts, device.compute_dtype, hessians, offload, packed_bytes,
                                          solve_threads(device.name, MAX_SOLVE_THREADS))  # the most, on any machine

    def plan_warnings(self, variants: list[Variant]) -> list[str]:
        coarse = [v.id for v in variants if v.spec.hessian == "shared" and shared_measured_worse(v.spec)]
        if not coarse:
            return []
        return [f"{', '.join(coarse)}: hessian: shared at 3-bit or 4-bit without groups measured 16-49% worse perplexity "
                "than hessian: sequential on a model with outlier channels (README, the seven-permutation sweep); "
                "hessian: auto (the default) makes sequential's files faster where its memory fits"]

    def describe_more(self, spec: GPTQVariant) -> str:
        return f", act-order {'on' if spec.act_order else 'off'}, damp {spec.damp}, {spec.hessian} hessian"

    def short_label_more(self, params: dict[str, Any]) -> str:
        return " act-order" if params["act_order"] else ""

    def card_row(self, entry, model_type: str | None) -> dict[str, Any]:
        params = entry.params
        return {**self.weight_row(entry, model_type), "act_order": yes_no(params["act_order"]),
                "damp": f"{params['damp']}", "exllama": yes_no(exllama_compatible(params["bits"], model_type))}

    def repository_label(self, section: list[GPTQVariant]) -> str:
        return "GPTQ models for GPU inference" + (", with multiple quantisation parameter options"
                                                  if len(section) > 1 else "")


FORMAT = GPTQFormat()
