"""Meta's original Llama release, seen as transformers' ``LlamaForCausalLM``. No torch here.

Meta publishes Llama 1, 2 and 3 (and Code Llama) as a folder of:

- ``params.json``: the architecture in Meta's words (``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``,
  ``vocab_size`` (-1: the tokenizer's), ``multiple_of``, ``ffn_dim_multiplier``, ``norm_eps``,
  ``rope_theta``, ``use_scaled_rope``);
- ``consolidated.00.pth`` ... ``consolidated.NN.pth``: ``torch.save``'d state dicts, one per rank of the
  model-parallel code that trained it (fairscale). A ``ColumnParallelLinear`` weight (``wq``, ``wk``,
  ``wv``, ``w1``, ``w3``, ``output``) is split by rows, a ``RowParallelLinear`` one (``wo``, ``w2``) by
  columns, the embedding by columns (``ParallelEmbedding``: Llama 1 and 2) or by rows
  (``VocabParallelEmbedding``: Llama 3), and the norms are whole in every file;
- ``tokenizer.model``: SentencePiece (Llama 1 and 2) or tiktoken's ranks (Llama 3).

Two things differ from a transformers checkpoint of the same model, both fixed tables:

- the names (:data:`LAYER_NAMES`, :data:`TOP_NAMES`), as transformers' own conversion script
  (``convert_llama_weights_to_hf.py``, transformers 4) maps them;
- the rows of ``wq`` and ``wk`` within each head: Meta rotates adjacent pairs (rows ``2j`` and ``2j+1``
  of a head are one complex number), transformers pairs row ``j`` with row ``j + head_dim/2``. The
  permutation (the one llama.cpp's and llama2.c's files inherited, :mod:`sparsemap.formats.rotary`) is
  given back as each entry's row ``order``: loading serves those two weights as copies in transformers'
  order, every other tensor as a view of the file.

:func:`read_release` reads ``params.json`` and every file's header, checks them against each other and
returns each file as a :class:`~sparsemap.formats.catalog.Catalog` under transformers' names, with the
dimension the files split each tensor along: rank ``i``'s tensors for a tensor-parallel load, the parts a
conversion joins. ``sparsemap.open`` of a release in one file is that file's catalog
(:func:`open_release`); a release in several files is refused there with the one line that says how to
join it (``sparsemap convert FOLDER OUT/``, :mod:`sparsemap.models.meta_llama`) or load it on as many ranks
as files (:class:`sparsemap.rank_sources.RankFiles`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ..errors import FileChangedError, MetaLlamaFormatError, ShardedReleaseError, SourceNotFoundError
from .catalog import Catalog, FileStamp, TensorEntry
from .dtypes import ITEMSIZE
from .rotary import rotary_order
from .source import META_PARAMS, META_SHARD, ModelSource, check_regular_file, open_regular

FORMAT = "meta-llama"
# params.json is a few hundred bytes; anything this large is not one (and is not read whole).
MAX_PARAMS_NBYTES = 1 << 20
# Above any Llama's sizes (405B: dim 16384, 126 layers, 128 heads, vocab 128256) by far, and small enough
# that products of a few of them stay exact in a float and reasonable as shapes.
MAX_SIZE = 1 << 24
# Dimensions a file splits a tensor along; None: whole in every file.
ROWS, COLUMNS = 0, 1
EMBEDDING = "embedding"  # by columns (Llama 1, 2) or by rows (Llama 3): told by its shape

# Meta's name after "layers.N." -> transformers' after "model.layers.N.", and how the files split it.
LAYER_NAMES: Mapping[str, tuple[str, int | None]] = MappingProxyType({
    "attention.wq.weight": ("self_attn.q_proj.weight", ROWS),
    "attention.wk.weight": ("self_attn.k_proj.weight", ROWS),
    "attention.wv.weight": ("self_attn.v_proj.weight", ROWS),
    "attention.wo.weight": ("self_attn.o_proj.weight", COLUMNS),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", ROWS),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", COLUMNS),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", ROWS),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
})
TOP_NAMES: Mapping[str, tuple[str, int | str | None]] = MappingProxyType({
    "tok_embeddings.weight": ("model.embed_tokens.weight", EMBEDDING),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", ROWS),  # absent: tied to the embedding (Llama 3.2 1B and 3B)
})
# Llama 1's precomputed rotary frequencies: transformers computes them (its converter leaves them out too).
IGNORED = ("rope.freqs",)
# params.json keys of releases that are not a plain Llama language model, and what they are.
NOT_PLAIN = {"quantization_args": "a quantized release (quantization_args)",
             "lora_args": "a LoRA adapter (lora_args)",
             "vision_chunk_size": "a vision model (vision_chunk_size)",
             "moe_args": "a mixture of experts (moe_args, Llama 4)"}


# ---------------------------------------------------------------- params.json

class MetaParams(NamedTuple):
    """``params.json``, checked: Meta's ``ModelArgs`` with its defaults.

    Attributes:
        vocab_size: ``None`` where params.json says -1 (the tokenizer's: read from the embedding).
        ffn_dim_multiplier: ``None`` when absent (no multiplier).
        rope_scaling_factor: where a release states it; ``use_scaled_rope`` alone means Meta's 8.
        max_seq_len: where a release states it (few do).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int | None
    multiple_of: int
    ffn_dim_multiplier: float | None
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool
    rope_scaling_factor: float | None
    max_seq_len: int | None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def intermediate_size(self) -> int:
        """The SwiGLU width Meta's ``FeedForward`` computes: ``int(2 * 4 * dim / 3)``, times
        ``ffn_dim_multiplier`` (truncated), rounded up to a multiple of ``multiple_of``.

        Example:
            >>> read_params_dict({"dim": 4096, "n_layers": 32, "n_heads": 32}).intermediate_size  # Llama 2 7B
            11008
        """
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


_REQUIRED = object()


def read_params(path: str | os.PathLike[str]) -> MetaParams:
    """Read and check ``params.json``.

    Raises:
        MetaLlamaFormatError: not a JSON object, a value of the wrong type or out of range (named, with the
            value), sizes that do not fit together, or a release that is not a plain Llama language model.
    """
    with open_regular(path) as f:
        raw = f.read(MAX_PARAMS_NBYTES + 1)
    if len(raw) > MAX_PARAMS_NBYTES:
        raise MetaLlamaFormatError(f"is over {MAX_PARAMS_NBYTES} bytes: not a params.json", path=path)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise MetaLlamaFormatError(f"is not JSON: {e}", path=path) from None
    return read_params_dict(doc, path=os.fspath(path))


def read_params_dict(doc: Any, *, path: str | None = None) -> MetaParams:
    """:func:`read_params` of a parsed document (``{"model": {...}}``, as some releases nest it, too)."""
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        doc = doc["model"]  # as transformers' conversion script reads it
    if not isinstance(doc, dict):
        raise MetaLlamaFormatError(f"holds a JSON {type(doc).__name__}, not an object of model parameters",
                                   path=path)
    for key, what in NOT_PLAIN.items():
        value = doc.get(key)
        if value not in (None, -1, False, {}):
            raise MetaLlamaFormatError(f"describes {what}; sparsemap reads Meta's plain Llama language "
                                       "models", path=path)

    def integer(key: str, default: object = _REQUIRED, minimum: int = 1) -> Any:
        value = doc.get(key, default)
        if value is _REQUIRED:
            raise MetaLlamaFormatError(f"has no {key!r}", path=path)
        if value is default:
            return value
        # bool is an int in Python: true is no layer count.
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SIZE:
            raise MetaLlamaFormatError(f"{key} is {value!r}; expected an integer from {minimum} to "
                                       f"{MAX_SIZE}", path=path)
        return value

    def number(key: str, default: float | None) -> Any:
        value = doc.get(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise MetaLlamaFormatError(f"{key} is {value!r}; expected a positive number", path=path)
        return float(value)

    dim, n_layers, n_heads = integer("dim"), integer("n_layers"), integer("n_heads")
    n_kv_heads = doc.get("n_kv_heads")
    n_kv_heads = n_heads if n_kv_heads is None else integer("n_kv_heads")
    vocab = doc.get("vocab_size", -1)
    vocab_size = None if vocab == -1 and not isinstance(vocab, bool) else integer("vocab_size")
    scaled = doc.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise MetaLlamaFormatError(f"use_scaled_rope is {scaled!r}; expected true or false", path=path)
    params = MetaParams(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
        multiple_of=integer("multiple_of", 256), ffn_dim_multiplier=number("ffn_dim_multiplier", None),
        norm_eps=number("norm_eps", 1e-5), rope_theta=number("rope_theta", 10000.0),  # Llama 2's ModelArgs
        use_scaled_rope=scaled, rope_scaling_factor=number("rope_scaling_factor", None),
        max_seq_len=integer("max_seq_len", None))
    if dim % n_heads:
        raise MetaLlamaFormatError(f"dim {dim} does not split into n_heads {n_heads} heads", path=path)
    if n_heads % n_kv_heads:
        raise MetaLlamaFormatError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}",
                                   path=path)
    if params.head_dim % 2:
        raise MetaLlamaFormatError(f"head size {params.head_dim} (dim / n_heads) is odd: rotary positions "
                                   "rotate pairs", path=path)
    return params


