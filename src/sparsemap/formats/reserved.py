"""The names sparsemap reserves in the safetensors files it writes. No torch, no imports.

A file written by the layout compiler carries its layout as a JSON document
under ``__metadata__[LAYOUT_KEY]`` (read by :mod:`sparsemap.formats.layout`),
stores tensors in a special layout under a suffixed name, and may fill
alignment gaps with padding tensors. Source tensors may not use these names.
The constants live apart from the layout reader so that the safetensors reader
can tell a laid-out file by its metadata without importing that reader.
"""

from __future__ import annotations

LAYOUT_KEY = "sparsemap.layout"
QUANT_KEY = "sparsemap.quantized"  # read by sparsemap.formats.quantized
PAD_PREFIX = "__sparsemap_pad__."
# Suffix of a stored tensor's name, by layout kind ("alias" stores nothing of its own).
SUFFIXES = {"rows": "@rows", "transpose": "@T", "bundle": "@bundle", "alias": ""}
# Quantized weights are stored as parts named ``<weight>@int4...`` or ``<weight>@int8...``.
QUANT_MARKS = ("@int4", "@int8")


def is_padding(name: str) -> bool:
    """Whether ``name`` is a padding tensor's (meaningful only in a file with a layout document)."""
    return name.startswith(PAD_PREFIX)


def is_reserved(name: str) -> bool:
    """Whether a source tensor's ``name`` collides with names the layout compiler writes."""
    return (name.startswith(PAD_PREFIX) or name.endswith(tuple(s for s in SUFFIXES.values() if s))
            or any(mark in name for mark in QUANT_MARKS))
