"""What GPTQ and AWQ share: both are made with GPTQModel from the fp16 model and the release's
calibration windows, and are saved, cleaned, verified and measured the same way.

The two formats differ only in the data of their `WeightFormat` (GPTQModel settings, the fields
their config files must carry, the kernel transformers loads them with). The shared work they
need (calibration windows, the fp16 reference) comes from the release's artifact store.
"""

from __future__ import annotations

import json
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ... import devices
from ...calibration import WindowsArtifact
from ...devices import Device
from ...errors import BadInput, WorkFailed
from ...formats.base import Backend, Produced, Variant
from ...manifest import package_versions
from ...memory import give_back
from ...stages import Stopwatch
from .folder import assemble_release, release_files, rewrite_configs, save_model
from .hessians import GPTQHessians, load_hessians, quantize_batched, quantize_with_hessians
from .setup import (OFFLOAD_SUBDIR, eager_torch, embeddings_in_stored_dtype, import_gptqmodel, load_streaming,
                    quantize_config, quantize_in_loop, release_model, samples_per_forward, supported_model_types)
from .verify import check_release_folder, generate_check, load_quantized, weight_reader

RELEASE_DTYPES = ("float16", "bfloat16")  # unquantized tensors keep the source's dtype (else float16)
SAVE_SUBDIR = ".gptqmodel-save"  # inside the staging folder; removed once the release files are out
TOOL_PACKAGES = ("gptqmodel", "optimum", "accelerate", "safetensors", "tokenizers")


@dataclass(frozen=True)
class WeightFormat:
    name: str  # "gptq" or "awq"
    quantize_backend: str  # GPTQModel BACKEND used while quantizing on a CPU ("auto" on a GPU)
    load_backend: str  # the transformers quantization backend that loads every variant on a CPU ("auto" on a GPU)
    quantize_settings: Callable[[Any], dict[str, Any]]  # variant spec -> QuantizeConfig kwargs
    release_fields: Callable[[Any], dict[str, Any]]  # variant spec -> required config keys
    legacy_keys: dict[str, Any] = field(default_factory=dict)  # added to quantize_config.json
    needs_optimum: bool = False  # transformers loads it through optimum
    # variant spec -> what holds while GPTQModel quantizes (AWQ: its float32 fixes and scale search)
    quantizing: Callable[[Any], AbstractContextManager] = lambda spec: nullcontext()

    # GPTQModel's loop runs FORWARD_TOKENS of calibration samples per forward pass (else one sample)
    batched_forwards: bool = False
    # variant spec -> whether it is quantized by hessians.quantize_batched instead of GPTQModel's loop
    solved_in_one_forward: Callable[[Any], bool] = lambda spec: False

    # The compute dtype comes from the device (quantize/devices.py): float32 on a CPU, fp16/bf16 on a GPU.

    def samples_per_forward(self, seq_len: int) -> int:
        return samples_per_forward(seq_len) if self.batched_forwards else 1

    def quantize_config(self, spec: Any, device: Device | None = None, offload_folder: Path | None = None):
        """GPTQModel's settings (setup.quantize_config); with `offload_folder` the layers stream from disk."""
        return quantize_config(self.quantize_settings(spec), device.name if device is not None else None,
                               offload_folder)

    def backend_for(self, device: Device | None) -> str:
        """GPTQModel's kernels for quantizing: its own choice (GPU kernels) on a GPU."""
        return "auto" if device is not None and device.is_cuda else self.quantize_backend

    def transformers_loading_config(self, spec: Any, device: Device | None = None):
        """Loading attributes only: transformers keeps the saved config and swaps in this backend."""
        from transformers import AwqConfig, GPTQConfig

        config_class = AwqConfig if self.name == "awq" else GPTQConfig
        backend = "auto" if device is not None and device.is_cuda else self.load_backend
        return config_class(bits=spec.bits, backend=backend)


def calibration_batch(windows: list[list[int]]) -> list[dict[str, Any]]:
    import torch

    return [{"input_ids": torch.tensor(ids, dtype=torch.long),
             "attention_mask": torch.ones(len(ids), dtype=torch.long)} for ids in windows]


