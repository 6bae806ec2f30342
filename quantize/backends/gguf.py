"""GGUF releases with llama.cpp: convert once, importance matrix once, then every type of the ladder.

Shared work, done once per release and kept in `<out>/.work/gguf/` between runs (each file is
written under a temporary name, renamed when complete, and reused only when the record beside
it says it was made from the same inputs):
  <basename>.F16.gguf        the converted model (or BF16, recipe `gguf.outtype`)
  <basename>.imatrix.gguf    the importance matrix (`gguf.imatrix: true`)
  baseline-perplexity.json   the F16 file's perplexity on the held-out text
All pending types are then quantized in parallel (as many llama-quantize processes as cores and
memory allow); `produce` waits for its own type, splits it if it is above the release's size
limit, checks the file, and measures its perplexity.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BadInput, WorkFailed
from ..manifest import write_atomic
from ..plan import Variant
from ..quant_types import GB, GGUF_TYPES
from ..recipe import Recipe
from ..source import ModelFacts
from .base import Backend, Produced, ReleaseContext
from .llamacpp import (LlamaCpp, convert_command, find_llama_cpp, imatrix_command, parse_fallbacks,
                       parse_perplexity, perplexity_command, quantize_command, registered_architectures,
                       run_tool, split_command)

HUB = "https://huggingface.co"
CONTEXT_TOKENS = 512  # llama.cpp's usual window for imatrix and perplexity, so figures compare across releases
ENGINE = "llama.cpp"
JOB_MEMORY_MARGIN = 512 * 1024 * 1024  # per llama-quantize process, on top of the source file
WORK_SUBDIR = "gguf"


@dataclass(frozen=True)
class SharedFiles:
    """What every type of the release is made from, and what making it cost."""

    source: Path  # the F16/BF16 GGUF
    imatrix: Path | None
    baseline_perplexity: float
    timings: dict[str, float]


@dataclass(frozen=True)
class QuantizedFile:
    path: Path
    output: str  # what llama-quantize printed (fallback warnings)
    seconds: float


@dataclass(frozen=True)
class GGUFFacts:
    """What a GGUF file (all its parts) says about itself."""

    file_type: str  # "Q4_K_M", from general.file_type
    bits_per_weight: float  # tensor bytes * 8 / weights, over all tensors
    weights: int
    metadata: dict[str, Any]  # general.* and quantize.* keys of the first part


# --- checks ---------------------------------------------------------------------------------

def source_architecture(config: dict[str, Any]) -> str | None:
    """The architecture the converter dispatches on: the text model's, else the top-level one."""
    names = (config.get("text_config") or {}).get("architectures") or config.get("architectures") or []
    return names[0] if names else None


def check_architecture(facts: ModelFacts | None, tools: LlamaCpp) -> None:
    if facts is None:  # config.json unreachable: the conversion itself will tell
        return
    architecture = source_architecture(facts.config)
    if architecture is None:
        raise BadInput("source: config.json lists no `architectures`, which the GGUF converter needs")
    supported = registered_architectures(tools.root)
    if supported and architecture not in supported:
        raise BadInput(f"gguf: llama.cpp's converter ({tools.converter}) cannot convert architecture "
                       f"{architecture}; remove the gguf section or point QUANTIZE_LLAMA_CPP at a newer llama.cpp")


def check_imatrix(variants: list[Variant]) -> None:
    needing = [v.name for v in variants if GGUF_TYPES[v.name].needs_imatrix and not v.params.get("imatrix")]
    if needing:
        raise BadInput(f"gguf: {', '.join(needing)} need an importance matrix: set gguf.imatrix: true")


# --- what the files say ---------------------------------------------------------------------

def gguf_metadata(recipe: Recipe) -> dict[str, Any]:
    """The converter's `--metadata` overrides: what users see on the Hub's GGUF viewer."""
    source, release = recipe.source, recipe.release
    metadata: dict[str, Any] = {
        "general.name": source.display_name(),
        "general.basename": release.basename,
        "general.quantized_by": release.author,
        "general.repo_url": f"{HUB}/{release.repo_id('gguf')}",
    }
    if source.creator:
        metadata["general.organization"] = source.creator
    if source.base_model:
        metadata["general.base_models"] = [{"name": source.display_name(),
                                            "organization": source.base_model.split("/")[0],
                                            "repo_url": f"{HUB}/{source.base_model}"}]
    return metadata


def metadata_overrides(recipe: Recipe) -> dict[str, str]:
    """Keys the converter's metadata file can't set (general.license), given to llama-quantize instead."""
    return {"general.license": recipe.source.license} if recipe.source.license else {}


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value.tolist() if hasattr(value, "tolist") else value


