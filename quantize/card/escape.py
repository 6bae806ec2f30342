"""Recipe and model strings made safe for where they land in a card. Pure.

A card is Markdown with code blocks holding shell and Python: a display name, creator or
description is text to show, never Markdown to interpret, and a prompt template is data inside a
code block or a Python string. Each filter here is registered in the card's Jinja environment
under the same name (`md`, `cell`, `url`, `fence`, `pystr`, `shell`).
"""

from __future__ import annotations

import re
import shlex
from typing import Any
from urllib.parse import quote, urlsplit

# Characters that start Markdown or HTML constructs inline: emphasis, code, links, images, raw HTML.
_INLINE_SPECIAL = re.compile(r"([\\`*\[\]<>])")
# `_` emphasises only at a word's edge (GFM ignores it inside words such as GGML_TYPE_Q4_K).
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_WHITESPACE_RUN = re.compile(r"\s+")
_BACKTICK_RUN = re.compile(r"`+")
_URL_SAFE = ":/?#@!$&'*+,;=%~-._[]"  # kept as they are; everything else (spaces, parens, quotes) is %-encoded


def one_line(value: Any) -> str:
    """Newlines, tabs and other control characters become single spaces."""
    text = "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in str(value))
    return _WHITESPACE_RUN.sub(" ", text).strip()


def md(value: Any) -> str:
    """Inline Markdown text (a heading, a list item, link text): one line, every construct escaped."""
    text = _INLINE_SPECIAL.sub(r"\\\1", one_line(value))
    text = _EDGE_UNDERSCORE.sub(r"\\_", text)
    return text.replace("&", "&amp;")


def cell(value: Any) -> str:
    """A Markdown table cell: inline text with `|` escaped too."""
    return md(value).replace("|", "\\|")


def url(value: Any) -> str:
    """A link destination: http(s) only (anything else becomes "#"), characters that end a link encoded."""
    text = str(value).strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        return "#"
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return "#"
    return quote(text, safe=_URL_SAFE).replace("[", "%5B").replace("]", "%5D")


def fence(*texts: Any) -> str:
    """A code fence longer than any run of backticks in the texts the block will hold (at least ```)."""
    longest = max((len(run) for text in texts for run in _BACKTICK_RUN.findall(str(text or ""))), default=0)
    return "`" * max(3, longest + 1)


def pystr(value: Any) -> str:
    """A Python string literal for the text: triple-quoted when that is exact and readable, else repr()."""
    text = str(value)
    plain = all(c == "\n" or 0x20 <= ord(c) < 0x7F or ord(c) > 0x9F for c in text)
    if plain and "\\" not in text and "'''" not in text and not text.endswith("'"):
        return f"'''{text}'''"
    return repr(text)


def shell(value: Any) -> str:
    """One shell word (POSIX quoting)."""
    return shlex.quote(str(value))


FILTERS = {"md": md, "cell": cell, "url": url, "fence": fence, "pystr": pystr, "shell": shell}
