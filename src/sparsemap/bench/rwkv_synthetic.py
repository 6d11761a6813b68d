"""Synthetic RWKV checkpoints (versions 7, 6, 5.2 and 4): random weights in BlinkDL's key names and
shapes, scaled like trained ones.

Written by ``torch.save``, as BlinkDL's releases are. Used by the RWKV tests (against the ``rwkv``
package), by ``benchmarks/rwkv.py`` and by ``sparsemap demo`` (the 0.1 B shape: 12 layers, 768 wide, a
65,536 vocabulary: :func:`prepare_0_1b`, cached). Every version shares the frame (embedding and its
first norm, two norms a layer, the output norm and head); :func:`_write` draws it and asks each version
for the rest of a layer. torch is imported only to draw and write (naming the cached files needs none).

``python -m sparsemap.bench.rwkv_synthetic`` prepares the 0.1 B checkpoint and prints its path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SHAPE_0_1B = (12, 768, 64, 65536, 3072)  # (layers, width, head size, vocabulary, FFN)
State = dict[str, "torch.Tensor"]
# The matrices a vector-matrix product streams, stored (in, out) in the prepared file: 1.2x the tokens/s
# of the .pth's (out, in) here, and with ffn.value transposed a neuron's value row is contiguous, so the
# sparse channel mix reads only the rows it uses (benchmarks/RESULTS.md, RWKV).
TRANSPOSED = ("head.weight", "*.ffn.key.weight", "*.ffn.value.weight", "*.att.receptance.weight",
              "*.att.key.weight", "*.att.value.weight", "*.att.output.weight")


def paths_0_1b() -> tuple[Path, Path]:
    """``(the .pth as BlinkDL releases it, the same weights with TRANSPOSED stored (in, out))`` in the
    cache, whether or not they are written yet. No torch."""
    from ..models.assets import cache_dir

    folder = cache_dir() / "bench"
    return folder / "rwkv7-0.1b.pth", folder / "rwkv7-0.1b-transposed.safetensors"


def prepare_0_1b(*, quiet: bool = False) -> tuple[Path, Path]:
    """The 0.1 B-shaped random RWKV-7 (749 MB), written and converted on first use: :func:`paths_0_1b`.

    Example:
        >>> pth, transposed = prepare_0_1b()                            # doctest: +SKIP
    """
    import sys

    path, laid = paths_0_1b()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print(f"writing {path} (random weights in the 0.1 B shape) ...", file=sys.stderr)
        partial = path.with_name(path.name + ".partial")  # a file cut short is never taken for the model
        write_rwkv7(partial, *SHAPE_0_1B)
        partial.replace(path)
    if not laid.is_file():
        from ..converter import convert
        from ..formats.planner import Layout

        convert(path, laid, layout=Layout(transpose=list(TRANSPOSED)))  # writes to a temporary, then renames
    return path, laid


class _Draw:
    """Seeded random tensors: ``normal`` (scaled and shifted) and ``uniform`` in [0, 1)."""

    def __init__(self, seed: int) -> None:
        import torch

        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        import torch

        return torch.randn(*shape, generator=self.g) * scale + shift

    def uniform(self, *shape: int) -> torch.Tensor:
        import torch

        return torch.rand(*shape, generator=self.g)

    def norm(self, sd: State, name: str, c: int) -> None:
        sd[name + ".weight"] = self.normal(c, scale=0.1, shift=1)
        sd[name + ".bias"] = self.normal(c, scale=0.1)

    def matrix(self, rows: int, cols: int) -> torch.Tensor:
        return self.normal(rows, cols, scale=cols ** -0.5)


def _write(path: Path, layers: int, c: int, vocab: int, seed: int,
           layer: Callable[[State, str, _Draw], None]) -> Path:
    """A checkpoint: the frame every version shares, and ``layer(sd, "blocks.N.", draw)`` for the rest."""
    import torch

    draw = _Draw(seed)
    sd: State = {"emb.weight": draw.normal(vocab, c, scale=0.5)}
    draw.norm(sd, "blocks.0.ln0", c)
    for i in range(layers):
        b = f"blocks.{i}."
        draw.norm(sd, b + "ln1", c)
        draw.norm(sd, b + "ln2", c)
        layer(sd, b, draw)
    draw.norm(sd, "ln_out", c)
    sd["head.weight"] = draw.matrix(vocab, c)
    torch.save(sd, path)
    return path


def _gated_ffn(sd: State, b: str, draw: _Draw, c: int, ffn: int, mix: str) -> None:
    """RWKV-6, 5 and 4's channel mix: two token-shift mixes, key, value and a receptance gate."""
    sd[b + f"ffn.{mix}k"], sd[b + f"ffn.{mix}r"] = draw.uniform(1, 1, c), draw.uniform(1, 1, c)
    sd[b + "ffn.key.weight"], sd[b + "ffn.value.weight"] = draw.matrix(ffn, c), draw.matrix(c, ffn)
    sd[b + "ffn.receptance.weight"] = draw.matrix(c, c)


