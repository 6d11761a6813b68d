"""What an RWKV checkpoint is, from its keys and shapes alone: version, sizes, rwkv.cpp's rewrites. No torch.

:func:`detect_version` tells RWKV-4 to RWKV-7 apart by keys BlinkDL's training
code names; :class:`Rwkv7Shape` reads an RWKV-7 checkpoint's sizes and checks
every tensor's shape before anything is loaded; :func:`pytorch_view` shows an
rwkv.cpp file as the checkpoint it was converted from, as zero-copy views;
:func:`find_vocabulary` finds the World vocabulary a model needs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import RwkvFormatError
from ..formats.catalog import Catalog, TensorEntry

# Keys that tell the versions apart (BlinkDL's training code names them so).
VERSION_KEYS = {
    "7": "blocks.0.att.k_k",  # x070: a, v and g low-rank mixes, k_k and k_a
    "6": "blocks.0.att.time_maa_x",  # x060: data-dependent token shift
    "5": "blocks.0.att.ln_x.weight",  # x052 and earlier v5: heads, group norm
    "4": "blocks.0.att.time_first",  # v4: one channel per head
}
SUPPORTED = ("7", "6", "5.2", "4")
LAYER_NORM_EPS = 1e-5
GROUP_NORM_EPS = 64e-5  # the time mix's output norm, per head
DECAY_SCALE = 0.606531  # exp(-0.5): the time mix's decay is exp(-DECAY_SCALE * sigmoid(...)), in (0.545, 1)


def detect_version(names: Any) -> str | None:
    """The RWKV version a checkpoint's keys say (``"7"``, ``"6"``, ``"5"``, ``"4"``), or ``None``
    when they are not an RWKV checkpoint's."""
    if "emb.weight" not in names or "blocks.0.ln1.weight" not in names:
        return None
    for version, key in VERSION_KEYS.items():  # newest first: later versions keep older keys' names
        if key in names:
            return version
    return "unknown"


@dataclass(frozen=True)
class Rwkv7Shape:
    """The sizes of an RWKV-7 model, read from its checkpoint's shapes."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_size: int
    lora: dict[str, int] = field(default_factory=dict)  # "w", "a", "v", "g" -> low-rank width

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Rwkv7Shape:
        """Read and check every tensor's shape; one error naming the key and the shapes on a mismatch.

        Raises:
            RwkvFormatError: not RWKV-7, a tensor missing, or shapes that disagree.
        """
        names = set(catalog)
        version = detect_version(names)
        if version != "7":
            raise RwkvFormatError(f"RWKV version {version} is not supported yet (supported: "
                                  f"{', '.join(SUPPORTED)})" if version else "not an RWKV checkpoint "
                                  "(no emb.weight and blocks.0.ln1.weight)", path=catalog.source)

        shape = _shape_reader(catalog, "RWKV-7")

        vocab, c = _dims(shape("emb.weight"), 2, "emb.weight", catalog)
        h, n = _heads(shape, "blocks.0.att.r_k", c, catalog)
        n_layer = _layer_count(names)
        ffn = shape("blocks.0.ffn.key.weight")[0]
        lora = {x: shape(f"blocks.0.att.{x}1")[-1] for x in ("w", "a", "g")}
        lora["v"] = shape("blocks.1.att.v1")[-1] if n_layer > 1 else 0
        s = cls(n_layer, c, h, n, vocab, ffn, lora)
        _check_shapes(s.expected(), shape,
                      f"an RWKV-7 model of {n_layer} layers, {c} wide, {h} heads, FFN {ffn}", catalog)
        return s

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model and its shape, as BlinkDL's checkpoints store them."""
        c, f, v = self.n_embd, self.ffn_size, self.vocab_size
        out = _common_tensors(v, c, self.n_layer)
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            att = b + "att."
            for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
                out[att + x] = (1, 1, c)
            for x in ("w", "a", "g") + (("v",) if i else ()):
                out[att + x + "1"], out[att + x + "2"] = (c, self.lora[x]), (self.lora[x], c)
            if i:
                out[att + "v0"] = (1, 1, c)
            out[att + "r_k"] = (self.n_head, self.head_size)
            for m in ("receptance", "key", "value", "output"):
                out[att + m + ".weight"] = (c, c)
            out[att + "ln_x.weight"] = out[att + "ln_x.bias"] = (c,)
            out[b + "ffn.x_k"] = (1, 1, c)
            out[b + "ffn.key.weight"], out[b + "ffn.value.weight"] = (f, c), (c, f)
        return out


