"""Running a model in a memory budget: what stays resident, what streams, and the hooks that hold it.

A mapped weight costs page cache, and page cache is charged to the memory
cgroup like anything else. When weights do not fit, the kernel reclaims the
least recently used pages; a model reads its layers in the same cycle every
token, so the least recently used page is always the next one needed, and
every token reads the whole model from disk (measured: 1.4 tokens/s for
SmolLM2 in float32 in 300 MB, against 27 unlimited).

A :class:`BudgetPlan` avoids that by deciding which units (the embedding,
each decoder layer, the head) stay resident and which stream:

    baseline (measured: torch, the tokenizer, code pages) + KV cache + scratch
    + resident units + two streamed units in flight  <=  limit

:class:`Budget` then makes the plan hold while the model runs: before a
streamed unit computes, the next streamed unit is read ahead
(``MADV_WILLNEED``: the kernel reads the range in large sequential requests
while this one computes); after it computes, its pages are released from the
process and from the page cache (``MADV_DONTNEED`` + ``POSIX_FADV_DONTNEED``),
so the cache never grows past the plan and the kernel never needs to reclaim a
resident page. The rows the embedding gathers are released after each step.
Each token then reads the streamed bytes, and only those.

Where two whole units do not fit in flight, the streamed units' large linear
layers (the output projection over the vocabulary, above all) stream in
pieces of rows (:mod:`sparsemap.row_pieces`): such a unit holds its other
weights and two pieces at once, not its whole self, so a budget smaller than
the head still runs.

The layers are the model's stack: its largest ``nn.ModuleList``, or
``nn.Sequential`` of two or more modules of one class (a transformers model's
decoder layers, the lean engine's, LLMs-from-scratch's ``trf_blocks``; not a
``Sequential(Linear, GELU, Linear)``, nor a ``Sequential`` wrapping one model).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from . import pages
from .errors import BudgetError
from .mapped import FileMapping, mapping_of, mapping_or_none
from .memory import Snapshot
from .qtensor import QuantizedTensor
from .row_pieces import RowPieces, can_cut, piece_rows
from .units import format_size

# The least kept for one step's activations and kernel buffers; see scratch_nbytes.
SCRATCH_NBYTES = 8 << 20


class Range(NamedTuple):
    """Bytes of a mapped file that one unit reads: ``[start, start + nbytes)`` of the mapping."""

    mapping: FileMapping
    start: int  # address in the mapping, page-aligned
    nbytes: int  # whole pages


class Unit(NamedTuple):
    """A part of the model read as a whole each step: the embedding, a decoder layer, the head.

    Attributes:
        name: the module's name (``model.layers.3``), or ``"head"`` for what follows the layers.
        modules: the modules whose forward reads it (hooks go on the first and the last).
        ranges: the pages of mapped files its weights lie in.
        gathered: read a few rows per step (an embedding), not as a whole.
        releasable: ``ranges`` less the edge pages another unit's tensors share.
        pieces: its linear layers that stream in pieces of rows when it streams (see
            :mod:`sparsemap.row_pieces`).
        lead: with ``pieces``, what is read ahead of it: its other tensors and each piece layer's first piece.
        piece_nbytes: with ``pieces``, the bytes of the largest piece (one more is read while one computes).
    """

    name: str
    modules: tuple[nn.Module, ...]
    ranges: tuple[Range, ...]
    gathered: bool = False
    releasable: tuple[Range, ...] = ()
    pieces: tuple[nn.Module, ...] = ()
    lead: tuple[Range, ...] = ()
    piece_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)

    @property
    def least_nbytes(self) -> int:
        """Bytes it holds at once while it streams in pieces: its lead and one more piece (all of it, for a
        unit without pieces)."""
        if not self.pieces:
            return self.nbytes
        return sum(r.nbytes for r in self.lead) + self.piece_nbytes + pages.PAGE_SIZE


def _tensor_spans(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t.parts) if isinstance(t, QuantizedTensor) else [t]


def _ranges(tensors: list[torch.Tensor]) -> tuple[Range, ...]:
    """The pages of mapped files that ``tensors`` lie in, merged; tensors not mapped are skipped."""
    spans: dict[int, tuple[FileMapping, list[tuple[int, int]]]] = {}
    for t in tensors:
        for part in _tensor_spans(t):
            if part.numel() == 0 or part.device.type != "cpu":
                continue
            mm = mapping_or_none(part)
            if mm is None:  # a copy (a dequantized or computed tensor): not ours to stream
                continue
            start = part.data_ptr()
            first, last = pages.pages_covering(start, start + part.numel() * part.element_size())
            spans.setdefault(id(mm), (mm, []))[1].append((first, last))
    out = []
    for mm, pieces in spans.values():
        pieces.sort()
        merged = [list(pieces[0])]
        for first, last in pieces[1:]:
            if first <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        out.extend(Range(mm, first, last - first) for first, last in merged)
    return tuple(out)


def _layer_stack(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's layers: its largest (by parameter count) ``nn.ModuleList``, or ``nn.Sequential`` of two
    or more modules of one class (decoder blocks, not a ``Sequential(Linear, GELU, Linear)``)."""
    best: tuple[str, nn.Module] | None = None
    best_n = -1
    for name, module in model.named_modules():
        if len(module) if isinstance(module, nn.ModuleList) else \
                isinstance(module, nn.Sequential) and len(module) > 1 and len({type(m) for m in module}) == 1:
            n = sum(t.numel() for t in module.parameters())
            if n > best_n:
                best, best_n = (name, module), n
    if best is None:
        raise BudgetError("the model has no stack of layers to stream (an nn.ModuleList, or nn.Sequential "
                          "of modules of one class)")
    return best


