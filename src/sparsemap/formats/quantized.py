"""Quantized weights stored in the layouts torch's CPU kernels read, so they run mapped. No torch.

A weight ``W`` of shape ``(N, K)`` (out, in) is stored in one of two schemes,
each as a few plain safetensors tensors under reserved names:

``int4``: 4-bit values in groups of ``group`` along ``K``, each group with a
scale and a zero: ``W[n, k] = (q - 8) * scale + zero``. Stored as
``W@int4``, uint8 ``(N, K/2)`` in the packed layout of torch's
``_weight_int4pack_mm_for_cpu`` (it differs between CPU capabilities, so the
file records the layout it was packed for), and ``W@int4.scale_zero``, bf16
``(K/group, N, 2)``. GGUF's Q4_0, Q4_1 and Q4_K map onto it.

``int8``: 8-bit values, group-major so each group is one contiguous matrix
for torch's ``_weight_int8pack_mm``: ``W[n, k] = q * scale (+ zero)``. Stored
as ``W@int8``, int8 ``(K/group, N, group)``, ``W@int8.scale``, float32
``(K/group, N)``, and optionally ``W@int8.zero``, float32 ``(K/group, N)``.
GGUF's Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q5_K and Q6_K map onto it: values of more
than 4 bits, or groups of 16, which the int4 kernel does not take. So does any
4-bit weight whose rows are gathered (an embedding): the int4 layout cannot give
back one row.

What each weight is (scheme, logical shape, group, the source type) is a JSON
document under ``__metadata__[QUANT_KEY]``. :func:`apply_quantization` checks
it against the stored tensors and gives each weight back as one logical entry
(``encoding`` ``"int4"`` or ``"int8"``) plus a :class:`QuantizedWeight` with
its parts. :func:`scheme_for` is the planner's rule for what becomes what.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..errors import LayoutOptionError, QuantizationError, UnsupportedQuantizationError
from .catalog import TensorEntry
from .dtypes import FLOATING
from .reserved import QUANT_KEY, QUANT_MARKS

QUANT_VERSION = 1
INT4, INT8 = "int4", "int8"
INT4_GROUPS = (32, 64, 128, 256)  # what the int4 kernel accepts
INT4_N_MULTIPLE = 16  # the int4 packer works in blocks of 16 output rows
INT8_GROUP_MULTIPLE = 16  # the int8 kernel reads K in runs of 16 (and crashes on a K that is not)

# GGUF type -> (scheme, group, has a zero) when kept quantized.
FROM_GGUF: dict[str, tuple[str, int, bool]] = {
    "Q4_0": (INT4, 32, True),  # values d * (q - 8): a zero of -8 d beside each scale
    "Q4_1": (INT4, 32, True),
    "Q4_K": (INT4, 32, True),
    "Q5_0": (INT8, 32, False),  # 5-bit values d * (q - 16): in int8, one scale per 32
    "Q5_1": (INT8, 32, True),  # d * q + m: a zero beside each scale
    "Q8_0": (INT8, 32, False),
    "Q6_K": (INT8, 16, False),
    "Q5_K": (INT8, 32, True),  # 5-bit values d * sc * q - dmin * m: int8, a zero beside each scale
    "Q3_K": (INT8, 16, False),  # 3-bit values in -4..3, a 6-bit scale per 16
    "Q2_K": (INT8, 16, True),  # 2-bit values, a 4-bit scale and min per 16
}
# Float tensors quantized on the way out (``sparsemap convert --quantize q8_0``). Group 0: a whole row
# (one scale per output channel: one int8 kernel call per matmul, where groups of 32 take K / 32).
FROM_FLOAT: dict[str, tuple[str, int, bool]] = {
    "q8_0": (INT8, 32, False),
    "q4_1": (INT4, 32, True),
    "int8": (INT8, 0, False),
}
MODES = ("keep", *FROM_FLOAT)
# llama2.c's Q8_0 (runq.c): int8 values, a float32 scale per group of the file's own size (export.py's
# group_size). A weight whose rows hold whole groups comes from ``"llama2c-Q8_0/G"`` (G its group): int8
# in groups of G, as it lies; one whose groups straddle rows has no such form.
LLAMA2C_Q8_0 = "llama2c-Q8_0"
# Tensors whose rows are gathered, not multiplied: never int4 (see the module docstring).
GATHERED = ("*embed_tokens*", "*token_embd*", "*wte*", "*word_embeddings*", "*embeddings.weight")


def supported_types() -> str:
    return ", ".join(FROM_GGUF)


def kept_scheme(encoding: str) -> tuple[str, int, bool] | None:
    """``(scheme, group, zero)`` a source's quantization is kept in, or ``None`` where no kernel layout
    holds it: a GGUF type (:data:`FROM_GGUF`), or llama2.c's Q8_0 in groups of a multiple of 16.

    Example:
        >>> kept_scheme("Q4_1"), kept_scheme("llama2c-Q8_0/64"), kept_scheme("llama2c-Q8_0/8")
        (('int4', 32, True), ('int8', 64, False), None)
    """
    if encoding in FROM_GGUF:
        return FROM_GGUF[encoding]
    kind, _, group = encoding.partition("/")
    if kind == LLAMA2C_Q8_0 and group.isdecimal() and int(group) and not int(group) % INT8_GROUP_MULTIPLE:
        return INT8, int(group), False
    return None


class QuantizedWeight(NamedTuple):
    """One quantized weight: how its values are coded, and the stored tensors that hold them.

    Attributes:
        name: the logical weight's name (``model.layers.0.mlp.up_proj.weight``).
        scheme: ``"int4"`` or ``"int8"``.
        shape: logical ``(N, K)``.
        group: elements along ``K`` that share a scale.
        source: what it was quantized from (a GGUF type such as ``"Q4_1"``, or ``"F32"``).
        q: the packed values' entry.
        scale: the scales' entry (for int4, scales and zeros interleaved).
        zero: the zeros' entry (int8 with zeros only).
        int4_layout: the packed layout's fingerprint (int4 only; see :mod:`sparsemap.quantize`).
    """

    name: str
    scheme: str
    shape: tuple[int, int]
    group: int
    source: str
    q: TensorEntry
    scale: TensorEntry
    zero: TensorEntry | None = None
    int4_layout: str | None = None

    @property
    def parts(self) -> tuple[TensorEntry, ...]:
        return (self.q, self.scale) if self.zero is None else (self.q, self.scale, self.zero)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def part_specs(name: str, scheme: str, shape: tuple[int, int], group: int,
               zero: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(stored name, dtype, shape)`` of each stored part of a weight, in file order."""
    n, k = shape
    g = k // group
    if scheme == INT4:
        return [(f"{name}@int4", "U8", (n, k // 2)), (f"{name}@int4.scale_zero", "BF16", (g, n, 2))]
    parts = [(f"{name}@int8", "I8", (g, n, group)), (f"{name}@int8.scale", "F32", (g, n))]
    if zero:
        parts.append((f"{name}@int8.zero", "F32", (g, n)))
    return parts


def scheme_for(name: str, shape: tuple[int, ...], dtype: str, encoding: str | None, mode: str | None,
               gathered: tuple[str, ...] = GATHERED) -> tuple[str, int, bool] | None:
    """``(scheme, group, zero)`` a tensor is stored in under ``mode``, or ``None`` to store it as it is.

    ``mode`` is ``"keep"`` (GGUF quantizations kept, in the kernels' layout),
    ``"q8_0"`` or ``"q4_1"`` (floating 2-D weights quantized), or ``None``.

    Raises:
        UnsupportedQuantizationError: a GGUF type that has no kernel layout here.
        LayoutOptionError: an unknown mode, or a shape the scheme cannot take.
    """
    if mode is None:
        return None
    if mode not in MODES:
        raise LayoutOptionError(f"quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if encoding is not None and len(shape) != 2:
        return None  # a stack of matrices (experts): no kernel takes it; stored dequantized
    if encoding is not None:
        kept = kept_scheme(encoding)
        if kept is None:
            raise UnsupportedQuantizationError(f"{encoding} cannot be kept quantized (supported: "
                                               f"{supported_types()}, llama2.c's Q8_0; or convert without "
                                               "quantize to dequantize it)", tensor=name)
        chosen = kept
    elif mode != "keep" and dtype in FLOATING and len(shape) == 2 and shape[0] and shape[1] and (
            shape[1] % (FROM_FLOAT[mode][1] or INT8_GROUP_MULTIPLE) == 0):
        scheme, group, zero = FROM_FLOAT[mode]
        chosen = scheme, group or shape[1], zero
    else:
        return None
    scheme, group, zero = chosen
    if len(shape) != 2 or shape[1] % group:
        raise LayoutOptionError(f"{name}: shape {list(shape)} cannot be stored {scheme} in groups of {group}")
    if scheme == INT4 and (shape[0] % INT4_N_MULTIPLE or any(fnmatch.fnmatchcase(name, p) for p in gathered)):
        # rows gathered, or a row count the int4 packer refuses: the same values in int8 (4 bits fit in 8)
        scheme = INT8
    return scheme, group, zero or scheme == INT4  # int4 always stores a zero beside each scale


def document(weights: Mapping[str, tuple[str, tuple[int, int], int, bool, str, str | None]],
             int4_layout: str | None) -> str:
    """The JSON stored under ``__metadata__[QUANT_KEY]``: ``weights`` maps a name to
    ``(scheme, shape, group, zero, source, tied)``; a tied weight reads the parts of the one named."""
    out: dict[str, Any] = {}
    for name, (s, shape, g, z, src, tied) in weights.items():
        out[name] = {"tied": tied} if tied else {"scheme": s, "shape": list(shape), "group": g, "zero": z,
                                                  "from": src}
    return json.dumps({"version": QUANT_VERSION, "int4_layout": int4_layout, "weights": out},
                      separators=(",", ":"))


def _field(spec: dict[str, Any], key: str, kind: type, path: str, name: str) -> Any:
    value = spec.get(key)
    if type(value) is not kind:
        raise QuantizationError(f"{QUANT_KEY}: {key!r} must be {kind.__name__}, got {str(value)[:60]}",
                                path=path, tensor=name)
    return value


def apply_quantization(entries: list[TensorEntry], metadata: Mapping[str, str],
                       path: str) -> tuple[list[TensorEntry], dict[str, QuantizedWeight]]:
    """The logical tensors of a file with quantized weights, and those weights' parts.

    Each weight's parts are checked against what its document says (names,
    dtypes, shapes, plain contiguous storage); parts are hidden from the
    entries and the weight is listed once, with ``encoding`` set to its
    scheme, ``dtype`` F32 (what it dequantizes to) and the packed values'
    offset. A stored tensor with a reserved quantized name that no weight
    claims is refused.

    Raises:
        QuantizationError: the document is malformed or disagrees with the stored tensors.
    """
    try:
        doc = json.loads(metadata[QUANT_KEY])
    except ValueError as e:
        raise QuantizationError(f"{QUANT_KEY} is not JSON: {e}", path=path) from None
    if not isinstance(doc, dict) or doc.get("version") != QUANT_VERSION or not isinstance(doc.get("weights"),
                                                                                          dict):
        raise QuantizationError(f"{QUANT_KEY} must be an object with version {QUANT_VERSION} and weights",
                                path=path)
    layout = doc.get("int4_layout")
    if layout is not None and not isinstance(layout, str):
        raise QuantizationError(f"{QUANT_KEY}: int4_layout must be a string", path=path)
    stored = {e.name: e for e in entries}
    claimed: set[str] = set()
    weights: dict[str, QuantizedWeight] = {}
    tied: dict[str, str] = {}
    for name, spec in doc["weights"].items():
        if not isinstance(spec, dict):
            raise QuantizationError(f"{QUANT_KEY}: weight entry must be an object", path=path, tensor=name)
        if name in stored:
            raise QuantizationError("quantized weight's name collides with a stored tensor", path=path,
                                    tensor=name)
        if "tied" in spec:
            tied[name] = _field(spec, "tied", str, path, name)
            continue
        scheme = spec.get("scheme")
        if scheme not in (INT4, INT8):
            raise QuantizationError(f"scheme {str(scheme)[:40]!r} is not int4 or int8", path=path,
                                    tensor=name)
        shape = _field(spec, "shape", list, path, name)
        group = _field(spec, "group", int, path, name)
        zero = _field(spec, "zero", bool, path, name)
        source = _field(spec, "from", str, path, name)
        if len(shape) != 2 or not all(type(d) is int and d > 0 for d in shape):
            raise QuantizationError(f"shape {shape[:4]} is not two positive integers", path=path, tensor=name)
        n, k = shape
        if group <= 0 or k % group or (scheme == INT4 and (group not in INT4_GROUPS or n % INT4_N_MULTIPLE)) \
                or (scheme == INT8 and group % INT8_GROUP_MULTIPLE):
            raise QuantizationError(f"{scheme} weight of shape {shape} cannot have groups of {group}",
                                    path=path, tensor=name)
        if scheme == INT4 and layout is None:
            raise QuantizationError("an int4 weight needs the file's int4_layout", path=path, tensor=name)
        parts = []
        for part, dtype, part_shape in part_specs(name, scheme, (n, k), group, zero):
            e = stored.get(part)
            if e is None:
                raise QuantizationError(f"part {part!r} is missing", path=path, tensor=name)
            if (e.dtype, e.shape) != (dtype, part_shape) or not e.zero_copy or e.strides is not None:
                raise QuantizationError(f"part {part!r} is {e.dtype} {list(e.shape)}, should be plain "
                                        f"{dtype} {list(part_shape)}", path=path, tensor=name)
            parts.append(e)
            claimed.add(part)
        weights[name] = QuantizedWeight(name, scheme, (n, k), group, source, *parts,
                                        int4_layout=layout if scheme == INT4 else None)
    for name, target in tied.items():
        if target not in weights:
            raise QuantizationError(f"tied to {target[:80]!r}, which is not a quantized weight of the file",
                                    path=path, tensor=name)
        weights[name] = weights[target]._replace(name=name)
    orphans = [e.name for e in entries if any(mark in e.name for mark in QUANT_MARKS)]
    orphans = [n for n in orphans if n not in claimed]
    if orphans:
        raise QuantizationError("stored tensor looks like a quantized part but no weight claims it",
                                path=path, tensor=orphans[0])
    out = [e for e in entries if e.name not in claimed]
    for w in weights.values():
        out.append(TensorEntry(name=w.name, file=w.q.file, offset=w.q.offset, nbytes=w.q.nbytes, dtype="F32",
                               shape=w.shape, encoding=w.scheme))
    return out, weights