@dataclass(frozen=True)
class Rwkv6Shape:
    """The sizes of an RWKV-6 ("x060") model, read from its checkpoint's shapes."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_size: int
    mix_rank: int  # time_maa_w1 is (C, 5 * mix_rank)
    decay_rank: int

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Rwkv6Shape:
        """Read and check every tensor's shape; one error naming the key and the shapes on a mismatch.

        Raises:
            RwkvFormatError: not RWKV-6, a tensor missing, or shapes that disagree.
        """
        names = set(catalog)
        if detect_version(names) != "6":
            raise RwkvFormatError("not an RWKV-6 checkpoint", path=catalog.source)

        shape = _shape_reader(catalog, "RWKV-6")

        vocab, c = _dims(shape("emb.weight"), 2, "emb.weight", catalog)
        h, n = _heads(shape, "blocks.0.att.time_faaaa", c, catalog)
        n_layer = _layer_count(names)
        mix = shape("blocks.0.att.time_maa_w1")[-1]
        if mix % 5:
            raise RwkvFormatError(f"width {mix} is not 5 mixes of one rank", path=catalog.source,
                                  tensor="blocks.0.att.time_maa_w1")
        s = cls(n_layer, c, h, n, vocab, shape("blocks.0.ffn.key.weight")[0], mix // 5,
                shape("blocks.0.att.time_decay_w1")[-1])
        _check_shapes(s.expected(), shape,
                      f"an RWKV-6 model of {n_layer} layers, {c} wide, {h} heads, FFN {s.ffn_size}", catalog)
        return s

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model and its shape, as BlinkDL's checkpoints store them."""
        c, f, v = self.n_embd, self.ffn_size, self.vocab_size
        out = _common_tensors(v, c, self.n_layer)
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            att = b + "att."
            for x in ("x", "w", "k", "v", "r", "g"):
                out[att + "time_maa_" + x] = (1, 1, c)
            out[att + "time_maa_w1"] = (c, 5 * self.mix_rank)
            out[att + "time_maa_w2"] = (5, self.mix_rank, c)
            out[att + "time_decay"] = (1, 1, c)
            out[att + "time_decay_w1"] = (c, self.decay_rank)
            out[att + "time_decay_w2"] = (self.decay_rank, c)
            out[att + "time_faaaa"] = (self.n_head, self.head_size)
            for m in ("receptance", "key", "value", "gate", "output"):
                out[att + m + ".weight"] = (c, c)
            out[att + "ln_x.weight"] = out[att + "ln_x.bias"] = (c,)
            out[b + "ffn.time_maa_k"] = out[b + "ffn.time_maa_r"] = (1, 1, c)
            out[b + "ffn.key.weight"], out[b + "ffn.value.weight"] = (f, c), (c, f)
            out[b + "ffn.receptance.weight"] = (c, c)
        return out


@dataclass(frozen=True)
class Rwkv5Shape:
    """The sizes of an RWKV-5.2 model (heads, a gate, fixed token-shift mixes), read from its shapes."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_size: int

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Rwkv5Shape:
        """Read and check every tensor's shape; one error naming the key and the shapes on a mismatch.

        Raises:
            RwkvFormatError: not RWKV-5.2 (5.0 and 5.1 are named), a tensor missing, or shapes that disagree.
        """
        names = set(catalog)
        if detect_version(names) != "5":
            raise RwkvFormatError("not an RWKV-5 checkpoint", path=catalog.source)
        if "blocks.0.att.gate.weight" not in names or "blocks.0.att.time_faaaa" not in names:
            raise RwkvFormatError("RWKV 5.0 or 5.1 (no att.gate or att.time_faaaa) is not supported yet "
                                  f"(supported: {', '.join(SUPPORTED)})", path=catalog.source)

        shape = _shape_reader(catalog, "RWKV-5.2")

        vocab, c = _dims(shape("emb.weight"), 2, "emb.weight", catalog)
        h, n = _heads(shape, "blocks.0.att.time_faaaa", c, catalog)
        n_layer = _layer_count(names)
        s = cls(n_layer, c, h, n, vocab, shape("blocks.0.ffn.key.weight")[0])
        model = f"an RWKV-5.2 model of {n_layer} layers, {c} wide, {h} heads, FFN {s.ffn_size}"
        _check_shapes(s.expected(), shape, model, catalog)
        return s

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model and its shape, as BlinkDL's checkpoints store them."""
        c, f, v = self.n_embd, self.ffn_size, self.vocab_size
        out = _common_tensors(v, c, self.n_layer)
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            att = b + "att."
            for x in ("k", "v", "r", "g"):
                out[att + "time_mix_" + x] = (1, 1, c)
            out[att + "time_decay"] = out[att + "time_faaaa"] = (self.n_head, self.head_size)
            for m in ("receptance", "key", "value", "gate", "output"):
                out[att + m + ".weight"] = (c, c)
            out[att + "ln_x.weight"] = out[att + "ln_x.bias"] = (c,)
            out[b + "ffn.time_mix_k"] = out[b + "ffn.time_mix_r"] = (1, 1, c)
            out[b + "ffn.key.weight"], out[b + "ffn.value.weight"] = (f, c), (c, f)
            out[b + "ffn.receptance.weight"] = (c, c)
        return out


