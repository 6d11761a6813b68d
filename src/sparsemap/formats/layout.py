"""The converted file's layout: how stored tensors become the model's tensors. No torch.

A file written by ``sparsemap convert`` / ``sparsemap.save`` is a valid
safetensors file. Tensors in a plain layout keep their names and shapes.
Alignment gaps are padding tensors (``U8``, names starting with
:data:`PAD_PREFIX`). A tensor in a special layout (padded rows, transposed,
bundled with others) is stored under a suffixed name, so no other tool
misreads it, and ``__metadata__[LAYOUT_KEY]`` holds a JSON document that gives
each logical tensor as a strided view of a stored one::

    {"version": 1, "align": 4096, "page": 4096,
     "views": {"<logical name>": {"stored": "<stored name>",
                                  "kind": "rows" | "transpose" | "bundle" | "alias",
                                  "offset": <elements>, "shape": [...], "strides": [...]}}}

("alias": a second name for a tensor stored once, such as tied weights.) A
view may also carry ``"order": [...]`` and ``"order_dim"``: the stored rows were
reordered by a usage profile, ``order[k]`` being the logical index of stored
slice ``k`` along ``order_dim``. Undoing an order needs a gather (a copy);
``catalog.tensor(name, stored_order=True)`` gives the zero-copy stored view.

One recipe (offset, shape, strides: an ``as_strided`` view) undoes every
layout without copying. :func:`apply_layout` turns stored entries into logical
ones, validating every view against its stored tensor first.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import LayoutError
from .catalog import TensorEntry
from .dtypes import ITEMSIZE

LAYOUT_KEY = "sparsemap.layout"
LAYOUT_VERSION = 1
PAD_PREFIX = "__sparsemap_pad__."
SUFFIXES = {"rows": "@rows", "transpose": "@T", "bundle": "@bundle", "alias": ""}


def is_padding(name: str) -> bool:
    return name.startswith(PAD_PREFIX)


def parse(text: str, path: str) -> dict[str, Any]:
    """Parse and check the layout document's structure (not yet against the file)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise LayoutError(f"{LAYOUT_KEY} is not JSON: {e}", path=path) from None
    # `type(...) is int`: JSON true would otherwise pass as 1.
    if not isinstance(doc, dict) or type(doc.get("version")) is not int or doc["version"] != LAYOUT_VERSION:
        raise LayoutError(f"{LAYOUT_KEY} must be an object with version {LAYOUT_VERSION}, got "
                          f"{str(doc)[:80]}", path=path)
    views = doc.get("views", {})
    if not isinstance(views, dict):
        raise LayoutError(f"{LAYOUT_KEY}.views must be an object", path=path)
    for name, v in views.items():
        ok = (isinstance(v, dict) and isinstance(v.get("stored"), str) and v.get("kind") in SUFFIXES
              and type(v.get("offset")) is int and v["offset"] >= 0
              and isinstance(v.get("shape"), list) and isinstance(v.get("strides"), list)
              and len(v["shape"]) == len(v["strides"])
              and all(type(d) is int and d >= 0 for d in v["shape"])
              and all(type(s) is int and s >= 0 for s in v["strides"]))
        if not ok:
            raise LayoutError(f"view must be {{stored, kind, offset, shape, strides}} with non-negative "
                              f"integers, got {str(v)[:120]}", path=path, tensor=name)
    return doc


def apply_layout(entries: list[TensorEntry], metadata: dict[str, str], path: str) -> list[TensorEntry]:
    """The logical tensors of a converted file: padding dropped, special layouts undone as views.

    Files without layout metadata come back unchanged (padding tensors are
    dropped only when the metadata says the file is ours).
    """
    text = metadata.get(LAYOUT_KEY)
    if text is None:
        return entries
    doc = parse(text, path)
    stored = {e.name: e for e in entries}
    views: dict[str, Any] = doc.get("views", {})
    # Stored tensors in a special layout are hidden behind their views; an
    # alias's stored tensor is also a logical tensor and stays.
    used = {v["stored"] for v in views.values() if v["kind"] != "alias"}
    out = [e for e in entries if not is_padding(e.name) and e.name not in used]
    plain_names = {e.name for e in out}
    for name, v in views.items():
        if name in plain_names:
            raise LayoutError("view name collides with a stored tensor", path=path, tensor=name)
        order, order_dim = _order(v, name, path)
        base = stored.get(v["stored"])
        if base is None:
            raise LayoutError(f"view points to stored tensor {v['stored']!r}, which the file lacks",
                              path=path, tensor=name)
        if base.strides is not None or base.encoding is not None:
            raise LayoutError(f"stored tensor {v['stored']!r} is not a plain contiguous tensor",
                              path=path, tensor=name)
        size = ITEMSIZE[base.dtype]
        shape, strides, offset = tuple(v["shape"]), tuple(v["strides"]), v["offset"]
        numel = math.prod(shape)
        if numel:
            last = offset + sum((d - 1) * s for d, s in zip(shape, strides))
            if last >= base.numel:
                raise LayoutError(
                    f"view (offset {offset}, shape {list(shape)}, strides {list(strides)}) reaches element "
                    f"{last} of {v['stored']!r}, which has {base.numel}", path=path, tensor=name)
            span = (last - offset + 1) * size
        else:
            span = 0
        _check_no_overlap(shape, strides, name, path)
        if order is not None and (order_dim >= len(shape) or len(order) != shape[order_dim]):
            raise LayoutError(f"row order has {len(order)} entries for dimension {order_dim} of shape "
                              f"{list(shape)}", path=path, tensor=name)
        # A "rows" view is the only user of its stored tensor: the padding after
        # each row is its own, so whole padded slots can be freed.
        row_span = strides[0] * size if v["kind"] == "rows" and len(shape) >= 1 and offset == 0 else None
        if row_span is not None:
            span = shape[0] * row_span if numel else 0
            if offset + span // size > base.numel:
                raise LayoutError(f"padded rows ({shape[0]} x {row_span} bytes) run past {v['stored']!r}",
                                  path=path, tensor=name)
        out.append(TensorEntry(name=name, file=base.file, offset=base.offset + offset * size, nbytes=span,
                               dtype=base.dtype, shape=shape, strides=strides, order=order, order_dim=order_dim,
                               row_span=row_span))
    return out


def _check_no_overlap(shape: tuple[int, ...], strides: tuple[int, ...], name: str, path: str) -> None:
    """Refuse a view whose elements share bytes (rows that overlap cannot be masked one at a time).

    Sufficient rule, met by every layout the writer makes: ordered by stride,
    each dimension's stride reaches past everything the smaller ones span.
    """
    if 0 in shape:
        return  # no elements, nothing to overlap
    extent = 1
    for d, s in sorted(((d, s) for d, s in zip(shape, strides, strict=True) if d > 1), key=lambda t: t[1]):
        if s < extent:
            raise LayoutError(f"view strides {list(strides)} with shape {list(shape)} make elements overlap "
                              f"(a stride of {s} inside a span of {extent} elements)", path=path, tensor=name)
        extent = s * (d - 1) + extent


def _order(view: dict[str, Any], name: str, path: str) -> tuple[tuple[int, ...] | None, int]:
    order = view.get("order")
    if order is None:
        return None, 0
    dim = view.get("order_dim", 0)
    if (not isinstance(order, list) or type(dim) is not int or dim < 0
            or not all(type(i) is int for i in order) or sorted(order) != list(range(len(order)))):
        raise LayoutError("row order must be a permutation of 0..n-1 with an integer order_dim",
                          path=path, tensor=name)
    return tuple(order), dim
