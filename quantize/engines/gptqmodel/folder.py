"""Turning GPTQModel's save into a clean release folder: configs with the fields loaders need,
unquantized tensors exactly as the source had them, tokenizer files copied, run-time noise gone.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    in front of the layers it quantizes) keep their new values. A shard is rewritten one tensor at
    a time (`rewrite_safetensors`), so this holds one tensor in memory, not the shard.
    """
    import torch

    target = getattr(torch, dtype)

    def wanted(name: str, current: torch.dtype) -> torch.dtype:
        if not current.is_floating_point:
            return current
        return torch.float16 if name.endswith(("scales", ".scale")) else target

    for shard in sorted(folder.glob("*.safetensors")):
        rewrite_safetensors(shard, wanted, metadata={"format": "pt"})
    _update_shard_index(folder)


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def rewrite_safetensors(path: Path, wanted: Callable[[str, Any], Any], metadata: dict[str, str]) -> bool:
    """Rewrite a .safetensors file with each tensor in `wanted(name, dtype)`, streaming one tensor at a
    time into a new file that then replaces it; nothing is written when every dtype is already right.
    Returns whether the file was rewritten."""
    import torch

    names = {torch_name: code for code, torch_name in SAFETENSORS_DTYPES.items()}
    with open(path, "rb") as source:
        header_size = int.from_bytes(source.read(8), "little")
        header = json.loads(source.read(header_size))
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    dtypes = {name: getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]]) for name, entry in entries}
    targets = {name: wanted(name, dtype) for name, dtype in dtypes.items()}
    if all(targets[name] == dtypes[name] for name in dtypes) and header.get("__metadata__") == metadata:
        return False
    layout, offset = {"__metadata__": metadata}, 0
    for name, entry in entries:
        size = math.prod(entry["shape"]) * torch.finfo(targets[name]).bits // 8 if targets[name].is_floating_point \
            else entry["data_offsets"][1] - entry["data_offsets"][0]
        layout[name] = {"dtype": names[str(targets[name]).removeprefix("torch.")], "shape": entry["shape"],
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(layout, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(path, "rb") as source, open(partial, "wb") as out:  # read, not memory-mapped: mapped pages count as resident
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for name, entry in entries:
            begin, end = entry["data_offsets"]
            source.seek(8 + header_size + begin)
            raw = bytearray(source.read(end - begin))
            if not raw:
                continue
            tensor = torch.frombuffer(raw, dtype=dtypes[name]).to(targets[name])
            out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor, raw
    partial.replace(path)
    return True


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
