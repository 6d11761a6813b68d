"""RWKV-7, 6, 5.2 and 4 in plain PyTorch, from BlinkDL's ``.pth``, mapped; an exact sparse FFN.

The parameters keep the checkpoint's names and shapes (``emb.weight``,
``blocks.N.att.receptance.weight``, ``blocks.N.ffn.value.weight``, ...), so
the checkpoint loads zero-copy: matrices are used as ``F.linear`` takes them,
(out, in), never transposed into a copy, and the embedding's first layer norm
(``blocks.0.ln0``) is applied to the rows a step gathers, not to the whole
table.

RWKV's channel mix is ``value(relu(key(x)) ** 2)``: every hidden neuron whose
key output is negative contributes exactly zero. With ``sparse=True`` the
channel mix multiplies only the value rows of the neurons that are active
(``value.weight`` read as its transpose, one row per neuron: zero-copy and
page-sparse when the file stores it transposed, ``sparsemap convert
--transpose '*ffn.value.weight'``). Only the order of the additions changes.

A model is a recurrent state per layer: the time mix's previous input and its
``(heads, head_size, head_size)`` matrix, and the channel mix's previous
input. :meth:`Rwkv7.forward` runs a prompt (sequence mode: matrices over all
tokens, the recurrence token by token) or one token, from and into a state.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError
from ..formats.catalog import Catalog
from .rwkv_config import (
    DECAY_SCALE,
    GROUP_NORM_EPS,
    LAYER_NORM_EPS,
    Rwkv4Shape,
    Rwkv5Shape,
    Rwkv6Shape,
    Rwkv7Shape,
    RwkvShape,
    detect_version,
    pytorch_view,
    shape_of,
)
from .sampling import Sampler, Sampling, generate_from, resolve

RWKV_CPP_V5_NORM_EPS = 1e-5  # rwkv.cpp's RWKV-5 output norm (its tiny 5.2 model's logits need it: tested)


def _param(*shape: int) -> nn.Parameter:
    """A parameter with a shape and no storage, replaced by a mapped view when loaded."""
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class LayerNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = _param(c), _param(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, LAYER_NORM_EPS)


def _shifted(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Each token's previous token minus itself, the first's previous from the state: (T, C)."""
    return torch.cat((prev[None], x[:-1])) - x


