"""What we know about the source model without loading its weights: config, card, chat template.

Reads a local folder or the Hub (config.json, README.md, tokenizer_config.json only). When a Hub
model cannot be reached, the facts are None and a warning says so; the plan still works.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput
from .schema import hub_id_problem
from .stages import folder_fingerprint

if TYPE_CHECKING:
    from .recipe import Recipe

# Decoder families whose MLP has gate, up and down projections (3 matrices of hidden x intermediate).
GATED_MLP = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
             "phi3", "olmo", "olmo2", "granite", "cohere", "deepseek", "internlm2", "starcoder2x"}

# `tie_word_embeddings` when config.json leaves it out: transformers' PretrainedConfig defaults to True,
# and these model types' config classes to False (checked against transformers 5.x).
UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3",
                     "phimoe", "gpt_neox", "olmo", "olmo2", "olmoe", "granite", "granitemoe", "deepseek_v2",
                     "deepseek_v3", "internlm2", "stablelm", "exaone", "nemotron", "jamba", "dbrx", "arcee"}

# Where configs keep their sizes: the Llama-style key first, then the names other families use.
SIZE_KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "vocab_size": ("vocab_size",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "num_local_experts": ("num_local_experts", "num_experts"),
}
CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "max_sequence_length", "seq_length", "n_positions",
                "n_ctx", "max_seq_length")
REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

# Model types that are not causal language models (no text generation): encoders and seq2seq models.
NOT_CAUSAL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                    "camembert", "mpnet", "nomic_bert", "jina_bert", "modernbert", "xlnet", "t5", "mt5", "umt5",
                    "bart", "mbart", "pegasus", "marian", "whisper", "wav2vec2", "vit", "clip", "siglip"}
NOT_CAUSAL_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                    "ForMultipleChoice", "ForNextSentencePrediction", "ForPreTraining", "ForImageClassification",
                    "ForAudioClassification", "ForCTC", "ForSpeechSeq2Seq", "EncoderModel")


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config  # multimodal wrappers keep the LM inside


def config_value(config: dict[str, Any], name: str) -> Any:
    """A size by its Llama-style name, from the text config first, under any of the names families use."""
    for where in (_text_config(config), config):
        for key in SIZE_KEYS.get(name, (name,)):
            if where.get(key) is not None:
                return where[key]
    return None


def context_length(config: dict[str, Any] | None) -> int | None:
    """The model's context window, under whichever key its family uses (text config first)."""
    if not config:
        return None
    for where in (_text_config(config), config):
        for key in CONTEXT_KEYS:
            value = where.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def tied_embeddings(config: dict[str, Any]) -> bool:
    """Whether the output head shares the embedding matrix; when the config is silent, its class's default."""
    for where in (_text_config(config), config):
        if isinstance(where.get("tie_word_embeddings"), bool):
            return where["tie_word_embeddings"]
    model_type = _text_config(config).get("model_type") or config.get("model_type")
    return str(model_type or "").lower() not in UNTIED_BY_DEFAULT


