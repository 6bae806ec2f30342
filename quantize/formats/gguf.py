"""GGUF: every type of the k-quant ladder as one file (or split parts) side by side on `main`,
made with llama.cpp's own tools.

Shared work, as artifacts of the release (cached in `<out>/.work/<name>/`):
  gguf_convert    the model converted once to F16 (or BF16, recipe `gguf.outtype`)
  gguf_imatrix    the importance matrix (`gguf.imatrix: true`), from the calibration text
  gguf_reference  the converted file scored by llama.cpp against the release's fp16 reference
                  (quantize/evaluate.py): llama.cpp's own baseline, next to transformers'
All pending types are then quantized in parallel (as many llama-quantize processes as cores and
memory allow); `produce` waits for its own type, splits it if it is above the release's size
limit, checks the file, and scores it with `llama-perplexity --kl-divergence` against the same
fp16 reference as every GPTQ/AWQ variant.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from .. import memory
from ..calibration import CALIBRATION_FILE, CalibrationTextArtifact
from ..engines.llamacpp import (LlamaCpp, convert_command, find_llama_cpp, imatrix_command, kl_divergence_command,
                                parse_fallbacks, parse_kl_divergence, quantize_command, registered_architectures,
                                run_tool, split_command)
from ..errors import BadInput, WorkFailed
from ..quality import Quality, quality_record
from ..quant_types import GB, GGUF_TYPES, K_QUANT_BLOCKS, RAM_OVERHEAD_BYTES, format_size, gguf_file_name
from ..schema import Strict
from ..stages import Artifact, ArtifactStore, Stopwatch, write_json
from .base import Backend, Format, Produced, ReleaseContext, Variant

if TYPE_CHECKING:
    from ..evaluate import FP16Reference, Reference
    from ..recipe import Recipe
    from ..source import ModelFacts, SourceModel

HUB = "https://huggingface.co"
CONTEXT_TOKENS = 512  # llama.cpp's usual window for imatrix and perplexity, so figures compare across releases
ENGINE = "llama.cpp"
LOGS_SUBDIR = "gguf/logs"  # below <out>/.work: every tool's full output
FLOAT_BITS = 16
PREFERRED_EXAMPLE = "Q4_K_M"  # the type the card's examples use when the release has it


# --- the recipe section and the variant's parameters ------------------------------------------

class GGUFSpec(Strict):
    """The recipe's `gguf:` section."""

    types: list[str]
    imatrix: bool = False
    imatrix_chunks: int | None = Field(None, ge=1)  # default: all the calibration text
    outtype: Literal["f16", "bf16"] = "f16"

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one GGUF type (e.g. Q4_K_M)")
        names = []
        for name in value:
            upper = str(name).upper()
            if upper not in GGUF_TYPES:
                raise ValueError(f"unknown GGUF type {name!r}; known types: {', '.join(GGUF_TYPES)}")
            if upper in names:
                raise ValueError(f"GGUF type {upper} is listed twice")
            names.append(upper)
        return names

    @model_validator(mode="after")
    def _imatrix_types(self) -> "GGUFSpec":
        needing = [t for t in self.types if GGUF_TYPES[t].needs_imatrix]
        if needing and not self.imatrix:
            raise ValueError(f"{', '.join(needing)} need an importance matrix: set gguf.imatrix: true")
        return self


class GGUFVariant(Strict):
    """One GGUF file's parameters: everything besides the shared artifacts that changes its bytes."""

    type: str
    imatrix: bool
    imatrix_chunks: int | None
    outtype: str
    split_max_size_gb: float  # files above this are split into parts
    license: str | None  # written into the file's general.license


# --- checks and what the files say ----------------------------------------------------------

@dataclass(frozen=True)
class GGUFFacts:
    """What a GGUF file (all its parts) says about itself."""

    file_type: str  # "Q4_K_M", from general.file_type
    bits_per_weight: float  # tensor bytes * 8 / weights, over all tensors
    weights: int
    metadata: dict[str, Any]  # general.* and quantize.* keys of the first part


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
    needing = [v.name for v in variants if GGUF_TYPES[v.name].needs_imatrix and not v.spec.imatrix]
    if needing:
        raise BadInput(f"gguf: {', '.join(needing)} need an importance matrix: set gguf.imatrix: true")