def file_type_name(value: int) -> str:
    from gguf import LlamaFileType

    name = LlamaFileType(value).name
    return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")


def read_gguf_facts(paths: list[Path]) -> GGUFFacts:
    """Open every part with gguf's reader: file type, metadata, measured bits per weight."""
    from gguf import GGUFReader

    tensor_bytes = weights = 0
    metadata: dict[str, Any] = {}
    for index, path in enumerate(paths):
        reader = GGUFReader(path)
        if index == 0:
            metadata = {name: _field_value(field) for name, field in reader.fields.items()
                        if name.startswith(("general.", "quantize.", "split."))}
        for tensor in reader.tensors:
            tensor_bytes += int(tensor.n_bytes)
            weights += int(tensor.n_elements)
    if "general.file_type" not in metadata or not weights:
        raise WorkFailed(f"{paths[0].name}: not a complete GGUF model (no general.file_type or no tensors)")
    return GGUFFacts(file_type_name(int(metadata["general.file_type"])), tensor_bytes * 8 / weights, weights, metadata)


def imatrix_facts(facts: GGUFFacts) -> dict[str, Any]:
    """The quantize.imatrix.* keys llama-quantize wrote; WorkFailed when they are missing."""
    keys = {"file": "quantize.imatrix.file", "dataset": "quantize.imatrix.dataset",
            "entries": "quantize.imatrix.entries_count", "chunks": "quantize.imatrix.chunks_count"}
    found = {name: facts.metadata.get(key) for name, key in keys.items()}
    missing = [keys[name] for name in ("dataset", "chunks") if found[name] is None]
    if missing:
        raise WorkFailed(f"the {facts.file_type} file lacks {', '.join(missing)} although an imatrix was used")
    return {**found, "context": CONTEXT_TOKENS}


# --- cached shared files --------------------------------------------------------------------

