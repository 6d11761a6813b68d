"""Checkpoint formats: what a path holds, then each file's header parsed and validated into a
frozen :class:`Catalog`. No torch here (a test enforces it)."""

from .catalog import Catalog, FileStamp, TensorEntry
from .dispatch import open_catalog
from .source import ModelSource, resolve_source

__all__ = ["Catalog", "FileStamp", "ModelSource", "TensorEntry", "open_catalog", "resolve_source"]
