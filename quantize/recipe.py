"""The recipe: one YAML file describing a whole release. Schema, loading and friendly errors.

Pure: reading the YAML file is the only I/O here. Paths in a recipe are relative to the recipe.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BadInput
from .quant_types import AWQ_BITS, GGUF_TYPES, GPTQ_BITS, awq_branch_name, gptq_branch_name

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BRANCH_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def _group_size(value: Any) -> Any:
    """`none`, null and -1 all mean one group per row; stored as None."""
    if value is None or value == -1 or (isinstance(value, str) and value.strip().lower() in ("none", "-1")):
        return None
    return value


GroupSize = Annotated[int | None, BeforeValidator(_group_size)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Strict):
    path: Path | None = None  # a local fp16 Hugging Face folder ...
    hub: str | None = None  # ... or a Hub model id (then `revision` applies)
    revision: str = "main"
    name: str | None = None  # display name, e.g. "SmolLM2 135M Instruct"
    creator: str | None = None  # model_creator, e.g. "Hugging Face"
    creator_url: str | None = None
    repo_id: str | None = None  # the original repo (front matter base_model); defaults to `hub`
    license: str | None = None  # defaults to the original card's
    prompt_template: str | None = None  # defaults to the tokenizer's chat template, rendered
    prompt_template_name: str | None = None
    card: Path | None = None  # the original model card; defaults to README.md of the model

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of source.path (local folder) or source.hub (Hub id)")
        if self.hub is not None and not HUB_ID.match(self.hub):
            raise ValueError(f"source.hub must look like owner/name (got {self.hub!r})")
        return self

    @property
    def base_model(self) -> str | None:
        return self.repo_id or self.hub

    def display_name(self) -> str:
        if self.name:
            return self.name
        ident = self.base_model or (self.path.name if self.path else "model")
        return ident.split("/")[-1]


class Release(Strict):
    namespace: str
    basename: str
    quantized_by: str | None = None  # defaults to the namespace
    private: bool = False
    tags: list[str] = Field(default_factory=list)
    split_max_size_gb: float = Field(48.0, gt=0, le=50)  # GGUF files above this are split

    @field_validator("namespace", "basename")
    @classmethod
    def _repo_part(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][\w.-]*$", value):
            raise ValueError(f"must be letters, digits, '-', '_' or '.' (got {value!r})")
        return value

    def repo_id(self, fmt: str) -> str:
        return f"{self.namespace}/{self.basename}-{fmt.upper()}"

    @property
    def author(self) -> str:
        return self.quantized_by or self.namespace


class Calibration(Strict):
    dataset: Literal["wikitext", "c4", "file"] = "wikitext"
    config: str | None = None  # wikitext: wikitext-2-raw-v1 (default) or wikitext-2-v1
    split: str = "test"
    path: Path | None = None  # dataset: file -> a .txt or .jsonl ("text" field) file
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(2048, ge=16, le=1_048_576)
    seed: int = 0
    held_out: float = Field(0.1, gt=0, lt=0.5)  # the end of the text kept apart for perplexity

    @model_validator(mode="after")
    def _config_and_path(self) -> "Calibration":
        if self.dataset == "file" and self.path is None:
            raise ValueError("dataset 'file' needs calibration.path")
        if self.dataset != "file" and self.path is not None:
            raise ValueError("calibration.path is only for dataset 'file'")
        if self.dataset == "wikitext" and self.config not in (None, "wikitext-2-raw-v1", "wikitext-2-v1"):
            raise ValueError("wikitext config must be wikitext-2-raw-v1 or wikitext-2-v1")
        return self

    @property
    def resolved_config(self) -> str | None:
        if self.dataset == "wikitext":
            return self.config or "wikitext-2-raw-v1"
        if self.dataset == "c4":
            return self.config or "en"
        return None

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "config": self.resolved_config, "split": self.split,
                "path": str(self.path) if self.path else None, "samples": self.samples,
                "seq_len": self.seq_len, "seed": self.seed, "held_out": self.held_out}


class _WeightVariant(Strict):
    """What GPTQ and AWQ variants share: a group size, a branch, a card description."""

    group_size: GroupSize = 128
    seq_len: int | None = Field(None, ge=16)  # overrides calibration.seq_len for this variant
    branch: str | None = None  # default: main for the default (else first) one, else a generated name
    default: bool = False  # publish this one on `main`
    description: str | None = None

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        if value is not None and (value < 16 or value > 1024 or value & (value - 1)):
            raise ValueError(f"must be a power of two from 16 to 1024, or none (got {value})")
        return value


class GPTQVariant(_WeightVariant):
    bits: int = 4
    act_order: bool = True
    damp: float = 0.1
    sym: bool = True

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


class AWQVariant(_WeightVariant):
    bits: int = 4
    zero_point: bool = True

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in AWQ_BITS:
            raise ValueError(f"AWQ supports {', '.join(map(str, AWQ_BITS))}-bit only (got {value})")
        return value

    @field_validator("group_size")
    @classmethod
    def _needs_group(cls, value: int | None) -> int | None:
        if value is None:
            raise ValueError("AWQ needs a group size (e.g. 128)")
        return value

    def generated_branch(self) -> str:
        return awq_branch_name(self.bits, self.group_size)


class GGUFSpec(Strict):
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


class Publish(Strict):
    target: Literal["hub", "local", "none"] = "local"
    path: Path | None = None  # local target: where the git repositories go (default: <out>/repos)


class CardOptions(Strict):
    header: Path | None = None  # Markdown inserted verbatim after the front matter
    footer: Path | None = None  # Markdown inserted verbatim before the original card
    templates: Path | None = None  # a folder of templates overriding the built-in ones


class Recipe(Strict):
    source: Source
    release: Release
    calibration: Calibration = Field(default_factory=Calibration)
    gptq: list[GPTQVariant] | None = None
    awq: list[AWQVariant] | None = None
    gguf: GGUFSpec | None = None
    publish: Publish = Field(default_factory=Publish)
    card: CardOptions = Field(default_factory=CardOptions)
    base_dir: Path = Field(Path("."), exclude=True)  # the recipe's folder; relative paths start here

    @field_validator("gptq", "awq")
    @classmethod
    def _non_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("empty list: remove the key or list at least one variant")
        return value

    @model_validator(mode="after")
    def _has_variants_and_unique_branches(self) -> "Recipe":
        if not (self.gptq or self.awq or self.gguf):
            raise ValueError("the recipe lists no variants: add gptq, awq or gguf")
        for fmt, variants in (("gptq", self.gptq), ("awq", self.awq)):
            branches = assign_branches(fmt, variants or [])
            seen: dict[str, int] = {}
            for index, branch in enumerate(branches):
                if not BRANCH_NAME.match(branch):
                    raise ValueError(f"{fmt}[{index}].branch: {branch!r} is not a valid branch name")
                if branch in seen:
                    raise ValueError(f"{fmt}[{index}]: branch {branch!r} is also used by {fmt}[{seen[branch]}]")
                seen[branch] = index
        return self

    def resolve(self, path: Path | None) -> Path | None:
        """A recipe path made absolute against the recipe's folder."""
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def assign_branches(fmt: str, variants: list) -> list[str]:
    """Branch per variant: explicit names win; the `default` (else the first) unnamed one is main."""
    explicit_main = any(v.branch == "main" for v in variants)
    marked = [i for i, v in enumerate(variants) if v.default]
    if len(marked) > 1:
        raise ValueError(f"{fmt}: only one variant can be `default: true` (found {len(marked)})")
    main_index = None if explicit_main else (marked[0] if marked else 0)
    branches = []
    for index, variant in enumerate(variants):
        if variant.branch:
            branches.append(variant.branch)
        elif index == main_index:
            branches.append("main")
        else:
            branches.append(variant.generated_branch())
    return branches


def _format_error(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    where = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", where)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    return f"{where}: {message}" if where else message


def parse_recipe(data: Any, base_dir: Path, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise BadInput(f"{origin}: expected a mapping of keys at the top level")
    try:
        return Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise BadInput(f"{origin}: {_format_error(errors[0])}{more}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; any problem is a BadInput naming the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise BadInput(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_recipe(data, path.parent.resolve(), str(path))


def with_model_path(recipe: Recipe, model_path: str | Path) -> Recipe:
    """The recipe with its source replaced by a local folder (`--model`, e.g. right after training)."""
    source = recipe.source.model_copy(update={"path": Path(model_path).resolve(), "hub": None,
                                              "repo_id": recipe.source.base_model})
    return recipe.model_copy(update={"source": source})
