"""Checkpoint formats: parse and validate headers into a :class:`Catalog`. No torch here."""

from .catalog import Catalog, TensorEntry
from .resolve import open_catalog

__all__ = ["Catalog", "TensorEntry", "open_catalog"]
