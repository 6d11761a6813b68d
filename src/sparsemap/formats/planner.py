"""The planner: every stored tensor of a laid-out file, its offset, and the views that undo it. No torch.

Planning needs names, shapes and dtypes only, so a conversion is decided (and
its size, padding and layout errors known) before any tensor data is touched,
on a machine that may not hold the model. :func:`plan` turns a list of
:class:`Spec` and a :class:`Layout` into a :class:`Plan`: the stored
:class:`Record` of each tensor in file order (alignment gaps become padding
tensors), the :class:`~sparsemap.formats.layout.LayoutView` of each tensor in
a special layout, and the finished safetensors header. :mod:`sparsemap.writer`
then streams the data into it.

Every special layout is one stored ``(n_rows, row stride)`` matrix whose rows
hold one or more logical tensors side by side:

- ``rows``: a tensor's rows, each padded so rows share no page needlessly
  (rows of a page or more start on a page; smaller rows are padded to a power
  of two so a page holds a whole number of them), or reordered by a usage profile;
- ``transpose``: a 2-D tensor's columns as rows (a down projection's neurons);
- ``bundle``: one FFN neuron's gate row, up row and down column in one record.

A file with none of these, and no quantized weight, lists exactly the source's
names, shapes and dtypes: alignment comes from the order of the tensors and the
header's padding, never from filler tensors unless asked for (``fillers``).

Dtypes are safetensors names (``"F32"``, ``"BF16"``); sizes and
floating-ness come from :mod:`sparsemap.formats.dtypes`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import LayoutOptionError, ReservedNameError
from .catalog import contiguous_strides
from .dtypes import FLOATING, ITEMSIZE, name_of
from .layout import LayoutDocument, LayoutView
from .quantized import GATHERED, MODES, part_specs, scheme_for
from .quantized import document as quant_document
from .reserved import (
    HEADER_KEYS,
    LAYOUT_KEY,
    PAD_PREFIX,
    QUANT_KEY,
    RESHAPED_FORMAT,
    RESHAPED_KINDS,
    SUFFIXES,
    reserved_reason,
)

# Rows are padded to at most a 64 KiB page (the largest base page in use, arm64's)
# even when tensors are aligned to 2 MiB huge pages: 2 MiB rows would multiply the file.
MAX_ROW_PAGE = 64 << 10

FFN_FAMILIES = (
    # (gate, up, down): each a suffix after the layer prefix; down is stored transposed.
    ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),  # Llama
    (None, "intermediate.dense.weight", "output.dense.weight"),  # BERT
    ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"),  # GGUF
)


# ---------------------------------------------------------------- the options

@dataclass(frozen=True, init=False)
class Layout:
    """How tensors are laid out in a written file. Options are keyword-only.

    Attributes:
        align: byte alignment of the data section and of every tensor
            (4 KiB pages by default; 16 KiB or 64 KiB for other page sizes, 2 MiB
            for huge pages). A power of two.
        dtype: cast floating-point tensors to this dtype while writing. Given
            as a torch dtype (``torch.bfloat16``) or a name (``"bfloat16"``,
            ``"BF16"``); stored as the safetensors name (``"BF16"``).
        pad_rows: glob patterns of tensors whose rows are padded so each row
            starts on a page (rows of a page or more), or a page holds a whole
            number of rows (smaller rows, padded to a power of two). One
            pattern may be given as a plain string.
        transpose: glob patterns of 2-D tensors stored transposed, so a column
            (one FFN neuron of a down projection) becomes a row.
        bundle_ffn: store each FFN neuron's gate, up and down weights as one
            padded record (Llama's ``mlp.{gate,up,down}_proj``, BERT's
            ``intermediate.dense`` and ``output.dense``; down is transposed).
        page: the page rows are padded to; default ``min(align, 64 KiB)``.
        reorder: usage counts per row, by tensor name (``{"emb.weight": [count
            of row 0, count of row 1, ...]}``; for a transposed or bundled
            down projection, one count per neuron). Rows are stored hottest
            first, so rows used together share pages. Loading undoes the order
            with a copy; sparse consumers read the stored order without one.
        quantize: keep weights quantized in the layouts torch's CPU kernels
            read (see :mod:`sparsemap.formats.quantized`): ``"keep"`` keeps a
            GGUF's quantized tensors so, ``"q8_0"`` or ``"q4_1"`` also quantizes
            2-D floating tensors whose rows are a multiple of 32. ``None``
            (default): quantized sources are dequantized.
        gathered: glob patterns of weights whose rows are gathered (embeddings):
            with ``quantize``, stored int8 rather than int4, which cannot give back a row.
        fillers: align every tensor, filling the gaps with padding tensors
            (``__sparsemap_pad__.N``, which other readers list as tensors of the
            model). Off by default: tensors are ordered so that the ones of whole
            pages start on a page and small ones fill the gaps between the others;
            a tensor that still cannot start on a page is left unaligned, and
            ``sparsemap inspect`` names it. A file whose layout changes stored shapes
            (padded, reordered, transposed, bundled or quantized tensors), which
            other readers refuse anyway, always has its gaps filled.

    Example:
        >>> Layout(dtype="bfloat16", pad_rows="*embed_tokens*").dtype, Layout().row_page
        ('BF16', 4096)
    """

    align: int
    dtype: str | None
    pad_rows: tuple[str, ...]
    transpose: tuple[str, ...]
    bundle_ffn: bool
    page: int | None
    reorder: Mapping[str, Sequence[float]] | None
    quantize: str | None
    gathered: tuple[str, ...]
    fillers: bool

    def __init__(self, *, align: int = 4096, dtype: object = None, pad_rows: str | Iterable[str] = (),
                 transpose: str | Iterable[str] = (), bundle_ffn: bool = False, page: int | None = None,
                 reorder: Mapping[str, Sequence[float]] | None = None, quantize: str | None = None,
                 gathered: str | Iterable[str] = GATHERED, fillers: bool = False) -> None:
        # The one place options are normalised; the planner reads only the normalised fields.
        for what, value in (("align", align), ("page", page)):
            if value is not None and (value <= 0 or value & (value - 1)):
                raise LayoutOptionError(f"{what} must be a power of two, got {value}")
        if quantize is not None and quantize not in MODES:
            raise LayoutOptionError(f"quantize must be one of {', '.join(MODES)}, got {quantize!r}")
        name = None
        if dtype is not None:
            try:
                name = name_of(dtype)
            except KeyError:
                raise LayoutOptionError(f"dtype must be a torch dtype or a safetensors dtype name, "
                                        f"got {dtype!r}") from None
        set_ = object.__setattr__  # frozen: assign once, here
        set_(self, "align", align)
        set_(self, "dtype", name)
        set_(self, "pad_rows", _patterns("pad_rows", pad_rows))
        set_(self, "transpose", _patterns("transpose", transpose))
        set_(self, "bundle_ffn", bool(bundle_ffn))
        set_(self, "page", page)
        set_(self, "reorder", dict(reorder) if reorder is not None else None)
        set_(self, "quantize", quantize)
        set_(self, "gathered", _patterns("gathered", gathered))
        set_(self, "fillers", bool(fillers))

    @property
    def row_page(self) -> int:
        """The page padded rows are fitted to."""
        return self.page or min(self.align, MAX_ROW_PAGE)

    def output_dtype(self, dtype: str) -> str:
        """The dtype a tensor of ``dtype`` is written as: the cast applies to floating-point tensors only."""
        return self.dtype if self.dtype is not None and dtype in FLOATING else dtype

    def document(self, views: dict[str, LayoutView]) -> LayoutDocument:
        """The layout document a file written with these options and ``views`` records."""
        return LayoutDocument(align=self.align, page=self.row_page, dtype=self.dtype, pad_rows=self.pad_rows,
                              transpose=self.transpose, bundle_ffn=self.bundle_ffn,
                              reorder=tuple(sorted(self.reorder or {})), views=views)


def _patterns(what: str, value: str | Iterable[str]) -> tuple[str, ...]:
    # A bare string is one pattern, not a sequence of one-character patterns ("*" among them).
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise LayoutOptionError(f"{what} must be glob patterns (strings), got {list(patterns)!r}")
    return patterns


# ---------------------------------------------------------------- what goes in the file

@dataclass(frozen=True)
class Spec:
    """What the planner needs to know of a source tensor, without its data.

    Attributes:
        name: the tensor's name; also its name in the file unless stored in a special layout.
        shape: its shape.
        dtype: its safetensors dtype name (``"F32"``); see :mod:`sparsemap.formats.dtypes`.
        identity: equal (and not ``None``) for tensors that share their bytes
            (tied weights); the first is stored, the others become aliases.
        encoding: the source's quantization (a GGUF type such as ``"Q4_1"``),
            for tensors that are not plain elements; ``dtype`` is then what it dequantizes to.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    identity: object = None
    encoding: str | None = None