@dataclass(frozen=True)
class Rwkv4Shape:
    """The sizes of an RWKV-4 model (one decay and bonus per channel, no heads), read from its shapes."""

    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_size: int

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Rwkv4Shape:
        """Read and check every tensor's shape; one error naming the key and the shapes on a mismatch.

        Raises:
            RwkvFormatError: not RWKV-4, a tensor missing, or shapes that disagree.
        """
        names = set(catalog)
        if detect_version(names) != "4":
            raise RwkvFormatError("not an RWKV-4 checkpoint", path=catalog.source)

        shape = _shape_reader(catalog, "RWKV-4")

        vocab, c = _dims(shape("emb.weight"), 2, "emb.weight", catalog)
        n_layer = _layer_count(names)
        s = cls(n_layer, c, vocab, shape("blocks.0.ffn.key.weight")[0])
        _check_shapes(s.expected(), shape, f"an RWKV-4 model of {n_layer} layers, {c} wide, FFN {s.ffn_size}",
                      catalog)
        return s

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model and its shape, as BlinkDL's checkpoints store them."""
        c, f, v = self.n_embd, self.ffn_size, self.vocab_size
        out = _common_tensors(v, c, self.n_layer)
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            att = b + "att."
            for x in ("k", "v", "r"):
                out[att + "time_mix_" + x] = (1, 1, c)
            out[att + "time_decay"] = out[att + "time_first"] = (c,)
            for m in ("receptance", "key", "value", "output"):
                out[att + m + ".weight"] = (c, c)
            out[b + "ffn.time_mix_k"] = out[b + "ffn.time_mix_r"] = (1, 1, c)
            out[b + "ffn.key.weight"], out[b + "ffn.value.weight"] = (f, c), (c, f)
            out[b + "ffn.receptance.weight"] = (c, c)
        return out


RwkvShape = Rwkv7Shape | Rwkv6Shape | Rwkv5Shape | Rwkv4Shape


def shape_of(catalog: Catalog) -> RwkvShape:
    """The checked shape of an RWKV checkpoint, by its version.

    Raises:
        RwkvFormatError: a version not supported yet, a tensor missing, or inconsistent shapes.
    """
    version = detect_version(set(catalog))
    if version == "6":
        return Rwkv6Shape.from_catalog(catalog)
    if version == "5":
        return Rwkv5Shape.from_catalog(catalog)
    if version == "4":
        return Rwkv4Shape.from_catalog(catalog)
    return Rwkv7Shape.from_catalog(catalog)


