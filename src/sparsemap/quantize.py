"""Quantized weights: GGUF blocks and float tensors turned into the layouts torch's CPU kernels read.

Every weight goes through one form, :class:`Coded`: integer values ``q``
``(N, K)`` with a float scale and zero per group of ``group`` elements along
``K``, meaning ``W[n, k] = scale * q + zero``. GGUF's quantizations decode to
it exactly (:func:`from_gguf`; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the K-quants Q2_K to Q6_K), float
tensors are
quantized to it (:func:`from_float`; ``q8_0``, ``q4_1``), and :func:`pack`
writes it in the stored parts of :mod:`sparsemap.formats.quantized`: torch's
packed int4 layout, or group-major int8. :func:`dequantize` goes back.

The packed int4 layout is torch's, and it depends on the CPU capability torch
dispatches to (AVX512, AVX2, default: measured, they differ). A file records
the :func:`int4_layout` it was packed with; a process whose torch packs
differently refuses the file instead of computing garbage.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .errors import QuantizationError, UnsupportedQuantizationError
from .formats.quantized import FROM_FLOAT, FROM_GGUF, INT4, INT8, QuantizedWeight, supported_types

if TYPE_CHECKING:
    from .formats.planner import Plan


class Coded(NamedTuple):
    """A weight as integers and per-group affine factors: ``W = scale * q + zero``, group by group."""

    q: torch.Tensor  # (N, K) int16
    scale: torch.Tensor  # (N, K / group) float32
    zero: torch.Tensor | None  # (N, K / group) float32, or None for 0
    group: int

    def rows(self, index: torch.Tensor) -> Coded:
        """The rows ``index`` (int64, (N,)) of this weight, in that order."""
        zero = self.zero.index_select(0, index) if self.zero is not None else None
        return Coded(self.q.index_select(0, index), self.scale.index_select(0, index), zero, self.group)

    def values(self) -> torch.Tensor:
        """The float32 weight, (N, K)."""
        n, k = self.q.shape
        w = self.q.view(n, -1, self.group).float() * self.scale[..., None]  # (N, G, group)
        if self.zero is not None:
            w += self.zero[..., None]
        return w.view(n, k)


@functools.cache
def int4_layout() -> str:
    """A fingerprint of this torch's packed int4 layout: the packing of a fixed probe, hashed."""
    probe = (torch.arange(64 * 64, dtype=torch.int32).view(64, 64) * 7 + 3) % 16  # (64, 64)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    digest = hashlib.sha256(packed.numpy().tobytes()).hexdigest()[:16]
    return f"torch-cpu-int4pack:{torch.backends.cpu.get_cpu_capability()}:{digest}"


# ---------------------------------------------------------------- GGUF blocks -> Coded

def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of each block, as float32: (..., )."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGML's 4-bit packing: byte ``j`` holds element ``j`` (low nibble) and ``j + len`` (high)."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1).to(torch.int16)


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in Q4_K's 12 bytes: two (..., 8) tensors."""
    s = s.to(torch.int16)
    low_sc, low_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    high_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    high_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat((low_sc, high_sc), -1), torch.cat((low_m, high_m), -1)


