"""The converted file's layout: how stored tensors become the model's tensors. No torch.

A file written by ``sparsemap convert`` / ``sparsemap.save`` is a valid
safetensors file. Tensors in a plain layout keep their names and shapes.
Alignment gaps are padding tensors (``U8``, names starting with
:data:`PAD_PREFIX`). A tensor in a special layout (padded rows, transposed,
bundled with others) is stored under a suffixed name, so no other tool
misreads it, and ``__metadata__[LAYOUT_KEY]`` holds a JSON document that gives
each logical tensor as a strided view of a stored one::

    {"version": 1, "align": 4096, "page": 4096, "dtype": "BF16" | null,
     "pad_rows": [<glob>...], "transpose": [<glob>...], "bundle_ffn": false, "reorder": [<name>...],
     "views": {"<logical name>": {"stored": "<stored name>",
                                  "kind": "rows" | "transpose" | "bundle" | "alias",
                                  "offset": <elements>, "shape": [...], "strides": [...]}}}

("alias": a second name for a tensor stored once, such as tied weights.) A
view may also carry ``"order": [...]`` and ``"order_dim"``: the stored rows were
reordered by a usage profile, ``order[k]`` being the logical index of stored
slice ``k`` along ``order_dim``. Undoing an order needs a gather (a copy);
``Checkpoint.tensor(name, stored_order=True)`` gives the zero-copy stored view.

The document is written in one layer (the planner, :mod:`sparsemap.formats.planner`)
and read in another (this module, for the safetensors reader), so it is one
pair of typed records, :class:`LayoutDocument` and :class:`LayoutView`, each
with its own ``to_json``/``from_json``; nothing else builds or reads the JSON.

One recipe (offset, shape, strides: an ``as_strided`` view) undoes every
layout without copying. :func:`apply_layout` turns stored entries into logical
ones, validating every view against its stored tensor first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LayoutError
from .catalog import TensorEntry, check_name, repeated_stride
from .dtypes import ITEMSIZE
from .reserved import LAYOUT_KEY, PAD_PREFIX, SUFFIXES, is_padding

__all__ = ["LAYOUT_KEY", "LAYOUT_VERSION", "PAD_PREFIX", "SUFFIXES", "LayoutDocument", "LayoutView",
           "apply_layout", "is_padding"]

LAYOUT_VERSION = 1
EMPTY_VIEW_WIDTH = 1 << 24  # elements across the other dimensions of an empty view: wider than any real row


# ---------------------------------------------------------------- the typed records

@dataclass(frozen=True)
class LayoutView:
    """One logical tensor as an ``as_strided`` view of a stored one.

    Attributes:
        stored: name of the stored tensor in the file.
        kind: ``"rows"``, ``"transpose"``, ``"bundle"`` or ``"alias"`` (the keys of :data:`SUFFIXES`).
        offset: elements from the stored tensor's first element to the view's.
        shape: the logical shape.
        strides: element strides into the stored tensor, one per dimension.
        order: for rows reordered by a usage profile, ``order[k]`` is the
            logical index of stored slice ``k`` along ``order_dim``; ``None``
            when stored in logical order.
        order_dim: the dimension ``order`` permutes (1 for a transposed tensor).

    Example:
        >>> LayoutView("emb@rows", "rows", 0, (50, 12), (16, 1)).to_json()
        {'stored': 'emb@rows', 'kind': 'rows', 'offset': 0, 'shape': [50, 12], 'strides': [16, 1]}
    """

    stored: str
    kind: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    order: tuple[int, ...] | None = None
    order_dim: int = 0

    def to_json(self) -> dict[str, Any]:
        """The view as the JSON object stored in the document (``order`` only when there is one)."""
        out: dict[str, Any] = {"stored": self.stored, "kind": self.kind, "offset": self.offset,
                               "shape": list(self.shape), "strides": list(self.strides)}
        if self.order is not None:
            out["order"] = list(self.order)
            out["order_dim"] = self.order_dim
        return out

    @classmethod
    def from_json(cls, name: str, obj: Any, path: str) -> LayoutView:
        """Check one parsed view (of logical tensor ``name``) on its own, before any file is consulted.

        Everything a view must satisfy without its stored tensor is checked
        here: the fields and their types, the row order (a permutation as long
        as the dimension it orders) and that no two elements share bytes. What
        depends on the file (the stored tensor exists, the view stays inside
        it) is :func:`apply_layout`'s.

        Raises:
            LayoutError: naming ``path``, ``name`` and what is wrong.
        """
        # `type(...) is int`: JSON true would otherwise pass as 1.
        ok = (isinstance(obj, dict) and isinstance(obj.get("stored"), str) and obj.get("kind") in SUFFIXES
              and type(obj.get("offset")) is int and obj["offset"] >= 0
              and isinstance(obj.get("shape"), list) and isinstance(obj.get("strides"), list)
              and len(obj["shape"]) == len(obj["strides"])
              and all(type(d) is int and d >= 0 for d in obj["shape"])
              and all(type(s) is int and s >= 0 for s in obj["strides"]))
        if not ok:
            raise LayoutError(f"view must be {{stored, kind, offset, shape, strides}} with non-negative "
                              f"integers, got {str(obj)[:120]}", path=path, tensor=name)
        shape, strides = tuple(obj["shape"]), tuple(obj["strides"])
        order, order_dim = _order(obj, name, path)
        if order is not None and (order_dim >= len(shape) or len(order) != shape[order_dim]):
            raise LayoutError(f"row order has {len(order)} entries for dimension {order_dim} of shape "
                              f"{list(shape)}", path=path, tensor=name)
        _check_no_overlap(shape, strides, name, path)
        return cls(obj["stored"], obj["kind"], obj["offset"], shape, strides, order, order_dim)


@dataclass(frozen=True, kw_only=True)
class LayoutDocument:
    """The document under ``__metadata__[LAYOUT_KEY]``: the options a file was written with, and its views.

    Only ``views`` changes what a reader serves; the other fields record how
    the file was laid out (for reports, and for writing a file like it).

    Attributes (keyword-only):
        version: :data:`LAYOUT_VERSION`; a reader refuses any other.
        align: byte alignment of the data section and of every stored tensor
            (``None``: not recorded).
        page: the page padded rows were fitted to (``None``: not recorded).
        dtype: the safetensors dtype floating-point tensors were cast to, or ``None``.
        pad_rows: glob patterns of tensors whose rows were padded.
        transpose: glob patterns of tensors stored transposed.
        bundle_ffn: whether FFN neurons were stored as bundles.
        reorder: names of the tensors a usage profile was given for.
        views: logical tensor name -> its view of a stored tensor.

    Example:
        >>> doc = LayoutDocument(views={"emb": LayoutView("emb@rows", "rows", 0, (50, 12), (16, 1))})
        >>> LayoutDocument.parse(doc.to_json(), "model.safetensors") == doc
        True
    """

    version: int = LAYOUT_VERSION
    align: int | None = None
    page: int | None = None
    dtype: str | None = None
    pad_rows: tuple[str, ...] = ()
    transpose: tuple[str, ...] = ()
    bundle_ffn: bool = False
    reorder: tuple[str, ...] = ()
    views: dict[str, LayoutView] = field(default_factory=dict)

    def to_json(self) -> str:
        """The document as compact JSON, fields in the order sparsemap has always written them."""
        doc = {"version": self.version, "align": self.align, "page": self.page, "dtype": self.dtype,
               "pad_rows": list(self.pad_rows), "transpose": list(self.transpose),
               "bundle_ffn": self.bundle_ffn, "reorder": list(self.reorder),
               "views": {name: v.to_json() for name, v in self.views.items()}}
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str, path: str) -> LayoutDocument:
        """Parse and check the document's structure and every view on its own (not yet against the file).

        Fields other than ``version`` and ``views`` may be absent (documents
        written by hand, or by older writers): they take their defaults.

        Raises:
            LayoutError: naming ``path`` (and the view, for a bad view).
        """
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise LayoutError(f"{LAYOUT_KEY} is not JSON: {e}", path=path) from None
        # `type(...) is int`: JSON true would otherwise pass as 1.
        version = doc.get("version") if isinstance(doc, dict) else None
        if type(version) is not int or version != LAYOUT_VERSION:
            raise LayoutError(f"{LAYOUT_KEY} must be an object with version {LAYOUT_VERSION}, got "
                              f"{str(doc)[:80]}", path=path)
        views = doc.get("views", {})
        if not isinstance(views, dict):
            raise LayoutError(f"{LAYOUT_KEY}.views must be an object", path=path)
        for key, check, what in _OPTIONS:
            if key in doc and not check(doc[key]):
                raise LayoutError(f"{LAYOUT_KEY}.{key} must be {what}, got {str(doc[key])[:80]}", path=path)
        for name, v in views.items():
            check_name(name, path, "view name")
            if isinstance(v, dict) and isinstance(v.get("stored"), str):
                check_name(v["stored"], path, f"stored name of view {name!r}")
        return cls(views={name: LayoutView.from_json(name, v, path) for name, v in views.items()},
                   align=doc.get("align"), page=doc.get("page"), dtype=doc.get("dtype"),
                   pad_rows=tuple(doc.get("pad_rows", ())), transpose=tuple(doc.get("transpose", ())),
                   bundle_ffn=doc.get("bundle_ffn", False), reorder=tuple(doc.get("reorder", ())),
                   version=doc["version"])


def _size_or_null(value: Any) -> bool:
    return value is None or (type(value) is int and value > 0)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# (key, check, what the message says it must be) for the document's descriptive fields.
_OPTIONS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("align", _size_or_null, "a positive integer or null"),
    ("page", _size_or_null, "a positive integer or null"),
    ("dtype", lambda v: v is None or (isinstance(v, str) and v in ITEMSIZE),
     "a safetensors dtype name or null"),
    ("pad_rows", _names, "a list of strings"),
    ("transpose", _names, "a list of strings"),
    ("bundle_ffn", lambda v: type(v) is bool, "true or false"),
    ("reorder", _names, "a list of strings"),
)


# ---------------------------------------------------------------- stored entries -> logical ones

def apply_layout(entries: list[TensorEntry], metadata: dict[str, str], path: str) -> list[TensorEntry]:
    """The logical tensors of a converted file: padding dropped, special layouts undone as views.

    Files without layout metadata come back unchanged (padding tensors are
    dropped only when the metadata says the file is ours).

    Args:
        entries: the file's stored tensors, as :func:`~sparsemap.formats.safetensors.validate` gives them.
        metadata: the file's ``__metadata__``.
        path: the file, for error messages.

    Returns:
        The logical entries: plain stored tensors, then one per view.

    Raises:
        LayoutError: the document is malformed, or a view points outside its stored tensor.
    """
    text = metadata.get(LAYOUT_KEY)
    if text is None:
        return entries
    doc = LayoutDocument.parse(text, path)
    stored = {e.name: e for e in entries}
    # Stored tensors in a special layout are hidden behind their views; an
    # alias's stored tensor is also a logical tensor and stays.
    used = {v.stored for v in doc.views.values() if v.kind != "alias"}
    out = [e for e in entries if not is_padding(e.name) and e.name not in used]
    plain_names = {e.name for e in out}
    views = []
    for name, v in doc.views.items():
        if name in plain_names:
            raise LayoutError("view name collides with a stored tensor", path=path, tensor=name)
        base = stored.get(v.stored)
        if base is None:
            raise LayoutError(f"view points to stored tensor {v.stored!r}, which the file lacks",
                              path=path, tensor=name)
        if base.strides is not None or base.encoding is not None:
            raise LayoutError(f"stored tensor {v.stored!r} is not a plain contiguous tensor",
                              path=path, tensor=name)
        views.append(_view_entry(name, v, base, path))
    _check_isolated(views, doc.views, path)
    return out + views


def _view_entry(name: str, v: LayoutView, base: TensorEntry, path: str) -> TensorEntry:
    """The entry of one view, checked against its stored tensor: inside it, and not degenerate."""
    size = ITEMSIZE[base.dtype]
    if 0 in v.shape:
        # Nothing to read, but torch and every size computation still see the other dimensions: an
        # empty view may be no wider than its stored tensor, or than EMPTY_VIEW_WIDTH when the writer
        # stored an empty tensor without them ([0, 2**62] of a 16-element tensor is refused).
        wide, stored_room = math.prod(d for d in v.shape if d), math.prod(d for d in base.shape if d)
        room = max(stored_room, EMPTY_VIEW_WIDTH)
        if wide > room or v.offset > stored_room:
            raise LayoutError(f"empty view (offset {v.offset}, shape {list(v.shape)}) is wider than its "
                              f"stored tensor {v.stored!r} (shape {list(base.shape)}): {wide} elements "
                              f"across its other dimensions, at most {room}", path=path, tensor=name)
        span = 0
    else:
        last = v.offset + sum((d - 1) * s for d, s in zip(v.shape, v.strides, strict=True))
        if last >= base.numel:
            raise LayoutError(
                f"view (offset {v.offset}, shape {list(v.shape)}, strides {list(v.strides)}) reaches "
                f"element {last} of {v.stored!r}, which has {base.numel}", path=path, tensor=name)
        span = (last - v.offset + 1) * size
    # A "rows" view at the start of its stored tensor owns the padding after each row, so whole
    # padded slots can be freed; _check_isolated makes sure no other view reads those bytes.
    row_span = v.strides[0] * size if v.kind == "rows" and len(v.shape) >= 1 and v.offset == 0 else None
    if row_span is not None:
        span = v.shape[0] * row_span if span else 0
        if v.offset + span // size > base.numel:
            raise LayoutError(f"padded rows ({v.shape[0]} x {row_span} bytes) run past {v.stored!r}",
                              path=path, tensor=name)
    return TensorEntry(name=name, file=base.file, offset=base.offset + v.offset * size, nbytes=span,
                       dtype=base.dtype, shape=v.shape, strides=v.strides, order=v.order,
                       order_dim=v.order_dim, row_span=row_span)


def _check_isolated(views: list[TensorEntry], recipes: dict[str, LayoutView], path: str) -> None:
    """Refuse a view that owns bytes (padded rows, freed or masked as whole slots) another view reads.

    Views with the same recipe are one tensor under two names (tied weights) and count once. Every
    view stays inside its stored tensor and stored tensors never overlap (checked before), so
    comparing the byte ranges of views is enough; one sweep in offset order, O(n log n).
    """
    distinct: dict[tuple[object, ...], TensorEntry] = {}
    for e in views:
        r = recipes[e.name]
        distinct.setdefault((r.stored, r.kind, r.offset, r.shape, r.strides), e)
    reach, reach_name = -1, ""  # the furthest end of any view so far, and its name
    owned, owned_name = -1, ""  # the furthest end of an owning view so far
    for e in sorted((e for e in distinct.values() if e.nbytes), key=lambda e: e.offset):
        owner = e.row_span is not None
        if owner and reach > e.offset:
            raise LayoutError(f"owns the padded rows [{e.offset}, {e.end}) of the file, which view "
                              f"{reach_name!r} also reads (up to byte {reach})", path=path, tensor=e.name)
        if owned > e.offset:
            raise LayoutError(f"reads bytes [{e.offset}, {min(e.end, owned)}) that view {owned_name!r} owns "
                              "as padded rows (freeing or masking them would change this tensor)",
                              path=path, tensor=e.name)
        if e.end > reach:
            reach, reach_name = e.end, e.name
        if owner and e.end > owned:
            owned, owned_name = e.end, e.name


def _check_no_overlap(shape: tuple[int, ...], strides: tuple[int, ...], name: str, path: str) -> None:
    """Refuse a view whose elements share bytes (rows that overlap cannot be masked one at a time)."""
    repeat = repeated_stride(shape, strides)
    if repeat is not None:
        raise LayoutError(f"view strides {list(strides)} with shape {list(shape)} make elements overlap "
                          f"(a stride of {repeat[0]} inside a span of {repeat[1]} elements)",
                          path=path, tensor=name)


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
