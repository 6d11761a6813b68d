"""Streaming tensors into a planned, laid-out safetensors file, atomically and durably.

The writer never builds a serialized copy in memory: each tensor's bytes go
from its storage (or a mapped source) to the file, through at most one small
buffer when rows are padded, transposed, bundled or cast. What goes where is
decided beforehand, without torch, by :func:`sparsemap.formats.planner.plan`
(see :mod:`sparsemap.formats.layout` for how special layouts are recorded and
undone); how the bytes reach the disk (temporary file, rename, bounded dirty
pages) is :mod:`sparsemap.durable`'s.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Mapping

import torch

from .durable import WritebackSink, atomic_write
from .errors import LayoutOptionError
from .formats.planner import Layout, Plan, Record, Spec, plan
from .mapped import DTYPE_NAMES, TORCH_DTYPES

# Rows padded, transposed or bundled, and plain tensors cast or gathered, are written through a buffer
# about this big: big enough for sequential writes, small enough to add nothing to a model's footprint.
CHUNK_NBYTES = 16 << 20

__all__ = ["CHUNK_NBYTES", "Layout", "Plan", "Spec", "plan", "save", "write"]


# ---------------------------------------------------------------- streaming a plan

def write(plan_: Plan, get: Callable[[str], torch.Tensor], path: str | os.PathLike[str], *,
          on_bytes: Callable[[int], None] | None = None,
          on_tensor: Callable[[str], None] | None = None) -> None:
    """Write a planned file, fetching each source tensor with ``get(name)`` when its turn comes.

    Peak extra memory: one source tensor if it must be made contiguous or
    cast as a whole (plain records), else one buffer of :data:`CHUNK_NBYTES`.
    A quantized weight's parts are fetched by their stored names (``get("w@int4")``);
    :func:`sparsemap.quantize.part_getter` packs them from the source.
    The file appears at ``path`` whole or not at all (:func:`~sparsemap.durable.atomic_write`).

    Args:
        plan_: what to write (:func:`~sparsemap.formats.planner.plan`).
        get: the source tensor of a name; called once per tensor, in file order.
        path: the destination.
        on_bytes: called with each number of bytes written (progress).
        on_tensor: called with each tensor's name once its bytes are written
            (the caller may release its pages).

    Example:
        >>> the_plan = plan([Spec(n, tuple(t.shape), DTYPE_NAMES[t.dtype]) for n, t in state.items()],
        ...                 Layout())                                          # doctest: +SKIP
        >>> write(the_plan, state.__getitem__, "model.safetensors")               # doctest: +SKIP
    """
    with atomic_write(path) as fd:
        sink = WritebackSink(fd, on_bytes)
        sink.write(struct.pack("<Q", len(plan_.header)) + plan_.header)
        for record in plan_.records:
            if record.kind == "pad":
                sink.zeros(record.nbytes)
            elif record.kind in ("plain", "quant"):
                _write_plain(sink, get(record.name), record)
                if on_tensor:
                    on_tensor(record.name)
            else:
                _write_rows(sink, record, get)
                if on_tensor:
                    for p in record.parts:
                        on_tensor(p.name)
        assert sink.position == plan_.file_nbytes, (sink.position, plan_.file_nbytes)


def _torch_dtype(record: Record) -> torch.dtype:
    try:
        return TORCH_DTYPES[record.dtype]
    except KeyError:
        raise LayoutOptionError(f"{record.name}: dtype {record.dtype} has no torch equivalent in torch "
                                f"{torch.__version__}") from None


def _write_plain(sink: WritebackSink, t: torch.Tensor, record: Record) -> None:
    """A tensor stored as itself: its bytes as they are, or cast (or gathered) a chunk at a time."""
    if tuple(t.shape) != record.shape:
        raise LayoutOptionError(f"{record.name}: tensor has shape {list(t.shape)}, "
                                f"planned {list(record.shape)}")
    if t.numel() == 0:
        return
    dtype = _torch_dtype(record)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == dtype and t.is_contiguous():
        sink.write(t.reshape(-1).view(torch.uint8).numpy().data)
        return
    # Cast (or gather) in chunks so no whole converted copy is held.
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)  # (numel,)
    step = max(1, CHUNK_NBYTES // max(dtype.itemsize, flat.element_size()))
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].to(dtype)
        sink.write(chunk.view(torch.uint8).numpy().data)


def _write_rows(sink: WritebackSink, record: Record, get: Callable[[str], torch.Tensor]) -> None:
    """A row record: each part's rows (or columns) copied side by side into padded rows, in stored order."""
    n_rows, stride = record.shape  # (n_rows, row stride in elements)
    if record.nbytes == 0:
        return
    dtype = _torch_dtype(record)
    sources = []
    for p in record.parts:
        t = get(p.name).detach()
        if t.device.type != "cpu":
            t = t.cpu()
        rows = t.t() if p.transposed else t.reshape(t.shape[0], math.prod(t.shape[1:]))  # (n_rows, n_cols)
        sources.append((p, rows))
    rows_per_chunk = max(1, CHUNK_NBYTES // (stride * dtype.itemsize))
    # Zeroed once: the padding columns are never written, so they stay zero in every chunk.
    buf = torch.zeros(min(rows_per_chunk, n_rows), stride, dtype=dtype)  # (rows, stride)
    order = torch.tensor(record.order, dtype=torch.int64) if record.order is not None else None
    for start in range(0, n_rows, rows_per_chunk):
        k = min(rows_per_chunk, n_rows - start)
        block = buf[:k]  # (k, stride)
        for p, src in sources:
            rows = src[start:start + k] if order is None else src.index_select(0, order[start:start + k])
            block[:, p.col_offset:p.col_offset + p.n_cols].copy_(rows)  # casts if the record's dtype differs
        sink.write(block.reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------- the public entry point

Tensors = Mapping[str, torch.Tensor] | torch.nn.Module | torch.Tensor


def _identity(t: torch.Tensor) -> object:
    # Tensors are tied when they are the same bytes seen the same way.
    from .qtensor import QuantizedTensor

    if isinstance(t, QuantizedTensor):  # no storage of its own (data_ptr 0): its parts' bytes
        return ("quantized", *((p.data_ptr(), tuple(p.shape)) for p in t.parts))
    return (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None


def _dtype_name(name: str, t: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise LayoutOptionError(f"{name}: dtype {t.dtype} has no safetensors name") from None


def save(tensors: Tensors, path: str | os.PathLike[str], *, layout: Layout | None = None,
         metadata: Mapping[str, str] | None = None) -> Plan:
    """Write tensors as a mapped-ready safetensors file, streaming from their storage.

    Args:
        tensors: a state dict, a module (its ``state_dict()``), or one tensor
            (saved as ``"tensor"``).
        path: destination; written atomically (temp file, fsync, rename).
        layout: alignment, casts and row layouts (see :class:`Layout`).
        metadata: extra ``__metadata__`` strings.

    Returns:
        The plan that was written (records, offsets, layout views).

    Example:
        >>> sparsemap.save(model, "model.safetensors",
        ...                layout=Layout(pad_rows=("*embed_tokens*",)))  # doctest: +SKIP
        >>> model = sparsemap.load(factory, "model.safetensors")  # doctest: +SKIP
        >>> # ^ undoes the layout, zero-copy
    """
    if isinstance(tensors, torch.nn.Module):
        state = dict(tensors.state_dict(keep_vars=False))
    elif isinstance(tensors, torch.Tensor):
        state = {"tensor": tensors}
    else:
        state = dict(tensors)
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise LayoutOptionError(f"{name}: not a tensor ({type(t).__name__})")
        if t.device.type == "meta":
            raise LayoutOptionError(f"{name}: on the meta device, it has no data to save")
    specs = [Spec(n, tuple(t.shape), _dtype_name(n, t), _identity(t)) for n, t in state.items()]
    layout = layout or Layout()
    get: Callable[[str], torch.Tensor] = state.__getitem__
    int4 = None
    if layout.quantize is not None:
        from .quantize import from_float, int4_layout, part_getter

        int4 = int4_layout()
    the_plan = plan(specs, layout, metadata, int4_layout=int4)
    if layout.quantize is not None:
        get = part_getter(the_plan, get, lambda name: from_float(state[name], layout.quantize))
    write(the_plan, get, path)
    return the_plan