def _two_bit_runs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K's and Q3_K's 2-bit packing: (..., 2, 32) bytes -> (..., 2, 4, 32) values in 0..3, where bits
    ``2j, 2j + 1`` of byte ``l`` of a half are element ``32 j + l`` of its 128."""
    shifts = torch.arange(0, 8, 2, dtype=torch.int16)[:, None]  # (4, 1)
    return (qs.to(torch.int16)[..., None, :] >> shifts) & 3


def _bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """(..., 32) bytes -> (..., 8, 32): plane ``i`` holds bit ``i`` of each byte (Q3_K's and Q5_K's
    high bits: plane ``i`` belongs to the ``i``-th run of 32 elements)."""
    return (bits.to(torch.int16)[..., None, :] >> torch.arange(8, dtype=torch.int16)[:, None]) & 1


def from_gguf(raw: torch.Tensor, encoding: str, shape: tuple[int, int], *, name: str = "") -> Coded:
    """Decode a GGUF tensor's blocks (a uint8 view of the file) exactly, without a float copy of it.

    Raises:
        UnsupportedQuantizationError: a type with no decoder here (the message lists those there are).
    """
    n, k = shape
    if encoding == "Q8_0":
        b = raw.view(n, k // 32, 34)  # (N, G, d + 32 int8)
        q = b[..., 2:].contiguous().view(torch.int8).to(torch.int16)  # (N, G, 32)
        return Coded(q.view(n, k), _f16(b, 0), None, 32)
    if encoding == "Q4_0":
        b = raw.view(n, k // 32, 18)  # (N, G, d + 16 bytes of nibbles)
        d = _f16(b, 0)
        return Coded(_nibbles(b[..., 2:]).view(n, k), d, -8 * d, 32)
    if encoding == "Q4_1":
        b = raw.view(n, k // 32, 20)  # (N, G, d + m + 16 bytes of nibbles)
        return Coded(_nibbles(b[..., 4:]).view(n, k), _f16(b, 0), _f16(b, 2), 32)
    if encoding in ("Q5_0", "Q5_1"):
        head = 2 if encoding == "Q5_0" else 4  # d, or d and m
        b = raw.view(n, k // 32, head + 20)  # (N, G, d [+ m] + 4 bytes of high bits + 16 bytes of nibbles)
        high = b[..., head:head + 4].contiguous().view(torch.int32)  # (N, G, 1): bit j is element j's fifth
        bits = (high >> torch.arange(32, dtype=torch.int32)) & 1  # (N, G, 32)
        q = _nibbles(b[..., head + 4:]) | (bits.to(torch.int16) << 4)  # (N, G, 32) in 0..31
        d = _f16(b, 0)
        if encoding == "Q5_0":
            return Coded((q - 16).view(n, k), d, None, 32)  # values d * (q - 16)
        return Coded(q.view(n, k), d, _f16(b, 2), 32)  # values d * q + m
    if encoding == "Q4_K":
        b = raw.view(n, k // 256, 144)  # (N, super-blocks, d + dmin + 12 scale bytes + 128 bytes)
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, m = _q4_k_scales(b[..., 4:16])  # (N, S, 8) each
        qs = b[..., 16:].reshape(n, k // 256, 4, 32)  # four runs of 64 elements: low nibbles, then high
        q = torch.cat((qs & 0xF, qs >> 4), dim=-1).to(torch.int16)  # (N, S, 4, 64)
        scale = (d[..., None] * sc.float()).view(n, -1)  # (N, K / 32)
        zero = (-(dmin[..., None] * m.float())).view(n, -1)
        return Coded(q.view(n, k), scale, zero, 32)
    if encoding == "Q5_K":
        b = raw.view(n, k // 256, 176)  # (N, S, d + dmin + 12 scale bytes + 32 high-bit bytes + 128 bytes)
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, m = _q4_k_scales(b[..., 4:16])  # (N, S, 8) each: one per run of 32
        qs = b[..., 48:].reshape(n, k // 256, 4, 32)  # four runs of 64: low nibbles first, then high
        low = torch.stack((qs & 0xF, qs >> 4), dim=-2).to(torch.int16).view(n, -1, 8, 32)  # (N, S, 8, 32)
        q = low | (_bit_planes(b[..., 16:48]) << 4)  # (N, S, 8, 32) in 0..31
        scale = (d[..., None] * sc.float()).view(n, -1)  # (N, K / 32)
        zero = (-(dmin[..., None] * m.float())).view(n, -1)
        return Coded(q.reshape(n, k), scale, zero, 32)
    if encoding == "Q3_K":
        b = raw.view(n, k // 256, 110)  # (N, S, 32 high-bit bytes + 64 bytes of 2-bit values + 12 + d)
        low = _two_bit_runs(b[..., 32:96].reshape(n, -1, 2, 32)).view(n, -1, 8, 32)  # (N, S, 8, 32)
        q = low - 4 * (1 - _bit_planes(b[..., 0:32]))  # (N, S, 8, 32) in -4..3: a clear bit subtracts 4
        s = b[..., 96:108].to(torch.int16)  # 16 6-bit scales: low nibbles in bytes 0-7, high pairs in 8-11
        nibbles = torch.cat((s[..., 0:8] & 0xF, s[..., 0:8] >> 4), -1)  # (N, S, 16)
        pairs = (s[..., 8:12, None] >> torch.arange(0, 8, 2, dtype=torch.int16)) & 3  # (N, S, 4, 4)
        sc = (nibbles | (pairs.transpose(-1, -2).reshape(n, -1, 16) << 4)) - 32  # (N, S, 16) in -32..31
        scale = (_f16(b, 108)[..., None] * sc.float()).view(n, -1)  # (N, K / 16)
        return Coded(q.reshape(n, k), scale, None, 16)
    if encoding == "Q2_K":
        b = raw.view(n, k // 256, 84)  # (N, S, 16 scale bytes + 64 bytes of 2-bit values + d + dmin)
        q = _two_bit_runs(b[..., 16:80].reshape(n, -1, 2, 32))  # (N, S, 2, 4, 32) in 0..3
        s = b[..., 0:16].to(torch.int16)  # (N, S, 16): a 4-bit scale and a 4-bit min per run of 16
        scale = (_f16(b, 80)[..., None] * (s & 0xF).float()).view(n, -1)  # (N, K / 16)
        zero = (-(_f16(b, 82)[..., None] * (s >> 4).float())).view(n, -1)
        return Coded(q.reshape(n, k), scale, zero, 16)
    if encoding == "Q6_K":
        b = raw.view(n, k // 256, 210)  # (N, S, 128 ql + 64 qh + 16 int8 scales + d)
        ql = b[..., 0:128].reshape(n, -1, 2, 64).to(torch.int16)  # two halves of 128 elements
        qh = b[..., 128:192].reshape(n, -1, 2, 32).to(torch.int16)
        first, second = ql[..., 0:32], ql[..., 32:64]
        lo = torch.cat((first & 0xF, second & 0xF, first >> 4, second >> 4), -1)
        hi = torch.cat(((qh >> 0) & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3), -1)
        q = (lo | (hi << 4)) - 32  # (N, S, 2, 128)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()  # (N, S, 16): one per 16 elements
        scale = (_f16(b, 208)[..., None] * sc).view(n, -1)
        return Coded(q.reshape(n, k), scale, None, 16)
    raise UnsupportedQuantizationError(f"{encoding} has no decoder for kernel layouts (supported: "
                                       f"{supported_types()})", tensor=name or None)


def dequantize_flat_q8_0(raw: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """llama2.c's Q8_0 (``runq.c``): ``numel`` int8 values, then one float32 scale per ``group``
    consecutive values of the flattened tensor (groups may straddle rows), as float32 in ``shape``: a
    copy. ``raw``: the bytes, a uint8 numpy array; the group size follows from its length.
    """
    import numpy as np

    numel = math.prod(shape)
    scales = raw[numel:].view(np.float32)  # (numel / group,): numpy reads them unaligned if need be
    group = numel // len(scales) if len(scales) else 1
    values = raw[:numel].view(np.int8).reshape(-1, group).astype(np.float32) * scales[:, None]
    return torch.from_numpy(values.reshape(shape))


# ---------------------------------------------------------------- float -> Coded

def from_float(w: torch.Tensor, mode: str) -> Coded:
    """Quantize a float weight (N, K): ``q8_0`` (symmetric int8 in groups of 32, float32 scales,
    as GGUF's Q8_0), ``int8`` (the same, one scale per row) or ``q4_1`` (4-bit with a minimum per
    group of 32, as GGUF's Q4_1)."""
    n, k = w.shape
    group = FROM_FLOAT[mode][1] or k
    g = w.detach().float().reshape(n, k // group, group)  # (N, G, group)
    if mode in ("q8_0", "int8"):
        scale = g.abs().amax(-1) / 127  # (N, G)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(g / safe[..., None]).clamp(-127, 127)
        return Coded(q.to(torch.int16).view(n, k), scale, None, group)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, G)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / safe[..., None]).clamp(0, 15)
    return Coded(q.to(torch.int16).view(n, k), scale, lo, group)


