"""Card data -> README.md text: YAML front matter (huggingface_hub's ModelCardData) + Jinja body."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from jinja2 import ChoiceLoader, DictLoader, FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from ..errors import BadInput
from ..schema import HUB_ID
from .chart import render_chart
from .context import CardInputs, card_context, chart_points
from .escape import FILTERS


def _builtin_templates() -> Path:
    """The card templates: package data in an installed package (pyproject.toml maps the top-level
    templates/ folder to quantize/templates/); in a source checkout (on PYTHONPATH, or installed
    editable) that top-level folder itself."""
    installed = Path(str(files("quantize") / "templates"))
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "templates"


BUILTIN_TEMPLATES = _builtin_templates()
SECTION = re.compile(r"<!-- (\S+) (start|end) -->")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CELL_EDGE = re.compile(r"(?<!\\)\|")


def environment(overrides: dict[str, str] | None = None) -> SandboxedEnvironment:
    """Built-in templates, with a recipe's overrides (name -> text) taking precedence. Sandboxed: a
    template (a recipe's, or one carried in a published record) reaches no Python internals."""
    loader = ChoiceLoader([DictLoader(dict(overrides or {})), FileSystemLoader(str(BUILTIN_TEMPLATES))])
    env = SandboxedEnvironment(loader=loader, autoescape=False,
                               undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                               lstrip_blocks=True)
    env.filters.update(FILTERS)
    return env


def front_matter(context: dict[str, Any], tags: list[str], license_id: str | None) -> ModelCardData:
    """Ours, with license, datasets and language inherited from the original card's metadata."""
    inherited = context["inherited"]
    data: dict[str, Any] = {
        "base_model": context["base_model"], "base_model_relation": "quantized" if context["base_model"] else None,
        "datasets": inherited.get("datasets"), "inference": False, "language": inherited.get("language"),
        "library_name": context["library_name"], "license": license_id or inherited.get("license"),
        "license_name": inherited.get("license_name"), "license_link": inherited.get("license_link"),
        "model_creator": context["creator"], "model_name": context["model_name"],
        "model_type": context["model_type"], "pipeline_tag": "text-generation",
        "prompt_template": context["prompt"].text + ("\n" if not context["prompt"].text.endswith("\n") else ""),
        "quantized_by": context["quantized_by"],
        "tags": list(dict.fromkeys([context["fmt"], "quantized", *tags])),
    }
    return ModelCardData(**{key: value for key, value in data.items() if value is not None})


def _markdown_lines(text: str) -> tuple[list[str], str | None]:
    """The lines outside fenced code blocks, and the fence left open at the end (None if all close)."""
    outside, open_fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if open_fence is None:
            if match:
                open_fence = match.group(1)
            else:
                outside.append(line)
        elif match and match.group(1)[0] == open_fence[0] and len(match.group(1)) >= len(open_fence) \
                and not line.strip().strip(open_fence[0]):
            open_fence = None
    return outside, open_fence


def _table_problems(lines: list[str]) -> list[str]:
    """Rows whose cell count differs from their table's header (a stray `|` or newline in a value)."""
    problems, columns = [], None
    for line in lines:
        if not line.startswith("|"):
            columns = None
            continue
        cells = len(CELL_EDGE.split(line.rstrip())) - 2
        if columns is None:
            columns = cells
        elif cells != columns:
            problems.append(f"a table row has {cells} cells where its header has {columns}: {line[:60]!r}")
    return problems


def validate_card(text: str) -> list[str]:
    """Problems a Hub user would hit: unreadable front matter, bad base_model, unbalanced sections,
    code blocks left open, table rows that don't match their header (checked outside the original card)."""
    problems = []
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:  # the Hub's own parser refuses it: so would the Hub
        return [f"front matter does not parse ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"]
    data = card.data.to_dict()
    for key in ("base_model", "base_model_relation", "model_name", "prompt_template", "quantized_by"):
        if key not in data:
            problems.append(f"front matter lacks {key}")
    base = data.get("base_model")
    if base is not None and not HUB_ID.match(str(base)):
        problems.append(f"base_model {base!r} is not a Hub model id")
    ours = ("\n" + card.text).split("\n<!-- original-model-card start -->", 1)[0]  # the body, less the original
    lines, open_fence = _markdown_lines(ours)
    if open_fence:
        problems.append(f"a code block opened with {open_fence} is never closed")
    open_sections: list[str] = []
    for name, edge in SECTION.findall("\n".join(lines)):
        if edge == "start":
            open_sections.append(name)
        elif not open_sections or open_sections.pop() != name:
            problems.append(f"section marker {name} end without its start")
    problems += [f"section {name} is never closed" for name in open_sections]
    return problems + _table_problems(lines)


def read_template_overrides(folder: Path) -> dict[str, str]:
    """A recipe's `card.templates` folder as name -> text (`partials/x.md.j2` included)."""
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*.j2")) if p.is_file()}


def render_card(inputs: CardInputs, fmt: str) -> str:
    """README.md of one repo: front matter + the format's template; the one way every card is rendered."""
    context = card_context(inputs, fmt)
    recipe = inputs.recipe
    try:
        body = environment(inputs.assets.templates).get_template(f"{fmt}.md.j2").render(**context)
    except TemplateError as exc:
        where = f" ({exc.name}, line {exc.lineno})" if getattr(exc, "lineno", None) and getattr(exc, "name", None) else ""
        raise BadInput(f"card template {fmt}.md.j2{where}: {' '.join(str(exc).split())}") from None
    except Exception as exc:
        if not inputs.assets.templates:
            raise  # the built-in templates failing is our bug, not bad input
        raise BadInput(f"card template {fmt}.md.j2 (card.templates): {type(exc).__name__}: {exc}") from None
    yaml_text = front_matter(context, recipe.release.tags, recipe.source.license).to_yaml()
    text = f"---\n{yaml_text}\n---\n{body}"
    problems = validate_card(text)
    if problems:
        raise BadInput(f"card for {context['repo_id']}: {problems[0]}")
    return text


def render_release_chart(inputs: CardInputs) -> bytes | None:
    """The size-vs-KLD chart of the whole release (the same PNG for every repo), None with nothing measured."""
    points = chart_points(inputs)
    if not points:
        return None
    return render_chart(points, f"{inputs.recipe.source.display_name()}: size and KL divergence from fp16")
