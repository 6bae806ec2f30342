"""Turning GPTQModel's save into a clean release folder: configs with the fields loaders need,
unquantized tensors exactly as the source had them, tokenizer files copied, run-time noise gone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .weights import WeightFormat

# Source files a release folder copies verbatim: tokenizer and generation settings.
SOURCE_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab.", "merges.txt",
                        "chat_template", "spiece.model", "generation_config.json")
# Provenance and algorithm settings kept from GPTQModel's `meta` block; the rest is run-time noise
# (temp offload paths, thread and memory strategies).
KEPT_META_KEYS = ("quantizer", "uri", "damp_percent", "damp_auto_increment", "static_groups",
                  "true_sequential", "mse", "act_group_aware")


def clean_quantization_config(saved: dict[str, Any], fmt: WeightFormat, spec: Any) -> dict[str, Any]:
    """The saved config with the format's required fields first, the legacy keys, and no run noise."""
    meta = {k: v for k, v in (saved.get("meta") or {}).items() if k in KEPT_META_KEYS and v is not None}
    rest = {k: v for k, v in saved.items() if k != "meta"}
    cleaned = {**fmt.release_fields(spec), **fmt.legacy_keys}
    cleaned.update({k: v for k, v in rest.items() if k not in cleaned})
    if meta:
        cleaned["meta"] = meta
    return cleaned


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def rewrite_configs(folder: Path, fmt: WeightFormat, spec: Any, dtype: str) -> None:
    quantize_config_path = folder / "quantize_config.json"
    quantization = clean_quantization_config(json.loads(quantize_config_path.read_text()), fmt, spec)
    _write_json(quantize_config_path, quantization)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    _write_json(config_path, config)


def cast_unquantized_tensors(folder: Path, dtype: str) -> None:
    """Float tensors back to the source's dtype, scales to fp16; packed weights, zeros and indexes kept.

    GPTQModel saves the tensors it did not pack in the dtype it computed in (float32). fp16 and bf16
    values survive the round trip through float32 exactly, so untouched tensors (embeddings, head)
    come out bit-identical to the source, and tensors the algorithm changed (AWQ scales the norms
    in front of the layers it quantizes) keep their new values.
    """
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                tensors[name] = tensor.to(torch.float16 if name.endswith(("scales", ".scale")) else target).contiguous()
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
