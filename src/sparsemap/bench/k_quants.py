"""GGUF K-quant blocks (Q2_K, Q3_K, Q5_K) written from float weights, for the tests and benchmarks of
weights kept quantized: the ``gguf`` package reads every K-quant but writes none.

Each sub-block gets the plain min/max scale rounded to the super-block's 6-bit (or 4-bit) grid, not the
search for the best scales that llama.cpp's quantizer runs, so the error is larger than a real file's;
the blocks are valid ones, which every reader decodes alike. numpy only.

Example:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    >>> quantize_k(w, "Q5_K").shape     # 176 bytes a super-block of 256 values
    (4, 176)
"""

from __future__ import annotations

import numpy as np

QK = 256  # values in a super-block
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q5_K": 176}


def quantize_k(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` (N, K) as ``qtype`` blocks: (N, K / 256 * bytes a block) uint8, rows in GGUF's order.

    Raises:
        ValueError: an unknown ``qtype``, not a matrix, or a K that is not a multiple of 256.
    """
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"no K-quant writer for {qtype} (there are: {', '.join(BLOCK_BYTES)})")
    if w.ndim != 2:
        raise ValueError(f"{qtype} blocks are written for a matrix, not shape {list(w.shape)}")
    n, k = w.shape
    if k % QK:
        raise ValueError(f"{qtype} needs rows of a multiple of {QK} values, not {k}")
    x = w.astype(np.float32).reshape(n * k // QK, QK)  # (B, 256): one super-block a row
    blocks = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q5_K": _q5_k}[qtype](x)
    return blocks.reshape(n, -1)


def _f16(values: np.ndarray) -> np.ndarray:
    """(B,) float32 -> (B, 2) uint8: each as float16 bytes."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _grid(step: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The super-block factor ``d`` (B,), float16-exact, so that ``step`` (B, S) ~ d * (0..top), and the
    integer multipliers (B, S)."""
    d = (step.max(axis=1) / top).astype(np.float16).astype(np.float32)  # (B,)
    safe = np.where(d > 0, d, 1)
    return d, np.clip(np.rint(step / safe[:, None]), 0, top).astype(np.int32)


def _levels(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, low: int, high: int) -> np.ndarray:
    """Round ``(x + offset) / scale`` per sub-block into low..high: x (B, S, n), scale and offset (B, S)."""
    safe = np.where(scale > 0, scale, 1)[..., None]
    return np.clip(np.rint((x + offset[..., None]) / safe), low, high).astype(np.int32)


def _two_bit_bytes(q: np.ndarray) -> np.ndarray:
    """(B, 256) values in 0..3 -> (B, 64) bytes: bits 2j, 2j + 1 of byte l of half h hold element
    128 h + 32 j + l."""
    runs = q.reshape(-1, 2, 4, 32)  # (B, half, j, l)
    shifts = np.array([0, 2, 4, 6])[:, None]
    return (runs << shifts).sum(axis=2).astype(np.uint8).reshape(-1, 64)


def _bit_plane_bytes(bits: np.ndarray) -> np.ndarray:
    """(B, 256) bits -> (B, 32) bytes: bit c of byte l is element 32 c + l."""
    planes = bits.reshape(-1, 8, 32)  # (B, c, l)
    return (planes << np.arange(8)[:, None]).sum(axis=1).astype(np.uint8)


def _q5_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 8, 32)  # (B, 8, 32): a 6-bit scale and min per 32
    lo = np.minimum(sub.min(axis=2), 0)  # (B, 8)
    step = (np.maximum(sub.max(axis=2), lo) - lo) / 31
    d, sc = _grid(step, 63)
    dmin, mn = _grid(-lo, 63)
    q = _levels(sub, d[:, None] * sc, dmin[:, None] * mn, 0, 31).reshape(-1, QK)  # (B, 256)
    nibbles = (q & 0xF).reshape(-1, 4, 2, 32)  # (B, pair, low/high, l): chunks 2p and 2p + 1 share bytes
    qs = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).astype(np.uint8).reshape(-1, 128)
    scales = np.concatenate((sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)), axis=1).astype(np.uint8)
    return np.concatenate((_f16(d), _f16(dmin), scales, _bit_plane_bytes(q >> 4), qs), axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)  # (B, 16, 16): a signed 6-bit scale per 16, values -4..3
    d, sc = _grid(np.abs(sub).max(axis=2) / 4, 31)
    q = _levels(sub, d[:, None] * sc, np.zeros_like(d[:, None] * sc), -4, 3).reshape(-1, QK)
    high = (q >= 0).astype(np.int32)  # a set bit: the value as it is; clear: 4 was added
    u = sc + 32  # (B, 16) stored in 6 bits
    low_nibbles = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)  # (B, 8)
    pairs = ((u >> 4) & 3).reshape(-1, 4, 4)  # (B, w, i): scale 4 w + i
    high_pairs = (pairs << (2 * np.arange(4))[:, None]).sum(axis=1)  # (B, 4): byte 8 + i
    scales = np.concatenate((low_nibbles, high_pairs), axis=1).astype(np.uint8)
    return np.concatenate((_bit_plane_bytes(high), _two_bit_bytes(q + 4 * (1 - high)), scales, _f16(d)),
                          axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)  # (B, 16, 16): a 4-bit scale and min per 16, values 0..3
    lo = np.minimum(sub.min(axis=2), 0)
    d, sc = _grid((np.maximum(sub.max(axis=2), lo) - lo) / 3, 15)
    dmin, mn = _grid(-lo, 15)
    q = _levels(sub, d[:, None] * sc, dmin[:, None] * mn, 0, 3).reshape(-1, QK)
    scales = (sc | (mn << 4)).astype(np.uint8)
    return np.concatenate((scales, _two_bit_bytes(q), _f16(d), _f16(dmin)), axis=1)
