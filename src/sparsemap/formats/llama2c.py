"""llama2.c's model files (Karpathy's ``run.c`` and ``runq.c``): a header, then every weight at a fixed
place. No torch.

Three layouts, as ``export.py`` writes them; all little-endian, float32 unless said:

- **v0, "legacy"** (``run.c``): seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len; a negative vocab_size says the classifier is *not* shared with the embedding),
  then token_embedding_table (vocab, dim); rms_att_weight (layer, dim); wq (layer, n_heads*head_size,
  dim); wk, wv (layer, n_kv_heads*head_size, dim); wo (layer, dim, n_heads*head_size); rms_ffn_weight
  (layer, dim); w1 (layer, hidden, dim); w2 (layer, dim, hidden); w3 (layer, hidden, dim);
  rms_final_weight (dim,); freq_cis_real and freq_cis_imag (seq_len, head_size/2), which ``run.c``
  skips and so does this reader; then wcls (vocab, dim) when not shared. No magic number.
- **v1**: magic ``0x616b3432`` ("ak42"), int32 version 1, the seven int32 (vocab_size positive), a
  byte saying whether the classifier is shared, zeros up to byte 256; then the norms first
  (rms_att, rms_ffn, rms_final), the embedding, wq, wk, wv, wo, w1, w2, w3, [wcls].
- **v2** (``runq.c``): as v1, with an int32 group size after the shared byte (at byte 37, unaligned);
  the norms in float32, then each matrix in the order of v1 as Q8_0: its int8 values (numel), then
  one float32 scale per group of ``group_size`` consecutive values (numel / group_size).

Matrices are stored as ``nn.Linear`` keeps them, (out, in), layer after layer, so each layer's matrix
is its own contiguous run of the file: every tensor is an entry of its own, named as transformers'
``LlamaForCausalLM`` names it (``model.layers.0.self_attn.q_proj.weight``). The rows of q and k are
in Meta's order (the two rotary halves of each head interleaved, as ``export.py`` permutes
transformers' weights back); their entries carry the row ``order`` that gives transformers' order, so
a transformers model gets its own layout (served as a copy; sparsemap's lean engine runs the stored
order instead, zero-copy: :mod:`sparsemap.models.llama2c`).

Q8_0 matrices whose rows hold whole groups (the row length a multiple of the group size, which
``export.py`` ensures for ``dim`` but not for ``hidden_dim``) are kept quantized: a
:class:`~sparsemap.formats.quantized.QuantizedWeight` of scheme ``int8`` whose parts are strided views
of the file (values ``(groups, rows, group)``, scales ``(groups, rows)``), so the int8 kernel runs on
the mapped bytes. A matrix whose groups straddle rows (``runq.c`` computes such a matrix wrongly: its
loops drop the tail of each row) is served dequantized on access: one entry of encoding
``LLAMA2C_Q8_0`` spanning its int8 values then its float32 scales, the group size nbytes' own.
``sparsemap convert --quantize keep`` writes the kept ones as the converted file's int8 parts, the same
values and scales in the same groups (the file's int8 layout needs groups of a multiple of 16, which
``export.py``'s 64 and its halvings down to 16 are); the others are written dequantized, with a note.

Sizes are multiplied in Python integers (``run.c`` needs 64-bit products for 13B models), checked
against the file before any entry is built. Trailing bytes are refused: ``run.c`` and ``runq.c``
ignore them, but a legacy file has no magic and is recognised only by its size matching its header
exactly (see :func:`read_legacy`), and the versioned files are held to the same rule. The zero padding
of the versioned header is not checked (``runq.c`` does not read it).
"""

from __future__ import annotations

import os

from ..errors import Llama2cFormatError, SizeOverflowError, TrailingBytesError, TruncatedFileError
from .catalog import MAX_NBYTES, Catalog, FileStamp, TensorEntry
from .llama2c_header import (
    FIELDS,
    HEADER_NBYTES,
    LEGACY_HEADER_NBYTES,
    MAGIC,
    MAGIC_BYTES,
    NAMES,
    LegacyReading,
    Llama2cHeader,
    read_header,
    read_legacy,
)
from .quantized import INT8, LLAMA2C_Q8_0, QuantizedWeight
from .rotary import rotary_order
from .source import open_regular


def kept_source(group: int) -> str:
    """``QuantizedWeight.source`` of a matrix kept quantized: ``"llama2c-Q8_0/64"``, its group named, so
    that ``convert --quantize keep`` keeps it in groups of that size
    (:func:`~sparsemap.formats.quantized.kept_scheme`)."""
    return f"{LLAMA2C_Q8_0}/{group}"


# ---------------------------------------------------------------- the walk