def source_dtype(config: dict[str, Any]) -> str:
    return devices.source_dtype(config)


CPU = devices.resolve("cpu", False, 0)  # for a variant planned without a device (never by the plugins)


def damp_notes(requested: float, damps: list[float]) -> list[str]:
    raised = [d for d in damps if d > requested + 1e-9]
    if not raised:
        return []
    return [f"damp raised from {requested} to at most {max(raised):.4f} for {len(raised)} of "
            f"{len(damps)} modules (their Hessian was not positive definite at {requested})"]


def needed(variant: Variant, kind: type, required: bool = True) -> Any:
    """The variant's declared artifact of one kind (the plan puts them there)."""
    for artifact in variant.needs:
        if isinstance(artifact, kind):
            return artifact
    if required:
        raise WorkFailed(f"{variant.id}: the plan gives it no {kind.__name__}")
    return None


class GPTQModelBackend(Backend):
    """One GPTQModel weight format (see WeightFormat); formats/gptq.py and awq.py pick the format."""

    weight_format: WeightFormat

    def __init__(self, context, weight_format: WeightFormat):
        super().__init__(context)
        self.weight_format = weight_format

    @property
    def source_config(self) -> dict[str, Any]:
        facts = self.context.plan.source.facts
        return facts.config if facts else json.loads((self.context.model_path / "config.json").read_text())

    # check
    def check(self, variants: list[Variant]) -> None:
        from ...evaluate import FP16Reference

        import_gptqmodel()
        self._check_source()
        store = self.context.store
        for variant in variants:
            store.get(needed(variant, WindowsArtifact))  # BadInput when the text is too short
            needed(variant, FP16Reference).check(store)

    def _check_source(self) -> None:
        fmt = self.weight_format.name
        facts = self.context.plan.source.facts
        if facts is None:
            raise BadInput(f"{fmt}: the source's config.json could not be read; cannot check its architecture")
        if facts.config.get("quantization_config"):
            raise BadInput(f"{fmt}: the source model is already quantized; give the fp16 model")
        model_type = (facts.model_type or "").lower()
        if model_type not in supported_model_types():
            raise BadInput(f"{fmt}: GPTQModel does not support architecture {facts.model_type!r} "
                           f"({', '.join(facts.architectures) or 'unknown'})")
        if self.weight_format.needs_optimum:
            try:
                import optimum  # noqa: F401  transformers loads GPTQ folders through optimum
            except ImportError:
                raise BadInput(f"{fmt}: the optimum package is needed to verify {fmt.upper()} folders "
                               "with transformers") from None

    # produce
    def produce(self, variant: Variant, staging: Path) -> Produced:
        clock = Stopwatch()
        fmt, spec, store = self.weight_format, variant.spec, self.context.store
        windows = needed(variant, WindowsArtifact)
        with clock.stage("calibration"):
            batch = calibration_batch(store.value(windows))
        device = variant.device or CPU
        dtype = device.compute_dtype
        with clock.stage("baseline"):  # before the model is loaded: one model in memory at a time
            from ...evaluate import FP16Reference

            store.get(needed(variant, FP16Reference))
        hessians = needed(variant, GPTQHessians, required=False)
        # Both paths read the source one layer at a time (GPTQModel's lazy loader comes with its offload);
        # without `offload: disk` the finished, packed layers stay in memory instead of going to disk.
        offload_folder = self.context.work_dir / OFFLOAD_SUBDIR / variant.id
        on_disk = variant.offload == "disk"
        hessian_folder = store.get(hessians).folder if hessians is not None else None  # before this model loads
        try:
            with clock.stage("load"):
                model = load_streaming(self.context.model_path, dtype, fmt.quantize_settings(spec), offload_folder,
                                       self.context.trust_remote_code, device.name, keep_on_disk=on_disk)
            if hessian_folder is not None:  # shared calibration: the solve alone, from the release's Hessians
                with clock.stage("quantize"):
                    quantize_with_hessians(model, load_hessians(hessian_folder), fmt.backend_for(device), device.name,
                                           offload_folder if on_disk else None)
            elif fmt.solved_in_one_forward(spec):  # the loop's algorithm, one forward per layer
                with clock.stage("quantize"), embeddings_in_stored_dtype(model, self.context.model_path):
                    quantize_batched(model, store.value(windows), fmt.backend_for(device), device.name,
                                     offload_folder if on_disk else None)
            else:
                with clock.stage("quantize"), fmt.quantizing(spec):
                    quantize_in_loop(model, batch, fmt.backend_for(device), self.context.model_path,
                                     fmt.samples_per_forward(variant.calibration.seq_len))
            damps = [float(row["damp"]) for row in model.quant_log if "damp" in row]
            with clock.stage("save"):
                self._save(model, staging, spec)
            release_model(model)
            del model, batch
            give_back()
        finally:
            shutil.rmtree(offload_folder, ignore_errors=True)
        quality = self._verify(variant, staging, clock)
        tokens = store.value(windows.tokens)
        text = store.value(windows.tokens.text)
        calibration = {**variant.calibration_summary, "source": text.facts.get("source"),
                       "evaluation": text.facts.get("evaluation"), "calibration_tokens": len(tokens.calibration)}
        return Produced(files=release_files(staging), quality=quality,
                        timings={**store.timings(variant.needs), **clock.timings}, calibration=calibration,
                        measured={"quantize_dtype": dtype, "dtype": source_dtype(self.source_config),
                                  "device": device.name, "eval_dtype": device.eval_dtype},
                        notes=damp_notes(spec.damp, damps) if hasattr(spec, "damp") else [])

    def _save(self, model, staging: Path, spec: Any) -> None:
        saved = staging / SAVE_SUBDIR
        dtype = source_dtype(self.source_config)
        save_model(model, saved, self.context.model_path, dtype)
        rewrite_configs(saved, self.weight_format, spec, dtype)
        assemble_release(saved, staging, self.context.model_path)

    def _verify(self, variant: Variant, staging: Path, clock: Stopwatch) -> dict[str, Any]:
        """The folder loaded as users load it, its packed layers kept packed and its other weights in the
        source's dtype, computing one layer at a time in the evaluation dtype (evaluate.compute_layer_by_layer):
        about the packed size in memory whatever the offload. AWQ's torch kernel computes in fp16, slow
        on CPUs without half precision, so its layers multiply by their weights unpacked on each call."""
        import torch

        from ...evaluate import (ENGINE, FP16Reference, compute_layer_by_layer, page_out_after_use, score_windows,
                                 unpack_on_use)
        from ...quality import quality_record

        store = self.context.store
        device = variant.device or CPU
        dtype = device.torch_dtype("eval")
        check_release_folder(staging, self.weight_format, variant.spec)
        with clock.stage("verify"):
            model = load_quantized(staging, self.weight_format, variant.spec, self.context.trust_remote_code, device,
                                   stored=getattr(torch, source_dtype(self.source_config)))
            unpack_on_use(model, dtype, weight_reader)
            compute_layer_by_layer(model, dtype)
            if variant.offload == "disk":
                page_out_after_use(model)
            generated = generate_check(model, self.context.tokenizer)
        with clock.stage("baseline"):
            artifact = needed(variant, FP16Reference)
            reference = store.value(artifact)
        with clock.stage("evaluate"), eager_torch():
            quality = score_windows(model, reference.file, reference.bos, reference.perplexity)
        del model
        give_back()
        if not quality.perplexity < float("inf"):
            raise WorkFailed(f"the quantized model's perplexity is not finite ({quality.perplexity})")
        text = store.value(artifact.tokens.text)
        return quality_record(quality, ENGINE, eval_dtype=device.eval_dtype, eval_text=text.facts.get("evaluation"),
                              dataset=text.label, generated_tokens=generated)

    def tool_versions(self) -> dict[str, str]:
        return package_versions(TOOL_PACKAGES)