def _shape_reader(catalog: Catalog, label: str) -> Callable[[str], tuple[int, ...]]:
    """``shape(key)``: a tensor's shape, or an error naming the key when the checkpoint lacks it."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in catalog:
            raise RwkvFormatError(f"missing from an {label} checkpoint", path=catalog.source, tensor=key)
        return catalog[key].shape

    return shape


def _heads(shape: Callable[[str], tuple[int, ...]], key: str, width: int,
           catalog: Catalog) -> tuple[int, int]:
    """(heads, head size) from ``key``'s (H, N) shape; they must make the embedding's ``width``."""
    h, n = _dims(shape(key), 2, key, catalog)
    if h * n != width:
        raise RwkvFormatError(f"{h} heads of {n} make {h * n}, but emb.weight is {width} wide",
                              path=catalog.source, tensor=key)
    return h, n


def _layer_count(names: set[str]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in names if k.startswith("blocks."))


def _check_shapes(expected: dict[str, tuple[int, ...]], shape: Callable[[str], tuple[int, ...]], model: str,
                  catalog: Catalog) -> None:
    """Every expected tensor present with its shape; the first that is not is named, with both shapes."""
    for key, want in expected.items():
        got = shape(key)
        if tuple(got) != want:
            raise RwkvFormatError(f"shape {list(got)}, expected {list(want)} for {model}",
                                  path=catalog.source, tensor=key)


def _common_tensors(vocab: int, c: int, n_layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors every RWKV version has: embedding, its first norm, the two norms of each layer, head."""
    out: dict[str, tuple[int, ...]] = {"emb.weight": (vocab, c), "head.weight": (vocab, c),
                                       "ln_out.weight": (c,), "ln_out.bias": (c,),
                                       "blocks.0.ln0.weight": (c,), "blocks.0.ln0.bias": (c,)}
    for i in range(n_layer):
        for ln in ("ln1", "ln2"):
            out[f"blocks.{i}.{ln}.weight"] = out[f"blocks.{i}.{ln}.bias"] = (c,)
    return out


def _dims(shape: tuple[int, ...], n: int, key: str, catalog: Catalog) -> tuple[int, ...]:
    if len(shape) != n or not all(shape):
        raise RwkvFormatError(f"shape {list(shape)} should have {n} non-zero dimensions", path=catalog.source,
                              tensor=key)
    return shape


TOKEN_SHIFT = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # the order rwkv.cpp concatenates them in
LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")  # stored transposed by rwkv.cpp


def pytorch_view(catalog: Catalog) -> Catalog:
    """An rwkv.cpp RWKV-7 file seen as BlinkDL's checkpoint, zero-copy: ``att.x_rwkvag`` (6, 1, C)
    split back into its six rows, the low-rank matrices given back their shape as transposed views.

    Other catalogs come back unchanged.
    """
    if catalog.format != "rwkv-cpp":
        return catalog
    entries: dict[str, TensorEntry] = {}
    for name, e in catalog.items():
        if name.endswith(".att.x_rwkvag"):
            if len(e.shape) != 3 or e.shape[:2] != (len(TOKEN_SHIFT), 1):
                raise RwkvFormatError(f"shape {list(e.shape)}, expected [6, 1, C]", path=catalog.source,
                                      tensor=name)
            c = e.shape[2]
            row = e.nbytes // len(TOKEN_SHIFT)
            prefix = name[: -len("x_rwkvag")]
            for i, x in enumerate(TOKEN_SHIFT):
                entries[prefix + x] = e._replace(name=prefix + x, offset=e.offset + i * row, nbytes=row,
                                                 shape=(1, 1, c))
        elif ".time_mix_" in name and len(e.shape) == 1:  # squeezed by the converter: (C,) -> (1, 1, C)
            entries[name] = e._replace(shape=(1, 1, *e.shape))
        elif (name.endswith((".att.time_faaaa", ".att.time_decay")) and len(e.shape) == 3
              and e.shape[2] == 1):  # (H, N, 1) -> (H, N); the decay holds exp(-exp(time_decay)) already
            entries[name] = e._replace(shape=e.shape[:2])
        elif name.rsplit(".", 1)[-1] in LOW_RANK and ".att." in name and len(e.shape) == 2:
            rows, cols = e.shape  # stored (cols of the original, rows of the original)
            entries[name] = e._replace(shape=(cols, rows), strides=(1, cols))
        else:
            entries[name] = e
    return Catalog(source=catalog.source, format="rwkv-cpp:pytorch", entries=entries,
                   metadata=dict(catalog.metadata), stamps=catalog.stamps)


VOCABULARY = "rwkv_vocab_v20230424.txt"


def find_vocabulary(folder: str) -> str | None:
    """The World vocabulary for a model in ``folder``: the file beside it, else the copy the ``rwkv``
    package ships (located, not imported), else ``None``."""
    beside = os.path.join(folder, VOCABULARY)
    if os.path.isfile(beside):
        return beside
    spec = importlib.util.find_spec("rwkv")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, VOCABULARY)
        if os.path.isfile(candidate):
            return candidate
    return None
