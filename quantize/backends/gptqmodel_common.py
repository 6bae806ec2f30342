"""What the GPTQ and AWQ backends share: both are made with GPTQModel, from the same fp16 model and
the same calibration windows, and are saved, cleaned and verified the same way.

The two formats differ only in the data of their `WeightFormat` (GPTQModel settings, the fields
their config files must carry, the kernel transformers loads them with). The expensive shared
work lives in `SharedRelease`, one per release, used by both backends: the tokenizer and the
tokenized calibration text, the fp16 model (loaded from disk once, then copied in memory for each
variant while more are to come), and the fp16 baseline perplexity.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from ..calibration import token_windows
from ..errors import BadInput, WorkFailed
from ..manifest import package_versions
from ..plan import Variant
from .base import Backend, Produced, ReleaseContext

RELEASE_DTYPES = ("float16", "bfloat16")  # unquantized tensors keep the source's dtype (else float16)
GENERATE_TOKENS = 8
SAVE_SUBDIR = ".gptqmodel-save"  # inside the staging folder; removed once the release files are out
TOOL_PACKAGES = ("gptqmodel", "optimum", "accelerate", "safetensors", "tokenizers")
# Source files a release folder copies verbatim: tokenizer and generation settings.
SOURCE_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab.", "merges.txt",
                        "chat_template", "spiece.model", "generation_config.json")
# Provenance and algorithm settings kept from GPTQModel's `meta` block; the rest is run-time noise
# (temp offload paths, thread and memory strategies).
KEPT_META_KEYS = ("quantizer", "uri", "damp_percent", "damp_auto_increment", "static_groups",
                  "true_sequential", "mse", "act_group_aware")
# Keys older GPTQ loaders (AutoGPTQ, text-generation-webui) read from quantize_config.json.
GPTQ_LEGACY_KEYS = {"model_name_or_path": None, "model_file_base_name": "model"}


# --- GPTQModel setup ---------------------------------------------------------------------------

def import_gptqmodel():
    """GPTQModel, imported with settings that work on small CPU machines; BadInput when missing."""
    # GPTQModel's default is half the cores, and its loader needs 2 workers: 1 on a 2-core machine fails.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    try:
        import gptqmodel
    except ImportError as exc:
        raise BadInput(f"GPTQ/AWQ need the gptqmodel package (pip install '.[backends]'): {exc}") from None
    return gptqmodel


def supported_model_types() -> frozenset[str]:
    import_gptqmodel()
    from gptqmodel.models.auto import SUPPORTED_MODELS

    return frozenset(SUPPORTED_MODELS)


@contextmanager
def eager_torch() -> Iterator[None]:
    """Run GPTQModel's kernels eagerly: its torch kernel compiles itself, ~20 s per load on a CPU."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


# --- The per-format differences, as data -------------------------------------------------------

@dataclass(frozen=True)
class WeightFormat:
    name: str  # "gptq" or "awq"
    quantize_dtype: str | None  # the dtype GPTQModel computes in; None: the source's own dtype
    quantize_backend: str  # GPTQModel BACKEND used while quantizing
    load_backend: str  # the transformers quantization backend that loads every variant on a CPU
    quantize_settings: Callable[[dict[str, Any]], dict[str, Any]]  # variant params -> QuantizeConfig kwargs
    release_fields: Callable[[dict[str, Any]], dict[str, Any]]  # variant params -> required config keys
    legacy_keys: dict[str, Any] = field(default_factory=dict)  # added to quantize_config.json

    def compute_dtype(self, source: str) -> str:
        return self.quantize_dtype or source

    def quantize_config(self, params: dict[str, Any]):
        from gptqmodel import QuantizeConfig

        return QuantizeConfig(**self.quantize_settings(params), offload_to_disk=False)

    def transformers_loading_config(self, params: dict[str, Any]):
        """Loading attributes only: transformers keeps the saved config and swaps in this backend."""
        from transformers import AwqConfig, GPTQConfig

        config_class = AwqConfig if self.name == "awq" else GPTQConfig
        return config_class(bits=params["bits"], backend=self.load_backend)