# --- what the files say ---------------------------------------------------------------------

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


def dataset_file_name(facts: dict[str, Any]) -> str:
    """`wikitext-2-raw-v1-test.calibration.txt`: what the GGUF's quantize.imatrix.dataset key will say."""
    if facts.get("dataset") == "file" and facts.get("path"):
        stem = Path(facts["path"]).stem
    else:
        dataset, config = facts.get("dataset") or "text", facts.get("config")
        stem = config if config and config.startswith(dataset) else "-".join(p for p in (dataset, config) if p)
        stem = f"{stem}-{facts.get('split')}" if facts.get("split") else stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".calibration.txt"



# --- shared work ----------------------------------------------------------------------------

def llama_tools(context: ReleaseContext) -> LlamaCpp:
    return context.memo("llama.cpp", find_llama_cpp)


def log_file(store: ArtifactStore, step: str) -> Path:
    return store.work_dir / LOGS_SUBDIR / f"{step}.log"


@dataclass(frozen=True, repr=False)
class GGUFConversion(Artifact):
    """The source model converted once to F16/BF16: what every type is quantized from."""

    source_identity: str
    outtype: str
    file_name: str
    metadata: dict[str, Any]  # the converter's --metadata overrides
    estimated: int = 0
    peak: Any = field(default=None, compare=False)  # memory.StageMemory, for the plan

    @property
    def name(self) -> str:
        return "gguf_convert"

    def memory(self):
        return self.peak

    def inputs(self) -> dict[str, Any]:
        return {"model": self.source_identity, "outtype": self.outtype, "file": self.file_name,
                "metadata": self.metadata}

    def tool_versions(self, store: ArtifactStore) -> dict[str, str]:
        return {"llama.cpp": llama_tools(store.context).version()}

    def estimated_bytes(self) -> int:
        return self.estimated

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        tools = llama_tools(store.context)
        metadata = folder / "metadata.json"
        write_json(metadata, self.metadata)
        run_tool(convert_command(tools, store.context.model_path, folder / self.file_name, self.outtype, metadata),
                 log_file(store, "convert"), env=tools.converter_env())
        return {"bytes": (folder / self.file_name).stat().st_size}

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Path:
        return folder / self.file_name


@dataclass(frozen=True, repr=False)
class ImportanceMatrix(Artifact):
    """llama-imatrix over the calibration text, in 512-token chunks."""

    conversion: GGUFConversion
    text: CalibrationTextArtifact
    chunks: int | None
    file_name: str

    @property
    def name(self) -> str:
        return "gguf_imatrix"

    def memory(self):
        return memory.llama_tool(self.name, self.conversion.estimated)

    def inputs(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "context": CONTEXT_TOKENS, "file": self.file_name}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.conversion, self.text)

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        texts = store.get(self.text)
        text_name = dataset_file_name(texts.value.facts)  # what the files' quantize.imatrix.dataset will say
        shutil.copyfile(texts.folder / CALIBRATION_FILE, folder / text_name)
        run_tool(imatrix_command(llama_tools(store.context), store.value(self.conversion), text_name,
                                 folder / self.file_name, CONTEXT_TOKENS, self.chunks, cpu_count()),
                 log_file(store, "imatrix"), cwd=folder)
        return {"dataset": text_name}

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Path:
        return folder / self.file_name


@dataclass(frozen=True, repr=False)
class GGUFReference(Artifact):
    """The converted F16/BF16 file scored by llama.cpp against the fp16 reference: llama.cpp's own
    baseline, which must agree with transformers' on the same tokens (the README shows by how much)."""

    conversion: GGUFConversion
    reference: FP16Reference

    @property
    def name(self) -> str:
        return "gguf_reference"

    def memory(self):
        return memory.llama_tool(self.name, self.conversion.estimated)

    def inputs(self) -> dict[str, Any]:
        return {"context": CONTEXT_TOKENS, "engine": ENGINE}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.conversion, self.reference)

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        converted = store.value(self.conversion)
        check_bos(converted, store.value(self.reference))
        quality = measure_quality(store, converted, self.reference, f"baseline-{self.conversion.outtype.upper()}")
        return asdict(quality)

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Quality:
        return Quality(**value)


