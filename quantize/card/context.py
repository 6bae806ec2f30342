"""Card inputs -> the data a card template renders. Pure: no I/O.

`CardInputs` is built the same way whether the manifests are local (`quantize card`, a release)
or read back from a published repo's records (`quantize card --from-hub`): each produced variant
is a `CardEntry` made from its manifest; planned, not yet produced variants (`--planned`) are
made from the plan. The format plugins turn entries into table rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..calibration import dataset_label, dataset_url
from ..formats import all_formats, get_format
from ..formats.base import Variant
from ..manifest import Manifest
from ..quant_types import format_size
from ..recipe import Recipe
from .original import OriginalCard, PromptTemplate

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class CardEntry:
    """One variant as a card shows it: from its manifest (produced) or the plan (planned)."""

    id: str
    format: str
    repo_id: str
    branch: str
    name: str  # branch or GGUF type
    params: dict[str, Any]  # requested parameters
    calibration: dict[str, Any] | None
    description: str
    size: int | None
    produced: bool
    files: list[str] = field(default_factory=list)  # the files, as paths in the repo
    measured: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "CardEntry":
        return cls(manifest.variant_id, manifest.format, manifest.repo_id, manifest.branch, manifest.name,
                   manifest.requested, manifest.calibration, manifest.description, manifest.total_size, True,
                   [manifest.repo_path(f) for f in manifest.files], manifest.measured, manifest.quality)

    @classmethod
    def from_variant(cls, variant: Variant) -> "CardEntry":
        return cls(variant.id, variant.format, variant.repo_id, variant.branch, variant.name, variant.params,
                   variant.calibration_summary, variant.description, variant.estimated_bytes, False,
                   [variant.file_name] if variant.file_name else [])


@dataclass(frozen=True)
class CardAssets:
    """What the recipe adds to its cards: header and footer Markdown, template overrides by name."""

    header: str | None = None
    footer: str | None = None
    templates: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "footer": self.footer, "templates": self.templates}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "CardAssets":
        data = data or {}
        return cls(data.get("header"), data.get("footer"), dict(data.get("templates") or {}))


@dataclass(frozen=True)
class CardInputs:
    """Everything the cards of a release are rendered from."""

    recipe: Recipe
    model_config: dict[str, Any] | None  # the source's config.json
    entries: dict[str, list[CardEntry]]  # by format: every format of the release, in recipe order
    original: OriginalCard | None
    prompt: PromptTemplate
    assets: CardAssets = CardAssets()

    @property
    def model_type(self) -> str | None:
        return (self.model_config or {}).get("model_type")

    @property
    def context_length(self) -> int | None:
        config = self.model_config or {}
        return (config.get("text_config") or config).get("max_position_embeddings")


# --- cells the format plugins share ------------------------------------------------------------

def ppl_cell(entry: CardEntry) -> str:
    value = entry.quality.get("perplexity")
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def size_cell(entry: CardEntry) -> str:
    if entry.size is None:
        return "?"
    return format_size(entry.size) if entry.produced else "~" + format_size(entry.size)


def dataset_cell(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return ""
    url = dataset_url(calibration)
    label = dataset_label(calibration)
    return f"[{label}]({url})" if url else label


# --- the template data -------------------------------------------------------------------------

def _repositories(inputs: CardInputs, creator_title: str) -> list[dict[str, str]]:
    recipe = inputs.recipe
    repos = []
    for plugin in sorted(all_formats(), key=lambda p: p.card_order):
        section = getattr(recipe, plugin.name)
        if section is not None:
            repos.append({"label": plugin.repository_label(section),
                          "url": f"{HUB}/{recipe.release.repo_id(plugin.title)}"})
    base = recipe.source.base_model
    if base:
        repos.append({"label": f"{creator_title} original unquantised fp16 model in pytorch format, "
                               "for GPU inference and for further conversions", "url": f"{HUB}/{base}"})
    return repos


def _quality(entries: list[CardEntry]) -> dict[str, Any] | None:
    measured = [e for e in entries if "perplexity" in e.quality]
    if not measured:
        return None
    first = measured[0]
    quality = first.quality
    return {"engine": quality.get("engine", ""), "baseline": quality.get("baseline_perplexity"),
            "evaluation": quality.get("eval_text") or (first.calibration or {}).get("evaluation", ""),
            "dataset": quality.get("dataset") or (dataset_label(first.calibration) if first.calibration else "held-out")}


def card_context(inputs: CardInputs, fmt: str) -> dict[str, Any]:
    """Everything a `<fmt>.md.j2` template needs, from data alone."""
    plugin = get_format(fmt)
    recipe = inputs.recipe
    source = recipe.source
    name = source.display_name()
    creator = source.creator or (source.base_model.split("/")[0] if source.base_model else None)
    creator_title = f"{creator}'s" if creator else "The"
    creator_url = source.creator_url or (f"{HUB}/{source.base_model.split('/')[0]}" if source.base_model else None)
    entries = inputs.entries.get(fmt, [])
    rows = [plugin.card_row(entry, inputs.model_type) for entry in entries]
    repo_id = recipe.release.repo_id(plugin.title)
    return {
        "fmt": fmt, "title": plugin.title, "repo_id": repo_id, "library_name": plugin.library_name,
        "repo_name": repo_id.split("/")[-1], "basename": recipe.release.basename,
        "model_name": name, "creator": creator, "creator_url": creator_url,
        "original_title": f"{creator_title} {name}" if creator else name,
        "base_model": source.base_model, "base_model_url": f"{HUB}/{source.base_model}" if source.base_model else None,
        "quantized_by": recipe.release.author, "prompt": inputs.prompt, "rows": rows,
        "has_ppl": any(r["ppl"] for r in rows), "planned_only": not any(e.produced for e in entries),
        "repositories": _repositories(inputs, creator_title),
        "quality": _quality([e for e in entries if e.produced]),
        "context_length": inputs.context_length or 4096,
        "model_type": inputs.model_type,
        "original": inputs.original, "header": inputs.assets.header, "footer": inputs.assets.footer,
        **plugin.card_extras(entries),
    }