# --- Calibration, model and baseline shared by every variant of a release ----------------------

def calibration_batch(windows: list[list[int]]) -> list[dict[str, Any]]:
    import torch

    return [{"input_ids": torch.tensor(ids, dtype=torch.long),
             "attention_mask": torch.ones(len(ids), dtype=torch.long)} for ids in windows]


def source_dtype(config: dict[str, Any]) -> str:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float16").removeprefix("torch.")
    return name if name in RELEASE_DTYPES else "float16"


class SharedRelease:
    """The tokenizer, calibration windows, fp16 model and baseline every GPTQ/AWQ variant reuses."""

    def __init__(self, context: ReleaseContext):
        self.context = context
        self.backends: set[int] = set()
        self.remaining_variants = 0  # variants still to quantize: keep the fp16 copy while > 0
        self._windows: dict[int, list[list[int]]] = {}
        self._pristine = None  # the loaded fp16 model (an HF module), never quantized
        self._model_class = None  # GPTQModel's class for this architecture
        self._quantize_device = None

    # tokenizer and text
    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        recipe = self.context.recipe
        location = self.context.plan.source.local_path or recipe.source.hub
        revision = None if self.context.plan.source.local_path else recipe.source.revision
        return AutoTokenizer.from_pretrained(location, revision=revision)

    @cached_property
    def calibration_ids(self) -> list[int]:
        return self._tokenize(self.context.texts.calibration)

    @cached_property
    def evaluation_ids(self) -> list[int]:
        return self._tokenize(self.context.texts.evaluation)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def calibration_windows(self, seq_len: int) -> list[list[int]]:
        """The seeded windows of one seq_len, drawn once and reused by every variant that uses it."""
        if seq_len not in self._windows:
            calib = self.context.recipe.calibration
            self._windows[seq_len] = token_windows(self.calibration_ids, calib.samples, seq_len, calib.seed)
        return self._windows[seq_len]

    @cached_property
    def evaluation_windows(self) -> list[list[int]]:
        from ..evaluate import evaluation_windows

        return evaluation_windows(self.evaluation_ids)

    @cached_property
    def baseline(self):
        from ..evaluate import baseline_perplexity

        return baseline_perplexity(self.context.model_path, self.evaluation_windows, self.context.work_dir)

    @cached_property
    def model_config(self) -> dict[str, Any]:
        return json.loads((self.context.model_path / "config.json").read_text(encoding="utf-8"))

    # the fp16 model
    def fresh_model(self, quantize_config, dtype: str):
        """An unquantized GPTQModel model in `dtype`: loaded from disk the first time, then copied in memory."""
        if self._pristine is None:
            model = self._load_from_disk(quantize_config, dtype)
        else:
            model = self._wrap_copy(quantize_config, dtype)
        self.remaining_variants -= 1
        if self.remaining_variants > 0 and self._pristine is None:
            self._pristine = copy.deepcopy(model.model)
            self._quantize_device = model.quantize_config.device
            self._model_class = type(model)
        elif self.remaining_variants <= 0:
            self._pristine = None
        return model

    def _load_from_disk(self, quantize_config, dtype: str):
        import torch
        from gptqmodel import GPTQModel

        return GPTQModel.load(str(self.context.model_path), quantize_config, dtype=getattr(torch, dtype))

    def _wrap_copy(self, quantize_config, dtype: str):
        import torch

        quantize_config.device = self._quantize_device
        quantize_config.calculate_bits_per_weight()
        model = copy.deepcopy(self._pristine)
        if model.dtype != getattr(torch, dtype):  # exact: fp16 and bf16 sources are held in float32 or themselves
            model.to(getattr(torch, dtype))
            model.config.dtype = getattr(torch, dtype)
        return self._model_class(model, quantized=False, quantize_config=quantize_config,
                                 tokenizer=self.tokenizer, model_local_path=str(self.context.model_path))

    def release_memory(self) -> None:
        self._pristine = None
        gc.collect()


