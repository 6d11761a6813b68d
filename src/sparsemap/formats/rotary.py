"""Meta's q/k row order: what llama.cpp's, llama2.c's and Meta's own files store. No torch.

Meta's reference Llama keeps each head's two rotary halves interleaved (rows
``2*j`` and ``2*j + 1`` rotate together); transformers keeps them as halves.
Files descended from Meta's layout (consolidated checkpoints, llama2.c exports,
llama.cpp's GGUF of Llama-family models) store q and k in Meta's order, and a
reader gives that order back as each entry's row ``order``.
"""

from __future__ import annotations

from ..errors import InvalidShapeError


def rotary_order(n_rows: int, n_heads: int) -> tuple[int, ...]:
    """``order[k]``: the transformers row stored at row ``k`` of a q or k projection in Meta's order.

    Per head of ``D`` rows, stored row ``h*D + 2*j + s`` holds transformers row ``h*D + s*(D/2) + j``.

    Raises:
        InvalidShapeError: the rows do not split into ``n_heads`` heads of rotary pairs.

    Example:
        >>> rotary_order(4, 1)
        (0, 2, 1, 3)
    """
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise InvalidShapeError(f"{n_rows} rows cannot split into {n_heads} heads of rotary pairs")
    head_dim = n_rows // n_heads
    half = head_dim // 2
    return tuple(h * head_dim + s * half + j for h in range(n_heads) for j in range(half) for s in range(2))
