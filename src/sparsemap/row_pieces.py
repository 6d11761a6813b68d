"""A linear layer computed a piece of its rows at a time, each piece read ahead and then given back.

Under a memory budget the layers of a model stream one at a time, but one weight can be larger than all the
room a budget leaves: the output projection over the vocabulary (GPT-2 124M's is 147 MiB of its 622 MiB of
weights; Gemma 3 270M's 320 MiB). Computed whole, it needs every page of itself in memory at once. Its output
features are independent of each other, so it need not be::

    y[..., i:j] = x @ W[i:j].T + b[i:j]        W: (out, in), a view of the mapped file

:class:`RowPieces` replaces such a module's forward with one that computes ``y`` in pieces of rows: before a
piece computes, the next is read ahead (``MADV_WILLNEED``), and after, the pages wholly behind it are given
back through a callback the caller owns (:class:`sparsemap.Budget`'s, which refuses to drop pages changed in
memory). At most two pieces are in memory at once. Each output element is the same dot product over ``in``
as the whole matrix computes, so the output equals the unpieced one (tested).

Only a module whose forward is ``nn.Linear``'s (``F.linear(x, self.weight, self.bias)``: ``nn.Linear``, the
lean engine's ``Linear``), not wrapped on the instance (accelerate's hooks), with a plain mapped row-major
weight is cut: :func:`can_cut` says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import pages
from .mapped import mapping_or_none

# One piece's bytes: large enough that a piece is one efficient read and matmul, small beside any budget.
PIECE_NBYTES = 4 << 20
# A weight smaller than this is computed whole: cutting it saves less than the room two pieces take.
CUT_MIN_NBYTES = 4 * PIECE_NBYTES

# Gives back [start, start + nbytes) of a mapping: page-aligned addresses, whole pages.
GiveBack = Callable[[int, int], None]


def can_cut(module: nn.Module) -> bool:
    """Whether ``module`` computes ``nn.Linear``'s forward, unwrapped, of a plain mapped row-major weight of
    at least :data:`CUT_MIN_NBYTES` on the CPU: what :class:`RowPieces` can compute in pieces."""
    weight = getattr(module, "weight", None)
    if type(module).forward is not nn.Linear.forward or "forward" in module.__dict__:  # a hook's wrapper
        return False
    if type(weight) not in (nn.Parameter, torch.Tensor):
        return False  # quantized blocks (QuantizedTensor), a DTensor: not rows of a mapping
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.stride() != (weight.shape[1], 1):
        return False
    if weight.numel() * weight.element_size() < CUT_MIN_NBYTES:
        return False
    return mapping_or_none(weight) is not None


def piece_rows(row_nbytes: int, piece_nbytes: int = PIECE_NBYTES) -> int:
    """Rows per piece: about ``piece_nbytes``, a whole number of pages when rows allow it (rows of
    3,072 bytes: a multiple of 4 rows), so that pieces of a page-aligned weight end on page boundaries.

    Example:
        >>> piece_rows(3072, 4 << 20)
        1364
    """
    align = pages.PAGE_SIZE // math.gcd(row_nbytes, pages.PAGE_SIZE)
    rows = max(1, piece_nbytes // row_nbytes)
    return max(align, rows // align * align)


class RowPieces:
    """``module`` (see :func:`can_cut`) computed in row pieces until :meth:`remove`.

    Args:
        module: the linear layer; its forward is replaced (an instance attribute) until :meth:`remove`.
        give_back: called with each stretch of whole pages the computed pieces have left behind.
        piece_nbytes: about how many bytes of weight one piece holds.

    Example:
        >>> pieces = RowPieces(model.lm_head, give_back=release)                   # doctest: +SKIP
        >>> logits = model(ids)         # the head read 4 MiB at a time, each piece released after
        >>> pieces.remove()
    """

    def __init__(self, module: nn.Module, *, give_back: GiveBack, piece_nbytes: int = PIECE_NBYTES) -> None:
        if not can_cut(module):
            raise ValueError(f"{type(module).__name__} is not a linear layer over a mapped weight of at "
                             f"least {CUT_MIN_NBYTES} bytes")
        self.module = module
        self.give_back = give_back
        weight = module.weight  # (out, in)
        self.rows = piece_rows(weight.shape[1] * weight.element_size(), piece_nbytes)
        module.forward = self.forward  # type: ignore[method-assign]

    def remove(self) -> None:
        """Give the module its own forward back (unless something replaced this one since: left as it is)."""
        if self.module.__dict__.get("forward") == self.forward:
            del self.module.forward  # the class's forward again (can_cut refused a module with its own)

    def _span(self, first: int, stop: int) -> tuple[int, int]:
        """Addresses ``[start, end)`` of rows ``[first, stop)`` of the weight."""
        weight = self.module.weight
        row = weight.shape[1] * weight.element_size()
        return weight.data_ptr() + first * row, weight.data_ptr() + stop * row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight, self.module.bias  # (out, in), (out,) or None
        out_features, step = weight.shape[0], self.rows
        out: torch.Tensor | None = None  # (..., out)
        kept_from = pages.pages_inside(*self._span(0, out_features))[0]  # pages before it may be shared
        for first in range(0, out_features, step):
            stop = min(first + step, out_features)
            if stop < out_features:  # the next piece is read while this one computes
                start, end = pages.pages_covering(*self._span(stop, min(stop + step, out_features)))
                pages.will_need(start, end - start)
            piece = F.linear(x, weight[first:stop], None if bias is None else bias[first:stop])  # (..., rows)
            if out is None:
                out = piece.new_empty((*piece.shape[:-1], out_features))
            out[..., first:stop] = piece
            # Whole pages behind this piece; a page it shares with the next piece goes with that one, and
            # the last partial page is the caller's (another tensor may share it).
            behind = pages.pages_inside(kept_from, self._span(0, stop)[1])[1]
            if behind > kept_from:
                self.give_back(kept_from, behind - kept_from)
                kept_from = behind
        assert out is not None  # out_features >= 1: can_cut saw a weight of CUT_MIN_NBYTES
        return out


__all__ = ["CUT_MIN_NBYTES", "PIECE_NBYTES", "RowPieces", "can_cut", "piece_rows"]