SHARED_KEY = "gptqmodel"


def shared_release(context: ReleaseContext) -> SharedRelease:
    """The one SharedRelease of this release context (GPTQ and AWQ backends get the same)."""
    if SHARED_KEY not in context.shared:
        context.shared[SHARED_KEY] = SharedRelease(context)
    return context.shared[SHARED_KEY]


# --- Saving a clean release folder -------------------------------------------------------------

def clean_quantization_config(saved: dict[str, Any], fmt: WeightFormat, params: dict[str, Any]) -> dict[str, Any]:
    """The saved config with the format's required fields first, the legacy keys, and no run noise."""
    meta = {k: v for k, v in (saved.get("meta") or {}).items() if k in KEPT_META_KEYS and v is not None}
    rest = {k: v for k, v in saved.items() if k != "meta"}
    cleaned = {**fmt.release_fields(params), **fmt.legacy_keys}
    cleaned.update({k: v for k, v in rest.items() if k not in cleaned})
    if meta:
        cleaned["meta"] = meta
    return cleaned


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def rewrite_configs(folder: Path, fmt: WeightFormat, params: dict[str, Any], dtype: str) -> None:
    quantize_config_path = folder / "quantize_config.json"
    quantization = clean_quantization_config(json.loads(quantize_config_path.read_text()), fmt, params)
    _write_json(quantize_config_path, quantization)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    _write_json(config_path, config)


def _source_tensors(model_path: Path) -> dict[str, Any]:
    """The source checkpoint's tensors, opened lazily (safetensors only; {} for .bin checkpoints)."""
    from safetensors import safe_open

    handles = {}
    for shard in sorted(Path(model_path).glob("*.safetensors")):
        handle = safe_open(str(shard), framework="pt")
        handles.update({name: handle for name in handle.keys()})
    return handles


def restore_unquantized_tensors(folder: Path, model_path: Path, dtype: str) -> None:
    """Unquantized tensors (embeddings, norms, head) back to the source's exact values and dtype.

    GPTQModel saves the untouched tensors in the dtype it computed in; the release keeps
    them as the source had them. Packed weights, zeros and indexes are kept; float scales become fp16.
    """
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    source = _source_tensors(model_path)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, tensor in tensors.items():
            if name in source and tuple(source[name].get_slice(name).get_shape()) == tuple(tensor.shape):
                tensors[name] = source[name].get_tensor(name).to(target).contiguous()
            elif tensor.is_floating_point():
                scale_dtype = torch.float16 if name.endswith(("scales", ".scale")) else target
                tensors[name] = tensor.to(scale_dtype).contiguous()
        save_file(tensors, str(shard), metadata={"format": "pt"})
    _update_shard_index(folder)


def _update_shard_index(folder: Path) -> None:
    index_path = folder / "model.safetensors.index.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    shards = set(index.get("weight_map", {}).values())
    index.setdefault("metadata", {})["total_size"] = sum((folder / s).stat().st_size for s in shards)
    _write_json(index_path, index)


def is_source_file(name: str) -> bool:
    return name.startswith(SOURCE_FILE_PREFIXES)


def is_gptqmodel_release_file(name: str) -> bool:
    return (name.endswith(".safetensors") or name in ("model.safetensors.index.json", "config.json",
                                                      "quantize_config.json", "generation_config.json"))


def assemble_release(saved: Path, staging: Path, model_path: Path) -> None:
    """Weights and configs from GPTQModel's save; tokenizer and generation files copied from the source."""
    copied = [p for p in Path(model_path).iterdir() if p.is_file() and is_source_file(p.name)]
    for path in copied:
        shutil.copy2(path, staging / path.name)
    for path in saved.iterdir():
        if is_gptqmodel_release_file(path.name) and not (staging / path.name).exists():
            path.rename(staging / path.name)
    shutil.rmtree(saved)


