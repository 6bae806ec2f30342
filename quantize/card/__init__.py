"""Model cards: README.md for each repo of a release, from the recipe and the manifests alone.

original.py reads the source model's card and prompt template, context.py turns card inputs
(recipe, manifests, original card) into template data (pure), render.py renders the Jinja
templates and the front matter. This module builds the inputs from a local output folder;
publish/regenerate.py builds the same inputs from a published repo's records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, read_user_text
from ..manifest import Manifest, read_manifest, write_atomic
from ..plan import Plan
from .chart import CHART_FILE
from .context import CardAssets, CardEntry, CardInputs
from .original import OriginalCard, PromptTemplate, load_original_card, prompt_template, split_card
from .render import read_template_overrides, render_card, render_release_chart, validate_card

CARDS_DIR = "cards"
CARD_FILE = "README.md"

__all__ = ["RenderedCard", "render_cards", "card_path", "collect_manifests", "split_card", "validate_card", "OriginalCard",
           "PromptTemplate", "CardAssets", "CardEntry", "CardInputs", "card_assets", "check_cards", "local_card_inputs",
           "plan_card_inputs"]


@dataclass
class RenderedCard:
    fmt: str
    repo_id: str
    path: Path
    text: str
    produced: list[str]  # variant ids with a manifest
    missing: list[str]  # planned variant ids without one (left out of the card unless planned=True)
    warnings: list[str] = field(default_factory=list)  # what the card lacks for want of an input, one line each
    chart: bytes | None = None  # the release's size-vs-KLD chart (PNG), committed next to README.md

    def files(self) -> dict[str, bytes]:
        """What the card puts on each branch of its repo: README.md and, once files are measured, the chart."""
        return {CARD_FILE: self.text.encode("utf-8"), **({CHART_FILE: self.chart} if self.chart else {})}


def card_path(out_dir: Path, repo_id: str) -> Path:
    return Path(out_dir) / CARDS_DIR / repo_id.split("/")[-1] / CARD_FILE


def collect_manifests(plan: Plan, out_dir: Path) -> dict[str, Manifest]:
    found = {v.id: read_manifest(out_dir, v.id) for v in plan.variants}
    return {key: manifest for key, manifest in found.items() if manifest is not None}


def _read_optional(recipe, path: Path | None, what: str) -> str | None:
    resolved = recipe.resolve(path)
    if resolved is None:
        return None
    return read_user_text(resolved, f"card.{what}").rstrip("\n")


def card_assets(recipe) -> CardAssets:
    """The recipe's header, footer and template overrides, read once (and kept in the release record)."""
    templates = recipe.resolve(recipe.card.templates)
    if templates is not None and not templates.is_dir():
        what = "is not a folder" if templates.exists() else "does not exist"
        raise BadInput(f"card.templates: {templates} {what}")
    try:
        overrides = read_template_overrides(templates) if templates else {}
    except UnicodeDecodeError as exc:
        raise BadInput(f"card.templates: a template in {templates} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise BadInput(f"card.templates: cannot read {exc.filename} ({exc.strerror})") from None
    return CardAssets(_read_optional(recipe, recipe.card.header, "header"),
                      _read_optional(recipe, recipe.card.footer, "footer"), overrides)


def plan_card_inputs(plan: Plan, manifests: dict[str, Manifest], original: OriginalCard | None,
                     prompt: PromptTemplate, assets: CardAssets = CardAssets(),
                     include_planned: bool = False) -> CardInputs:
    """Card inputs from a plan and its produced variants' manifests (pure)."""
    entries = {fmt: [CardEntry.from_manifest(manifests[v.id]) if v.id in manifests else CardEntry.from_variant(v)
                     for v in plan.of_format(fmt) if include_planned or v.id in manifests]
               for fmt in plan.formats}
    return CardInputs(plan.recipe, plan.source.facts.config if plan.source.facts else None, entries,
                      original, prompt, assets)


def local_card_inputs(plan: Plan, out_dir: Path, include_planned: bool = False,
                      manifests: dict[str, Manifest] | None = None) -> CardInputs:
    """Card inputs from the manifests in `out_dir` (or `manifests`; and the plan, for planned variants)."""
    recipe = plan.recipe
    found = collect_manifests(plan, out_dir) if manifests is None else manifests
    return plan_card_inputs(plan, found, load_original_card(recipe),
                            prompt_template(recipe), card_assets(recipe), include_planned)


def render_cards(plan: Plan, out_dir: Path, include_planned: bool = False, write: bool = True,
                 manifests: dict[str, Manifest] | None = None) -> list[RenderedCard]:
    """Render every repo's card from the manifests in `out_dir` (or the given ones: what a publish puts
    on the branches, published variants not made here included); write them to <out>/cards/<repo>/."""
    inputs = local_card_inputs(plan, out_dir, include_planned, manifests)
    gaps = inputs.gaps()
    unreachable = f" (could not reach {plan.source.hub} on the Hub)" if plan.source.facts is None and plan.source.hub else ""
    cards = []
    chart = render_release_chart(inputs)
    for fmt in plan.formats:
        ids = [v.id for v in plan.of_format(fmt)]
        produced = [e.id for e in inputs.entries[fmt] if e.produced]
        if not produced and not include_planned:
            continue
        text = render_card(inputs, fmt)
        repo_id = plan.repo_ids()[fmt]
        path = card_path(out_dir, repo_id)
        warnings = [f"{repo_id}: the card lacks {'; '.join(gaps)}{unreachable}"] if gaps else []
        cards.append(RenderedCard(fmt, repo_id, path, text, produced, [i for i in ids if i not in produced], warnings,
                                  chart))
    if write:  # only once every card rendered and passed its checks
        for card in cards:
            for name, data in card.files().items():
                write_atomic(card.path.with_name(name), data)
            if card.chart is None:
                card.path.with_name(CHART_FILE).unlink(missing_ok=True)  # nothing measured any more: no stale chart
    return cards


def check_cards(plan: Plan, out_dir: Path) -> list[RenderedCard]:
    """Render every card of the plan as it will be once every variant is made (produced variants from
    their manifests, the rest from the plan) and check it, writing nothing: BadInput before any work
    for a card the release would fail on at the end (front matter, templates, header, original card)."""
    return render_cards(plan, out_dir, include_planned=True, write=False)
