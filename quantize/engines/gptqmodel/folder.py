"""Turning GPTQModel's save into a clean release folder: configs with the fields loaders need,
unquantized tensors exactly as the source had them, tokenizer files copied, run-time noise gone.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

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
    """Float tensors in the source's dtype, scales in fp16; packed weights, zeros and indexes kept.

    GPTQModel saves a tensor in the dtype the model holds it in: `save_model` settles the
    unquantized ones first, so this finds nothing to do as a rule, and is what guarantees the files
    whatever GPTQModel left in the compute dtype (float32). fp16 and bf16 values survive the round
    trip through float32 exactly, and tensors the algorithm changed (AWQ scales the norms in front
    of the layers it quantizes) keep their new values. A shard is rewritten one tensor at a time
    (`rewrite_safetensors`), and not at all when every dtype is already right.
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


def save_model(model, folder: Path, source_folder: Path, dtype: str) -> None:
    """GPTQModel's save of a quantized model, its unquantized tensors as the source has them."""
    settle_unquantized_tensors(model.model, source_folder, dtype)
    model.save(str(folder))
    cast_unquantized_tensors(folder, dtype)


def settle_unquantized_tensors(model, source_folder: Path, dtype: str) -> None:
    """The model's unquantized parameters in the source's dtype, before GPTQModel saves it.

    GPTQModel's lazy loader leaves the embeddings and the head on the meta device once its loop is
    done, and its save reads them back in the compute dtype (float32 on a CPU: twice their stored
    size, then read once more to be cast back). Here they are read from the source checkpoint in its
    own dtype, one tensor at a time, so the save holds them at their stored size and writes them as the
    source has them. Parameters in memory (norms, which AWQ may have scaled) are cast in place; packed
    layers are left alone. A meta parameter the checkpoint lacks under its name stays for GPTQModel.
    """
    import torch

    from .setup import unquantized_parameters

    target = getattr(torch, dtype)
    pending = {place.key: place for place in unquantized_parameters(model)}
    on_meta = {name: place.key for place in pending.values() if place.param.is_meta for name in place.names}
    for name, tensor in read_checkpoint_tensors(source_folder, list(on_meta)):
        if on_meta[name] in pending:
            pending.pop(on_meta[name]).replace(tensor.to(target))
    for place in pending.values():
        if not place.param.is_meta and place.param.dtype != target:
            place.replace(place.param.detach().to(target))


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a .safetensors file."""
    with open(path, "rb") as source:
        header_size = int.from_bytes(source.read(8), "little")
        return header_size, json.loads(source.read(header_size))


def stored_dtype(entry: dict[str, Any]):
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])


def read_tensor(source: BinaryIO, header_size: int, entry: dict[str, Any]):
    """One tensor of an open .safetensors file, read into memory of its own (not memory-mapped: mapped
    pages count as resident as long as the file stays mapped)."""
    import torch

    begin, end = entry["data_offsets"]
    source.seek(8 + header_size + begin)
    raw = bytearray(source.read(end - begin))
    if not raw:
        return torch.empty(entry["shape"], dtype=stored_dtype(entry))
    return torch.frombuffer(raw, dtype=stored_dtype(entry)).reshape(entry["shape"])


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file of a model folder that holds it (sharded or not)."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        return {name: folder / shard for name, shard in weight_map.items()}
    files: dict[str, Path] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        files.update((name, shard) for name in safetensors_header(shard)[1] if name != "__metadata__")
    return files


def checkpoint_dtype(folder: Path, names: list[str]):
    """The dtype the folder's checkpoint stores the first of `names` it holds in (None: none of them)."""
    files = checkpoint_files(folder)
    name = next((n for n in names if n in files), None)
    return stored_dtype(safetensors_header(files[name])[1][name]) if name else None


def read_checkpoint_tensors(folder: Path, names: list[str]) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for each of `names` the folder's checkpoint holds, one tensor in memory at a time."""
    files = checkpoint_files(folder)
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for path, wanted in by_file.items():
        header_size, header = safetensors_header(path)
        with open(path, "rb") as source:
            for name in wanted:
                yield name, read_tensor(source, header_size, header[name])


def rewrite_safetensors(path: Path, wanted: Callable[[str, Any], Any], metadata: dict[str, str]) -> bool:
    """Rewrite a .safetensors file with each tensor in `wanted(name, dtype)`, streaming one tensor at a
    time into a new file that then replaces it; nothing is written when every dtype is already right.
    Returns whether the file was rewritten."""
    import torch

    names = {torch_name: code for code, torch_name in SAFETENSORS_DTYPES.items()}
    header_size, header = safetensors_header(path)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    dtypes = {name: stored_dtype(entry) for name, entry in entries}
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
            tensor = read_tensor(source, header_size, entry)
            if tensor.numel():
                out.write(memoryview(tensor.to(targets[name]).reshape(-1).view(torch.uint8).numpy()))
            del tensor
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