def write_rwkv7(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-7 checkpoint in BlinkDL's names and shapes (layer 0 keeps v0..v2, as trained ones do)."""
    ranks = {"w": 16, "a": 16, "v": 8, "g": 32}

    def layer(sd: State, b: str, draw: _Draw) -> None:
        att = b + "att."
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[att + x] = draw.uniform(1, 1, c)
        sd[att + "w0"] = draw.normal(1, 1, c, scale=0.5, shift=-1)
        sd[att + "a0"], sd[att + "v0"] = draw.normal(1, 1, c, scale=0.5), draw.normal(1, 1, c, scale=0.5)
        sd[att + "k_k"] = draw.normal(1, 1, c, scale=0.1, shift=0.8)
        sd[att + "k_a"] = draw.normal(1, 1, c, scale=0.1, shift=1)
        for x, d in ranks.items():
            sd[att + x + "1"], sd[att + x + "2"] = draw.normal(c, d, scale=0.1), draw.normal(d, c, scale=0.1)
        sd[att + "r_k"] = draw.normal(c // n, n, scale=0.1)
        for m in ("receptance", "key", "value", "output"):
            sd[att + m + ".weight"] = draw.matrix(c, c)
        draw.norm(sd, att + "ln_x", c)
        sd[b + "ffn.x_k"] = draw.uniform(1, 1, c)
        sd[b + "ffn.key.weight"], sd[b + "ffn.value.weight"] = draw.matrix(ffn, c), draw.matrix(c, ffn)

    return _write(path, layers, c, vocab, seed, layer)


def write_rwkv6(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-6 ("x060") checkpoint in BlinkDL's names and shapes."""
    mix, decay = 32, 64

    def layer(sd: State, b: str, draw: _Draw) -> None:
        att = b + "att."
        for x in ("x", "w", "k", "v", "r", "g"):
            sd[att + "time_maa_" + x] = draw.uniform(1, 1, c)
        sd[att + "time_maa_w1"] = draw.normal(c, 5 * mix, scale=0.1)
        sd[att + "time_maa_w2"] = draw.normal(5, mix, c, scale=0.1)
        sd[att + "time_decay"] = draw.normal(1, 1, c, scale=0.5, shift=-1)
        sd[att + "time_decay_w1"] = draw.normal(c, decay, scale=0.1)
        sd[att + "time_decay_w2"] = draw.normal(decay, c, scale=0.1)
        sd[att + "time_faaaa"] = draw.normal(c // n, n, scale=0.1)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[att + m + ".weight"] = draw.matrix(c, c)
        draw.norm(sd, att + "ln_x", c)
        _gated_ffn(sd, b, draw, c, ffn, "time_maa_")

    return _write(path, layers, c, vocab, seed, layer)


def write_rwkv5(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-5.2 checkpoint in BlinkDL's names and shapes (heads, a gate, fixed token-shift mixes)."""

    def layer(sd: State, b: str, draw: _Draw) -> None:
        att = b + "att."
        for x in ("k", "v", "r", "g"):
            sd[att + "time_mix_" + x] = draw.uniform(1, 1, c)
        sd[att + "time_decay"] = draw.normal(c // n, n, scale=0.5, shift=-1)
        sd[att + "time_faaaa"] = draw.normal(c // n, n, scale=0.1)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[att + m + ".weight"] = draw.matrix(c, c)
        draw.norm(sd, att + "ln_x", c)
        _gated_ffn(sd, b, draw, c, ffn, "time_mix_")

    return _write(path, layers, c, vocab, seed, layer)


def write_rwkv4(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-4 checkpoint in BlinkDL's names and shapes (``n``, the head size, is unused: v4 has
    one decay per channel)."""

    def layer(sd: State, b: str, draw: _Draw) -> None:
        att = b + "att."
        for x in ("k", "v", "r"):
            sd[att + "time_mix_" + x] = draw.uniform(1, 1, c)
        sd[att + "time_decay"] = draw.normal(c, scale=0.5, shift=-1)
        sd[att + "time_first"] = draw.normal(c, scale=0.3)
        for m in ("receptance", "key", "value", "output"):
            sd[att + m + ".weight"] = draw.matrix(c, c)
        _gated_ffn(sd, b, draw, c, ffn, "time_mix_")

    return _write(path, layers, c, vocab, seed, layer)


if __name__ == "__main__":
    print(prepare_0_1b()[1])
