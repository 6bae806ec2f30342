"""The source model's own card and prompt template, as the release cards reuse them."""

from __future__ import annotations

import ctypes
import json
import operator
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import BadInput
from ..recipe import Recipe, StrictLoader, yaml_problem
from ..source import source_file

NO_TEMPLATE = "{prompt}"
USER_PLACEHOLDER = "{prompt}"
BOM = "\ufeff"
# The Hub's own rule (huggingface_hub.repocard.REGEX_YAML_BLOCK): a block between two `---` lines at the top.
FRONT_MATTER = re.compile(r"\A[ \t\r\n]*---[ \t]*\r?\n(?P<yaml>(?:.*?\r?\n)??)---[ \t]*(?:\r?\n|\Z)", re.S)
CHAT_TEMPLATE_SECONDS = 2.0  # a chat template renders one message in milliseconds; more is a runaway
CHAT_TEMPLATE_CHARS = 64_000  # ... and a prompt template is a few lines


@dataclass(frozen=True)
class OriginalCard:
    metadata: dict[str, Any] = field(default_factory=dict)  # its YAML front matter, if any
    body: str = ""  # everything after the front matter, byte for byte


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str


class CardFormatError(ValueError):
    """The card's front matter can't be read (the message says why)."""


def split_card(text: str) -> OriginalCard:
    """Split a card into its front matter (parsed) and its body (verbatim, less a UTF-8 BOM).

    CardFormatError when the front matter is not YAML or not a mapping: the Hub would not read it either.
    """
    text = text.removeprefix(BOM)
    match = FRONT_MATTER.match(text)
    if match is None:
        return OriginalCard({}, text)
    try:
        metadata = yaml.load(match.group("yaml"), Loader=StrictLoader)
    except yaml.YAMLError as exc:
        first_line = text[:match.start("yaml")].count("\n") + 1
        raise CardFormatError(f"its front matter is {yaml_problem(exc, first_line)}") from None
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CardFormatError(f"its front matter is a YAML {type(metadata).__name__}, not a mapping of keys")
    return OriginalCard(metadata, text[match.end():])


def load_original_card(recipe: Recipe) -> OriginalCard | None:
    """The card named by source.card, else the model's README.md; None when there is none."""
    explicit = recipe.resolve(recipe.source.card)
    if explicit is not None:
        if not explicit.is_file():
            raise BadInput(f"source.card: {explicit} " + ("is not a file" if explicit.exists() else "does not exist"))
        path = explicit
    else:
        path = source_file(recipe, "README.md")
        if path is None:
            return None
    try:
        return split_card(path.read_bytes().decode("utf-8"))  # bytes: keep \r\n as it is
    except UnicodeDecodeError:
        raise BadInput(f"source.card: {path} is not UTF-8 text") from None
    except CardFormatError as exc:
        raise BadInput(f"source.card: {path}: {exc}; fix it, or set source.card to a corrected copy") from None
    except OSError as exc:
        raise BadInput(f"source.card: cannot read {path} ({exc.strerror})") from None


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"source: {path} is not UTF-8 text ({what})") from None
    except OSError as exc:
        raise BadInput(f"source: cannot read {path} ({exc.strerror})") from None


def _chat_template(recipe: Recipe) -> tuple[str | None, dict[str, Any]]:
    config_file = source_file(recipe, "tokenizer_config.json")
    config: Any = {}
    if config_file:
        try:
            config = json.loads(_read_text(config_file, "the tokenizer's config"))
        except json.JSONDecodeError as exc:
            raise BadInput(f"source: {config_file} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise BadInput(f"source: {config_file} is not a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise BadInput(f"source: {config_file}: chat_template must be a string or a list of named templates")
    if not template:
        jinja_file = source_file(recipe, "chat_template.jinja")
        template = _read_text(jinja_file, "the chat template") if jinja_file else None
    return template, config


def _token_text(token: Any) -> str:
    return str(token.get("content", "")) if isinstance(token, dict) else str(token or "")


class ChatTemplateRunaway(TemplateError):
    """A chat template that runs too long or writes too much."""


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with a deadline checked on every call and attribute access, and
    `*`, `**` and `%` refused where they would build huge strings or numbers."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, deadline: float, max_chars: int, **options: Any):
        super().__init__(**options)
        self.deadline = deadline
        self.max_chars = max_chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateRunaway(f"it ran longer than {CHAT_TEMPLATE_SECONDS:g} s")

    def call(self, __context, __obj, *args, **kwargs):  # noqa: N807 (jinja's signature)
        self.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator_name: str, left: Any, right: Any) -> Any:
        self.tick()
        if operator_name == "*":
            sequence, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and len(sequence) * count > self.max_chars:
                raise ChatTemplateRunaway(f"it builds a sequence longer than {self.max_chars} items")
            return operator.mul(left, right)
        if operator_name == "**":
            if isinstance(right, int) and abs(right) > 1024 and isinstance(left, (int, float)) and abs(left) > 1:
                raise ChatTemplateRunaway("it computes a huge power")
            return operator.pow(left, right)
        if isinstance(left, str) and re.search(r"%[-+ #0]*(\d{5,}|\*)", left):
            raise ChatTemplateRunaway("it formats a huge field")
        return operator.mod(left, right)


def _stop_thread(thread: threading.Thread) -> None:
    """Raise an exception inside a thread still running a template (a pure Python loop stops at once)."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(ChatTemplateRunaway))
        thread.join(1.0)


def render_chat_template(template: str, tokenizer_config: dict[str, Any],
                         seconds: float = CHAT_TEMPLATE_SECONDS, max_chars: int = CHAT_TEMPLATE_CHARS) -> str:
    """A chat template applied to one user message "{prompt}", with the generation prompt.

    The template comes from someone else's model, so it runs in Jinja's sandbox with a time and size
    limit (in a thread that is stopped if it outlives the limit). Any failure is a TemplateError.
    """
    env = LimitedSandbox(time.monotonic() + seconds, max_chars, trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(str(message))

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
    env.filters["tojson"] = lambda value, **_: json.dumps(value)
    result: dict[str, Any] = {}

    def render() -> None:
        try:
            compiled = env.from_string(template)
            pieces, size = [], 0
            for piece in compiled.generate(
                    messages=[{"role": "user", "content": USER_PLACEHOLDER}], add_generation_prompt=True,
                    bos_token=_token_text(tokenizer_config.get("bos_token")),
                    eos_token=_token_text(tokenizer_config.get("eos_token"))):
                size += len(piece)
                if size > max_chars:
                    raise ChatTemplateRunaway(f"it writes more than {max_chars} characters")
                env.tick()
                pieces.append(piece)
            result["text"] = "".join(pieces)
        except TemplateError as exc:
            result["error"] = exc
        except BaseException as exc:  # noqa: BLE001  (anything a foreign template does is its own fault)
            result["error"] = TemplateError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    thread = threading.Thread(target=render, name="chat-template", daemon=True)
    thread.start()
    thread.join(seconds + 0.5)
    if thread.is_alive():
        _stop_thread(thread)
        raise ChatTemplateRunaway(f"it ran longer than {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["text"]


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
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise BadInput(f"source.prompt_template: the tokenizer's chat template fails ({reason}); "
                           "set source.prompt_template in the recipe") from None
    return PromptTemplate(source.prompt_template_name or guess_template_name(text), text)
