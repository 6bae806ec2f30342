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
from .chart import CHART_FILE, ChartPoint
from .choose import Candidate, choose, context_label
from .escape import cell, fence, md, url
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

NO_VALUE = "—"  # a figure the manifest lacks (made before quantize measured it)
QUALITY_KEYS = ("perplexity", "kld_mean", "kld_p99", "top1_agreement")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def kld_text(value: Any) -> str:
    number = _number(value)
    return NO_VALUE if number is None else f"{number:.3g}"


def quality_cells(entry: CardEntry) -> dict[str, str]:
    """The quality columns every card of a release shows, the same for every format."""
    quality = entry.quality
    ppl, top1 = _number(quality.get("perplexity")), _number(quality.get("top1_agreement"))
    return {"ppl": NO_VALUE if ppl is None else f"{ppl:.2f}", "kld": kld_text(quality.get("kld_mean")),
            "kld_p99": kld_text(quality.get("kld_p99")), "top1": NO_VALUE if top1 is None else f"{top1:.1%}"}


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


def _release_entries(inputs: CardInputs) -> list[tuple[Any, CardEntry]]:
    """Every variant of the release (all formats, in card order) with its plugin."""
    return [(get_format(fmt), entry) for fmt, entries in inputs.entries.items() for entry in entries]


def _quality(inputs: CardInputs) -> dict[str, Any] | None:
    """The evaluation note: the same for every card of the release (every format's measured files)."""
    measured = [(plugin, e) for plugin, e in _release_entries(inputs)
                if e.produced and any(_number(e.quality.get(key)) is not None for key in QUALITY_KEYS)]
    if not measured:
        return None
    first = measured[0][1]
    quality = first.quality
    engines: dict[str, list[str]] = {}  # engine -> the formats it scored
    baselines: dict[float, list[str]] = {}  # fp16 perplexity -> the engines that measured it
    for plugin, entry in measured:
        engine = str(entry.quality.get("engine") or "quantize")
        if plugin.title not in engines.setdefault(engine, []):
            engines[engine].append(plugin.title)
        baseline = _number(entry.quality.get("baseline_perplexity"))
        if baseline is not None and engine not in baselines.setdefault(round(baseline, 2), []):
            baselines[round(baseline, 2)].append(engine)
    # one protocol: every file scored on the same tokens against one fp16 reference (older manifests were not)
    one_protocol = len(baselines) == 1 and all(_number(e.quality.get("kld_mean")) is not None
                                               and e.quality.get("eval_tokens") for _, e in measured)
    return {"engines": [{"engine": engine, "formats": formats} for engine, formats in engines.items()],
            "baselines": [{"value": value, "engines": names} for value, names in baselines.items()],
            "tokens": quality.get("eval_tokens"), "windows": quality.get("eval_windows"),
            "window": quality.get("eval_window"), "has_protocol": one_protocol,
            "missing_kld": any(_number(e.quality.get("kld_mean")) is None for _, e in measured),
            "evaluation": quality.get("eval_text") or (first.calibration or {}).get("evaluation", ""),
            "dataset": quality.get("dataset") or (dataset_label(first.calibration) if first.calibration else "held-out")}


def entry_url(plugin: Any, entry: CardEntry) -> str:
    """Where a variant is on the Hub: its branch, or its (first) file on main."""
    if plugin.one_branch_per_variant or not entry.files:
        return f"{HUB}/{entry.repo_id}/tree/{entry.branch}"
    return f"{HUB}/{entry.repo_id}/blob/{entry.branch}/{entry.files[0]}"


def candidates(inputs: CardInputs) -> list[Candidate]:
    """Every variant of the release as the choice and the chart see it."""
    return [Candidate(entry.id, f"{plugin.title} {plugin.short_label(entry)}", entry_url(plugin, entry), entry.size,
                      _number(entry.quality.get("kld_mean")) if entry.produced else None, plugin.memory_kinds,
                      not entry.produced)
            for plugin, entry in _release_entries(inputs)]


def chart_points(inputs: CardInputs) -> list[ChartPoint]:
    """The release's measured files for the size-vs-KLD chart, one series per format, in card order."""
    return [ChartPoint(plugin.title, plugin.short_label(entry), entry.size, kld)
            for plugin, entry in _release_entries(inputs)
            if entry.produced and entry.size is not None and (kld := _number(entry.quality.get("kld_mean"))) is not None]


MEMORY_LABELS = {"RAM": "RAM (CPU)", "VRAM": "VRAM (GPU)"}


def _gb(value: float) -> str:
    return f"{value:g} GB"


def _which_file(inputs: CardInputs) -> dict[str, Any]:
    """The "Which file should I choose?" section's data, computed by choose.py."""
    choice = choose(candidates(inputs), inputs.model_config)

    def pick(candidate: Candidate | None) -> str:
        return f"[{cell(candidate.label)}]({candidate.url}) (KLD {kld_text(candidate.kld)})" if candidate else "nothing fits"

    columns = [(kind, tokens) for kind in choice.kinds for tokens in choice.contexts]
    kv = choice.kv
    return {
        "kv": {"layers": kv.layers, "kv_heads": kv.kv_heads, "head_dim": kv.head_dim, "value_bytes": kv.value_bytes,
               "per_token": f"{kv.bytes_per_token:,}",
               "at": [{"tokens": f"{t:,}", "size": format_size(kv.bytes(t))} for t in choice.contexts]} if kv else None,
        "contexts": [context_label(t) for t in choice.contexts],
        "columns": [f"{MEMORY_LABELS[kind]}, {context_label(tokens)} context" for kind, tokens in columns],
        "budgets": [{"budget": _gb(gb), "picks": [pick(picks[column]) for column in columns]}
                    for gb, picks in choice.budgets],
        "files": [{"label": cell(c.label), "url": c.url, "runs_in": " or ".join(c.memory_kinds),
                   "size": ("~" if c.estimated else "") + format_size(c.size) if c.size is not None else "?",
                   "kld": kld_text(c.kld),
                   "needs": [("~" if c.estimated else "") + format_size(n) if n is not None else "?" for n in needs]}
                  for c, needs in choice.needs],
        "best": {"label": md(choice.best_per_gb.label), "url": choice.best_per_gb.url,
                 "size": format_size(choice.best_per_gb.size), "kld": kld_text(choice.best_per_gb.kld)}
        if choice.best_per_gb else None,
        "ranked": choice.ranked, "kinds": list(choice.kinds),
    }


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
    rows = [{**plugin.card_row(entry, inputs.model_type), **quality_cells(entry)} for entry in entries]
    quality = _quality(inputs)
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
        "has_quality": quality is not None, "planned_only": not any(e.produced for e in entries),
        "repositories": _repositories(inputs, creator_title),
        "quality": quality, "which_file": _which_file(inputs),
        "chart": CHART_FILE if chart_points(inputs) else None,
        "context_length": inputs.context_length or 4096,
        "model_type": inputs.model_type,
        "original": original, "header": inputs.assets.header, "footer": inputs.assets.footer,
        "inherited": inherited_metadata(inputs.original, source.base_model, revision, source.license),
        "prompt_example": _prompt_example(inputs.prompt),
        # one fence for every code block holding the prompt template: longer than any backtick run in it
        "prompt_fence": fence(inputs.prompt.text),
        **plugin.card_extras(entries),
    }
