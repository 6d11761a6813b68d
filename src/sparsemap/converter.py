"""``sparsemap convert``: any checkpoint in, an aligned, laid-out safetensors file out.

Reads anything :func:`sparsemap.open` reads (GGUF quantized tensors are
dequantized), writes through :mod:`sparsemap.writer`. Memory stays bounded:
one source tensor at a time is fetched (a zero-copy view, or a dequantized
copy for GGUF), its pages are released once written, and output pages are
flushed and dropped as they go.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, Source
from .formats.catalog import Catalog
from .formats.planner import Layout, Plan, Spec, plan
from .formats.reserved import LAYOUT_KEY
from .writer import write


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion wrote and how fast."""

    source: str
    destination: str
    tensors: int
    file_nbytes: int
    padding_nbytes: int
    seconds: float

    @property
    def padding_percent(self) -> float:
        return 100 * self.padding_nbytes / self.file_nbytes if self.file_nbytes else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.file_nbytes / 1e6 / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"wrote {self.destination}: {self.tensors} tensors, {self.file_nbytes / 1e6:,.1f} MB "
                f"(padding {self.padding_percent:.2f}% of the file) in {self.seconds:.2f} s, "
                f"{self.mb_per_s:,.0f} MB/s")


def convert(source: Source | Checkpoint, destination: str | os.PathLike[str], *,
            layout: Layout | None = None,
            on_bytes: Callable[[int], None] | None = None) -> ConvertSummary:
    """Convert a checkpoint to a safetensors file with the given layout.

    Args:
        source: any checkpoint :func:`sparsemap.open` reads, its catalog, or a
            :class:`~sparsemap.Checkpoint`.
        destination: the output file; written atomically, so an interrupted
            conversion leaves it as it was.
        layout: alignment, dtype cast, row padding, transposition, bundles.
        on_bytes: called with each number of bytes written (progress).

    Returns:
        A :class:`ConvertSummary` (tensors, bytes, padding overhead, time, MB/s).

    Example:
        >>> convert("model.gguf", "model.safetensors", layout=Layout(dtype=torch.bfloat16))  # doctest: +SKIP
    """
    ckpt = Checkpoint.of(source)
    catalog = ckpt.catalog
    layout = layout or Layout()
    start = time.perf_counter()
    specs = [Spec(e.name, e.shape, e.dtype, (e.file, e.offset, e.nbytes, e.dtype, e.shape, e.strides)
                  if e.encoding is None and e.nbytes else None)
             for e in catalog.values()]
    the_plan: Plan = plan(specs, layout, _kept_metadata(catalog))
    current: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        # The checkpoint checks the file is still the one parsed before serving each view (FileChangedError).
        current[name] = t = ckpt.tensor(name)
        return t

    def done(name: str) -> None:
        t = current.pop(name, None)
        if t is not None:
            ckpt.release(t, drop_cache=True)  # written: give its pages back

    write(the_plan, get, destination, on_bytes=on_bytes, on_tensor=done)
    return ConvertSummary(source=catalog.source, destination=os.fspath(destination), tensors=len(catalog),
                          file_nbytes=the_plan.file_nbytes, padding_nbytes=the_plan.padding_nbytes,
                          seconds=time.perf_counter() - start)


def _kept_metadata(catalog: Catalog) -> dict[str, str]:
    """Source metadata worth carrying over: safetensors' own strings (not GGUF's key-values)."""
    if catalog.format != "safetensors":
        return {"sparsemap.source_format": catalog.format}
    return {k: v for k, v in catalog.metadata.items() if k != LAYOUT_KEY}