def check_bos(converted: Path, reference: Reference) -> None:
    """llama.cpp puts BOS first in each window when the file says so; the reference must have done the same."""
    from gguf import GGUFReader

    fields = GGUFReader(converted).fields
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    if add_bos is not None and bool(_field_value(add_bos)) != (reference.bos is not None):
        raise WorkFailed(f"{converted.name}: llama.cpp {'adds' if _field_value(add_bos) else 'does not add'} a BOS "
                         "token to each window but the source's tokenizer does not agree: the figures would not compare")
    if reference.bos is not None and bos_id is not None and int(_field_value(bos_id)) != reference.bos:
        raise WorkFailed(f"{converted.name}: BOS token {int(_field_value(bos_id))} differs from the tokenizer's "
                         f"{reference.bos}")


def measure_quality(store: ArtifactStore, model: Path, reference: FP16Reference, label: str) -> Quality:
    """llama-perplexity --kl-divergence on the reference's tokens; the baseline perplexity is transformers'."""
    base = store.value(reference)
    output = run_tool(kl_divergence_command(llama_tools(store.context), model, base.file.path, base.file.window,
                                            cpu_count()), log_file(store, f"kl-divergence-{label}"))
    values = parse_kl_divergence(output.text)
    return Quality(values["perplexity"], base.perplexity, values["kld_mean"], values["kld_p99"],
                   values["top1_agreement"], base.eval_tokens, base.file.windows, base.file.window)


