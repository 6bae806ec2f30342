"""What a format plugin is, what a variant is, and the interface between the runner and a backend.

A format (GPTQ, AWQ, GGUF, ...) is one `Format` object in one module of this package. It owns
its recipe section (a pydantic model), how that section expands into variants (with their typed
parameters and the shared artifacts they need), where its files go, its card rows and its CLI
wording, and it makes the `Backend` that produces its variants. Nothing outside this package
switches on a format's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel

from ..stages import Artifact, ArtifactStore, content_key

if TYPE_CHECKING:
    from ..devices import Device
    from ..memory import StageMemory
    from ..plan import Plan
    from ..recipe import Recipe
    from ..schema import Calibration
    from ..source import SourceModel

PRESENTATION = "presentation"  # marks recipe fields that change how a variant is shown, never its bytes


def byte_params(spec: BaseModel) -> dict[str, Any]:
    """The fields of a variant's parameters that change its files (JSON types), in field order."""
    data = spec.model_dump(mode="json")
    return {name: data[name] for name, info in type(spec).model_fields.items()
            if not (info.json_schema_extra or {}).get(PRESENTATION)}


def identity_params(spec: BaseModel) -> dict[str, Any]:
    """byte_params with the values a spec declares to make the same files (its SAME_FILES: field -> value ->
    the value it stands for) written one way: choosing between them redoes nothing."""
    params = byte_params(spec)
    for name, same in getattr(spec, "SAME_FILES", {}).items():
        params[name] = same.get(params[name], params[name])
    return params


def artifact_tree(artifact: Artifact) -> dict[str, Any]:
    """An artifact's inputs with those of everything it is made from: what a variant's bytes depend on."""
    return {"name": artifact.name, "inputs": artifact.inputs(), "needs": [artifact_tree(a) for a in artifact.needs()]}


@dataclass(frozen=True)
class Variant:
    """One file set of the release: a branch of a GPTQ/AWQ repo, or one GGUF type."""

    id: str  # "gptq/main", "awq/main", "gguf/Q4_K_M": also the manifest's name
    format: str
    repo_id: str
    branch: str  # GGUF files all live on main
    name: str  # the branch (GPTQ/AWQ) or the GGUF type
    spec: BaseModel  # the typed parameters (the recipe's own model for GPTQ/AWQ)
    calibration: "Calibration | None"  # the calibration it is made from (paths resolved), if any
    description: str
    estimated_bytes: int | None
    subdir: str  # where its files go, below the release's output folder
    source_identity: str  # the source model's files (local) or id@revision (Hub)
    needs: tuple[Artifact, ...] = ()  # shared work it is made from
    file_name: str | None = None  # single-file formats (GGUF)
    device: "Device | None" = None  # where (and in which dtypes) it is computed, for formats that use one
    offload: str = "none"  # compute.offload: "disk" streams the layers from disk (not in the digest: same bytes)
    memory: tuple["StageMemory", ...] = ()  # the peak memory of each of its own stages (quantize/memory.py)

    @property
    def compute_dtype(self) -> str | None:
        return self.device.compute_dtype if self.device else None

    @property
    def params(self) -> dict[str, Any]:
        """The requested parameters, as the manifest records them."""
        return byte_params(self.spec)

    @property
    def calibration_summary(self) -> dict[str, Any] | None:
        return self.calibration.summary() if self.calibration else None

    @cached_property
    def digest(self) -> str:
        """Changes whenever anything that changes the variant's bytes does: then it is redone.

        The calibration file's path is left out: its content is an input of the text artifact. The
        compute dtype is in it when it is not float32 (the CPU's, which the keys always assumed);
        the device's name is not (the same dtype gives the same files)."""
        calibration = {k: v for k, v in (self.calibration_summary or {}).items() if k != "path"}
        parts = [self.format, identity_params(self.spec), calibration, self.source_identity,
                 [artifact_tree(a) for a in self.needs]]
        if self.compute_dtype not in (None, "float32"):
            parts.append({"compute_dtype": self.compute_dtype})
        return content_key(*parts)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "format": self.format, "repo_id": self.repo_id, "branch": self.branch,
                "file_name": self.file_name, "params": self.params, "calibration": self.calibration_summary,
                "description": self.description, "estimated_bytes": self.estimated_bytes,
                "needs": [a.name for a in self.needs], "memory": [m.to_dict() for m in self.memory],
                **({"device": self.device.name, "compute_dtype": self.device.compute_dtype,
                    "eval_dtype": self.device.eval_dtype} if self.device else {})}


@dataclass
class Produced:
    files: list[Path]  # every file of the variant, inside the staging folder
    quality: dict[str, Any] = field(default_factory=dict)  # perplexity, baseline_perplexity, ...
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # facts of the calibration actually used
    measured: dict[str, Any] = field(default_factory=dict)  # facts of the result (bpw, compute dtype, ...)


