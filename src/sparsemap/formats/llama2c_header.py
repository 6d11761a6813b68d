"""llama2.c's header: the seven int32 of ``run.c``'s ``Config`` (and the versioned files' magic, version,
flag and group size), what they say and the file size they imply. No torch, no file access.

Sniffing reads a legacy file's first 28 bytes with :func:`read_legacy` (the layout has no magic: a
``*.bin`` is one when its header is consistent and its sizes add up to the file's exactly);
:mod:`sparsemap.formats.llama2c` reads the rest. The layouts are described there.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

from ..errors import FormatError, Llama2cFormatError, TrailingBytesError, TruncatedFileError

MAGIC = 0x616B3432  # "ak42"
MAGIC_BYTES = struct.pack("<I", MAGIC)  # b"24ka" on disk
VERSIONS = (1, 2)
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
PARAMS = struct.Struct("<7i")
LEGACY_HEADER_NBYTES = PARAMS.size  # 28
HEADER_NBYTES = 256  # v1 and v2, padded with zeros
SHARED_AT = 8 + PARAMS.size  # byte 36: the shared-classifier flag
GROUP = struct.Struct("<i")  # v2's group size, at byte 37
# A legacy header is believed only if the file it describes could exist: beyond this, the seven int32
# are more likely the first bytes of something else (a raw float32 dump reads as 10**9-sized ints).
LEGACY_MAX_NBYTES = 1 << 48

# transformers' names for each of llama2.c's arrays ("{}" is the layer).
NAMES = {
    "embed": "model.embed_tokens.weight",
    "rms_att": "model.layers.{}.input_layernorm.weight",
    "wq": "model.layers.{}.self_attn.q_proj.weight",
    "wk": "model.layers.{}.self_attn.k_proj.weight",
    "wv": "model.layers.{}.self_attn.v_proj.weight",
    "wo": "model.layers.{}.self_attn.o_proj.weight",
    "rms_ffn": "model.layers.{}.post_attention_layernorm.weight",
    "w1": "model.layers.{}.mlp.gate_proj.weight",
    "w2": "model.layers.{}.mlp.down_proj.weight",
    "w3": "model.layers.{}.mlp.up_proj.weight",
    "rms_final": "model.norm.weight",
    "wcls": "lm_head.weight",
}
PER_LAYER = frozenset({"rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"})
NORMS = ("rms_att", "rms_ffn", "rms_final")
MATRICES = ("embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3")


class Llama2cHeader(NamedTuple):
    """What a llama2.c header says, checked for consistency (not yet against the file)."""

    version: int  # 0 for the legacy layout
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # positive; a legacy file's sign is ``shared``
    seq_len: int
    shared: bool  # the classifier is the token embedding
    group_size: int = 0  # v2 only
    header_nbytes: int = LEGACY_HEADER_NBYTES

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def shape(self, kind: str) -> tuple[int, ...]:
        """The shape of one tensor of ``kind`` (one layer's, for the per-layer arrays), row-major."""
        d, h, v = self.dim, self.hidden_dim, self.vocab_size
        q, kv = self.n_heads * self.head_size, self.kv_dim
        return {"embed": (v, d), "wcls": (v, d), "rms_att": (d,), "rms_ffn": (d,), "rms_final": (d,),
                "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (h, d), "w2": (d, h),
                "w3": (h, d), "freq_cis": (self.seq_len, self.head_size // 2)}[kind]

    def arrays(self) -> list[tuple[str, bool]]:
        """``(kind, quantized)`` of each array in file order (per-layer arrays once, for all layers)."""
        cls = [] if self.shared else ["wcls"]
        if self.version == 0:
            return [(k, False) for k in ("embed", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1",
                                         "w2", "w3", "rms_final", "freq_cis", "freq_cis", *cls)]
        return [*((k, False) for k in NORMS), *((k, self.version == 2) for k in (*MATRICES, *cls))]

    def nbytes_of(self, kind: str, quantized: bool) -> int:
        """Bytes of one tensor of ``kind`` as stored (Q8_0: values, then one float32 scale per group)."""
        numel = math.prod(self.shape(kind))
        return numel + 4 * (numel // self.group_size) if quantized else 4 * numel

    def count(self, kind: str) -> int:
        return self.n_layers if kind in PER_LAYER else 1

    def file_nbytes(self) -> int:
        """The size of the file this header describes: Python integers, so no product overflows."""
        return self.header_nbytes + sum(self.count(k) * self.nbytes_of(k, q) for k, q in self.arrays())

    def metadata(self) -> dict[str, str]:
        out = {f"llama2c.{f}": str(getattr(self, f)) for f in ("version", *FIELDS)}
        out["llama2c.shared_classifier"] = str(self.shared)
        if self.version == 2:
            out["llama2c.group_size"] = str(self.group_size)
        return out


# ---------------------------------------------------------------- the header

def _fields_fault(values: dict[str, int]) -> str | None:
    """What is inconsistent in the seven header fields (``vocab_size`` already made positive), or None."""
    for name in FIELDS:
        if values[name] <= 0:
            return f"{name} is {values[name]} (must be positive)"
    dim, heads, kv = values["dim"], values["n_heads"], values["n_kv_heads"]
    if dim % heads:
        return f"dim {dim} is not a multiple of n_heads {heads}"
    if kv > heads or heads % kv:
        return f"n_heads {heads} is not a multiple of n_kv_heads {kv}"
    if (dim // heads) % 2:
        return f"head size {dim // heads} (dim {dim} / n_heads {heads}) is odd: rotary pairs need it even"
    return None


def _parse_params(raw: bytes) -> dict[str, int]:
    return dict(zip(FIELDS, PARAMS.unpack(raw), strict=True))


def read_header(f: object, size: int, path: str) -> Llama2cHeader:
    """The header of a versioned (``ak42``) file, checked for consistency.

    Raises:
        TruncatedFileError: the file is shorter than the 256-byte header.
        Llama2cFormatError: an unknown version, a field out of range, a bad flag or group size.
    """
    raw = f.read(HEADER_NBYTES)  # type: ignore[attr-defined]
    if len(raw) < HEADER_NBYTES:
        raise TruncatedFileError(f"the llama2.c header needs {HEADER_NBYTES} bytes, the file has {size}",
                                 path=path)
    magic, version = struct.unpack_from("<Ii", raw)
    if magic != MAGIC:
        raise Llama2cFormatError(f"magic is {magic:#x}, not {MAGIC:#x} ('ak42')", path=path)
    if version not in VERSIONS:
        raise Llama2cFormatError(f"version {version}; sparsemap reads llama2.c versions 0 (legacy, no "
                                 f"magic), {', '.join(map(str, VERSIONS))}", path=path)
    values = _parse_params(raw[8:SHARED_AT])
    fault = _fields_fault(values)
    if fault is not None:
        raise Llama2cFormatError(f"version {version} header: {fault}", path=path)
    flag = raw[SHARED_AT]
    if flag not in (0, 1):
        raise Llama2cFormatError(f"the shared-classifier flag (byte {SHARED_AT}) is {flag}, not 0 or 1",
                                 path=path)
    group = 0
    if version == 2:
        (group,) = GROUP.unpack_from(raw, SHARED_AT + 1)
        if group <= 0:
            raise Llama2cFormatError(f"group size is {group} (must be positive)", path=path)
    header = Llama2cHeader(version, **values, shared=bool(flag), group_size=group,
                           header_nbytes=HEADER_NBYTES)
    if version == 2:
        for kind, quantized in header.arrays():
            numel = math.prod(header.shape(kind))
            if quantized and numel % group:
                name = NAMES[kind].format(0)
                raise Llama2cFormatError(f"{numel} values are not a whole number of groups of {group} "
                                         f"(shape {list(header.shape(kind))})", path=path, tensor=name)
    return header


class LegacyReading(NamedTuple):
    """A legacy (v0) header read from a file's first bytes, and why the file is not that checkpoint."""

    header: Llama2cHeader
    fault: FormatError | None  # None: the file's size is exactly what the header describes


def read_legacy(prefix: bytes, size: int, path: str) -> LegacyReading | None:
    """A file's first bytes read as a legacy llama2.c header, which has no magic number.

    Returns ``None`` when they cannot be one (a field out of range or inconsistent, or a model
    larger than :data:`LEGACY_MAX_NBYTES`): the file is something else. Otherwise the header, with the
    fault that keeps the file from being that checkpoint, if any: shorter than the header says
    (TruncatedFileError), longer (TrailingBytesError), or exactly the size of the *other* reading of
    the classifier flag (Llama2cFormatError: ambiguous, refused rather than guessed).

    Example:
        >>> head = PARAMS.pack(8, 16, 1, 2, 2, 32, 4)   # dim 8, 1 layer, vocabulary 32, shared
        >>> read_legacy(head, 3772, "m.bin").fault is None
        True
        >>> type(read_legacy(head, 3000, "m.bin").fault).__name__
        'TruncatedFileError'
    """
    if len(prefix) < LEGACY_HEADER_NBYTES:
        return None
    values = _parse_params(prefix[:LEGACY_HEADER_NBYTES])
    shared = values["vocab_size"] > 0
    values["vocab_size"] = abs(values["vocab_size"])
    if _fields_fault(values) is not None:
        return None
    header = Llama2cHeader(0, **values, shared=shared)
    need = header.file_nbytes()
    if need > LEGACY_MAX_NBYTES:
        return None
    what = (f"as a llama2.c legacy checkpoint (no magic number: recognised by its header, dim "
            f"{header.dim}, {header.n_layers} layers, vocabulary {header.vocab_size}, classifier "
            f"{'shared' if shared else 'not shared'})")
    if size == need:
        return LegacyReading(header, None)
    other = header._replace(shared=not shared).file_nbytes()
    if size == other:
        sign = "positive" if shared else "negative"
        return LegacyReading(header, Llama2cFormatError(
            f"{what} it needs {need} bytes, but the file has {size}: the size of the same model with the "
            f"classifier {'not ' if shared else ''}shared. The vocab_size's sign ({sign}) and the size "
            "disagree; refused rather than guessed", path=path))
    if size < need:
        return LegacyReading(header, TruncatedFileError(f"{what} it needs {need} bytes, the file has {size}",
                                                        path=path))
    return LegacyReading(header, TrailingBytesError(
        f"{what} it needs {need} bytes, the file has {size}: {size - need} bytes after the last tensor "
        "(run.c ignores them; sparsemap recognises a file without magic only by its exact size)", path=path))
