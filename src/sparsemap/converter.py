"""``sparsemap convert``: any checkpoint in, an aligned, laid-out safetensors file out.

Reads anything :func:`sparsemap.open` reads, writes through
:mod:`sparsemap.writer`. GGUF quantized tensors are dequantized, or, with
``Layout(quantize="keep")``, kept quantized in the layouts torch's CPU kernels
read (``"q8_0"``/``"q4_1"`` also quantize float weights; see
:mod:`sparsemap.quantize`). Memory stays bounded:
one source tensor at a time is fetched (a zero-copy view, or a dequantized
copy for GGUF), its pages are released once written, and output pages are
flushed and dropped as they go.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .checkpoint import Checkpoint, Source
from .errors import UnsupportedQuantizationError
from .formats.catalog import Catalog
from .formats.planner import Layout, Plan, Spec, plan
from .formats.quantized import FROM_GGUF
from .formats.reserved import LAYOUT_KEY, QUANT_KEY
from .writer import write

if TYPE_CHECKING:
    from .quantize import Coded


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
                  if e.encoding is None and e.nbytes else None,
                  encoding=_source_encoding(catalog, e.name))
             for e in catalog.values()]
    int4 = None
    if layout.quantize is not None:
        from .quantize import int4_layout

        int4 = int4_layout()
    try:
        the_plan: Plan = plan(specs, layout, _kept_metadata(catalog), int4_layout=int4)
    except UnsupportedQuantizationError as e:
        raise UnsupportedQuantizationError(e.detail, path=catalog.source, tensor=e.tensor) from None
    current: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        # The checkpoint checks the file is still the one parsed before serving each view (FileChangedError).
        current[name] = t = ckpt.tensor(name)
        return t

    def done(name: str) -> None:
        t = current.pop(name, None)
        if t is not None:
            ckpt.release(t, drop_cache=True)  # written: give its pages back

    if layout.quantize is not None:
        from .quantize import part_getter

        get = part_getter(the_plan, get, lambda name: _coded(ckpt, name, layout.quantize))
    write(the_plan, get, destination, on_bytes=on_bytes, on_tensor=done)
    return ConvertSummary(source=catalog.source, destination=os.fspath(destination), tensors=len(catalog),
                          file_nbytes=the_plan.file_nbytes, padding_nbytes=the_plan.padding_nbytes,
                          seconds=time.perf_counter() - start)


def _source_encoding(catalog: Catalog, name: str) -> str | None:
    """The quantization a tensor comes in, as the planner judges it: a GGUF type (also for a weight of
    ours decoded from one), else ``None`` (float, or quantized from float: quantized again by the mode)."""
    weight = catalog.quantized.get(name)
    if weight is not None:
        return weight.source if weight.source in FROM_GGUF else None
    return catalog[name].encoding


def _coded(ckpt: Checkpoint, name: str, mode: str) -> Coded:
    """A weight to be stored quantized: a GGUF tensor decoded from its blocks (rows put in logical
    order), a weight already kept quantized decoded from its parts, or a float tensor quantized."""
    from .quantize import decode, from_float, from_gguf

    entry = ckpt.catalog[name]
    if name in ckpt.catalog.quantized:  # a file of ours: its GGUF-born weights as they are, others again
        weight = ckpt.catalog.quantized[name]
        coded = decode(weight, ckpt.quantized(name))
        return coded if weight.source in FROM_GGUF else from_float(coded.values(), mode)
    if entry.encoding is None:
        return from_float(ckpt.tensor(name), mode)
    coded = from_gguf(ckpt.raw(name), entry.encoding, (entry.shape[0], entry.shape[1]), name=name)
    if entry.order is None:
        return coded
    inverse = torch.empty(len(entry.order), dtype=torch.int64)  # stored row k is logical row order[k]
    inverse[torch.tensor(entry.order, dtype=torch.int64)] = torch.arange(len(entry.order))
    return coded.rows(inverse)


def _kept_metadata(catalog: Catalog) -> dict[str, str]:
    """Source metadata worth carrying over: safetensors' own strings (not GGUF's key-values)."""
    if catalog.format != "safetensors":
        return {"sparsemap.source_format": catalog.format}
    return {k: v for k, v in catalog.metadata.items() if k not in (LAYOUT_KEY, QUANT_KEY)}