# ---------------------------------------------------------------- the folder

class Release(NamedTuple):
    """A Meta release, checked, each file seen as transformers' tensors. Immutable.

    Attributes:
        folder: the release's folder.
        params: its ``params.json``.
        vocab_size: ``params.vocab_size``, or the embedding's rows where params.json says -1.
        tied: no ``output.weight``: the head is the embedding.
        ranks: file ``i`` (``consolidated.0i.pth``) as a catalog under transformers' names, the rows of
            q and k in transformers' order (an ``order`` per entry, over that file's heads).
        split_dims: transformers' name -> the dimension the files split it along, ``None`` for a tensor
            whole in every file (the norms; every tensor of a release in one file).
        tokenizer: ``tokenizer.model`` beside ``params.json``, or ``None``.
    """

    folder: str
    params: MetaParams
    vocab_size: int
    tied: bool
    ranks: tuple[Catalog, ...]
    split_dims: Mapping[str, int | None]
    tokenizer: str | None

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor of the whole model (the files' parts joined)."""
        part = self.ranks[0][name].shape
        dim = self.split_dims[name]
        if dim is None:
            return part
        return (*part[:dim], part[dim] * len(self.ranks), *part[dim + 1:])

    def whole_catalog(self) -> Catalog:
        """The whole model's tensors as the joined files would hold them (names, whole shapes, dtypes), to
        match a model against. Never served: every entry's file is the release's folder, which nothing
        maps."""
        entries = {}
        for name, e in self.ranks[0].items():
            shape = self.shape(name)
            nbytes = math.prod(shape) * ITEMSIZE[e.dtype]
            entries[name] = TensorEntry(name=name, file=self.folder, offset=0, nbytes=nbytes, dtype=e.dtype,
                                        shape=shape)
        return Catalog(self.folder, self.ranks[0].format, entries)


def shard_files(folder: str) -> tuple[str, ...]:
    """``consolidated.00.pth`` ... ``consolidated.NN.pth`` in ``folder``, in rank order.

    Raises:
        SourceNotFoundError: none there.
        MetaLlamaFormatError: a gap in the numbering (a file missing).
    """
    found: dict[int, str] = {}
    for name in os.listdir(folder):
        match = META_SHARD.fullmatch(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    if not found:
        raise SourceNotFoundError("no consolidated.NN.pth file beside params.json", path=folder)
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise MetaLlamaFormatError(f"holds {len(found)} consolidated.NN.pth files but not "
                                   f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: each "
                                   "file is one model-parallel slice, and every one is needed", path=folder)
    return tuple(found[i] for i in range(len(found)))


def read_release(source: str | os.PathLike[str] | ModelSource) -> Release:
    """Read ``params.json`` and every ``consolidated.NN.pth`` header; check that they describe one model.

    Args:
        source: the release's folder, its ``params.json``, or the
            :class:`~sparsemap.formats.source.ModelSource` resolved from either.

    Raises:
        MetaLlamaFormatError: params.json is malformed; a file is missing from the numbering; a file holds
            a tensor that is not Llama's, lacks one, or holds one whose shape or dtype is not what
            params.json and the other files say (named, with both shapes).
        FormatError: a ``consolidated.NN.pth`` that is no readable torch checkpoint (its own reader says).

    Example:
        >>> release = read_release("Llama-2-13b/")                 # doctest: +SKIP
        >>> len(release.ranks), release.split_dims["model.layers.0.self_attn.o_proj.weight"]
        (2, 1)
    """
    if isinstance(source, ModelSource):
        folder = source.folder
    else:
        path = os.path.abspath(os.fspath(source))
        folder = path if os.path.isdir(path) else os.path.dirname(path)
    params_path = os.path.join(folder, META_PARAMS)
    params = read_params(params_path)
    shards = shard_files(folder)
    raws = [_open_shard(path) for path in shards]
    ranks, split_dims, vocab_size, tied = _as_transformers(params, raws)
    tokenizer = os.path.join(folder, "tokenizer.model")
    return Release(folder=folder, params=params, vocab_size=vocab_size, tied=tied, ranks=ranks,
                   split_dims=MappingProxyType(split_dims),
                   tokenizer=tokenizer if os.path.isfile(tokenizer) else None)


def open_release(source: ModelSource) -> Catalog:
    """``sparsemap.open`` of a release: its one file under transformers' names, q and k rows in
    transformers' order.

    Raises:
        ShardedReleaseError: a release in several files: no one file holds a whole tensor.
    """
    release = read_release(source)
    if len(release.ranks) > 1:
        first, last = (os.path.basename(c.source) for c in (release.ranks[0], release.ranks[-1]))
        n = len(release.ranks)
        raise ShardedReleaseError(
            f"a Meta release in {n} model-parallel files ({first} ... {last}), each a slice of every matrix: "
            f"join them once with `sparsemap convert {release.folder} OUT/`, then load OUT/; or load it on "
            f"{n} ranks (torchrun --nproc-per-node {n}, tp_plan='auto'), rank i mapping file i",
            path=release.folder)
    return release.ranks[0]


def _open_shard(path: str) -> Catalog:
    """One ``consolidated.NN.pth``: a torch zip checkpoint, as ``sparsemap.open`` reads one (its version
    recorded, a change while its header is read refused)."""
    from .torchzip import open_torch_zip

    check_regular_file(path)  # a FIFO named consolidated.00.pth would block the first read
    before = FileStamp.of(path)
    catalog = open_torch_zip(path, before)
    after = FileStamp.of(path)
    if after != before:
        raise FileChangedError(f"changed while its header was read: {before.differences(after)}", path=path)
    return catalog


# ---------------------------------------------------------------- names, shapes, splits

def _names(n_layers: int) -> dict[str, tuple[str, int | str | None]]:
    """Meta's name -> (transformers' name, split) for every tensor of a model of ``n_layers`` layers."""
    table: dict[str, tuple[str, int | str | None]] = dict(TOP_NAMES)
    for i in range(n_layers):
        for meta, (hf, split) in LAYER_NAMES.items():
            table[f"layers.{i}.{meta}"] = (f"model.layers.{i}.{hf}", split)
    return table


def _as_transformers(params: MetaParams, raws: list[Catalog]
                     ) -> tuple[tuple[Catalog, ...], dict[str, int | None], int, bool]:
    """Each file's catalog renamed and checked: (ranks, split dims, vocabulary size, tied head)."""
    n = len(raws)
    table = _names(params.n_layers)
    first = raws[0]
    for raw in raws:
        unknown = [name for name in raw if name not in table and name not in IGNORED]
        if unknown:
            raise MetaLlamaFormatError(
                f"holds {len(unknown)} tensors that are not Llama's (first: {unknown[0]!r}); Meta's names "
                f"are tok_embeddings, layers.N.attention.wq/wk/wv/wo, layers.N.feed_forward.w1/w2/w3, "
                f"layers.N.attention_norm, layers.N.ffn_norm, norm, output (n_layers {params.n_layers})",
                path=raw.source)
        names = {name for name in raw if name in table}
        expected = {name for name in first if name in table}
        if names != expected:
            odd = sorted(names ^ expected)
            raise MetaLlamaFormatError(f"does not hold the tensors {os.path.basename(first.source)} holds "
                                       f"(first difference: {odd[0]!r}); every file slices the same model",
                                       path=raw.source)
    missing = [name for name in table if name not in first and name != "output.weight"]
    if missing:
        raise MetaLlamaFormatError(f"lacks {len(missing)} of the model's tensors (first: {missing[0]!r}; "
                                   f"params.json says n_layers {params.n_layers})", path=first.source)
    tied = "output.weight" not in first

    embed_split, vocab_size = _embedding(params, raws)
    hd = params.head_dim
    q_rows, kv_rows, inter = params.n_heads * hd, params.n_kv_heads * hd, params.intermediate_size
    full = {"model.embed_tokens.weight": (vocab_size, params.dim), "model.norm.weight": (params.dim,),
            "lm_head.weight": (vocab_size, params.dim)}
    dim_ = params.dim
    per_layer = {"self_attn.q_proj.weight": (q_rows, dim_), "self_attn.k_proj.weight": (kv_rows, dim_),
                 "self_attn.v_proj.weight": (kv_rows, dim_), "self_attn.o_proj.weight": (dim_, q_rows),
                 "mlp.gate_proj.weight": (inter, dim_), "mlp.up_proj.weight": (inter, dim_),
                 "mlp.down_proj.weight": (dim_, inter), "input_layernorm.weight": (dim_,),
                 "post_attention_layernorm.weight": (dim_,)}
    if n > 1:
        for what, count in (("n_heads", params.n_heads), ("n_kv_heads", params.n_kv_heads)):
            if count % n:
                raise MetaLlamaFormatError(f"params.json's {what} {count} do not split over {n} files",
                                           path=os.path.dirname(first.source))

    split_dims: dict[str, int | None] = {}
    entries: list[dict[str, TensorEntry]] = [{} for _ in raws]
    for meta, (hf, split) in table.items():
        if meta not in first:
            continue  # the tied head
        dim = embed_split if split == EMBEDDING else split
        dim = None if n == 1 else dim
        split_dims[hf] = dim  # type: ignore[assignment]
        whole = full.get(hf) or per_layer[hf.split(".", 3)[3]]
        want = whole if dim is None else _part(whole, dim, n, hf, first.source)  # type: ignore[arg-type]
        for rank, raw in enumerate(raws):
            e = raw[meta]
            if e.shape != want:
                raise MetaLlamaFormatError(_shape_fault(params, hf, e.shape, want, n), path=raw.source,
                                           tensor=meta)
            if e.dtype != first[meta].dtype:
                raise MetaLlamaFormatError(f"is {e.dtype} here but {first[meta].dtype} in "
                                           f"{os.path.basename(first.source)}", path=raw.source, tensor=meta)
            entry = e._replace(name=hf)
            if hf.endswith(("q_proj.weight", "k_proj.weight")):
                heads = params.n_heads if hf.endswith("q_proj.weight") else params.n_kv_heads
                entry = entry._replace(order=rotary_order(want[0], heads // n), order_dim=0)
            entries[rank][hf] = entry
    ranks = tuple(Catalog(source=raw.source, format=FORMAT, entries=es, stamps=raw.stamps)
                  for raw, es in zip(raws, entries, strict=True))
    return ranks, split_dims, vocab_size, tied


def _embedding(params: MetaParams, raws: list[Catalog]) -> tuple[int | None, int]:
    """How the files split the embedding (``None``, rows or columns), and the vocabulary size."""
    n = len(raws)
    first = raws[0]
    shape = first["tok_embeddings.weight"].shape
    if len(shape) != 2:
        raise MetaLlamaFormatError(f"has shape {shape}; an embedding is 2-D", path=first.source,
                                   tensor="tok_embeddings.weight")
    rows, cols = shape
    if n == 1 or cols * n == params.dim:  # one file, or ParallelEmbedding (Llama 1, 2): by columns
        dim, vocab = (None if n == 1 else COLUMNS), rows
    elif cols == params.dim:  # VocabParallelEmbedding (Llama 3): by rows
        dim, vocab = ROWS, rows * n
    else:
        raise MetaLlamaFormatError(f"has {cols} columns in each of {n} files; params.json's dim {params.dim} "
                                   f"is {params.dim} columns whole or {params.dim / n:g} per file",
                                   path=first.source, tensor="tok_embeddings.weight")
    if params.vocab_size is not None and vocab != params.vocab_size:
        raise MetaLlamaFormatError(f"holds {vocab} rows in all but params.json says vocab_size "
                                   f"{params.vocab_size}", path=first.source, tensor="tok_embeddings.weight")
    return dim, vocab


def _part(whole: tuple[int, ...], dim: int, n: int, name: str, where: str) -> tuple[int, ...]:
    """The shape of one file's part of ``whole`` split ``n`` ways along ``dim``."""
    if whole[dim] % n:
        raise MetaLlamaFormatError(f"{name}: {whole[dim]} along dimension {dim} do not split over {n} files",
                                   path=os.path.dirname(where))
    return (*whole[:dim], whole[dim] // n, *whole[dim + 1:])


def _shape_fault(params: MetaParams, hf: str, got: tuple[int, ...], want: tuple[int, ...], n: int) -> str:
    each = " in each file" if n > 1 else ""
    text = f"has shape {got}; params.json makes it {want}{each} (transformers' {hf})"
    if "mlp." in hf:
        text += (f": multiple_of {params.multiple_of} and ffn_dim_multiplier {params.ffn_dim_multiplier} "
                 f"give a feed-forward width of {params.intermediate_size}")
    return text
