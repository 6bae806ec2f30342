"""The source model's own card and prompt template, as the release cards reuse them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import BadInput
from ..recipe import Recipe
from ..source import source_file

NO_TEMPLATE = "{prompt}"
USER_PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class OriginalCard:
    metadata: dict[str, Any] = field(default_factory=dict)  # its YAML front matter, if any
    body: str = ""  # everything after the front matter, byte for byte


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str


def split_card(text: str) -> OriginalCard:
    """Split a card into its front matter (parsed) and its body (verbatim)."""
    from huggingface_hub import ModelCard

    hub_logger = logging.getLogger("huggingface_hub.repocard")
    previous, hub_logger.level = hub_logger.level, logging.ERROR  # "metadata block not found" is fine here
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    finally:
        hub_logger.setLevel(previous)
    body = card.text if text.endswith(card.text) else text
    return OriginalCard(card.data.to_dict(), body)


def load_original_card(recipe: Recipe) -> OriginalCard | None:
    """The card named by source.card, else the model's README.md; None when there is none."""
    explicit = recipe.resolve(recipe.source.card)
    if explicit is not None:
        if not explicit.is_file():
            raise BadInput(f"source.card: {explicit} does not exist")
        path = explicit
    else:
        path = source_file(recipe, "README.md")
        if path is None:
            return None
    try:
        return split_card(path.read_bytes().decode("utf-8"))  # bytes: keep \r\n as it is
    except UnicodeDecodeError:
        raise BadInput(f"source.card: {path} is not UTF-8 text") from None


def _chat_template(recipe: Recipe) -> tuple[str | None, dict[str, Any]]:
    config_file = source_file(recipe, "tokenizer_config.json")
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        jinja_file = source_file(recipe, "chat_template.jinja")
        template = jinja_file.read_text(encoding="utf-8") if jinja_file else None
    return template, config


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def render_chat_template(template: str, tokenizer_config: dict[str, Any]) -> str:
    """A chat template applied to one user message "{prompt}", with the generation prompt."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
    env.filters["tojson"] = lambda value, **_: json.dumps(value)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": USER_PLACEHOLDER}], add_generation_prompt=True,
        bos_token=_token_text(tokenizer_config.get("bos_token")),
        eos_token=_token_text(tokenizer_config.get("eos_token")))


def guess_template_name(text: str) -> str:
    if "<|im_start|>" in text:
        return "ChatML"
    if "[INST]" in text:
        return "Llama-2-Chat" if "<<SYS>>" in text else "Mistral"
    if "<|start_header_id|>" in text:
        return "Llama-3"
    if "USER:" in text and "ASSISTANT:" in text:
        return "Vicuna"
    return "Custom" if text != NO_TEMPLATE else "None"


def prompt_template(recipe: Recipe) -> PromptTemplate:
    """The recipe's prompt template, else the tokenizer's chat template rendered for one prompt."""
    source = recipe.source
    if source.prompt_template is not None:
        text = source.prompt_template
    else:
        template, config = _chat_template(recipe)
        try:
            text = render_chat_template(template, config) if template else NO_TEMPLATE
        except TemplateError as exc:
            raise BadInput(f"source.prompt_template: the tokenizer's chat template fails ({exc}); "
                           "set prompt_template in the recipe") from None
    return PromptTemplate(source.prompt_template_name or guess_template_name(text), text)
