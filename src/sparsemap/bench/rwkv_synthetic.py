"""Synthetic RWKV-7 checkpoints: random weights in BlinkDL's key names and shapes, scaled like trained ones.

Written by ``torch.save``, as BlinkDL's releases are. Used by the RWKV tests (against the ``rwkv``
package) and by ``benchmarks/rwkv.py`` (the 0.1 B shape: 12 layers, 768 wide, a 65,536 vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE_0_1B = (12, 768, 64, 65536, 3072)  # (layers, width, head size, vocabulary, FFN)


def write_rwkv7(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-7 checkpoint in BlinkDL's names and shapes (layer 0 keeps v0..v2, as trained ones do)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

    h = c // n
    lw, la, lv, lg = 16, 16, 8, 32
    sd: dict[str, torch.Tensor] = {"emb.weight": rand(vocab, c, scale=0.5),
                                   "blocks.0.ln0.weight": rand(c, scale=0.1, shift=1),
                                   "blocks.0.ln0.bias": rand(c, scale=0.1)}
    for i in range(layers):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
        att = b + "att."
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[att + x] = torch.rand(1, 1, c, generator=g)
        sd[att + "w0"] = rand(1, 1, c, scale=0.5, shift=-1)
        sd[att + "a0"], sd[att + "v0"] = rand(1, 1, c, scale=0.5), rand(1, 1, c, scale=0.5)
        sd[att + "k_k"] = rand(1, 1, c, scale=0.1, shift=0.8)
        sd[att + "k_a"] = rand(1, 1, c, scale=0.1, shift=1)
        for x, d in (("w", lw), ("a", la), ("v", lv), ("g", lg)):
            sd[att + x + "1"], sd[att + x + "2"] = rand(c, d, scale=0.1), rand(d, c, scale=0.1)
        sd[att + "r_k"] = rand(h, n, scale=0.1)
        for m in ("receptance", "key", "value", "output"):
            sd[att + m + ".weight"] = rand(c, c, scale=c ** -0.5)
        sd[att + "ln_x.weight"], sd[att + "ln_x.bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
        sd[b + "ffn.x_k"] = torch.rand(1, 1, c, generator=g)
        sd[b + "ffn.key.weight"] = rand(ffn, c, scale=c ** -0.5)
        sd[b + "ffn.value.weight"] = rand(c, ffn, scale=ffn ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
    sd["head.weight"] = rand(vocab, c, scale=c ** -0.5)
    torch.save(sd, path)
    return path


def write_rwkv6(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-6 ("x060") checkpoint in BlinkDL's names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

    h, mix, decay = c // n, 32, 64
    sd: dict[str, torch.Tensor] = {"emb.weight": rand(vocab, c, scale=0.5),
                                   "blocks.0.ln0.weight": rand(c, scale=0.1, shift=1),
                                   "blocks.0.ln0.bias": rand(c, scale=0.1)}
    for i in range(layers):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
        att = b + "att."
        for x in ("x", "w", "k", "v", "r", "g"):
            sd[att + "time_maa_" + x] = torch.rand(1, 1, c, generator=g)
        sd[att + "time_maa_w1"] = rand(c, 5 * mix, scale=0.1)
        sd[att + "time_maa_w2"] = rand(5, mix, c, scale=0.1)
        sd[att + "time_decay"] = rand(1, 1, c, scale=0.5, shift=-1)
        sd[att + "time_decay_w1"] = rand(c, decay, scale=0.1)
        sd[att + "time_decay_w2"] = rand(decay, c, scale=0.1)
        sd[att + "time_faaaa"] = rand(h, n, scale=0.1)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[att + m + ".weight"] = rand(c, c, scale=c ** -0.5)
        sd[att + "ln_x.weight"], sd[att + "ln_x.bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
        sd[b + "ffn.time_maa_k"] = torch.rand(1, 1, c, generator=g)
        sd[b + "ffn.time_maa_r"] = torch.rand(1, 1, c, generator=g)
        sd[b + "ffn.key.weight"] = rand(ffn, c, scale=c ** -0.5)
        sd[b + "ffn.value.weight"] = rand(c, ffn, scale=ffn ** -0.5)
        sd[b + "ffn.receptance.weight"] = rand(c, c, scale=c ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
    sd["head.weight"] = rand(vocab, c, scale=c ** -0.5)
    torch.save(sd, path)
    return path


def write_rwkv5(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-5.2 checkpoint in BlinkDL's names and shapes (heads, a gate, fixed token-shift mixes)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

    h = c // n
    sd: dict[str, torch.Tensor] = {"emb.weight": rand(vocab, c, scale=0.5),
                                   "blocks.0.ln0.weight": rand(c, scale=0.1, shift=1),
                                   "blocks.0.ln0.bias": rand(c, scale=0.1)}
    for i in range(layers):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
        att = b + "att."
        for x in ("k", "v", "r", "g"):
            sd[att + "time_mix_" + x] = torch.rand(1, 1, c, generator=g)
        sd[att + "time_decay"] = rand(h, n, scale=0.5, shift=-1)
        sd[att + "time_faaaa"] = rand(h, n, scale=0.1)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[att + m + ".weight"] = rand(c, c, scale=c ** -0.5)
        sd[att + "ln_x.weight"], sd[att + "ln_x.bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
        sd[b + "ffn.time_mix_k"] = torch.rand(1, 1, c, generator=g)
        sd[b + "ffn.time_mix_r"] = torch.rand(1, 1, c, generator=g)
        sd[b + "ffn.key.weight"] = rand(ffn, c, scale=c ** -0.5)
        sd[b + "ffn.value.weight"] = rand(c, ffn, scale=ffn ** -0.5)
        sd[b + "ffn.receptance.weight"] = rand(c, c, scale=c ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
    sd["head.weight"] = rand(vocab, c, scale=c ** -0.5)
    torch.save(sd, path)
    return path


def write_rwkv4(path: Path, layers: int, c: int, n: int, vocab: int, ffn: int, seed: int = 0) -> Path:
    """A random RWKV-4 checkpoint in BlinkDL's names and shapes (``n``, the head size, is unused: v4 has
    one decay per channel)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

    sd: dict[str, torch.Tensor] = {"emb.weight": rand(vocab, c, scale=0.5),
                                   "blocks.0.ln0.weight": rand(c, scale=0.1, shift=1),
                                   "blocks.0.ln0.bias": rand(c, scale=0.1)}
    for i in range(layers):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
        att = b + "att."
        for x in ("k", "v", "r"):
            sd[att + "time_mix_" + x] = torch.rand(1, 1, c, generator=g)
        sd[att + "time_decay"] = rand(c, scale=0.5, shift=-1)
        sd[att + "time_first"] = rand(c, scale=0.3)
        for m in ("receptance", "key", "value", "output"):
            sd[att + m + ".weight"] = rand(c, c, scale=c ** -0.5)
        sd[b + "ffn.time_mix_k"] = torch.rand(1, 1, c, generator=g)
        sd[b + "ffn.time_mix_r"] = torch.rand(1, 1, c, generator=g)
        sd[b + "ffn.key.weight"] = rand(ffn, c, scale=c ** -0.5)
        sd[b + "ffn.value.weight"] = rand(c, ffn, scale=ffn ** -0.5)
        sd[b + "ffn.receptance.weight"] = rand(c, c, scale=c ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = rand(c, scale=0.1, shift=1), rand(c, scale=0.1)
    sd["head.weight"] = rand(vocab, c, scale=c ** -0.5)
    torch.save(sd, path)
    return path
