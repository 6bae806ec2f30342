"""What we know about the source model without loading its weights: config, card, chat template.

Reads a local folder or the Hub (config.json, README.md, tokenizer_config.json only). When a Hub
model cannot be reached, the facts are None and a warning says so; the plan still works.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput
from .stages import folder_fingerprint

if TYPE_CHECKING:
    from .recipe import Recipe

# Decoder families whose MLP has gate, up and down projections (3 matrices of hidden x intermediate).
GATED_MLP = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
             "phi3", "olmo", "olmo2", "granite", "cohere", "deepseek", "internlm2", "starcoder2x"}


@dataclass(frozen=True)
class ModelFacts:
    """Shapes and sizes from config.json: enough to plan, estimate sizes and check group sizes."""

    config: dict[str, Any]
    model_type: str | None
    param_count: int | None  # all weights
    linear_param_count: int | None  # weights of the decoder's Linear layers (what GPTQ/AWQ quantize)
    linear_in_features: tuple[int, ...]  # distinct input widths of those layers

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def context_length(self) -> int | None:
        return self.config.get("max_position_embeddings")


@dataclass
class SourceModel:
    """The source model as the plan and the card see it."""

    facts: ModelFacts | None  # None: config.json could not be reached (Hub offline)
    local_path: Path | None
    warnings: list[str] = field(default_factory=list)
    hub: str | None = None  # a Hub source: its id and revision
    revision: str = "main"

    @cached_property
    def identity(self) -> str:
        """What the variants are made from: a local folder's files, or the Hub id at its revision."""
        if self.local_path is not None:
            return f"local:{folder_fingerprint(self.local_path)}"
        return f"hub:{self.hub}@{self.revision}"

    @property
    def model_type(self) -> str | None:
        return self.facts.model_type if self.facts else None


def facts_from_config(config: dict[str, Any]) -> ModelFacts:
    text_config = config.get("text_config") or config  # multimodal wrappers keep the LM inside
    model_type = config.get("model_type")
    try:
        hidden = int(text_config["hidden_size"])
        layers = int(text_config["num_hidden_layers"])
        heads = int(text_config["num_attention_heads"])
        vocab = int(text_config["vocab_size"])
        inter = int(text_config.get("intermediate_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError):
        return ModelFacts(config, model_type, None, None, ())
    kv_heads = int(text_config.get("num_key_value_heads") or heads)
    head_dim = int(text_config.get("head_dim") or hidden // heads)
    experts = int(text_config.get("num_local_experts") or 1)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp_mats = 3 if (model_type in GATED_MLP or "hidden_act" in text_config and model_type not in ("gpt2",)) else 2
    mlp = mlp_mats * hidden * inter * experts
    linear = layers * (attention + mlp)
    embeddings = vocab * hidden * (1 if text_config.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    norms = (2 * layers + 1) * hidden
    widths = tuple(sorted({hidden, heads * head_dim, inter}))
    return ModelFacts(config, model_type, linear + embeddings + norms, linear, widths)


@lru_cache(maxsize=8)
def hub_reachable(endpoint: str) -> bool:
    """One quick request, no retries: the Hub client would retry an unreachable host for half a minute."""
    from huggingface_hub import get_session

    try:
        get_session().head(f"{endpoint}/api/models", timeout=5)
    except Exception:  # any transport failure means "not reachable"
        return False
    return True


def _hub_file(repo_id: str, revision: str, filename: str) -> Path | None:
    """Download one small file from the Hub; None when it is missing or the Hub can't be reached."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline))
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None


def source_file(recipe: Recipe, filename: str) -> Path | None:
    """A file of the source model: from its local folder, else from the Hub (None if unavailable)."""
    folder = recipe.resolve(recipe.source.path)
    if folder is not None:
        candidate = folder / filename
        return candidate if candidate.is_file() else None
    return _hub_file(recipe.source.hub, recipe.source.revision, filename)


CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def links_out_of(folder: Path) -> list[tuple[Path, Path]]:
    """Symlinks in `folder` whose targets lie outside it (a Hugging Face cache snapshot's links into
    its own `blobs/` are inside): (link, target) pairs."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev>/ -> ../../blobs/
        roots.append((folder.parent.parent / "blobs").resolve())
    found = []
    for current, dirs, files in os.walk(folder):  # links to folders are listed, not entered
        for name in [*dirs, *files]:
            path = Path(current) / name
            if path.is_symlink():
                target = path.resolve()
                if not any(target == root or root in target.parents for root in roots):
                    found.append((path, target))
    return found


def _auto_map(path: Path | None) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("auto_map"))


def model_code(recipe: Recipe, folder: Path | None) -> list[str]:
    """Why loading the model would run its own Python code: auto_map entries, *.py files."""
    reasons = [f"{name} has an auto_map" for name in CODE_CONFIGS if _auto_map(source_file(recipe, name))]
    if folder is not None:
        reasons += [f"{path.relative_to(folder)} is Python code" for path in sorted(folder.rglob("*.py"))]
    return reasons


def check_model_folder(recipe: Recipe, folder: Path | None) -> None:
    """Before any work: no symlink out of the model folder, and no code of the model's own unless trusted."""
    if folder is not None:
        links = links_out_of(folder)
        if links:
            link, target = links[0]
            raise BadInput(f"source.path: {link.relative_to(folder)} is a symlink to {target}, outside the model "
                           "folder: quantize does not follow it (copy the file into the folder)")
    if recipe.source.trust_remote_code:
        return
    reasons = model_code(recipe, folder)
    if reasons:
        more = f" and {len(reasons) - 1} more" if len(reasons) > 1 else ""
        raise BadInput(f"source: the model ships its own code ({reasons[0]}{more}), which quantize does not run: "
                       "set source.trust_remote_code: true in the recipe only if you trust that code")


def inspect_source(recipe: Recipe) -> SourceModel:
    """Config facts of the source model; BadInput when a local folder is missing or incomplete, has
    symlinks leading out of it, or ships code of its own the recipe doesn't trust."""
    folder = recipe.resolve(recipe.source.path)
    if folder is not None:
        if not folder.is_dir():
            raise BadInput(f"source.path: model folder {folder} does not exist")
        if not (folder / "config.json").is_file():
            raise BadInput(f"source.path: no config.json in {folder}")
    check_model_folder(recipe, folder)
    config_file = source_file(recipe, "config.json")
    if config_file is None:
        return SourceModel(None, None, [f"could not reach {recipe.source.hub} on the Hub: planning without size estimates"],
                           recipe.source.hub, recipe.source.revision)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"source: {config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise BadInput(f"source: {config_file} is not a JSON object")
    facts = facts_from_config(config)
    warnings = [] if facts.param_count else ["config.json lacks the usual transformer sizes: no size estimates"]
    return SourceModel(facts, folder, warnings, recipe.source.hub, recipe.source.revision)
