"""Model cards: README.md for each repo of a release, from the recipe and the manifests alone.

original.py reads the source model's card and prompt template, context.py turns plan + manifests
into template data (pure), render.py renders the Jinja templates and the front matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..manifest import Manifest, read_manifest, write_atomic
from ..plan import Plan
from .context import card_context
from .original import OriginalCard, PromptTemplate, load_original_card, prompt_template, split_card
from .render import render_card, validate_card

CARDS_DIR = "cards"

__all__ = ["RenderedCard", "render_cards", "card_path", "collect_manifests", "split_card", "validate_card", "OriginalCard",
           "PromptTemplate"]


@dataclass
class RenderedCard:
    fmt: str
    repo_id: str
    path: Path
    text: str
    produced: list[str]  # variant ids with a manifest
    missing: list[str]  # planned variant ids without one (left out of the card unless planned=True)


def card_path(out_dir: Path, repo_id: str) -> Path:
    return Path(out_dir) / CARDS_DIR / repo_id.split("/")[-1] / "README.md"


def collect_manifests(plan: Plan, out_dir: Path) -> dict[str, Manifest]:
    found = {v.id: read_manifest(out_dir, v.id) for v in plan.variants}
    return {key: manifest for key, manifest in found.items() if manifest is not None}


def _read_optional(plan: Plan, path: Path | None, what: str) -> str | None:
    resolved = plan.recipe.resolve(path)
    if resolved is None:
        return None
    try:
        return resolved.read_text(encoding="utf-8").rstrip("\n")
    except OSError:
        raise BadInput(f"card.{what}: cannot read {resolved}") from None


def render_cards(plan: Plan, out_dir: Path, include_planned: bool = False, write: bool = True) -> list[RenderedCard]:
    """Render every repo's card from the manifests in `out_dir`; write them to <out>/cards/<repo>/."""
    recipe = plan.recipe
    manifests = collect_manifests(plan, out_dir)
    original = load_original_card(recipe)
    prompt = prompt_template(recipe)
    header = _read_optional(plan, recipe.card.header, "header")
    footer = _read_optional(plan, recipe.card.footer, "footer")
    templates = recipe.resolve(recipe.card.templates)
    cards = []
    for fmt in plan.formats:
        ids = [v.id for v in plan.of_format(fmt)]
        produced = [i for i in ids if i in manifests]
        if not produced and not include_planned:
            continue
        context = card_context(plan, fmt, manifests, original, prompt, include_planned, header, footer)
        text = render_card(context, recipe.release.tags, recipe.source.license, templates)
        path = card_path(out_dir, context["repo_id"])
        if write:
            write_atomic(path, text.encode("utf-8"))
        cards.append(RenderedCard(fmt, context["repo_id"], path, text, produced,
                                  [i for i in ids if i not in manifests]))
    return cards
