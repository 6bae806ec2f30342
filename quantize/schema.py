"""The recipe's shared sections (source, release, calibration, publish, card) and value types.

Format sections live with their format plugins (quantize/formats/); recipe.py assembles them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BRANCH_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # our own branches: one path component, no odd characters
HUB_NAME_MAX = 96  # the Hub's limit on a repo name (and a namespace)
COMMIT_SHA = re.compile(r"^[0-9a-f]{7,64}$")


# --- names as the Hub and git check them ---------------------------------------------------------

def hub_name_problem(part: str) -> str | None:
    """Why the Hub would refuse `part` as a namespace or repo name (huggingface_hub's rules), or None."""
    if not part:
        return "is empty"
    if len(part) > HUB_NAME_MAX:
        return f"is {len(part)} characters long; the Hub allows at most {HUB_NAME_MAX}"
    if not re.fullmatch(r"[\w.-]+", part, re.ASCII):
        return f"may only hold letters, digits, '-', '_' and '.' (got {part!r})"
    if not (part[0].isalnum() and part[-1].isalnum()):
        return f"must start and end with a letter or digit (got {part!r})"
    if "--" in part or ".." in part:
        return f"cannot contain '--' or '..' (got {part!r})"
    if part.endswith(".git"):
        return f"cannot end with '.git' (got {part!r})"
    return None


def hub_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a Hub model id `namespace/name` the Hub accepts, or None."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        return f"must be namespace/name (got {repo_id!r})"
    for what, part in zip(("namespace", "name"), parts):
        problem = hub_name_problem(part)
        if problem:
            return f"{what} {problem}"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:  # the library's own check, should its rules ever be stricter than ours
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def ref_name_problem(name: str, allow_slash: bool = False) -> str | None:
    """Why git would refuse `name` as a branch (`git check-ref-format --branch`), or None.

    The rules of git-check-ref-format(1): no component starting with '.' or ending with '.lock',
    no '..', no control characters, space, '~', '^', ':', '?', '*', '[' or '\\', not starting
    with '-', not ending with '/' or '.', no '//', no '@{', not '@'.
    """
    if not name:
        return "is empty"
    if name == "@":
        return "cannot be '@'"
    if name.startswith("-"):
        return f"cannot start with '-' (got {name!r})"
    bad = sorted({c for c in name if ord(c) < 0x20 or ord(c) == 0x7F or c in " ~^:?*[\\"})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"cannot contain {shown} (got {name!r})"
    if ".." in name:
        return f"cannot contain '..' (got {name!r})"
    if "@{" in name:
        return f"cannot contain '@{{' (got {name!r})"
    if not allow_slash and "/" in name:
        return f"cannot contain '/' (got {name!r})"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return f"cannot start or end with '/' or contain '//' (got {name!r})"
    if name.endswith("."):
        return f"cannot end with '.' (got {name!r})"
    for component in name.split("/"):
        if component.startswith("."):
            return f"cannot have a part starting with '.' (got {name!r})"
        if component.endswith(".lock"):
            return f"cannot have a part ending with '.lock' (got {name!r})"
    return None


def branch_name_problem(name: str) -> str | None:
    """Why `name` can't be one of our branches: git's rules, and one plain path component."""
    problem = ref_name_problem(name)
    if problem:
        return problem
    if not BRANCH_NAME.match(name):
        return f"may only hold letters, digits, '-', '_' and '.', starting with a letter or digit (got {name!r})"
    return None


def url_problem(url: str) -> str | None:
    """Why `url` is not a plain http(s) link a card can show, or None."""
    from urllib.parse import urlsplit

    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return f"cannot contain spaces or control characters (got {url!r})"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return f"must be an http:// or https:// address (got {url!r})"
    return None


def _group_size(value: Any) -> Any:
    """`none`, null and -1 all mean one group per row; stored as None."""
    if value is None or value == -1 or (isinstance(value, str) and value.strip().lower() in ("none", "-1")):
        return None
    return value


def _power_of_two_group(value: int | None) -> int | None:
    if value is not None and (value < 16 or value > 1024 or value & (value - 1)):
        raise ValueError(f"must be a power of two from 16 to 1024, or none (got {value})")
    return value


GroupSize = Annotated[int | None, BeforeValidator(_group_size), AfterValidator(_power_of_two_group)]


def group_size_on_disk(group_size: int | None) -> int:
    """The value config files and loaders use: -1 for one group per row."""
    return -1 if group_size is None else group_size


def group_size_label(group_size: int | None) -> str:
    """How cards and the CLI write it: "None" for one group per row."""
    return "None" if group_size is None else str(group_size)


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
    trust_remote_code: bool = False  # run the model's own Python code (auto_map, *.py) in loaders and the converter

    @field_validator("hub", "repo_id")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        problem = hub_id_problem(value) if value is not None else None
        if problem:
            raise ValueError(f"not a Hub model id: {problem}")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        problem = None if COMMIT_SHA.match(value) else ref_name_problem(value, allow_slash=True)
        if problem:
            raise ValueError(f"not a branch, tag or commit git accepts: {problem}")
        return value

    @field_validator("creator_url")
    @classmethod
    def _creator_url(cls, value: str | None) -> str | None:
        problem = url_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of source.path (local folder) or source.hub (Hub id)")
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
        problem = hub_name_problem(value)
        if problem:
            raise ValueError(f"the Hub refuses this name: it {problem}")
        return value

    def repo_problem(self, fmt: str) -> str | None:
        """Why the Hub would refuse the repo of format `fmt` (e.g. a basename too long for "-GPTQ")."""
        problem = hub_id_problem(self.repo_id(fmt))
        return f"the repo name {self.repo_id(fmt)!r} {problem.removeprefix('name ')}" if problem else None

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


class Publish(Strict):
    target: Literal["hub", "local", "none"] = "local"
    path: Path | None = None  # local target: where the git repositories go (default: <out>/repos)


class CardOptions(Strict):
    header: Path | None = None  # Markdown inserted verbatim after the front matter
    footer: Path | None = None  # Markdown inserted verbatim before the original card
    templates: Path | None = None  # a folder of templates overriding the built-in ones


class QualityOptions(Strict):
    """How every variant is evaluated against the fp16 reference (quantize/evaluate.py), and the gate it must pass."""

    max_kld: float = Field(1.0, gt=0)  # nats: a variant whose mean KL divergence is above it is not published
    windows: int = Field(20, ge=1, le=10_000)  # 512-token windows of the held-out text scored (at most)


class Compute(Strict):
    """Where GPTQ/AWQ quantize, verify and evaluate (see quantize/devices.py); `--device` overrides it."""

    device: str = "auto"  # auto (cuda:0 when CUDA is available, else cpu), cpu, cuda or cuda:N
    # none: the model is held in memory while GPTQ/AWQ quantize and evaluate; disk: its layers are
    # streamed from disk (GPTQModel's offload_to_disk, accelerate's disk offload), for models bigger than RAM
    offload: Literal["none", "disk"] = "none"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from .devices import device_problem

        problem = device_problem(value)
        if problem:
            raise ValueError(problem)
        return value