class TimeMix7(nn.Module):
    """RWKV-7's time mix: a matrix-valued state per head, updated by a decay, a rank-one removal
    along ``kk`` and the new key-value outer product."""

    def __init__(self, s: Rwkv7Shape, layer: int) -> None:
        super().__init__()
        c = s.n_embd
        self.layer, self.heads, self.size = layer, s.n_head, s.head_size
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, _param(1, 1, c))
        for x in ("w", "a", "g") + (("v",) if layer else ()):
            setattr(self, x + "1", _param(c, s.lora[x]))
            setattr(self, x + "2", _param(s.lora[x], c))
        if layer:
            self.v0 = _param(1, 1, c)
        self.r_k = _param(s.n_head, s.head_size)
        self.receptance, self.key, self.value, self.output = (_Linear(c, c) for _ in range(4))
        self.ln_x = LayerNorm(c)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor, state: torch.Tensor,
                v_first: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """x: (T, C); x_prev: (C,); state: (H, N, N) float32. Returns (out (T, C), x_prev, state, v_first)."""
        t, c = x.shape
        h, n = self.heads, self.size
        dx = _shifted(x, x_prev)  # (T, C)

        def mixed(coef: torch.Tensor) -> torch.Tensor:
            return x + dx * coef.view(c)

        r = self.receptance(mixed(self.x_r))  # (T, C)
        w = torch.tanh(mixed(self.x_w) @ self.w1) @ self.w2
        k = self.key(mixed(self.x_k))
        xv = mixed(self.x_v)
        v = self.value(xv)
        a = torch.sigmoid(self.a0.view(c) + (mixed(self.x_a) @ self.a1) @ self.a2)
        g = torch.sigmoid(mixed(self.x_g) @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k.view(c)).view(t, h, n), dim=-1, p=2.0).view(t, c)
        k = k * (1 + (a - 1) * self.k_a.view(c))
        if self.layer == 0:
            v_first = v
        else:
            assert v_first is not None
            v = v + (v_first - v) * torch.sigmoid(self.v0.view(c) + (xv @ self.v1) @ self.v2)
        decay = torch.exp(-DECAY_SCALE * torch.sigmoid((self.w0.view(c) + w).float()))  # (T, C)
        y = torch.empty_like(x)  # (T, C)
        for i in range(t):  # the recurrence, token by token
            vk = v[i].view(h, n, 1) @ k[i].view(h, 1, n)  # (H, N, N)
            removal = (-kk[i]).view(h, n, 1) @ (kk[i] * a[i]).view(h, 1, n)  # (H, N, N)
            state = state * decay[i].view(h, 1, n) + state @ removal.float() + vk.float()
            y[i] = (state.to(x.dtype) @ r[i].view(h, n, 1)).view(c)
        y = F.group_norm(y.view(t, c), h, self.ln_x.weight, self.ln_x.bias, GROUP_NORM_EPS).view(t, c)
        y = y + ((r * k * self.r_k.view(c)).view(t, h, n).sum(-1, keepdim=True) * v.view(t, h, n)).view(t, c)
        return self.output(y * g), x[-1], state, v_first


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ChannelMix(nn.Module):
    """What every version's channel mix shares: ``value(relu(key(.)) ** 2)``, dense or over the active
    neurons only (exact either way). Versions differ in how the token shift mixes the input, and a gate."""

    def __init__(self, s: RwkvShape) -> None:
        super().__init__()
        self.key = _Linear(s.n_embd, s.ffn_size)
        self.value = _Linear(s.ffn_size, s.n_embd)
        self.sparse = False
        self.active: list[int] = []  # neurons active per step, while counting (see Rwkv.count_active)
        self.counting = False
        self.ever_active: torch.Tensor | None = None  # (F,) bool: neurons any counted step used

    def values(self, k: torch.Tensor) -> torch.Tensor:
        """``value(k)`` for k: (T, F), zero wherever the key output was not positive; sparse: only the
        rows of the neurons any token uses are read."""
        if not (self.sparse or self.counting):
            return self.value(k)
        used = k.ne(0).any(0)  # (F,)
        rows = torch.nonzero(used).view(-1)  # (active,)
        if self.counting:
            self.active.append(int(rows.numel()))
            self.ever_active = used if self.ever_active is None else self.ever_active | used
        if not self.sparse:
            return self.value(k)
        value_rows = self.value.weight.t()  # (F, C): one row per neuron (zero-copy rows if stored transposed)
        return k.index_select(1, rows) @ value_rows.index_select(0, rows)