@dataclass
class ReleaseContext:
    """What every backend of one release shares: the plan, the output folder and the artifact store."""

    plan: "Plan"
    out_dir: Path
    log: Callable[[str], None] = print
    output: Any = None  # capture.LibraryOutput, when the libraries' output goes to log files
    scratch_name: str = "quantized"  # see `scratch`: a Ray task gets its own
    store: ArtifactStore = field(init=False)
    _memo: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.store = ArtifactStore(self.out_dir, self.log, context=self, output=self.output)

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        """An in-memory object every backend of the release shares (e.g. the llama.cpp tools found)."""
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    @property
    def work_dir(self) -> Path:
        path = self.store.work_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    def scratch(self, owner: str) -> Path:
        """A backend's folder for temporary files below `.work/<owner>/`, this process's alone (the
        backend may empty it): tasks on other nodes writing the same output folder have theirs."""
        return self.work_dir / owner / self.scratch_name

    @cached_property
    def model_path(self) -> Path:
        """The fp16 model as a local folder (a Hub source is downloaded once, weights included)."""
        source = self.plan.source
        if source.local_path is not None:
            return source.local_path
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.hub, revision=source.revision))

    @property
    def trust_remote_code(self) -> bool:
        """Whether the model's own Python code may run (the recipe's `source.trust_remote_code`)."""
        return self.plan.recipe.source.trust_remote_code

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)


class Backend(ABC):
    """Makes one format's variants. Reads only the plan (variants, source) and the artifacts."""

    def __init__(self, context: ReleaseContext):
        self.context = context

    @abstractmethod
    def check(self, variants: list[Variant]) -> None:
        """Raise BadInput for anything that would fail later; must not start any work."""

    @abstractmethod
    def produce(self, variant: Variant, staging: Path) -> Produced:
        """Make, verify and measure one variant in `staging` (an empty folder)."""

    def tool_versions(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        """Release what was kept between variants (processes, temp files)."""


class Format(ABC):
    """A format plugin: everything the pipeline needs to know about one kind of release repo."""

    name: ClassVar[str]  # recipe key, output folder, manifest folder: "gptq"
    title: ClassVar[str]  # repo suffix and card title: "GPTQ"
    order: ClassVar[int]  # position in plans, summaries and cards
    card_order: ClassVar[int]  # position in a card's "Repositories available"
    section: ClassVar[Any]  # the type of the recipe section (a pydantic model, or a list of them)
    one_branch_per_variant: ClassVar[bool]  # True: each variant is a folder on its own branch; False: files on main
    library_name: ClassVar[str | None] = None  # front matter library_name
    location_label: ClassVar[str] = "Branch"  # what the plan calls a variant's place: Branch or File
    case_insensitive_names: ClassVar[bool] = False  # `--variants` matches names in any case (GGUF types)
    # where its files run, for the card's "Which file should I choose?": "RAM" (CPU) and/or "VRAM" (GPU)
    memory_kinds: ClassVar[tuple[str, ...]] = ("VRAM",)

    def check_section(self, section: Any) -> None:
        """Recipe-level checks beyond the section's schema; ValueError naming the field."""

    @abstractmethod
    def expand(self, recipe: "Recipe", source: "SourceModel") -> list[Variant]:
        """The section's variants, in recipe order; BadInput for what the model can't take."""

    def plan_warnings(self, variants: list[Variant]) -> list[str]:
        """What the plan should say about these variants' settings before any work starts (none by default)."""
        return []

    @abstractmethod
    def backend(self, context: ReleaseContext) -> Backend: ...

    def output_subdir(self, branch: str) -> str:
        return f"{self.name}/{branch}" if self.one_branch_per_variant else self.name

    # wording
    @abstractmethod
    def method(self, variant: Variant) -> str:
        """The plan's Method column."""

    @abstractmethod
    def describe(self, variant: Variant) -> str:
        """The plan's Parameters column."""

    # cards
    @abstractmethod
    def card_row(self, entry: Any, model_type: str | None) -> dict[str, Any]:
        """One row of the provided-files table (entry: card.context.CardEntry)."""

    @abstractmethod
    def repository_label(self, section: Any) -> str:
        """How the card's "Repositories available" describes this format's repo (from its recipe section)."""

    def card_extras(self, entries: list[Any]) -> dict[str, Any]:
        """Template data of this format's own (examples, explanations)."""
        return {}

    def short_label(self, entry: Any) -> str:
        """A variant in a few characters, for the release-wide chart and tables ("Q4_K_M", "4-bit g128")."""
        return entry.name

    def location(self, variant: Variant) -> str:
        return variant.file_name or variant.branch
