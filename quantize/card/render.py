"""Card data -> README.md text: YAML front matter (huggingface_hub's ModelCardData) + Jinja body."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from jinja2 import ChoiceLoader, DictLoader, FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from ..errors import BadInput
from ..schema import HUB_ID
from .context import CardInputs, card_context

BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates"
SECTION = re.compile(r"<!-- (\S+) (start|end) -->")


def _cell(value: Any) -> str:
    """A value made safe for a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def environment(overrides: dict[str, str] | None = None) -> SandboxedEnvironment:
    """Built-in templates, with a recipe's overrides (name -> text) taking precedence. Sandboxed: a
    template (a recipe's, or one carried in a published record) reaches no Python internals."""
    loader = ChoiceLoader([DictLoader(dict(overrides or {})), FileSystemLoader(str(BUILTIN_TEMPLATES))])
    env = SandboxedEnvironment(loader=loader, autoescape=False,
                               undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                               lstrip_blocks=True)
    env.filters["cell"] = _cell
    return env


def front_matter(context: dict[str, Any], tags: list[str], license_id: str | None) -> ModelCardData:
    """Ours, with license, datasets and language inherited from the original card's metadata."""
    inherited = context["original"].metadata if context["original"] else {}
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


def validate_card(text: str) -> list[str]:
    """Problems a Hub user would hit: unreadable front matter, bad base_model, unbalanced sections."""
    problems = []
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("base_model_relation", "model_name", "prompt_template", "quantized_by"):
        if key not in data:
            problems.append(f"front matter lacks {key}")
    base = data.get("base_model")
    if base is not None and not HUB_ID.match(str(base)):
        problems.append(f"base_model {base!r} is not a Hub model id")
    open_sections: list[str] = []
    body_without_original = text.split("\n<!-- original-model-card start -->", 1)[0]
    for name, edge in SECTION.findall(body_without_original):
        if edge == "start":
            open_sections.append(name)
        elif not open_sections or open_sections.pop() != name:
            problems.append(f"section marker {name} end without its start")
    problems += [f"section {name} is never closed" for name in open_sections]
    return problems


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
        raise BadInput(f"card template {fmt}.md.j2: {exc}") from None
    yaml_text = front_matter(context, recipe.release.tags, recipe.source.license).to_yaml()
    text = f"---\n{yaml_text}\n---\n{body}"
    problems = validate_card(text)
    if problems:
        raise BadInput(f"card for {context['repo_id']}: {problems[0]}")
    return text