def _weights(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers (a saved buffer, such as a causal mask, is mapped like a weight)."""
    return [*module.parameters(), *module.buffers()]


def _with_pieces(unit: Unit) -> Unit:
    """``unit`` with its linear layers that can stream in pieces, and its lead (see :class:`Unit`)."""
    if unit.gathered:
        return unit
    cut = tuple(m for module in unit.modules for m in module.modules() if can_cut(m))
    if not cut:
        return unit
    cut_ids = {id(m.weight) for m in cut}
    rest = [t for module in unit.modules for t in _weights(module) if id(t) not in cut_ids]
    firsts = [m.weight[:piece_rows(m.weight.shape[1] * m.weight.element_size())] for m in cut]
    return unit._replace(pieces=cut, lead=_ranges(rest + firsts),
                         piece_nbytes=max(f.numel() * f.element_size() for f in firsts))


def units_of(model: nn.Module) -> list[Unit]:
    """The model's units in forward order: the embedding (gathered), each layer, then the head
    (every other weight: final norm, output projection)."""
    name, layers = _layer_stack(model)
    in_layers = {id(p) for p in _weights(layers)}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)
                  or type(m).__name__ == "Embedding"]
    embedding_params = {id(p) for m in embeddings for p in m.parameters()}
    units = []
    tied_head = [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and id(m.weight) in embedding_params and m not in embeddings]
    if embeddings:
        units.append(Unit("embedding", tuple(embeddings),
                          () if tied_head else _ranges([p for m in embeddings for p in m.parameters()]),
                          gathered=True))
    for i, layer in enumerate(layers):
        units.append(Unit(f"{name}.{i}", (layer,), _ranges(_weights(layer))))
    # parameters() gives a tied tensor once: a head tied to the embedding is counted here, once.
    head = [p for p in _weights(model) if id(p) not in in_layers and (id(p) not in embedding_params
                                                                      or tied_head)]
    head_modules = tuple(m for m in model.modules() if m not in embeddings and not list(m.children())
                         and any(id(p) not in in_layers for p in m.parameters(recurse=False)))
    units.append(Unit("head", head_modules, _ranges(head)))
    return [_with_pieces(u._replace(releasable=_unshared(u, units))) for u in units]


def _unshared(unit: Unit, units: list[Unit]) -> tuple[Range, ...]:
    """``unit``'s ranges less any edge page that lies in another unit's range (a file whose tensors are
    not page-aligned puts the end of one layer and the start of the next on one page): releasing
    that page would throw away the other unit's page too."""
    others = [r for u in units if u is not unit for r in u.ranges]

    def shared(mapping: FileMapping, page: int) -> bool:
        return any(o.mapping is mapping and o.start <= page < o.start + o.nbytes for o in others)

    out = []
    for r in unit.ranges:
        start, end = r.start, r.start + r.nbytes
        if start < end and shared(r.mapping, start):
            start += pages.PAGE_SIZE
        if start < end and shared(r.mapping, end - pages.PAGE_SIZE):
            end -= pages.PAGE_SIZE
        if start < end:
            out.append(Range(r.mapping, start, end - start))
    return tuple(out)


@dataclass(frozen=True)
class BudgetPlan:
    """What stays resident and what streams, for a memory limit. ``str(plan)`` prints it.

    Attributes:
        limit: the budget, bytes.
        baseline: resident memory of the runtime before any weight (torch, the
            tokenizer, code pages), measured.
        kv_cache: bytes the KV cache takes at the longest context planned for.
        scratch: bytes kept for one step's activations and kernel buffers.
        units: every unit, in forward order.
        streamed: names of the units that stream; the rest stay resident.
        in_pieces: names of the streamed units whose large linear layers stream in pieces of rows (only
            when streaming whole units does not fit).
    """

    limit: int
    baseline: int
    kv_cache: int
    scratch: int
    units: tuple[Unit, ...]
    streamed: frozenset[str]
    in_pieces: frozenset[str] = frozenset()

    @property
    def resident_nbytes(self) -> int:
        """Weights that stay mapped (a gathered unit, an embedding, costs the rows of one step only)."""
        return sum(u.nbytes for u in self.units if u.name not in self.streamed and not u.gathered)

    @property
    def streamed_nbytes(self) -> int:
        """Bytes read from disk per step, cold (the streamed units)."""
        return sum(u.nbytes for u in self.units if u.name in self.streamed)

    @property
    def in_flight_nbytes(self) -> int:
        """Page cache of streamed units held at once: the one computing and the one read ahead."""
        return _in_flight([u for u in self.units if u.name in self.streamed], pieces=bool(self.in_pieces))

    @property
    def planned_nbytes(self) -> int:
        """The most memory the plan lets the process hold."""
        return self.baseline + self.kv_cache + self.scratch + self.resident_nbytes + self.in_flight_nbytes

    def __str__(self) -> str:
        n_streamed = sum(1 for u in self.units if u.name in self.streamed)
        rows = [("runtime (torch, tokenizer, code pages; measured)", self.baseline),
                ("KV cache and scratch", self.kv_cache + self.scratch),
                (f"weights resident ({len(self.units) - n_streamed} units)", self.resident_nbytes)]
        if n_streamed:
            how = f", {len(self.in_pieces)} in pieces of rows" if self.in_pieces else ""
            rows.append((f"weights streamed ({n_streamed} units{how}): two in flight", self.in_flight_nbytes))
        rows.append(("planned peak", self.planned_nbytes))
        lines = [f"memory plan for a limit of {format_size(self.limit)}:"]
        lines += [f"  {title:<52}{format_size(n):>10}" for title, n in rows]
        lines.append(f"  read from disk per token: {format_size(self.streamed_nbytes)} (streamed units, cold)"
                     if n_streamed else "  every weight stays resident: nothing is read again per token")
        return "\n".join(lines)


def _in_flight(streamed: Iterable[Unit], *, pieces: bool) -> int:
    """The most two streamed units hold at once (with ``pieces``, a unit with pieces holds its lead and a
    piece)."""
    return sum(sorted((u.least_nbytes if pieces else u.nbytes for u in streamed), reverse=True)[:2])


def check_room(limit: int, baseline: int, kv_cache: int = 0, scratch: int = SCRATCH_NBYTES) -> int:
    """Bytes ``limit`` leaves for weights after the runtime; refuse a limit that leaves none.

    Raises:
        BudgetError: the limit is below the runtime's own baseline (the message gives the measured numbers).
    """
    room = limit - baseline - kv_cache - scratch
    if room <= 0:
        raise BudgetError(f"a memory limit of {format_size(limit)} is below what the runtime needs before "
                          f"any weight: {format_size(baseline)} measured (torch, tokenizer, code pages) + "
                          f"{format_size(kv_cache)} KV cache + {format_size(scratch)} scratch")
    return room


def plan(units: list[Unit], *, limit: int, baseline: int, kv_cache: int,
         scratch: int = SCRATCH_NBYTES) -> BudgetPlan:
    """Keep units resident, largest first, while they fit beside two streamed units in flight.

    Largest first: every unit is read once per step, so the bytes read per
    token are what is left out either way, and leaving out small units leaves
    the least in flight (room that could have held resident weights). Streamed
    units are read whole (ahead, in large requests); where two of them do not
    fit, their large linear layers stream in pieces of rows.

    Raises:
        BudgetError: the limit is below the runtime's own baseline, or leaves
            no room to stream even in pieces (message: the numbers).
    """
    room = check_room(limit, baseline, kv_cache, scratch)
    fixed = limit - room
    streamable = [u for u in units if not u.gathered and u.nbytes]
    if sum(u.nbytes for u in streamable) <= room:
        return BudgetPlan(limit, baseline, kv_cache, scratch, tuple(units), frozenset())
    for pieces in (False, True):
        resident: list[Unit] = []
        rest = sorted(streamable, key=lambda u: -u.nbytes)  # stable: forward order among equals
        while rest:
            if sum(u.nbytes for u in resident) + rest[0].nbytes + _in_flight(rest[1:], pieces=pieces) > room:
                break
            resident.append(rest.pop(0))
        in_flight = _in_flight(rest, pieces=pieces)
        if sum(u.nbytes for u in resident) + in_flight <= room:
            streamed = frozenset(u.name for u in rest)
            in_pieces = frozenset(u.name for u in rest if u.pieces and pieces)
            return BudgetPlan(limit, baseline, kv_cache, scratch, tuple(units), streamed, in_pieces)
    raise BudgetError(f"a memory limit of {format_size(limit)} leaves {format_size(room)} for weights after "
                      f"the runtime's {format_size(fixed)}; streaming needs two units in flight "
                      f"({format_size(in_flight)}, their largest linear layers in pieces)")


class Budget:
    """A plan made to hold while a model runs: hooks that read ahead and release streamed units.

    Example:
        >>> model = sparsemap.models.llama.load("SmolLM2/")                       # doctest: +SKIP
        >>> with Budget(model, limit=400 << 20, max_tokens=len(ids) + 48) as budget:
        ...     print(budget.plan)
        ...     model.generate(ids, 48)
    """

    def __init__(self, model: nn.Module, *, limit: int, max_tokens: int, baseline: int | None = None) -> None:
        snap = Snapshot.take()
        self.units = units_of(model)
        if baseline is None:  # what the process holds now, less the weights' pages already touched
            baseline = snap.anon + snap.file - self._resident_weight_nbytes()
        kv_cache, scratch = kv_cache_nbytes(model, max_tokens), scratch_nbytes(model, max_tokens)
        self.plan = plan(self.units, limit=limit, baseline=baseline, kv_cache=kv_cache, scratch=scratch)
        self._handles: list[Any] = []
        self._pieces: list[RowPieces] = []
        self.own_peak = 0  # the process's own accounting (resident + the model's cached pages), sampled
        self._last_sample = 0.0
        self._install()

    # ------------------------------------------------------------ hooks

    def _install(self) -> None:
        streamed = [u for u in self.units if u.name in self.plan.streamed]
        for i, unit in enumerate(streamed):
            following = streamed[(i + 1) % len(streamed)]
            self._handles.append(unit.modules[0].register_forward_pre_hook(
                lambda *_, nxt=following: self._read_ahead(nxt)))  # samples too: the peak of a step
            self._handles.append(unit.modules[-1].register_forward_hook(
                lambda *_, u=unit: self._release(u)))
            for module in unit.pieces if unit.name in self.plan.in_pieces else ():
                mapping = mapping_of(module.weight)
                self._pieces.append(RowPieces(module, give_back=lambda start, nbytes, u=unit, mm=mapping:
                                              self._give_back(u.name, Range(mm, start, nbytes))))
        for unit in self.units if streamed else ():  # when everything fits, nothing needs releasing
            if unit.gathered and unit.ranges:
                self._handles.append(unit.modules[-1].register_forward_hook(
                    lambda *_, u=unit: self._release(u)))
        last = self.units[-1].modules[-1] if self.units[-1].modules else None
        if last is not None:
            self._handles.append(last.register_forward_hook(lambda *_: self.sample()))

    def _read_ahead(self, unit: Unit) -> None:
        for r in unit.lead if unit.name in self.plan.in_pieces else unit.ranges:
            r.mapping.check_unchanged()  # its pages are about to be read from the file again
            pages.will_need(r.start, r.nbytes)
        self.sample()

    @classmethod
    def _release(cls, unit: Unit) -> None:
        """Give back a unit's pages (see :meth:`_give_back`)."""
        for r in unit.releasable:
            cls._give_back(unit.name, r)

    @staticmethod
    def _give_back(unit_name: str, r: Range) -> None:
        """Drop ``r``'s pages from the process and the page cache. Pages changed in memory (a weight
        edited in place, rows masked) are private copies that releasing would throw away: refused, nothing
        is lost."""
        if pages.private_in_process(r.start, r.nbytes).any():
            raise BudgetError(f"{unit_name} has weights changed in memory (copy-on-write pages of "
                              f"{r.mapping.path}); streaming it would throw the changes away: save the "
                              "model and load the new file, or run without a memory limit")
        pages.release(r.start, r.nbytes)
        pages.drop_cache(r.mapping.fd, r.start - r.mapping.address, r.nbytes)

    def remove(self) -> None:
        """Take the hooks off; the model runs unbudgeted again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._pieces:
            p.remove()
        self._pieces.clear()

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------ accounting

    def _resident_weight_nbytes(self) -> int:
        """Bytes of weight pages mapped into this process now (they count in RssFile)."""
        return sum(int(pages.present_in_process(r.start, r.nbytes).sum()) * pages.PAGE_SIZE
                   for u in self.units for r in u.ranges)

    def accounting(self) -> int:
        """What this process holds, by its own count: resident anonymous and file pages, plus the
        streamed units' pages in the page cache that are not mapped here (read ahead, not yet touched).

        Comparable with the memory cgroup's usage, which charges the page cache the process reads.
        Resident units' cached pages are mapped once touched, so only streamed ones are looked at
        (``mincore`` over a whole 2 GB model costs about 35 ms).
        """
        snap = Snapshot.take()
        extra = 0
        for unit in self.units:
            if unit.name in self.plan.streamed:
                for r in unit.ranges:
                    cached = int(pages.in_page_cache(r.start, r.nbytes).sum())
                    mapped = int(pages.present_in_process(r.start, r.nbytes).sum())
                    extra += max(cached - mapped, 0) * pages.PAGE_SIZE
        return snap.anon + snap.file + extra

    def sample(self, every_s: float = 0.5) -> None:
        """Update :attr:`own_peak` (at most every ``every_s`` seconds: reading residency costs time)."""
        now = time.monotonic()
        if now - self._last_sample >= every_s:
            self._last_sample = now
            self.own_peak = max(self.own_peak, self.accounting())


def _dims(model: nn.Module) -> tuple[int, int, int, int, int, int]:
    """(layers, kv heads, head dim, hidden, intermediate, vocab) of a lean Llama or a transformers model;
    of any other model, read off its modules: its stack's length, its embedding's width and rows, keys
    and values as wide as the embedding, an MLP four times as wide."""
    shape = getattr(model, "shape", None) or getattr(model, "config", None)
    if shape is None or not hasattr(shape, "hidden_size"):
        tables = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Embedding)]
        vocab, hidden = max(tables, default=(32000, 4096))
        layers = len(_layer_stack(model)[1])
        return layers, 1, hidden, hidden, 4 * hidden, vocab
    layers = getattr(shape, "num_hidden_layers", 32)
    heads = getattr(shape, "num_attention_heads", 32)
    kv_heads = getattr(shape, "num_key_value_heads", None) or heads
    hidden = getattr(shape, "hidden_size", 4096)
    head_dim = getattr(shape, "head_dim", None) or hidden // max(heads, 1)
    return (layers, kv_heads, head_dim, hidden, getattr(shape, "intermediate_size", 4 * hidden),
            getattr(shape, "vocab_size", 32000))


def scratch_nbytes(model: nn.Module, max_tokens: int) -> int:
    """Bytes one step's activations take at most: a few float32 copies of the widest activation for
    every token of the prompt (the prefill step), and the logits (sparsemap's lean Llama computes
    the last position's only; transformers' models every position's); at least :data:`SCRATCH_NBYTES`."""
    _, _, _, hidden, intermediate, vocab = _dims(model)
    logit_rows = 2 if hasattr(model, "shape") else 2 * max_tokens  # the lean Llama has a LlamaShape
    return SCRATCH_NBYTES + 4 * max_tokens * (4 * hidden + 3 * intermediate) * 4 + logit_rows * vocab * 4


def kv_cache_nbytes(model: nn.Module, max_tokens: int) -> int:
    """Bytes the KV cache reaches at ``max_tokens``: keys and values in float32 for every layer, twice
    over while a step concatenates the new token's."""
    layers, kv_heads, head_dim, *_ = _dims(model)
    return 2 * layers * 2 * kv_heads * head_dim * 4 * max_tokens


__all__ = ["SCRATCH_NBYTES", "Budget", "BudgetPlan", "Range", "Unit", "check_room", "kv_cache_nbytes", "plan",
           "scratch_nbytes", "units_of"]