# ---------------------------------------------------------------- Coded <-> stored parts

def pack(coded: Coded, scheme: str) -> list[torch.Tensor]:
    """The stored parts of a weight, in :func:`~sparsemap.formats.quantized.part_specs`'s order."""
    n, k = coded.q.shape
    if scheme == INT4:
        if int(coded.q.min()) < 0 or int(coded.q.max()) > 15:
            raise QuantizationError(f"values span [{int(coded.q.min())}, {int(coded.q.max())}], not 0..15")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(coded.q.to(torch.int32), 1)  # (N, K/2)
        zero = coded.zero if coded.zero is not None else torch.zeros_like(coded.scale)
        # The kernel computes (q - 8) * scale + zero'; ours is q * scale + zero.
        scale_zero = torch.stack((coded.scale, zero + 8 * coded.scale), -1)  # (N, G, 2)
        return [packed, scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16)]  # (G, N, 2)
    q = coded.q.view(n, k // coded.group, coded.group).transpose(0, 1).contiguous()  # (G, N, group)
    parts = [q.to(torch.int8), coded.scale.t().contiguous()]  # (G, N, group), (G, N)
    if coded.zero is not None:
        parts.append(coded.zero.t().contiguous())
    return parts


def part_getter(plan: Plan, get: Callable[[str], torch.Tensor],
                coded: Callable[[str], Coded]) -> Callable[[str], torch.Tensor]:
    """The ``get`` :func:`sparsemap.writer.write` calls, for a plan with quantized weights.

    Plain names go to ``get``. The parts of a quantized weight (``w@int4``,
    ``w@int4.scale_zero``...) are packed from ``coded(w)`` when the first is
    asked for and let go after the last, so one weight's parts are held at a time.
    """
    parts_of: dict[str, tuple[str, str, int, int]] = {}
    for r in plan.records:
        if r.quantized is not None:
            weight, scheme = r.quantized
            index = sum(1 for p in parts_of.values() if p[0] == weight)
            parts_of[r.name] = (weight, scheme, index, 0)
    counts: dict[str, int] = {}
    for weight, *_ in parts_of.values():
        counts[weight] = counts.get(weight, 0) + 1
    held: dict[str, list[torch.Tensor]] = {}

    def serve(name: str) -> torch.Tensor:
        if name not in parts_of:
            return get(name)
        weight, scheme, index, _ = parts_of[name]
        if weight not in held:
            held.clear()
            held[weight] = pack(coded(weight), scheme)
            if len(held[weight]) != counts[weight]:  # the plan and the values disagree on a zero
                raise QuantizationError(f"packed into {len(held[weight])} parts, planned {counts[weight]}",
                                        tensor=weight)
        part = held[weight][index]
        if index == counts[weight] - 1:
            del held[weight]
        return part

    return serve


def int4_values(packed: torch.Tensor, k: int, group: int, rows: int = 256) -> torch.Tensor:
    """The 4-bit values (0..15) of a packed int4 weight, (N, K) int16, read back through the kernel.

    The kernel with unit scales and zeros of 8 multiplies by identity rows;
    integers 0..15 are exact in bf16, so this is exact. Costs ``K * K * N``
    multiply-adds: a fallback for dequantizing, not a path for inference.
    """
    n = packed.shape[0]
    ones = torch.zeros(k // group, n, 2, dtype=torch.bfloat16)  # (G, N, 2)
    ones[..., 0], ones[..., 1] = 1, 8
    out = torch.empty(n, k, dtype=torch.int16)
    for start in range(0, k, rows):
        m = min(rows, k - start)
        eye = torch.zeros(m, k, dtype=torch.bfloat16)  # rows start .. start + m of the identity
        eye[:, start:start + m].fill_diagonal_(1)
        out[:, start:start + eye.shape[0]] = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, packed, group, ones).t().to(torch.int16)
    return out


def check_layout(weight: QuantizedWeight) -> None:
    """Refuse an int4 weight packed for a layout this torch does not read."""
    if weight.scheme == INT4 and weight.int4_layout != int4_layout():
        raise QuantizationError(f"packed for {weight.int4_layout}, but this torch ({torch.__version__}) "
                                f"reads {int4_layout()}: convert the source again on this machine",
                                path=weight.q.file, tensor=weight.name)


def decode(weight: QuantizedWeight, parts: list[torch.Tensor]) -> Coded:
    """The :class:`Coded` form of a weight's stored ``parts`` (exact)."""
    n, k = weight.shape
    if weight.scheme == INT8:
        q, scale = parts[0], parts[1]  # (G, N, group), (G, N)
        zero = parts[2].t() if len(parts) > 2 else None
        return Coded(q.transpose(0, 1).reshape(n, k).to(torch.int16), scale.t(), zero, weight.group)
    check_layout(weight)
    scale_zero = parts[1].float()  # (G, N, 2)
    scale, zero = scale_zero[..., 0].t(), scale_zero[..., 1].t()  # (N, G)
    return Coded(int4_values(parts[0], k, weight.group), scale, zero - 8 * scale, weight.group)


def dequantize(weight: QuantizedWeight, parts: list[torch.Tensor]) -> torch.Tensor:
    """The float32 weight (N, K) of stored ``parts`` (a copy)."""
    return decode(weight, parts).values()


__all__ = ["FROM_GGUF", "INT4", "INT8", "Coded", "check_layout", "decode", "dequantize",
           "dequantize_flat_q8_0", "from_float", "from_gguf", "int4_layout", "int4_values", "pack",
           "part_getter"]