def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of a model folder's files: changes when the model does."""
    entries = [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
               for p in sorted(folder.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in p.parts)]
    return digest(entries)


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_record(path: Path, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def _write_record(path: Path, key: str, **values: Any) -> None:
    write_atomic(_record_path(path), json.dumps({"key": key, **values}, indent=2).encode())


def partial_name(path: Path) -> Path:
    """`x.gguf` -> `x.partial.gguf`: unfinished, and still ending in .gguf (llama-imatrix picks its format by it)."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def cached_file(path: Path, key: str, make: Callable[[Path], None]) -> float:
    """Make `path` (via a temporary file) unless it was made from the same inputs; seconds it took to make."""
    record = _read_record(path, key)
    if record and path.is_file() and path.stat().st_size == record.get("size"):
        return record["seconds"]
    temporary = partial_name(path)
    temporary.unlink(missing_ok=True)
    started = time.monotonic()
    make(temporary)
    seconds = round(time.monotonic() - started, 2)
    os.replace(temporary, path)
    _write_record(path, key, size=path.stat().st_size, seconds=seconds)
    return seconds


def cached_value(path: Path, key: str, measure: Callable[[], float]) -> tuple[float, float]:
    """A measured number kept in a small JSON file; (value, seconds it took to measure)."""
    record = _read_record(path, key)
    if record:
        return record["value"], record["seconds"]
    started = time.monotonic()
    value = measure()
    seconds = round(time.monotonic() - started, 2)
    _write_record(path, key, value=value, seconds=seconds)
    return value, seconds


def write_text_if_changed(path: Path, text: str) -> str:
    """Write a text file (atomically) unless it already holds `text`; the text's digest."""
    data = text.encode("utf-8")
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()[:16]


def dataset_file_name(facts: dict[str, Any]) -> str:
    """`wikitext-2-raw-v1-test.calibration.txt`: what the GGUF's quantize.imatrix.dataset key will say."""
    if facts.get("dataset") == "file" and facts.get("path"):
        stem = Path(facts["path"]).stem
    else:
        dataset, config = facts.get("dataset") or "text", facts.get("config")
        stem = config if config and config.startswith(dataset) else "-".join(p for p in (dataset, config) if p)
        stem = f"{stem}-{facts.get('split')}" if facts.get("split") else stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".calibration.txt"


# --- resources ------------------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def quantize_parallelism(jobs: int, source_bytes: int) -> tuple[int, int]:
    """(processes, threads each): up to one process per core, as many as memory holds."""
    cores = cpu_count()
    by_memory = max(1, available_memory() // (source_bytes + JOB_MEMORY_MARGIN))
    processes = max(1, min(cores, jobs, by_memory))
    return processes, max(1, cores // processes)


# --- the backend ----------------------------------------------------------------------------

class GGUFBackend(Backend):
    format = "gguf"

    def __init__(self, context: ReleaseContext):
        super().__init__(context)
        self.tools: LlamaCpp | None = None
        self.pending: list[Variant] = []
        self._shared: SharedFiles | None = None
        self._shared_error: Exception | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 1
        self._jobs: dict[str, Future] = {}

    # the runner's interface

    def check(self, variants: list[Variant]) -> None:
        self.tools = find_llama_cpp()
        check_architecture(self.context.plan.source.facts, self.tools)
        check_imatrix(variants)
        self.pending = list(variants)

    def tool_versions(self) -> dict[str, str]:
        return {"llama.cpp": self.tools.version()} if self.tools else {}

    def produce(self, variant: Variant, staging: Path) -> Produced:
        shared = self._shared_files()
        quantized = self._quantize_job(variant).result()
        started = time.monotonic()
        files = self._place(quantized.path, variant, staging)
        split_seconds = round(time.monotonic() - started, 2)
        facts = read_gguf_facts(files)
        if facts.file_type != variant.name:
            raise WorkFailed(f"{files[0].name}: general.file_type says {facts.file_type}, expected {variant.name}")
        perplexity, perplexity_seconds = self._timed(lambda: self._perplexity(files[0], variant.name))
        timings = {**shared.timings, "quantize": quantized.seconds, "perplexity": perplexity_seconds}
        notes = parse_fallbacks(quantized.output)
        if len(files) > 1:
            timings["split"] = split_seconds
            notes.append(f"split into {len(files)} parts of at most "
                         f"{self.context.recipe.release.split_max_size_gb:g} GB with llama-gguf-split")
        return Produced(files=files, quality=self._quality(perplexity, shared), timings=timings, notes=notes,
                        calibration=self._calibration(variant, facts),
                        params={"bpw": round(facts.bits_per_weight, 3), "file_type": facts.file_type,
                                "weights": facts.weights, "parts": len(files)})

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        shutil.rmtree(self.work_dir / "quantized", ignore_errors=True)

    # shared work

    @property
    def work_dir(self) -> Path:
        path = self.context.work_dir / WORK_SUBDIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _log_file(self, step: str) -> Path:
        return self.work_dir / "logs" / f"{step}.log"

    def _shared_files(self) -> SharedFiles:
        """Convert, compute the imatrix and the baseline once; a failure fails every variant at once."""
        if self._shared_error is not None:
            raise WorkFailed(f"shared GGUF step failed earlier: {self._shared_error}")
        if self._shared is None:
            try:
                self._shared = self._make_shared_files()
            except Exception as exc:
                self._shared_error = exc
                raise
        return self._shared

    def _make_shared_files(self) -> SharedFiles:
        spec = self.context.recipe.gguf
        source, source_key, convert_seconds = self._convert()
        timings = {"convert_shared": convert_seconds}
        imatrix = None
        if spec.imatrix:
            imatrix, timings["imatrix_shared"] = self._imatrix(source, source_key)
        baseline, timings["baseline_perplexity_shared"] = self._baseline(source, source_key)
        return SharedFiles(source, imatrix, baseline, timings)

    def _convert(self) -> tuple[Path, str, float]:
        recipe = self.context.recipe
        outtype = recipe.gguf.outtype
        metadata = self.work_dir / "metadata.json"
        metadata_digest = write_text_if_changed(metadata, json.dumps(gguf_metadata(recipe), indent=2))
        model_dir = self.context.model_path
        target = self.work_dir / f"{recipe.release.basename}.{outtype.upper()}.gguf"
        key = digest(folder_fingerprint(model_dir), outtype, metadata_digest, self.tools.version())
        self.context.log(f"gguf: converting to {outtype.upper()} (once per release)")
        seconds = cached_file(target, key, lambda temporary: run_tool(
            convert_command(self.tools, model_dir, temporary, outtype, metadata), self._log_file("convert"),
            env=self.tools.converter_env()))
        return target, key, seconds

    def _imatrix(self, source: Path, source_key: str) -> tuple[Path, float]:
        spec, texts = self.context.recipe.gguf, self.context.texts
        text_name = dataset_file_name(texts.facts)
        text_digest = write_text_if_changed(self.work_dir / text_name, texts.calibration)
        target = self.work_dir / f"{self.context.recipe.release.basename}.imatrix.gguf"
        key = digest(source_key, text_digest, spec.imatrix_chunks, CONTEXT_TOKENS)
        self.context.log(f"gguf: computing the importance matrix on {text_name}")
        seconds = cached_file(target, key, lambda temporary: run_tool(
            imatrix_command(self.tools, source, text_name, temporary, CONTEXT_TOKENS, spec.imatrix_chunks,
                            cpu_count()), self._log_file("imatrix"), cwd=self.work_dir))
        return target, seconds

    def _evaluation_file(self) -> tuple[Path, str]:
        path = self.work_dir / "evaluation.txt"
        return path, write_text_if_changed(path, self.context.texts.evaluation)

    def _baseline(self, source: Path, source_key: str) -> tuple[float, float]:
        _, text_digest = self._evaluation_file()
        key = digest(source_key, text_digest, CONTEXT_TOKENS)
        self.context.log("gguf: measuring the baseline perplexity")
        label = f"baseline-{self.context.recipe.gguf.outtype.upper()}"
        return cached_value(self.work_dir / "baseline-perplexity", key, lambda: self._perplexity(source, label))

    def _perplexity(self, model: Path, label: str) -> float:
        text_file, _ = self._evaluation_file()
        output = run_tool(perplexity_command(self.tools, model, text_file, CONTEXT_TOKENS, cpu_count()),
                          self._log_file(f"perplexity-{label}"))
        return round(parse_perplexity(output.stdout, output.stderr), 4)

    # quantizing, in parallel

    def _quantize_job(self, variant: Variant) -> Future:
        if self._pool is None:
            self._start_quantizing()
        if variant.id not in self._jobs:
            self._jobs[variant.id] = self._pool.submit(self._quantize, variant)
        return self._jobs[variant.id]

    def _start_quantizing(self) -> None:
        shutil.rmtree(self.work_dir / "quantized", ignore_errors=True)
        processes, self._threads = quantize_parallelism(len(self.pending) or 1, self._shared.source.stat().st_size)
        self.context.log(f"gguf: quantizing {len(self.pending)} type(s), {processes} at a time "
                         f"({self._threads} thread(s) each)")
        self._pool = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="llama-quantize")
        for variant in self.pending:
            self._jobs[variant.id] = self._pool.submit(self._quantize, variant)

    def _quantize(self, variant: Variant) -> QuantizedFile:
        shared = self._shared
        target = self.work_dir / "quantized" / variant.file_name
        temporary = partial_name(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        imatrix = shared.imatrix.name if variant.params.get("imatrix") and shared.imatrix else None
        command = quantize_command(self.tools, shared.source, temporary, variant.name, self._threads,
                                   imatrix=imatrix, overrides=metadata_overrides(self.context.recipe))
        started = time.monotonic()
        output = run_tool(command, self._log_file(f"quantize-{variant.name}"), cwd=self.work_dir)
        os.replace(temporary, target)
        return QuantizedFile(target, output.text, round(time.monotonic() - started, 2))

    def _place(self, quantized: Path, variant: Variant, staging: Path) -> list[Path]:
        """The quantized file into the staging folder, split into parts when above the size limit."""
        max_bytes = int(self.context.recipe.release.split_max_size_gb * GB)
        if quantized.stat().st_size <= max_bytes:
            target = staging / variant.file_name
            shutil.move(quantized, target)
            return [target]
        prefix = staging / variant.file_name.removesuffix(".gguf")
        run_tool(split_command(self.tools, quantized, prefix, max_bytes), self._log_file(f"split-{variant.name}"))
        quantized.unlink()
        parts = sorted(staging.glob(f"{prefix.name}-*-of-*.gguf"))
        if not parts:
            raise WorkFailed(f"llama-gguf-split wrote no parts for {variant.file_name}")
        return parts

    # what goes into the manifest

    def _quality(self, perplexity: float, shared: SharedFiles) -> dict[str, Any]:
        facts = self.context.texts.facts
        return {"perplexity": perplexity, "baseline_perplexity": shared.baseline_perplexity, "engine": ENGINE,
                "eval_text": facts["evaluation"], "dataset": facts["dataset"],
                "context": CONTEXT_TOKENS}

    def _calibration(self, variant: Variant, facts: GGUFFacts) -> dict[str, Any] | None:
        if not variant.params.get("imatrix"):
            return None
        return {**self.context.texts.facts, "imatrix": imatrix_facts(facts)}

    @staticmethod
    def _timed(work: Callable[[], float]) -> tuple[float, float]:
        started = time.monotonic()
        value = work()
        return value, round(time.monotonic() - started, 2)


BACKEND = GGUFBackend
