"""sparsemap: load and run PyTorch models in the memory a machine actually has.

Checkpoints are described without reading their data (:func:`open` gives a
frozen, torch-free :class:`Catalog`), mapped by a :class:`Checkpoint` (one
copy-on-write mapping per file, tensors served as zero-copy views), and
loaded into models built on the meta device (:func:`load`): weights cost
file-backed pages the kernel can reclaim, not anonymous memory.

Example:
    >>> import sparsemap
    >>> cat = sparsemap.open("model.safetensors")          # headers only, no torch
    >>> sparsemap.Checkpoint(cat).tensor("embed.weight")     # doctest: +SKIP
    >>> model = sparsemap.load(lambda: MyModel(cfg), cat)    # doctest: +SKIP

``import sparsemap`` does not import torch; the names that need it are loaded
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .errors import SparsemapError
from .formats import Catalog, TensorEntry
from .formats import open_catalog as open

__version__ = "0.2.0"

_LAZY = {
    "Checkpoint": "sparsemap.checkpoint",
    "load": "sparsemap.loader",
    "load_state_dict": "sparsemap.loader",
    "skeleton": "sparsemap.loader",
    "rows": "sparsemap.sparse_rows",
    "RowController": "sparsemap.sparse_rows",
    "save": "sparsemap.writer",
    "Layout": "sparsemap.writer",
    "convert": "sparsemap.converter",
    "to_mapped": "sparsemap.lifecycle",
    "drop": "sparsemap.lifecycle",
    "from_pretrained": "sparsemap.models.hf",
    "stream_tensors": "sparsemap.stream",
    "StreamReport": "sparsemap.stream",
    "Budget": "sparsemap.budget",
    "QuantizedTensor": "sparsemap.qtensor",
    "safe_open": "sparsemap.safetensors_api",
    "memory": None,
}

if TYPE_CHECKING:  # pragma: no cover
    from . import memory
    from .budget import Budget
    from .checkpoint import Checkpoint
    from .converter import convert
    from .lifecycle import drop, to_mapped
    from .loader import load, load_state_dict, skeleton
    from .models.hf import from_pretrained
    from .qtensor import QuantizedTensor
    from .safetensors_api import safe_open
    from .sparse_rows import RowController, rows
    from .stream import StreamReport, stream_tensors
    from .writer import Layout, save


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sparsemap' has no attribute {name!r}")
    import importlib

    module_name = _LAZY[name]
    if module_name is None:
        value = importlib.import_module(f"sparsemap.{name}")
    else:
        value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # resolve once
    return value


__all__ = ["Budget", "Catalog", "Checkpoint", "Layout", "QuantizedTensor", "RowController", "SparsemapError",
           "StreamReport", "TensorEntry", "__version__", "convert", "drop", "errors", "from_pretrained",
           "load", "load_state_dict", "memory", "open", "rows", "safe_open", "save", "skeleton",
           "stream_tensors", "to_mapped"]