@dataclass(frozen=True)
class Part:
    """One logical tensor inside a row record: its rows, or its columns if transposed."""

    name: str
    transposed: bool
    col_offset: int  # elements into the record's row
    n_cols: int  # elements it adds to each record row


@dataclass(frozen=True)
class Record:
    """One stored tensor of the output, as the header lists it.

    Attributes:
        name: its name in the file (suffixed for a special layout, see :data:`SUFFIXES`).
        dtype: safetensors dtype name, after any cast.
        shape: its stored shape; ``(n_rows, row stride)`` for a row record.
        kind: ``"plain"``, ``"rows"``, ``"transpose"``, ``"bundle"``, ``"quant"`` or ``"pad"``.
        parts: for a row record, the logical tensors side by side in each row.
        offset: bytes from the start of the data section.
        order: for reordered rows, stored row ``k`` holds logical row ``order[k]``.
        quantized: for a ``"quant"`` record, ``(weight, scheme)``: the logical
            weight it is a part of, and how that weight is stored.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    parts: tuple[Part, ...] = ()
    offset: int = 0
    order: tuple[int, ...] | None = None
    quantized: tuple[str, str] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Plan:
    """A file decided down to the byte, before any data is read.

    Attributes:
        records: every stored tensor in file order, padding tensors included.
        views: logical name -> view, for each tensor not stored plainly under its own name.
        header: the safetensors header (JSON, padded with spaces), without its 8-byte length.
        data_start: byte offset of the data section in the file (a multiple of the alignment).
        tensors: what a reader of the file lists: logical name -> ``(dtype, shape)`` (a weight kept
            quantized is listed as the F32 it dequantizes to). The writer checks the written file against it.
    """

    records: tuple[Record, ...]
    views: dict[str, LayoutView]
    header: bytes
    data_start: int
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def file_nbytes(self) -> int:
        last = self.records[-1] if self.records else None
        return self.data_start + (last.offset + last.nbytes if last else 0)

    @property
    def padding_nbytes(self) -> int:
        """Bytes of the file that hold no tensor value: padding tensors, row padding, header padding."""
        pad = sum(r.nbytes for r in self.records if r.kind == "pad")
        for r in self.records:
            if r.parts:
                n_rows, stride = r.shape  # (n_rows, row stride)
                pad += (stride - sum(p.n_cols for p in r.parts)) * n_rows * ITEMSIZE[r.dtype]
        return pad + (self.data_start - 8 - len(self.header.rstrip(b" ")))


# ---------------------------------------------------------------- planning

def plan(specs: Sequence[Spec], layout: Layout, metadata: Mapping[str, str] | None = None, *,
         int4_layout: str | None = None) -> Plan:
    """Decide every stored tensor, its offset and the layout views; touch no data.

    Args:
        specs: the source tensors, in the order they are written (bundles go first).
        layout: alignment, cast and special layouts.
        metadata: extra ``__metadata__`` strings (``"format": "pt"`` is added if absent).
        int4_layout: the packed int4 layout the writer's torch makes
            (:func:`sparsemap.quantize.int4_layout`); needed when ``layout.quantize`` makes int4 weights.

    Returns:
        The :class:`Plan`: records, views and header.

    Raises:
        ReservedNameError: a source name in sparsemap's reserved namespace (see
            :func:`reserved_reason`), or two tensors planned under one stored name.
        LayoutOptionError: a name given twice, an unknown dtype, a
            layout these tensors cannot take (a 3-D tensor transposed, a bundle
            whose members disagree, a profile of the wrong length), or bad metadata.

    Example:
        >>> p = plan([Spec("emb", (50, 12), "F32"), Spec("bias", (12,), "F32")], Layout(pad_rows="emb"))
        >>> p.views["emb"].stored, p.views["emb"].strides, p.data_start, p.file_nbytes
        ('emb@rows', (16, 1), 4096, 8240)
    """
    by_name = _index(specs)
    _check_metadata(metadata)
    records, views, quantized = _stored(specs, by_name, layout)
    meta = dict(metadata or {})
    if quantized:
        if int4_layout is None and any(scheme == "int4" for scheme, *_ in quantized.values()):
            raise LayoutOptionError("int4 weights need the int4 layout of the torch that packs them")
        meta[QUANT_KEY] = quant_document(quantized, int4_layout)
    # A file whose stored shapes are not the model's is read by sparsemap only (see RESHAPED_FORMAT): its
    # row records start on pages whatever their sizes, gaps filled.
    reshaped = any(r.kind in RESHAPED_KINDS for r in records)
    laid = (_place_with_fillers if layout.fillers or reshaped else _place)(records, layout.align)
    _check_stored_names(laid, views, quantized)
    header, data_start = _header(laid, views, layout, meta)
    # What a reader lists: a weight kept quantized as the F32 it dequantizes to, the rest after the cast.
    tensors = {s.name: ("F32" if s.name in quantized else layout.output_dtype(s.dtype), s.shape)
               for s in specs}
    return Plan(tuple(laid), views, header, data_start, tensors)


def _index(specs: Sequence[Spec]) -> dict[str, Spec]:
    """Specs by name, refusing what would make a file that does not reopen as the same tensors."""
    by_name: dict[str, Spec] = {}
    for s in specs:
        if s.name in by_name:
            raise LayoutOptionError(f"{s.name}: two tensors have this name")
        # Stored names of special layouts and padding tensors live in a namespace
        # of their own, so a source tensor can never collide with one.
        reason = reserved_reason(s.name)
        if reason is not None:
            raise ReservedNameError(f"tensor name is reserved: {reason}; rename it before saving",
                                    tensor=s.name)
        if s.dtype not in ITEMSIZE:
            raise LayoutOptionError(f"{s.name}: dtype {s.dtype!r} has no safetensors name")
        if not all(type(d) is int and d >= 0 for d in s.shape):
            raise LayoutOptionError(f"{s.name}: shape must be non-negative integers, got {list(s.shape)}")
        by_name[s.name] = s
    return by_name


def _check_stored_names(laid: list[Record], views: Mapping[str, LayoutView],
                        quantized: Mapping[str, object]) -> None:
    """Every stored name once, and no logical name (a view, a quantized weight) also a stored tensor's.

    The source names were checked against the reserved namespace already; this is the last word on
    the header itself, whatever the layout code above derived: two records under one name would make
    a header with a duplicate key, which a reader refuses or, worse, reads as the last one.
    """
    stored: set[str] = set()
    for r in laid:
        if r.name in stored or r.name in HEADER_KEYS:
            raise ReservedNameError("two tensors would be stored under this name", tensor=r.name)
        stored.add(r.name)
    for name in (*views, *quantized):
        if name in stored:
            raise ReservedNameError("the tensor is planned as a view and also stored under its own name",
                                    tensor=name)


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LayoutOptionError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        if key in (LAYOUT_KEY, QUANT_KEY):
            raise LayoutOptionError(f"metadata key {key!r} is the planner's to write")


# name -> (scheme, shape, group, zero, source type, the weight it is tied to or None)
Quantized = dict[str, tuple[str, tuple[int, int], int, bool, str, str | None]]


def _stored(specs: Sequence[Spec], by_name: dict[str, Spec],
            layout: Layout) -> tuple[list[Record], dict[str, LayoutView], Quantized]:
    """The stored records (unplaced, in write order), the views of tensors not stored plainly, and the
    quantized weights."""
    records: list[Record] = []
    views: dict[str, LayoutView] = {}
    quantized: Quantized = {}
    bundled: set[str] = set()
    if layout.bundle_ffn:
        for members in _ffn_bundles(by_name):
            names = [s.name for s, _ in members]
            if bundled.intersection(names):
                continue  # already in another family's bundle
            stored = _common_prefix(names) + SUFFIXES["bundle"]
            if any(r.name == stored for r in records):  # prefixes such as "a." and "a_" strip to one name
                raise ReservedNameError(f"two FFN bundles would be stored under this name (the second "
                                        f"of {', '.join(names)})", tensor=stored)
            record, member_views = _row_record(stored, "bundle", members, layout, pad=True)
            records.append(record)
            views.update(member_views)
            bundled.update(names)
    stored_by_identity: dict[object, Spec] = {}  # tied tensors: the one written
    # A weight tied to an embedding is gathered too, whichever of its names comes first.
    gathered_identities = {s.identity for s in specs if s.identity is not None
                           and _matches(s.name, layout.gathered)}
    for s in specs:
        if s.name in bundled:
            continue
        first = stored_by_identity.get(s.identity) if s.identity is not None else None
        if first is not None and first.name in quantized:
            if (s.shape, s.dtype) != (first.shape, first.dtype):
                raise LayoutOptionError(f"{s.name}: tied to {first.name!r} but has another shape or dtype")
            quantized[s.name] = (*quantized[first.name][:5], first.name)  # the same parts, read twice
            continue
        if first is not None:
            views[s.name] = _tied_view(s, first, views.get(first.name))
            continue
        if s.identity is not None:
            stored_by_identity[s.identity] = s
        gathered = ("*",) if s.identity in gathered_identities else layout.gathered
        chosen = scheme_for(s.name, s.shape, s.dtype, s.encoding, layout.quantize, gathered)
        if chosen is not None:
            records.extend(_quant_records(s, chosen, layout))
            scheme, group, zero = chosen
            quantized[s.name] = (scheme, (s.shape[0], s.shape[1]), group, zero, s.encoding or s.dtype, None)
            continue
        record, own_views = _own_record(s, layout)
        records.append(record)
        views.update(own_views)
    return records, views, quantized


def _quant_records(s: Spec, chosen: tuple[str, int, bool], layout: Layout) -> list[Record]:
    """The stored parts of a weight kept quantized (see :mod:`sparsemap.formats.quantized`)."""
    if _matches(s.name, layout.transpose + layout.pad_rows) or s.name in (layout.reorder or {}):
        raise LayoutOptionError(f"{s.name}: a quantized weight cannot also be transposed, padded or "
                                "reordered")
    scheme, group, zero = chosen
    return [Record(name, dtype, shape, "quant", quantized=(s.name, scheme))
            for name, dtype, shape in part_specs(s.name, scheme, (s.shape[0], s.shape[1]), group, zero)]


def _own_record(s: Spec, layout: Layout) -> tuple[Record, dict[str, LayoutView]]:
    """The record of a tensor stored on its own: plainly, transposed, or as (padded, reordered) rows."""
    if _matches(s.name, layout.transpose):  # 2-D only: _row_record refuses any other
        return _row_record(s.name + SUFFIXES["transpose"], "transpose", [(s, True)], layout,
                           pad=_matches(s.name, layout.pad_rows))
    # A 1-D tensor's rows are single elements: padding them would only waste space.
    pad = _matches(s.name, layout.pad_rows) and len(s.shape) >= 2
    reordered = s.name in (layout.reorder or {}) and len(s.shape) >= 1
    if pad or reordered:
        return _row_record(s.name + SUFFIXES["rows"], "rows", [(s, False)], layout, pad=pad)
    return Record(s.name, layout.output_dtype(s.dtype), s.shape, "plain"), {}


def _row_record(stored: str, kind: str, members: list[tuple[Spec, bool]], layout: Layout, *,
                pad: bool) -> tuple[Record, dict[str, LayoutView]]:
    """One stored ``(n_rows, row stride)`` matrix holding ``members`` side by side, and a view of each.

    ``members`` are ``(spec, transposed)``: a member's rows (or, transposed,
    its columns) are laid next to the others' in each stored row.
    """
    dtypes = {layout.output_dtype(s.dtype) for s, _ in members}
    if len(dtypes) != 1:
        raise LayoutOptionError(f"{stored}: cannot bundle tensors of different dtypes {sorted(dtypes)}")
    dtype = dtypes.pop()
    itemsize = ITEMSIZE[dtype]
    parts: list[Part] = []
    n_rows: int | None = None
    n_cols = 0  # elements of one stored row before padding
    for s, transposed in members:
        if transposed and len(s.shape) != 2:
            raise LayoutOptionError(f"{s.name}: only 2-D tensors can be transposed, shape is {list(s.shape)}")
        rows_here = s.shape[1] if transposed else s.shape[0]
        cols = s.shape[0] if transposed else math.prod(s.shape[1:])
        if n_rows is not None and rows_here != n_rows:
            raise LayoutOptionError(f"{stored}: {s.name} has {rows_here} rows, the others {n_rows}")
        n_rows = rows_here
        parts.append(Part(s.name, transposed, n_cols, cols))
        n_cols += cols
    assert n_rows is not None  # members is never empty
    stride = _row_stride(n_cols * itemsize, itemsize, layout.row_page) if pad else n_cols
    order = _row_order([s.name for s, _ in members], n_rows, layout.reorder or {})
    record = Record(stored, dtype, (n_rows, stride), kind, tuple(parts), order=order)  # (n_rows, stride)
    views = {}
    for (s, _), p in zip(members, parts, strict=True):
        # A transposed member's logical row i is stored column i: step 1 along it, a stored row across.
        strides = (1, stride) if p.transposed else (stride, *contiguous_strides(s.shape[1:]))
        order_dim = 1 if p.transposed and order is not None else 0
        views[s.name] = LayoutView(stored, kind, p.col_offset, s.shape, strides, order, order_dim)
    return record, views


def _tied_view(s: Spec, first: Spec, first_view: LayoutView | None) -> LayoutView:
    """The view of ``s``, whose bytes are those of ``first`` (already planned)."""
    if (s.shape, s.dtype) != (first.shape, first.dtype):
        raise LayoutOptionError(f"{s.name}: tied to {first.name!r} but is {s.dtype} {list(s.shape)}, "
                                f"it {first.dtype} {list(first.shape)}")
    if first_view is not None:
        return first_view  # the first has a special layout: share its recipe
    return LayoutView(first.name, "alias", 0, s.shape, contiguous_strides(s.shape))


def _place_with_fillers(records: list[Record], align: int) -> list[Record]:
    """Records with their offsets: each starts on an ``align`` boundary; gaps become padding tensors."""
    laid: list[Record] = []
    cursor = 0
    for r in records:
        # An empty tensor needs no alignment, and aligning it would make a gap for nothing.
        start = _round_up(cursor, align) if r.nbytes else cursor
        if start > cursor:
            laid.append(Record(f"{PAD_PREFIX}{len(laid)}", "U8", (start - cursor,), "pad", offset=cursor))
        laid.append(replace(r, offset=start))
        cursor = start + r.nbytes
    return laid


# Gaps are filled by subset sums over bitsets of gap + 1 bits, one per candidate tensor: cheap up to 64 KiB
# pages; wider gaps (2 MiB huge pages) are left for Layout(fillers=True).
MAX_FILLED_GAP = 64 << 10


def _place(records: list[Record], align: int) -> list[Record]:
    """Records with their offsets, tiling the data section with no gap and no filler (safetensors requires
    the data to tile): tensors of whole pages first (each then starts on a page, the data section being
    aligned by the header's padding), then the others from the largest, each gap before one filled with
    small tensors whose sizes add up to it exactly, the remaining small tensors last. Every tensor starts
    on a multiple of its element size when the sizes allow it (largest elements first)."""
    whole = [r for r in records if r.nbytes and r.nbytes % align == 0]
    rest = [r for r in records if not (r.nbytes and r.nbytes % align == 0)]
    by_element = sorted(rest, key=lambda r: (-ITEMSIZE[r.dtype], -r.nbytes))  # stable: file order in ties
    large = [r for r in by_element if r.nbytes >= align]
    small = [r for r in by_element if r.nbytes < align]
    laid: list[Record] = []
    cursor = 0

    def put(r: Record) -> None:
        nonlocal cursor
        laid.append(replace(r, offset=cursor))
        cursor += r.nbytes

    for r in whole:
        put(r)
    for r in large:
        gap = -cursor % align
        if gap:
            for f in _fill(small, gap, cursor):
                small.remove(f)
                put(f)
        put(r)
    while small:  # largest elements first; a gap before one that would start off its element size is
        r = small.pop(0)  # filled with smaller-element tensors when some add up to it
        misaligned = -cursor % ITEMSIZE[r.dtype]
        if misaligned and r.nbytes:
            for f in _fill([x for x in small if ITEMSIZE[x.dtype] < ITEMSIZE[r.dtype]], misaligned, cursor):
                small.remove(f)
                put(f)
        put(r)
    return laid


def _fill(small: list[Record], gap: int, cursor: int) -> list[Record]:
    """Small records whose sizes add up to ``gap`` exactly, each able to start on a multiple of its element
    size from ``cursor`` (largest elements first), or ``[]`` when none do."""
    if gap > MAX_FILLED_GAP:
        return []
    candidates = [r for r in small if 0 < r.nbytes <= gap and cursor % ITEMSIZE[r.dtype] == 0]
    full = (1 << (gap + 1)) - 1
    reach = [1]  # reach[i]: bit t set when some of the first i candidates add up to t bytes
    for r in candidates:
        reach.append((reach[-1] | reach[-1] << r.nbytes) & full)
    if not reach[-1] >> gap & 1:
        return []
    chosen = []
    for i in range(len(candidates), 0, -1):  # walk back: take candidate i - 1 when needed to reach the rest
        if not reach[i - 1] >> gap & 1:
            chosen.append(candidates[i - 1])
            gap -= candidates[i - 1].nbytes
    return sorted(chosen, key=lambda r: -ITEMSIZE[r.dtype])


def _header(laid: list[Record], views: dict[str, LayoutView], layout: Layout,
            metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    """``(header, data start)``: the header padded with spaces (allowed by the format) to align the data."""
    meta = dict(metadata or {})
    meta.setdefault("format", "pt")
    if any(r.kind in RESHAPED_KINDS for r in laid):
        # Stored shapes differ from the model's: loaders that check the format (accelerate, transformers
        # before 5) refuse the file rather than load it wrong.
        meta["format"] = RESHAPED_FORMAT
    elif meta["format"] == RESHAPED_FORMAT:  # metadata kept from a reshaped source: this file is plain
        meta["format"] = "pt"
    if views or any(r.kind == "pad" for r in laid) or layout.align > 1:
        meta[LAYOUT_KEY] = layout.document(views).to_json()
    doc: dict[str, object] = {"__metadata__": meta}
    for r in laid:
        doc[r.name] = {"dtype": r.dtype, "shape": list(r.shape),
                       "data_offsets": [r.offset, r.offset + r.nbytes]}
    header = json.dumps(doc, separators=(",", ":")).encode()
    data_start = _round_up(8 + len(header), layout.align)
    return header + b" " * (data_start - 8 - len(header)), data_start


# ---------------------------------------------------------------- helpers

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _row_stride(row_nbytes: int, itemsize: int, page: int) -> int:
    """Row stride in elements: a multiple of the page, or a power of two dividing it (0 for empty rows)."""
    if row_nbytes == 0:
        return 0
    if row_nbytes >= page:
        stride = _round_up(row_nbytes, page)
    else:
        stride = max(1 << (row_nbytes - 1).bit_length(), itemsize)
    return stride // itemsize


def _ffn_bundles(specs: Mapping[str, Spec]) -> list[list[tuple[Spec, bool]]]:
    """Groups of ``(spec, transposed)`` forming FFN neuron bundles, family by family."""
    bundles = []
    for gate, up, down in FFN_FAMILIES:
        for name in specs:
            if not name.endswith(up):
                continue
            prefix = name[: -len(up)]
            members = [(prefix + gate, False)] if gate else []
            members += [(prefix + up, False), (prefix + down, True)]
            if all(m in specs for m, _ in members):
                bundles.append([(specs[m], transposed) for m, transposed in members])
    return bundles


def _common_prefix(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)  # noqa: RUF071 - tensor names, not paths: a character prefix
    return prefix.rstrip("._") or names[0]


def _row_order(members: list[str], n_rows: int,
               profile: Mapping[str, Sequence[float]]) -> tuple[int, ...] | None:
    """Stored-row order from the first member with a profile: hottest first, ties in row order."""
    for m in members:
        counts = profile.get(m)
        if counts is None:
            continue
        if len(counts) != n_rows:
            raise LayoutOptionError(f"{m}: usage profile has {len(counts)} counts for {n_rows} rows")
        return tuple(sorted(range(n_rows), key=lambda i: -counts[i]))
    return None
