"""The format plugins: every module of this package that defines `FORMAT` (a `Format` instance).

Adding a format means adding one module here (its recipe section, expansion, backend, card rows)
and one template, `templates/<name>.md.j2`; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from .base import Backend, Format, Produced, ReleaseContext, Variant

__all__ = ["Backend", "Format", "Produced", "ReleaseContext", "Variant", "all_formats", "get_format", "format_names"]


@cache
def all_formats() -> tuple[Format, ...]:
    """Every installed format plugin, in their `order`."""
    found = []
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        plugin = getattr(module, "FORMAT", None)
        if isinstance(plugin, Format):
            found.append(plugin)
    return tuple(sorted(found, key=lambda plugin: plugin.order))


def format_names() -> tuple[str, ...]:
    return tuple(plugin.name for plugin in all_formats())


def get_format(name: str) -> Format:
    for plugin in all_formats():
        if plugin.name == name:
            return plugin
    raise KeyError(name)