def validate(f: object, size: int, path: str) -> tuple[Llama2cHeader, list[TensorEntry],
                                                       dict[str, QuantizedWeight]]:
    """Read the header, check it and the file's size, and place every tensor.

    Args:
        f: the file, open for binary reading at its start.
        size: the file's size in bytes.
        path: the file's name, for entries and messages.

    Returns:
        The header, every tensor's entry in file order (transformers' names; q and k with their row
        ``order``), and the Q8_0 matrices kept quantized (v2), by name.

    Raises:
        TruncatedFileError, TrailingBytesError: the file's size is not the header's (with both numbers).
        SizeOverflowError: a tensor the header describes would exceed 2**63 bytes.
        Llama2cFormatError: an inconsistent header, or a legacy file of ambiguous size.

    Example:
        >>> with open("stories15M.bin", "rb") as f:                       # doctest: +SKIP
        ...     header, entries, _ = validate(f, os.fstat(f.fileno()).st_size, "stories15M.bin")
        >>> header.dim, entries[0].name
        (288, 'model.embed_tokens.weight')
    """
    prefix = f.read(len(MAGIC_BYTES))  # type: ignore[attr-defined]
    f.seek(0)  # type: ignore[attr-defined]
    if prefix == MAGIC_BYTES:
        header = read_header(f, size, path)
    else:
        legacy = read_legacy(f.read(LEGACY_HEADER_NBYTES), size, path)  # type: ignore[attr-defined]
        if legacy is None:
            raise Llama2cFormatError("neither the magic 'ak42' nor a legacy header whose fields describe a "
                                     "llama2.c model", path=path)
        if legacy.fault is not None:
            raise legacy.fault
        header = legacy.header
    for kind, quantized in header.arrays():
        nbytes = header.nbytes_of(kind, quantized)
        if nbytes > MAX_NBYTES:
            raise SizeOverflowError(f"shape {list(header.shape(kind))} needs {nbytes} bytes (over 2**63)",
                                    path=path, tensor=NAMES.get(kind, kind).format(0))
    need = header.file_nbytes()
    if size < need:
        raise TruncatedFileError(f"the header (version {header.version}, dim {header.dim}, "
                                 f"{header.n_layers} layers, vocabulary {header.vocab_size}) needs {need} "
                                 f"bytes, the file has {size}", path=path)
    if size > need:
        raise TrailingBytesError(f"{size - need} bytes after the last tensor (the header needs {need}, the "
                                 f"file has {size})", path=path)
    entries, quantized = _place(header, path)
    return header, entries, quantized


def _place(h: Llama2cHeader, path: str) -> tuple[list[TensorEntry], dict[str, QuantizedWeight]]:
    """Every tensor's entry, walking the arrays in file order; runs only once the file's size is right
    (so the number of entries is bounded by the file)."""
    entries: list[TensorEntry] = []
    kept: dict[str, QuantizedWeight] = {}
    offset = h.header_nbytes
    for kind, quantized in h.arrays():
        shape = h.shape(kind)
        nbytes = h.nbytes_of(kind, quantized)
        for layer in range(h.count(kind)):
            if kind != "freq_cis":  # rotary tables: run.c skips them, the model computes its own
                name = NAMES[kind].format(layer)
                order = None
                if kind in ("wq", "wk"):
                    order = rotary_order(shape[0], h.n_heads if kind == "wq" else h.n_kv_heads)
                if quantized:
                    entry, weight = _q8_0(name, path, offset, shape, h.group_size)
                    if weight is not None:
                        kept[name] = weight
                else:
                    entry = TensorEntry(name, path, offset, nbytes, "F32", shape)
                entries.append(entry._replace(order=order))
            offset += nbytes
    return entries, kept


def _q8_0(name: str, path: str, offset: int, shape: tuple[int, ...],
          group: int) -> tuple[TensorEntry, QuantizedWeight | None]:
    """A Q8_0 matrix's entry, and its QuantizedWeight when its rows hold whole groups."""
    n, k = shape
    numel = n * k
    if k % group:  # groups straddle rows: no kernel layout; dequantized on access
        return TensorEntry(name, path, offset, numel + 4 * (numel // group), "F32", shape,
                           encoding=LLAMA2C_Q8_0), None
    groups = k // group
    # Stored (N, G, group) and (N, G); the int8 layout wants (G, N, group) and (G, N): the same bytes
    # seen with the first two dimensions swapped.
    q = TensorEntry(f"{name}@int8", path, offset, numel, "I8", (groups, n, group), strides=(group, k, 1))
    scale = TensorEntry(f"{name}@int8.scale", path, offset + numel, 4 * n * groups, "F32", (groups, n),
                        strides=(1, groups))
    weight = QuantizedWeight(name, INT8, (n, k), group, kept_source(group), q, scale)
    return TensorEntry(name, path, offset, numel, "F32", shape, encoding=INT8), weight


def open_llama2c(path: str, stamp: FileStamp) -> Catalog:
    """Index a llama2.c model file's tensors; read no tensor data."""
    with open_regular(path) as f:
        header, entries, quantized = validate(f, os.fstat(f.fileno()).st_size, path)
    return Catalog(source=path, format="llama2c", entries={e.name: e for e in entries},
                   metadata=header.metadata(), stamps={path: stamp}, quantized=quantized)


def header_of(catalog: Catalog) -> Llama2cHeader:
    """The header a llama2.c catalog was read from (from its metadata)."""
    meta = catalog.metadata
    values = {f: int(meta[f"llama2c.{f}"]) for f in FIELDS}
    version = int(meta["llama2c.version"])
    return Llama2cHeader(version, **values, shared=meta["llama2c.shared_classifier"] == "True",
                         group_size=int(meta.get("llama2c.group_size", "0")),
                         header_nbytes=LEGACY_HEADER_NBYTES if version == 0 else HEADER_NBYTES)


__all__ = ["FIELDS", "MAGIC", "MAGIC_BYTES", "NAMES", "LegacyReading", "Llama2cHeader",
           "header_of", "kept_source", "open_llama2c", "read_header", "read_legacy", "rotary_order",
           "validate"]
