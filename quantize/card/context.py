"""Card inputs -> the data a card template renders. Pure: no I/O.

`CardInputs` is built the same way whether the manifests are local (`quantize card`, a release)
or read back from a published repo's records (`quantize card --from-hub`): each produced variant
is a `CardEntry` made from its manifest; planned, not yet produced variants (`--planned`) are
made from the plan. The format plugins turn entries into table rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..calibration import dataset_label, dataset_url
from ..formats import all_formats, get_format
from ..formats.base import Variant
from ..manifest import Manifest
from ..quant_types import format_size
from ..recipe import Recipe
from ..source import context_length
from .escape import fence, md, url
from .original import NO_TEMPLATE, OriginalCard, PromptTemplate

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
    tools: dict[str, str] = field(default_factory=dict)  # library and tool versions it was made with

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "CardEntry":
        return cls(manifest.variant_id, manifest.format, manifest.repo_id, manifest.branch, manifest.name,
                   manifest.requested, manifest.calibration, manifest.description, manifest.total_size, True,
                   [manifest.repo_path(f) for f in manifest.files], manifest.measured, manifest.quality,
                   dict(manifest.tools))

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
        return context_length(self.model_config)

    def gaps(self) -> list[str]:
        """What the card lacks because an input is missing (said in a warning, never silently)."""
        source = self.recipe.source
        missing = []
        if not (source.license or (self.original and self.original.metadata.get("license"))):
            missing.append("the licence (set source.license)")
        if self.original is None:
            missing.append("the original model card (set source.card)")
        if self.prompt.text == NO_TEMPLATE and source.prompt_template is None:
            missing.append("the prompt template, shown as {prompt} (set source.prompt_template)")
        if any(e.size is None for entries in self.entries.values() for e in entries):
            missing.append("the file sizes, shown as ? (config.json could not be read)")
        return missing


# --- cells the format plugins share ------------------------------------------------------------

def ppl_cell(entry: CardEntry) -> str:
    value = entry.quality.get("perplexity")
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def size_cell(entry: CardEntry) -> str:
    if entry.size is None:
        return "?"
    return format_size(entry.size) if entry.produced else "~" + format_size(entry.size)


def dataset_cell(calibration: dict[str, Any] | None) -> str:
    """Markdown, escaped for a table cell: the dataset's name, linked when it is on the Hub."""
    if not calibration:
        return ""
    link = dataset_url(calibration)
    label = md(dataset_label(calibration)).replace("|", "\\|")
    return f"[{label}]({url(link)})" if link else label


def inherited_metadata(original: OriginalCard | None, base_model: str | None, revision: str,
                       license_id: str | None) -> dict[str, Any]:
    """What our front matter takes from the original card: licence (unless the recipe names another),
    licence name and link (a relative link made absolute to the file in the original repo), datasets, language."""
    metadata = original.metadata if original else {}
    inherited = {key: metadata.get(key) for key in ("datasets", "language", "license")}
    if license_id and license_id != metadata.get("license"):
        return {**inherited, "license": license_id}  # another licence: the original's name and link don't apply
    inherited["license_name"] = metadata.get("license_name")
    link = metadata.get("license_link")
    if isinstance(link, str) and link.strip() and not re.match(r"^[a-z][a-z0-9+.-]*:", link.strip(), re.I):
        relative = link.strip().removeprefix("./").lstrip("/")
        link = f"{HUB}/{base_model}/blob/{revision}/{relative}" if base_model and relative else None
    inherited["license_link"] = link if isinstance(link, str) and link else None
    return inherited


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


def _prompt_example(prompt: PromptTemplate) -> str:
    return prompt.text.replace("{prompt}", "Tell me about AI")


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
    original = inputs.original if inputs.original and inputs.original.body.strip() else None
    revision = source.revision if source.hub and source.base_model == source.hub else "main"
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
        "original": original, "header": inputs.assets.header, "footer": inputs.assets.footer,
        "inherited": inherited_metadata(inputs.original, source.base_model, revision, source.license),
        "prompt_example": _prompt_example(inputs.prompt),
        # one fence for every code block holding the prompt template: longer than any backtick run in it
        "prompt_fence": fence(inputs.prompt.text),
        **plugin.card_extras(entries),
    }