def release_files(staging: Path) -> list[Path]:
    return sorted(p for p in staging.rglob("*") if p.is_file())


# --- Verification ------------------------------------------------------------------------------

def check_release_folder(folder: Path, fmt: WeightFormat, params: dict[str, Any]) -> None:
    """The files and config fields mainstream loaders need; WorkFailed naming the first problem."""
    names = {p.name for p in folder.iterdir()}
    required = {"config.json", "quantize_config.json"}
    missing = sorted(required - names) or ([] if any(n.endswith(".safetensors") for n in names) else ["*.safetensors"])
    if missing:
        raise WorkFailed(f"{folder.name}: release folder lacks {', '.join(missing)}")
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        raise WorkFailed(f"{folder.name}: release folder holds pickled weights")
    wanted = {**fmt.release_fields(params), **fmt.legacy_keys}
    for file_name, config in (("quantize_config.json", json.loads((folder / "quantize_config.json").read_text())),
                              ("config.json", json.loads((folder / "config.json").read_text()).get("quantization_config") or {})):
        wrong = {k: config.get(k) for k, v in wanted.items() if config.get(k) != v}
        if wrong:
            raise WorkFailed(f"{file_name}: quantization fields {wrong} differ from {({k: wanted[k] for k in wrong})}")


def load_quantized(folder: Path, fmt: WeightFormat, params: dict[str, Any]):
    """The variant as a user loads it: transformers' AutoModelForCausalLM, on the CPU."""
    from transformers import AutoModelForCausalLM

    from ..evaluate import EVAL_DTYPE

    with eager_torch(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")  # we only pick the kernel
        model = AutoModelForCausalLM.from_pretrained(
            folder, device_map="cpu", dtype=EVAL_DTYPE,
            quantization_config=fmt.transformers_loading_config(params))
    if not any(hasattr(m, "qweight") for m in model.modules()):
        raise WorkFailed(f"{folder.name}: transformers loaded no quantized layer")
    return model.eval()


def generate_check(model, tokenizer, tokens: int = GENERATE_TOKENS) -> int:
    """Greedy-generate a few tokens; WorkFailed unless they come and the logits are finite."""
    import torch

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with eager_torch(), torch.inference_mode():
        logits = model(**prompt).logits
        output = model.generate(**prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if not torch.isfinite(logits).all():
        raise WorkFailed("the quantized model's logits are not finite")
    produced = output.shape[-1] - prompt["input_ids"].shape[-1]
    if produced != tokens:
        raise WorkFailed(f"the quantized model generated {produced} tokens instead of {tokens}")
    return produced


# --- The backend -------------------------------------------------------------------------------

class Stopwatch:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - started, 2)


class GPTQModelBackend(Backend):
    """One GPTQModel weight format (see WeightFormat); gptq.py and awq.py only pick the format."""

    weight_format: WeightFormat

    def __init__(self, context: ReleaseContext):
        super().__init__(context)
        self.shared = shared_release(context)
        self.shared.backends.add(id(self))

    # check
    def check(self, variants: list[Variant]) -> None:
        import_gptqmodel()
        self._check_source()
        for seq_len in sorted({v.calibration["seq_len"] for v in variants}):
            self.shared.calibration_windows(seq_len)  # BadInput when the text is too short
        if not self.shared.evaluation_windows:
            raise BadInput("calibration: the held-out evaluation text is empty; raise calibration.held_out")
        self.shared.remaining_variants += len(variants)

    def _check_source(self) -> None:
        facts = self.context.plan.source.facts
        if facts is None:
            raise BadInput(f"{self.format}: the source's config.json could not be read; cannot check its architecture")
        if facts.config.get("quantization_config"):
            raise BadInput(f"{self.format}: the source model is already quantized; give the fp16 model")
        model_type = (facts.model_type or "").lower()
        if model_type not in supported_model_types():
            raise BadInput(f"{self.format}: GPTQModel does not support architecture {facts.model_type!r} "
                           f"({', '.join(facts.architectures) or 'unknown'})")
        if self.format == "gptq":
            try:
                import optimum  # noqa: F401  transformers loads GPTQ folders through optimum
            except ImportError:
                raise BadInput("gptq: the optimum package is needed to verify GPTQ folders with transformers") from None

    # produce
    def produce(self, variant: Variant, staging: Path) -> Produced:
        clock = Stopwatch()
        fmt, params = self.weight_format, variant.params
        with clock.stage("calibration"):
            batch = calibration_batch(self.shared.calibration_windows(variant.calibration["seq_len"]))
        dtype = fmt.compute_dtype(source_dtype(self.shared.model_config))
        with clock.stage("load"):
            model = self.shared.fresh_model(fmt.quantize_config(params), dtype)
        with clock.stage("quantize"):
            model.quantize(batch, batch_size=1, backend=fmt.quantize_backend)
        damps = [float(row["damp"]) for row in model.quant_log if "damp" in row]
        with clock.stage("save"):
            self._save(model, staging, params)
        del model, batch
        gc.collect()
        quality = self._verify(staging, params, clock)
        return Produced(files=release_files(staging), quality=quality, timings=clock.timings,
                        calibration=self._calibration_facts(variant), params=self._measured(dtype),
                        notes=self._damp_notes(params, damps))

    def _save(self, model, staging: Path, params: dict[str, Any]) -> None:
        saved = staging / SAVE_SUBDIR
        model.save(str(saved))
        dtype = source_dtype(self.shared.model_config)
        restore_unquantized_tensors(saved, self.context.model_path, dtype)
        rewrite_configs(saved, self.weight_format, params, dtype)
        assemble_release(saved, staging, self.context.model_path)

    def _verify(self, staging: Path, params: dict[str, Any], clock: Stopwatch) -> dict[str, Any]:
        from ..evaluate import densify_quantized_linears, perplexity

        check_release_folder(staging, self.weight_format, params)
        with clock.stage("verify"):
            model = load_quantized(staging, self.weight_format, params)
            generated = generate_check(model, self.shared.tokenizer)
        with clock.stage("baseline"):
            baseline = self.shared.baseline
        with clock.stage("evaluate"):
            with eager_torch():
                densify_quantized_linears(model)
            result = perplexity(model, self.shared.evaluation_windows)
        del model
        gc.collect()
        if not result.perplexity < float("inf"):
            raise WorkFailed(f"the quantized model's perplexity is not finite ({result.perplexity})")
        return {**result.as_quality(baseline, self.context.texts.facts.get("evaluation")),
                "dataset": self.context.texts.label, "generated_tokens": generated}

    def _calibration_facts(self, variant: Variant) -> dict[str, Any]:
        facts = self.context.texts.facts
        return {**variant.calibration, "source": facts.get("source"), "evaluation": facts.get("evaluation"),
                "calibration_tokens": len(self.shared.calibration_ids)}

    def _measured(self, compute_dtype: str) -> dict[str, Any]:
        return {"quantize_dtype": compute_dtype, "dtype": source_dtype(self.shared.model_config)}

    def _damp_notes(self, params: dict[str, Any], damps: list[float]) -> list[str]:
        requested = params.get("damp")
        raised = [d for d in damps if requested is not None and d > requested + 1e-9]
        if not raised:
            return []
        return [f"damp raised from {requested} to at most {max(raised):.4f} for {len(raised)} of "
                f"{len(damps)} modules (their Hessian was not positive definite at {requested})"]

    def tool_versions(self) -> dict[str, str]:
        return package_versions(TOOL_PACKAGES)

    def close(self) -> None:
        self.shared.backends.discard(id(self))
        if not self.shared.backends:
            self.shared.release_memory()
            self.context.shared.pop(SHARED_KEY, None)
