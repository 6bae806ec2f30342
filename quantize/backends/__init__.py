"""One module per output format, each exposing a `Backend` (see base.py)."""

from .base import Backend, Produced, ReleaseContext, backend_class

__all__ = ["Backend", "Produced", "ReleaseContext", "backend_class"]