# --- resources ------------------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def quantize_parallelism(jobs: int, source_bytes: int) -> tuple[int, int]:
    """(processes, threads each): up to one process per core, as many as memory holds."""
    cores = cpu_count()
    by_memory = max(1, memory.available_memory() // (source_bytes + memory.TOOL_BYTES))
    processes = max(1, min(cores, jobs, by_memory))
    return processes, max(1, cores // processes)




# --- the backend ----------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedFile:
    path: Path
    output: str  # what llama-quantize printed (fallback warnings)
    seconds: float


def needed(variant: Variant, kind: type) -> Any:
    return next((a for a in variant.needs if isinstance(a, kind)), None)


class GGUFBackend(Backend):
    def __init__(self, context: ReleaseContext):
        super().__init__(context)
        self.pending: list[Variant] = []
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 1
        self._jobs: dict[str, Future] = {}

    @property
    def tools(self) -> LlamaCpp:
        return llama_tools(self.context)

    @property
    def scratch(self) -> Path:
        """Where llama-quantize writes before a file is moved into its staging folder."""
        return self.context.scratch("gguf")

    def check(self, variants: list[Variant]) -> None:
        check_architecture(self.context.plan.source.facts, self.tools)
        check_imatrix(variants)
        for variant in variants:
            needed(variant, GGUFReference).reference.check(self.context.store)
        self.pending = list(variants)

    def tool_versions(self) -> dict[str, str]:
        return {"llama.cpp": self.tools.version()}

    def produce(self, variant: Variant, staging: Path) -> Produced:
        clock = Stopwatch()
        store = self.context.store
        engine_baseline = needed(variant, GGUFReference)
        baseline: Quality = store.value(engine_baseline)
        quantized = self._quantize_job(variant).result()
        clock.add("quantize", quantized.seconds)
        with clock.stage("split"):
            files = self._place(quantized.path, variant, staging)
        facts = read_gguf_facts(files)
        if facts.file_type != variant.name:
            raise WorkFailed(f"{files[0].name}: general.file_type says {facts.file_type}, expected {variant.name}")
        with clock.stage("evaluate"):
            measured = measure_quality(store, files[0], engine_baseline.reference, variant.name)
        timings = {**store.timings(variant.needs), **clock.timings}
        notes = parse_fallbacks(quantized.output)
        if len(files) > 1:
            notes.append(f"split into {len(files)} parts of at most {variant.spec.split_max_size_gb:g} GB "
                         "with llama-gguf-split")
        else:
            timings.pop("split")
        text = store.value(engine_baseline.reference.tokens.text)
        quality = quality_record(measured, ENGINE, engine_baseline_perplexity=round(baseline.perplexity, 4),
                                 engine_baseline_kld=round(baseline.kld_mean, 6),
                                 engine_baseline_type=variant.spec.outtype.upper(),
                                 eval_text=text.facts["evaluation"], dataset=text.label)
        calibration = {**text.facts, "imatrix": imatrix_facts(facts)} if variant.spec.imatrix else None
        return Produced(files=files, quality=quality, timings=timings, notes=notes, calibration=calibration,
                        measured={"bpw": round(facts.bits_per_weight, 3), "file_type": facts.file_type,
                                  "weights": facts.weights, "parts": len(files)})

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        shutil.rmtree(self.scratch, ignore_errors=True)

    # quantizing, in parallel

    def _quantize_job(self, variant: Variant) -> Future:
        if self._pool is None:
            self._start_quantizing(variant)
        if variant.id not in self._jobs:
            self._jobs[variant.id] = self._pool.submit(self._quantize, variant)
        return self._jobs[variant.id]

    def _start_quantizing(self, first: Variant) -> None:
        store = self.context.store
        pending = self.pending or [first]
        source = store.value(needed(first, GGUFConversion))
        for variant in pending:  # shared inputs first: the jobs only read them
            for artifact in variant.needs:
                store.get(artifact)
        shutil.rmtree(self.scratch, ignore_errors=True)
        processes, self._threads = quantize_parallelism(len(pending), source.stat().st_size)
        self.context.log(f"gguf: quantizing {len(pending)} type(s), {processes} at a time "
                         f"({self._threads} thread(s) each)")
        self._pool = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="llama-quantize")
        for variant in pending:
            self._jobs[variant.id] = self._pool.submit(self._quantize, variant)

    def _quantize(self, variant: Variant) -> QuantizedFile:
        store, spec = self.context.store, variant.spec
        target = self.scratch / variant.file_name
        temporary = target.with_name(f"{target.stem}.partial.gguf")
        target.parent.mkdir(parents=True, exist_ok=True)
        imatrix = needed(variant, ImportanceMatrix)
        imatrix_result = store.get(imatrix) if imatrix else None
        # run beside the imatrix and name it relatively: the files record its name, not a local path
        command = quantize_command(self.tools, store.value(needed(variant, GGUFConversion)), temporary, spec.type,
                                   self._threads, imatrix=imatrix.file_name if imatrix else None,
                                   overrides={"general.license": spec.license} if spec.license else None)
        started = time.monotonic()
        output = run_tool(command, log_file(store, f"quantize-{spec.type}"),
                          cwd=imatrix_result.folder if imatrix_result else None)
        os.replace(temporary, target)
        return QuantizedFile(target, output.text, round(time.monotonic() - started, 2))

    def _place(self, quantized: Path, variant: Variant, staging: Path) -> list[Path]:
        """The quantized file into the staging folder, split into parts when above the size limit."""
        max_bytes = int(variant.spec.split_max_size_gb * GB)
        if quantized.stat().st_size <= max_bytes:
            target = staging / variant.file_name
            shutil.move(quantized, target)
            return [target]
        prefix = staging / variant.file_name.removesuffix(".gguf")
        run_tool(split_command(self.tools, quantized, prefix, max_bytes),
                 log_file(self.context.store, f"split-{variant.name}"))
        quantized.unlink()
        parts = sorted(staging.glob(f"{prefix.name}-*-of-*.gguf"))
        if not parts:
            raise WorkFailed(f"llama-gguf-split wrote no parts for {variant.file_name}")
        return parts


# --- the plugin -----------------------------------------------------------------------------

class GGUFFormat(Format):
    name = "gguf"
    title = "GGUF"
    order = 30
    card_order = 30
    section = GGUFSpec | None
    one_branch_per_variant = False
    library_name = None
    location_label = "File"
    case_insensitive_names = True  # llama.cpp's type names: q4_k_m is Q4_K_M
    memory_kinds = ("RAM", "VRAM")  # on the CPU, or every layer offloaded to a GPU (-ngl 99)

    def expand(self, recipe: "Recipe", source: "SourceModel") -> list[Variant]:
        spec: GGUFSpec = recipe.gguf
        release = recipe.release
        params_count = source.facts.param_count if source.facts else None
        converted_bytes = int(params_count * FLOAT_BITS / 8) if params_count else 0
        conversion = GGUFConversion(source.identity, spec.outtype, f"{release.basename}.{spec.outtype.upper()}.gguf",
                                    gguf_metadata(recipe), converted_bytes, memory.gguf_conversion(source.facts))
        calibration = recipe.resolved_calibration()
        text = CalibrationTextArtifact(calibration)
        imatrix = (ImportanceMatrix(conversion, text, spec.imatrix_chunks, f"{release.basename}.imatrix.gguf")
                   if spec.imatrix else None)
        from ..evaluate import fp16_reference

        reference = GGUFReference(conversion, fp16_reference(recipe, source))
        variants = []
        for type_name in spec.types:
            facts = GGUF_TYPES[type_name]
            size = int(params_count * facts.bpw / 8) if params_count else None
            stages = (memory.llama_tool(f"gguf/{type_name}: quantize", converted_bytes + (size or 0)),
                      memory.llama_tool(f"gguf/{type_name}: perplexity", size))
            params = GGUFVariant(type=type_name, imatrix=spec.imatrix, imatrix_chunks=spec.imatrix_chunks,
                                 outtype=spec.outtype, split_max_size_gb=release.split_max_size_gb,
                                 license=recipe.source.license)
            variants.append(Variant(
                id=f"gguf/{type_name}", format=self.name, repo_id=release.repo_id(self.title), branch="main",
                name=type_name, spec=params, calibration=calibration if spec.imatrix else None,
                description=facts.use_case,
                estimated_bytes=size, subdir=self.output_subdir("main"), source_identity=source.identity,
                needs=tuple(a for a in (conversion, imatrix, reference) if a is not None),
                file_name=gguf_file_name(release.basename, type_name), memory=tuple(m for m in stages if m)))
        return variants

    def backend(self, context: ReleaseContext) -> GGUFBackend:
        return GGUFBackend(context)

    def method(self, variant: Variant) -> str:
        return variant.name

    def describe(self, variant: Variant) -> str:
        return "imatrix" if variant.spec.imatrix else ""

    def card_row(self, entry, model_type: str | None) -> dict[str, Any]:
        facts = GGUF_TYPES[entry.name]
        prefix = "" if entry.produced else "~"
        size = entry.size
        return {
            "files": [{"name": name, "url": f"{HUB}/{entry.repo_id}/blob/main/{name}"} for name in entry.files],
            "method": entry.name, "bits": facts.bits,
            "size": prefix + format_size(size) if size else "?",
            "max_ram": prefix + format_size(size + RAM_OVERHEAD_BYTES) if size else "?",
            "use_case": entry.description, "bpw": entry.measured.get("bpw"),
            "imatrix": entry.params.get("imatrix", False), "split": len(entry.files) > 1,
        }

    def card_extras(self, entries: list) -> dict[str, Any]:
        preferred = next((e for e in entries if e.name == PREFERRED_EXAMPLE), entries[0] if entries else None)
        version = next((e.tools[ENGINE] for e in entries if e.tools.get(ENGINE)), None)
        commit = llama_cpp_commit(version) if version else None
        return {"gguf_files": [e.files[0] for e in entries if e.files], "k_quant_blocks": K_QUANT_BLOCKS,
                "example_gguf": preferred.name if preferred else None,
                "example_gguf_file": preferred.files[0] if preferred and preferred.files else None,
                "llama_cpp_version": version, "llama_cpp_commit": commit,
                "llama_cpp_detail": (version.replace(commit, "", 1).strip(" ()") if commit else version) if version else None,
                "llama_cpp_commit_url": f"https://github.com/ggml-org/llama.cpp/commit/{commit}" if commit else None,
                "needs_imatrix_types": [e.name for e in entries if GGUF_TYPES[e.name].method == "i-quant"]}

    def repository_label(self, section: GGUFSpec) -> str:
        bits = sorted({GGUF_TYPES[name].bits for name in section.types})
        return f"{join_words([str(b) for b in bits])}-bit GGUF models for CPU+GPU inference"


def llama_cpp_commit(version: str) -> str | None:
    """The llama.cpp commit a manifest's version names: "0c1e57098 (llama-cpp-python 0.3.36)" or "6500 (1a2b3c4)"."""
    match = (re.match(r"^([0-9a-f]{7,40})\b", version) or re.search(r"commit ([0-9a-f]{7,40})\b", version)
             or re.search(r"\(([0-9a-f]{7,40})\)", version))
    return match.group(1) if match else None


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


FORMAT = GGUFFormat()