class ChannelMix7(ChannelMix):
    """RWKV-7's channel mix: the input shifted by a learned fraction of the previous token's."""

    def __init__(self, s: Rwkv7Shape) -> None:
        super().__init__(s)
        self.x_k = _param(1, 1, s.n_embd)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, C); x_prev: (C,). Returns (out (T, C), x_prev)."""
        k = x + _shifted(x, x_prev) * self.x_k.view(-1)
        return self.values(torch.relu(self.key(k)) ** 2), x[-1]


class ChannelMix6(ChannelMix):
    """RWKV-6's channel mix: RWKV-7's with a receptance gate, ``sigmoid(r(x)) * value(relu(key(x)) ** 2)``."""

    def __init__(self, s: Rwkv6Shape) -> None:
        super().__init__(s)
        self.time_maa_k, self.time_maa_r = _param(1, 1, s.n_embd), _param(1, 1, s.n_embd)
        self.receptance = _Linear(s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dx = _shifted(x, x_prev)
        k = torch.relu(self.key(x + dx * self.time_maa_k.view(-1))) ** 2
        r = torch.sigmoid(self.receptance(x + dx * self.time_maa_r.view(-1)))
        return r * self.values(k), x[-1]


class TimeMix6(nn.Module):
    """RWKV-6's time mix: data-dependent token shift and decay, a bonus ``u`` for the current token."""

    def __init__(self, s: Rwkv6Shape, layer: int) -> None:
        super().__init__()
        c = s.n_embd
        self.heads, self.size, self.rank = s.n_head, s.head_size, s.mix_rank
        for x in ("x", "w", "k", "v", "r", "g"):
            setattr(self, "time_maa_" + x, _param(1, 1, c))
        self.time_maa_w1, self.time_maa_w2 = _param(c, 5 * s.mix_rank), _param(5, s.mix_rank, c)
        self.time_decay = _param(1, 1, c)
        self.time_decay_w1, self.time_decay_w2 = _param(c, s.decay_rank), _param(s.decay_rank, c)
        self.time_faaaa = _param(s.n_head, s.head_size)
        self.receptance, self.key, self.value, self.gate, self.output = (_Linear(c, c) for _ in range(5))
        self.ln_x = LayerNorm(c)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor, state: torch.Tensor,
                v_first: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """x: (T, C); x_prev: (C,); state: (H, N, N). Returns (out (T, C), x_prev, state, v_first)."""
        t, c = x.shape
        h, n = self.heads, self.size
        dx = _shifted(x, x_prev)  # (T, C)
        mixed = torch.tanh((x + dx * self.time_maa_x.view(c)) @ self.time_maa_w1).view(t, 5, self.rank)
        mw, mk, mv, mr, mg = torch.bmm(mixed.transpose(0, 1), self.time_maa_w2).unbind(0)  # 5 x (T, C)
        r = self.receptance(x + dx * (self.time_maa_r.view(c) + mr)).view(t, h, n)
        k = self.key(x + dx * (self.time_maa_k.view(c) + mk)).view(t, h, n)
        v = self.value(x + dx * (self.time_maa_v.view(c) + mv)).view(t, h, n)
        g = F.silu(self.gate(x + dx * (self.time_maa_g.view(c) + mg)))
        wx = x + dx * (self.time_maa_w.view(c) + mw)
        decay = self.time_decay.view(c) + torch.tanh(wx @ self.time_decay_w1) @ self.time_decay_w2
        decay = torch.exp(-torch.exp(decay.float())).view(t, h, n, 1)
        u = self.time_faaaa.view(h, n, 1)
        y = torch.empty(t, h, n)
        for i in range(t):
            kv = k[i].view(h, n, 1) @ v[i].view(h, 1, n)  # (H, N, N)
            y[i] = (r[i].view(h, 1, n) @ (u * kv + state)).view(h, n)
            state = kv + decay[i] * state
        y = F.group_norm(y.view(t, c), h, self.ln_x.weight, self.ln_x.bias, GROUP_NORM_EPS)
        return self.output(y.to(x.dtype) * g), x[-1], state, v_first