def check_config(config: dict[str, Any], where: str) -> None:
    """BadInput naming the field when config.json's sizes are nonsense (zero, negative, not integers)."""
    def positive_int(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInput(f"{where}: {name} must be a positive integer (got {value!r})")
        return value

    for section in (config, config.get("text_config")):
        if section is None:
            continue
        if not isinstance(section, dict):
            raise BadInput(f"{where}: text_config must be a JSON object")
        for name, keys in SIZE_KEYS.items():
            for key in keys:
                if section.get(key) is not None and not (name == "num_local_experts" and section[key] == 0):
                    positive_int(key, section[key])  # (0 experts: a dense model, as some configs say)
        for key in CONTEXT_KEYS:
            if section.get(key) is not None:
                positive_int(key, section[key])
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(a, str) for a in architectures)):
        raise BadInput(f"{where}: architectures must be a list of class names (got {architectures!r})")
    heads, kv_heads = config_value(config, "num_attention_heads"), config_value(config, "num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise BadInput(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    hidden = config_value(config, "hidden_size")
    if heads and hidden and config_value(config, "head_dim") is None and hidden % heads:
        raise BadInput(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                       "and no head_dim is given")


def causal_problem(config: dict[str, Any]) -> str | None:
    """Why the model is not a causal language model quantize can release, or None."""
    model_type = str(_text_config(config).get("model_type") or config.get("model_type") or "").lower()
    architectures = [str(a) for a in (config.get("architectures") or [])]
    if model_type in NOT_CAUSAL_TYPES or (architectures and all(a.endswith(NOT_CAUSAL_HEADS) for a in architectures)):
        shown = f"{model_type or 'unknown'} model ({', '.join(architectures) or 'no architectures'})"
        return (f"config.json describes a {shown}, not a text-generation (causal LM) model: "
                "quantize releases causal language models only")
    return None


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
        return context_length(self.config)


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


def _size(config: dict[str, Any], name: str) -> int | None:
    value = config_value(config, name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def facts_from_config(config: dict[str, Any]) -> ModelFacts:
    """Sizes from config.json (no counts when its sizes are missing or nonsense: check_config says which)."""
    text_config = _text_config(config)
    model_type = config.get("model_type")
    hidden, layers, heads, vocab = (_size(config, name) for name in REQUIRED_SIZES)
    if not (hidden and layers and heads and vocab):
        return ModelFacts(config, model_type, None, None, ())
    inter = _size(config, "intermediate_size") or 4 * hidden
    kv_heads = _size(config, "num_key_value_heads") or heads
    head_dim = _size(config, "head_dim") or hidden // heads
    experts = _size(config, "num_local_experts") or 1
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp_mats = 3 if (model_type in GATED_MLP or "hidden_act" in text_config and model_type not in ("gpt2",)) else 2
    mlp = mlp_mats * hidden * inter * experts
    linear = layers * (attention + mlp)
    embeddings = vocab * hidden * (1 if tied_embeddings(config) else 2)
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
        if folder.exists() and not folder.is_dir():
            raise BadInput(f"source.path: {folder} is a file, not a model folder (give the folder holding config.json)")
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
    check_config(config, f"source: {config_file}")
    problem = causal_problem(config)
    if problem:
        raise BadInput(f"source: {problem}")
    facts = facts_from_config(config)
    warnings = [] if facts.param_count else ["config.json lacks the usual transformer sizes: no size estimates"]
    return SourceModel(facts, folder, warnings, recipe.source.hub, recipe.source.revision)


# --- the original repo's id ---------------------------------------------------------------------

HUB_CACHE_FOLDER = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def derived_repo_id(folder: Path, config: dict[str, Any] | None) -> tuple[str, str] | None:
    """The original repo a local folder names itself, and how we know; None when it names none.

    A folder in the Hub cache (`models--owner--name/snapshots/<rev>`) says exactly which repo it is.
    Otherwise config.json's `_name_or_path` is taken when it is a Hub id (owner/name), not a path:
    for a model saved after fine-tuning it names the model it was trained from, so a warning says to
    set source.repo_id when that is not the original.
    """
    match = HUB_CACHE_FOLDER.search(folder.as_posix())
    if match and not hub_id_problem(f"{match.group(1)}/{match.group(2)}"):
        return f"{match.group(1)}/{match.group(2)}", "the Hub cache folder it is in"
    name = (config or {}).get("_name_or_path")
    if isinstance(name, str) and not name.startswith((".", "/", "~")) and not hub_id_problem(name) \
            and not (folder / name).exists():
        return name, "config.json's _name_or_path"
    return None


def settle_repo_id(recipe: Recipe, source: SourceModel) -> Recipe:
    """The recipe with source.repo_id set: given, the Hub id, or derived from a local model; else BadInput.

    The cards' front matter needs the original repo (base_model, base_model_relation: quantized).
    """
    if recipe.source.base_model or source.local_path is None:
        return recipe
    found = derived_repo_id(source.local_path, source.facts.config if source.facts else None)
    if found is None:
        raise BadInput("source.repo_id: required when source.path is a local folder: set it to the original "
                       "model's Hub id (owner/name), which the cards name as base_model")
    repo_id, how = found
    source.warnings.append(f"source.repo_id not set: using {repo_id} from {how} "
                           "(set source.repo_id if that is not the original model)")
    return recipe.model_copy(update={"source": recipe.source.model_copy(update={"repo_id": repo_id})})