class ChannelMix5(ChannelMix):
    """RWKV-5's (and 4's) channel mix: RWKV-6's with fixed token-shift mixes,
    ``x * mix + previous * (1 - mix)``."""

    def __init__(self, s: Rwkv5Shape | Rwkv4Shape) -> None:
        super().__init__(s)
        self.time_mix_k, self.time_mix_r = _param(1, 1, s.n_embd), _param(1, 1, s.n_embd)
        self.receptance = _Linear(s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dx = _shifted(x, x_prev)
        k = torch.relu(self.key(x + dx * (1 - self.time_mix_k.view(-1)))) ** 2
        r = torch.sigmoid(self.receptance(x + dx * (1 - self.time_mix_r.view(-1))))
        return r * self.values(k), x[-1]


class TimeMix5(nn.Module):
    """RWKV-5.2's time mix: heads with a fixed decay per channel and a bonus for the current token."""

    def __init__(self, s: Rwkv5Shape, layer: int) -> None:
        super().__init__()
        c = s.n_embd
        self.heads, self.size = s.n_head, s.head_size
        for x in ("k", "v", "r", "g"):
            setattr(self, "time_mix_" + x, _param(1, 1, c))
        self.time_decay, self.time_faaaa = _param(s.n_head, s.head_size), _param(s.n_head, s.head_size)
        # How rwkv.cpp's files differ (see load): the decay stored as the factor exp(-exp(time_decay)),
        # and the output norm's epsilon (1e-5 there; BlinkDL's 5.2 models use 64e-5, as the rwkv package).
        self.decay_is_factor = False
        self.norm_eps = GROUP_NORM_EPS
        self.receptance, self.key, self.value, self.gate, self.output = (_Linear(c, c) for _ in range(5))
        self.ln_x = LayerNorm(c)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor, state: torch.Tensor,
                v_first: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """x: (T, C); x_prev: (C,); state: (H, N, N). Returns (out (T, C), x_prev, state, v_first)."""
        t, c = x.shape
        h, n = self.heads, self.size
        dx = _shifted(x, x_prev)

        def mixed(mix: torch.Tensor) -> torch.Tensor:
            return x + dx * (1 - mix.view(c))

        r = self.receptance(mixed(self.time_mix_r)).view(t, h, n)
        k = self.key(mixed(self.time_mix_k)).view(t, h, n)
        v = self.value(mixed(self.time_mix_v)).view(t, h, n)
        g = F.silu(self.gate(mixed(self.time_mix_g)))
        decay = self.time_decay.float()
        decay = (decay if self.decay_is_factor else torch.exp(-torch.exp(decay))).view(h, n, 1)
        u = self.time_faaaa.view(h, n, 1)
        y = torch.empty(t, h, n)
        for i in range(t):
            kv = k[i].view(h, n, 1) @ v[i].view(h, 1, n)  # (H, N, N)
            y[i] = (r[i].view(h, 1, n) @ (u * kv + state)).view(h, n)
            state = kv + decay * state
        y = F.group_norm(y.view(t, c), h, self.ln_x.weight, self.ln_x.bias, self.norm_eps)
        return self.output(y.to(x.dtype) * g), x[-1], state, v_first


class TimeMix4(nn.Module):
    """RWKV-4's time mix: per channel, a weighted average of past values with a decaying weight and a
    bonus for the current token, kept as (numerator, denominator, exponent) so nothing overflows."""

    def __init__(self, s: Rwkv4Shape, layer: int) -> None:
        super().__init__()
        c = s.n_embd
        for x in ("k", "v", "r"):
            setattr(self, "time_mix_" + x, _param(1, 1, c))
        self.time_decay, self.time_first = _param(c), _param(c)
        self.receptance, self.key, self.value, self.output = (_Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor, state: torch.Tensor,
                v_first: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """x: (T, C); x_prev: (C,); state: (3, C) = numerator, denominator, exponent.
        Returns (out (T, C), x_prev, state, v_first)."""
        dx = _shifted(x, x_prev)

        def mixed(mix: torch.Tensor) -> torch.Tensor:
            return x + dx * (1 - mix.view(-1))

        r = torch.sigmoid(self.receptance(mixed(self.time_mix_r)))  # (T, C)
        k = self.key(mixed(self.time_mix_k)).float()
        v = self.value(mixed(self.time_mix_v)).float()
        decay, first = -torch.exp(self.time_decay.float()), self.time_first.float()
        num, den, exponent = state
        wkv = torch.empty_like(k)  # (T, C)
        for i in range(x.shape[0]):
            now = first + k[i]
            top = torch.maximum(exponent, now)
            a, b = torch.exp(exponent - top), torch.exp(now - top)
            wkv[i] = (a * num + b * v[i]) / (a * den + b)
            aged = decay + exponent
            top = torch.maximum(aged, k[i])
            a, b = torch.exp(aged - top), torch.exp(k[i] - top)
            num, den, exponent = a * num + b * v[i], a * den + b, top
        return self.output(r * wkv.to(x.dtype)), x[-1], torch.stack((num, den, exponent)), v_first


class Block(nn.Module):
    def __init__(self, s: RwkvShape, layer: int) -> None:
        super().__init__()
        if layer == 0:
            self.ln0 = LayerNorm(s.n_embd)
        self.ln1, self.ln2 = LayerNorm(s.n_embd), LayerNorm(s.n_embd)
        if isinstance(s, Rwkv6Shape):
            self.att: nn.Module = TimeMix6(s, layer)
            self.ffn: ChannelMix = ChannelMix6(s)
        elif isinstance(s, Rwkv5Shape):
            self.att, self.ffn = TimeMix5(s, layer), ChannelMix5(s)
        elif isinstance(s, Rwkv4Shape):
            self.att, self.ffn = TimeMix4(s, layer), ChannelMix5(s)
        else:
            self.att, self.ffn = TimeMix7(s, layer), ChannelMix7(s)


class Rwkv(nn.Module):
    """RWKV-7 or RWKV-6 with BlinkDL's parameter names. ``state``: a list of ``[att x_prev, att matrix,
    ffn x_prev]`` per layer (:meth:`zero_state`)."""

    def __init__(self, s: RwkvShape) -> None:
        super().__init__()
        self.shape = s
        self.emb = nn.Module()
        self.emb.weight = _param(s.vocab_size, s.n_embd)  # (vocab, C)
        self.blocks = nn.ModuleList(Block(s, i) for i in range(s.n_layer))
        self.ln_out = LayerNorm(s.n_embd)
        self.head = _Linear(s.n_embd, s.vocab_size)

    def zero_state(self) -> list[list[torch.Tensor]]:
        s = self.shape
        if isinstance(s, Rwkv4Shape):  # numerator, denominator, and an exponent that starts very low
            att = torch.stack((torch.zeros(s.n_embd), torch.zeros(s.n_embd), torch.full((s.n_embd,), -1e38)))
        else:
            att = torch.zeros(s.n_head, s.head_size, s.head_size)
        return [[torch.zeros(s.n_embd), att.clone(), torch.zeros(s.n_embd)] for _ in range(s.n_layer)]

    def set_sparse(self, sparse: bool) -> None:
        """Multiply only the active neurons' value rows in every channel mix (exact)."""
        for b in self.blocks:
            b.ffn.sparse = sparse

    @torch.inference_mode()
    def forward(self, ids: list[int], state: list[list[torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Logits after the last of ``ids`` (vocab,), and the state after all of them."""
        if self.head.weight.is_meta:
            raise BadInputError("the head was dropped (sparsemap.drop): use hidden() for hidden states")
        hidden, state = self.hidden(ids, state)
        return self.head(hidden), state

    @torch.inference_mode()
    def hidden(self, ids: list[int], state: list[list[torch.Tensor]] | None = None,
               ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """The final normalised hidden state after the last of ``ids`` (C,), and the state: what an
        embedding use needs. The head is never read, so ``sparsemap.drop(model, "head.weight")`` gives
        its memory back."""
        state = state if state is not None else self.zero_state()
        rows = self.emb.weight[torch.tensor(ids)]  # (T, C): only these rows of the table are read
        x = self.blocks[0].ln0(rows)
        v_first = None
        for i, block in enumerate(self.blocks):
            att_prev, att_state, ffn_prev = state[i]
            dx, att_prev, att_state, v_first = block.att(block.ln1(x), att_prev, att_state, v_first)
            x = x + dx
            dx, ffn_prev = block.ffn(block.ln2(x), ffn_prev)
            x = x + dx
            state[i] = [att_prev, att_state, ffn_prev]
        return self.ln_out(x[-1]), state

    def start(self) -> RwkvState:
        """An empty running sequence of this model: feed it ids, go back to a kept point, feed more."""
        return RwkvState(self)

    @torch.inference_mode()
    def generate(self, ids: list[int], max_new_tokens: int, *, sampling: Sampling | None = None,
                 temperature: float | None = None, stop: tuple[int, ...] = (),
                 on_token: Any = None) -> list[int]:
        """Continuation of ``ids``: the prompt in sequence mode, then one token at a time, chosen by
        ``sampling`` (greedy by default; ``temperature=`` is a shorthand for ``Sampling(temperature=...)``).
        ``on_token(token)`` hears each token as it comes; a true answer stops the generation there."""
        state = self.start()
        logits = state.feed(ids)
        return generate_from(state, logits, Sampler(resolve(sampling, temperature), ids), max_new_tokens,
                             stop_ids=stop, on_token=on_token)

    def count_active(self, on: bool = True) -> list[list[int]]:
        """Start (or stop) counting active FFN neurons per step; returns the counts so far, per layer.
        Starting also forgets which neurons were ever active (see :meth:`evict_unused`)."""
        for b in self.blocks:
            b.ffn.counting = on
            if on:
                b.ffn.active, b.ffn.ever_active = [], None
        return [b.ffn.active for b in self.blocks]

    def evict_unused(self, *, drop_cache: bool = False) -> int:
        """Release the pages of value rows no counted step used (a calibration text): they fault back
        from the file if a later token needs them, so the output stays exact. Returns pages released.

        Needs ``value`` stored transposed, one neuron a row (``sparsemap convert --transpose
        '*ffn.value.weight' --pad-rows '*ffn.value.weight'``): only pages wholly inside unused rows go.

        Raises:
            RowError: ``value`` is not stored as rows of a mapped file.
        """
        import mmap

        from .. import pages
        from ..sparse_rows import rows

        released = 0
        for b in self.blocks:
            used = b.ffn.ever_active
            if used is None:
                continue
            value_rows = b.ffn.value.weight.t()  # (F, C)
            unused = torch.nonzero(~used).view(-1).tolist()
            released += rows(value_rows).evict(unused, drop_cache=drop_cache)
            # Rows are read at random from now on: no read-around bringing evicted neighbours back.
            start = value_rows.data_ptr()
            first, last = pages.pages_inside(start, start + value_rows.shape[0] * value_rows.stride(0) * 4)
            if last > first:
                pages.madvise(first, last - first, mmap.MADV_RANDOM)
        return released


Rwkv7 = Rwkv  # the name the first version had


class RwkvState:
    """A running sequence of an :class:`Rwkv`: the ids fed so far and the recurrent state after them.

    A recurrent state cannot be cut back: it holds every token mixed in. So :meth:`mark` keeps a copy of
    it (the last :data:`MAX_MARKS` copies, one per conversation turn's prompt: a copy is the size of the
    state, ``layers x (2 C + H N N)`` floats), and :meth:`truncate` goes back to the newest copy at or
    before the length asked for, the ids between that copy and the length re-fed with the next
    :meth:`feed` (from the start when no copy fits). A chat keeps a copy at the end of each turn's
    prompt: the next turn's rendering, when it differs from what was fed, usually differs in the answer
    (its text tokenized anew), after that point.

    Example:
        >>> state = load("model.pth").start()
        >>> logits = state.feed([1, 2, 3]); state.mark()
        >>> logits = state.feed([4, 5])
        >>> state.truncate(4)              # back to the copy after [1, 2, 3]; 4 waits for the next feed
        >>> logits = state.feed([6])       # runs [4, 6]: the sequence is now [1, 2, 3, 4, 6]
    """

    def __init__(self, model: Rwkv) -> None:
        self.model = model
        self.ids: list[int] = []  # the sequence this state stands for
        self.layers = model.zero_state()  # after ids[:done]
        self.done = 0  # ids[done:] were cut back to and wait for the next feed
        self.marks: list[tuple[int, list[list[torch.Tensor]]]] = []  # (length, copy of layers), oldest first
        self.eos_ids = (0,)  # the end-of-text token of RWKV's vocabularies
        self.processed = 0  # ids run through the model since the start, re-fed ones included

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` (after any ids waiting since :meth:`truncate`); the logits after the last, (vocab,).

        Raises:
            BadInputError: no ids.
        """
        if not ids:
            raise BadInputError("nothing to feed: no ids")
        todo = self.ids[self.done:] + list(ids)
        # The model writes the new state into the list it is given: a copy of the list (not of the
        # tensors, never written in place), so a feed cut short (Ctrl-C) leaves this state as it was.
        logits, layers = self.model(todo, [list(layer) for layer in self.layers])
        fed = self.ids + list(ids)
        self.layers, self.ids, self.done = layers, fed, len(fed)  # one statement: no Ctrl-C in between
        self.processed += len(todo)
        return logits

    def mark(self) -> None:
        """Keep a copy of the state here, for :meth:`truncate` to return to (the oldest copy beyond
        :data:`MAX_MARKS` goes). Nothing to keep while ids wait to be re-fed."""
        if self.done == len(self.ids) and not (self.marks and self.marks[-1][0] == self.done):
            self.marks = [*self.marks[-(MAX_MARKS - 1):], (self.done, _copy(self.layers))]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` ids (all of them when there are fewer): back to the newest kept copy at or
        before ``n``, ids after it re-fed by the next :meth:`feed`."""
        if n >= len(self.ids):
            return
        self.marks = [m for m in self.marks if m[0] <= n]
        at, layers = self.marks[-1] if self.marks else (0, self.model.zero_state())
        self.layers, self.ids, self.done = _copy(layers), self.ids[:n], at


MAX_MARKS = 4  # copies of the state an RwkvState keeps: the turns a chat can go back over without re-feeding


def _copy(layers: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in layer] for layer in layers]


def load(source: str | os.PathLike[str] | Catalog, *, sparse: bool = False) -> Rwkv:
    """An RWKV-7 or RWKV-6 model with its weights mapped from ``source`` (a ``.pth``, a safetensors file,
    rwkv.cpp's ``.bin``...).

    Raises:
        RwkvFormatError: not an RWKV checkpoint of a supported version, or tensors missing or of the
            wrong shape.
    """
    from ..checkpoint import Checkpoint
    from ..formats.dispatch import open_catalog
    from ..loader import load as load_weights

    ckpt = Checkpoint(pytorch_view(source if isinstance(source, Catalog) else open_catalog(source)))
    model = Rwkv(shape_of(ckpt.catalog))
    model = load_weights(model, ckpt, skip=lambda name: name in ("blocks.0.att.v0", "blocks.0.att.v1",
                                                                 "blocks.0.att.v2"))
    model.set_sparse(sparse)
    if ckpt.catalog.format.startswith("rwkv-cpp"):  # an rwkv.cpp file computes as rwkv.cpp does
        for block in model.blocks:
            if isinstance(block.att, TimeMix5):
                block.att.decay_is_factor, block.att.norm_eps = True, RWKV_CPP_V5_NORM_EPS
    return model.eval()


__all__ = ["ChannelMix", "ChannelMix5", "ChannelMix6", "ChannelMix7", "Rwkv", "Rwkv4Shape", "Rwkv5Shape",
           "Rwkv6Shape", "Rwkv7", "Rwkv7Shape", "RwkvState", "TimeMix4", "TimeMix5", "TimeMix6", "TimeMix7",
           "detect_version", "load", "pytorch_view"]
