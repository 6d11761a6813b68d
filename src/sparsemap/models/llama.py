"""A lean Llama runtime: the model in plain PyTorch, the tokenizer from the ``tokenizers`` library.

``sparsemap run`` uses it for Llama-architecture folders so that answering a
prompt costs torch, the tokenizer and the mapped weights, and not the 128 MiB
of anonymous memory that importing transformers takes on its own (measured:
``sparsemap run --engine transformers`` shows it). Parameter names match
transformers' ``LlamaForCausalLM``, so the same checkpoint loads into either,
zero-copy, and a golden test checks that both generate the same tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError
from ..formats.catalog import Catalog
from ..formats.source import ModelSource, resolve_source
from .sampling import Sampler, Sampling, generate_from, resolve


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters the forward pass needs, read from config.json."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    qkv_bias: bool = False  # Qwen2 always; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False

    @classmethod
    def from_source(cls, source: ModelSource) -> LlamaShape:
        """Read the source's config; refuse, naming the key, anything this runtime does not implement."""
        if source.config is None:
            raise BadInputError("the lean runtime needs a config.json beside the weights", path=source.folder)
        cfg = read_config(source.config)
        reason = unsupported(cfg)
        if reason is not None:
            raise BadInputError(f"the lean runtime cannot run this model: {reason} "
                                "(use --engine transformers)", path=source.config)
        heads = cfg["num_attention_heads"]
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = cfg.get("eos_token_id")
        if source.generation_config is not None:
            eos = json.loads(Path(source.generation_config).read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                   num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                   vocab_size=cfg["vocab_size"], tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                   eos_token_ids=eos_ids,
                   qkv_bias=cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias")),
                   o_bias=cfg["model_type"] == "llama" and bool(cfg.get("attention_bias")),
                   mlp_bias=bool(cfg.get("mlp_bias")))


REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
LEAN_MODEL_TYPES = ("llama", "qwen2")


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config.json as a dict; a clear error when it is not one."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read config.json: {e}", path=path) from None
    if not isinstance(cfg, dict):
        raise BadInputError("config.json is not a JSON object", path=path)
    return cfg


def unsupported(cfg: dict[str, Any]) -> str | None:
    """Why the lean runtime cannot run this config, or ``None`` if it can (one check for every caller).

    It runs Llama (biases included) and Qwen2 (Llama with q/k/v biases) without sliding windows.
    """
    if cfg.get("model_type") not in LEAN_MODEL_TYPES:
        return f"model_type is {cfg.get('model_type')!r}, not one of {', '.join(LEAN_MODEL_TYPES)}"
    missing = [k for k in REQUIRED if not isinstance(cfg.get(k), int)]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act is {cfg['hidden_act']!r}, not 'silu'"
    if cfg.get("use_sliding_window"):
        return "sliding-window attention is set"
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        return "rope scaling is set"
    if cfg.get("pretraining_tp", 1) != 1:
        return f"pretraining_tp is {cfg['pretraining_tp']}"
    return None


def _weight(*shape: int) -> nn.Parameter:
    """A parameter with a shape and no storage, to be replaced by a mapped view.

    Made directly on the meta device and never initialised: running an
    initialiser on meta tensors imports torch's Python decompositions (about
    800 modules, 2 s and 78 MiB, measured), which is most of what this
    runtime exists to avoid.
    """
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """A linear layer with its weights on meta until loaded, and nothing to initialise them (a weight the
    file lacks is refused, never made up). Its forward is ``nn.Linear``'s own, ``F.linear(x, weight,
    bias)``, which is what lets a budget compute it in pieces of rows (:mod:`sparsemap.row_pieces`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = _weight(out_features, in_features)  # (out, in)
        self.bias = _weight(out_features) if bias else None  # (out,)

    forward = nn.Linear.forward


class Embedding(nn.Module):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.weight = _weight(n, dim)  # (vocab, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = _weight(dim)  # (dim,)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the weights' dtype, as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.q_proj = Linear(s.hidden_size, self.heads * self.head_dim, s.qkv_bias)
        self.k_proj = Linear(s.hidden_size, self.kv_heads * self.head_dim, s.qkv_bias)
        self.v_proj = Linear(s.hidden_size, self.kv_heads * self.head_dim, s.qkv_bias)
        self.o_proj = Linear(self.heads * self.head_dim, s.hidden_size, s.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape  # (batch, tokens, hidden)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (b, heads, t, head_dim)
        # k, v: (b, kv_heads, t, head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            if cache:
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            cache[:] = [k, v]
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)  # (b, heads, past + t, head_dim)
        v = v.repeat_interleave(group, dim=1)
        past = k.shape[2] - t
        if t == 1:  # one new token sees everything: no mask
            out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, 1, head_dim)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, head_dim)
        else:
            # is_causal would align the mask top-left; new token i sees the past and tokens <= i.
            mask = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)  # (t, past + t)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.gate_proj = Linear(s.hidden_size, s.intermediate_size, s.mlp_bias)
        self.up_proj = Linear(s.hidden_size, s.intermediate_size, s.mlp_bias)
        self.down_proj = Linear(s.intermediate_size, s.hidden_size, s.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[torch.Tensor] | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.embed_tokens = Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class Llama(nn.Module):
    """Llama (and Qwen2) with transformers' parameter names (``model.layers.N.self_attn.q_proj.weight``)."""

    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.shape = s
        self.model = Body(s)
        self.lm_head = Linear(s.hidden_size, s.vocab_size)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = 1.0 / (s.rope_theta
                          ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (head_dim / 2,)

    def forward(self, ids: torch.Tensor, start: int = 0,
                caches: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Logits of the last position, (batch, vocab). ``start``: tokens already in the caches."""
        x = self.model.embed_tokens(ids)  # (b, t, hidden)
        positions = torch.arange(start, start + ids.shape[1], dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]  # (t, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (t, head_dim)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, caches[i] if caches is not None else None)
        return self.lm_head(self.model.norm(x[:, -1:, :]))[:, -1, :]

    def start(self) -> LlamaState:
        """An empty running sequence of this model: feed it ids, cut it back, feed more (a chat's turns)."""
        return LlamaState(self)

    @torch.inference_mode()
    def generate(self, ids: list[int], max_new_tokens: int, *, sampling: Sampling | None = None,
                 temperature: float | None = None, on_token: Any = None) -> list[int]:
        """Continuation of ``ids`` with a KV cache, tokens chosen by ``sampling`` (greedy by default;
        ``temperature=`` is a shorthand for ``Sampling(temperature=...)``). ``on_token(token)`` hears each
        token as it comes; a true answer stops the generation there."""
        state = self.start()
        logits = state.feed(ids)
        return generate_from(state, logits, Sampler(resolve(sampling, temperature), ids), max_new_tokens,
                             stop_ids=self.shape.eos_token_ids, on_token=on_token)


class LlamaState:
    """A running sequence of a :class:`Llama`: the ids fed so far and every layer's KV cache.

    :meth:`truncate` cuts the caches back to any length, so a conversation whose next rendering shares
    only a prefix with what was fed re-feeds from the first differing token, not from the start.

    Example:
        >>> state = load("./SmolLM2/").start()
        >>> logits = state.feed([1, 2, 3, 4])    # (vocab,): what follows token 4
        >>> state.truncate(2)
        >>> logits = state.feed([5])             # the sequence is now [1, 2, 5]
    """

    def __init__(self, model: Llama) -> None:
        self.model = model
        self.ids: list[int] = []  # what the caches hold, in order
        self.caches: list[list[torch.Tensor]] = [[] for _ in model.model.layers]  # per layer: [] or [k, v]
        self.eos_ids = model.shape.eos_token_ids  # what ends an answer
        self.processed = 0  # ids run through the model since the start, re-fed ones included
        self._busy = False  # a feed began and did not finish (Ctrl-C): some layers may hold more than ids

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` after those fed so far; the logits after the last of them, (vocab,).

        Raises:
            BadInputError: no ids.
        """
        if not ids:
            raise BadInputError("nothing to feed: no ids")
        if self._busy:
            self.truncate(len(self.ids))
        self._busy = True
        logits = self.model(torch.tensor([ids]), len(self.ids), self.caches)  # (1, vocab)
        self.ids = self.ids + list(ids)
        self.processed += len(ids)
        self._busy = False
        return logits[0]

    @torch.inference_mode()
    def truncate(self, n: int) -> None:
        """Keep the first ``n`` ids fed (all of them when there are fewer); the caches drop the rest."""
        n = min(n, len(self.ids))
        if n == len(self.ids) and not self._busy:
            return
        for cache in self.caches:
            if cache:  # (batch, kv_heads, tokens, head_dim) each: a view of the first n positions
                cache[:] = [t[:, :, :n] for t in cache]
        self.ids = self.ids[:n]
        self._busy = False

    def mark(self) -> None:
        """Nothing to do: the caches can be cut back to any length (an RWKV state keeps a copy here)."""


def load(source: str | os.PathLike[str] | ModelSource, dtype: torch.dtype | None = None) -> Llama:
    """The lean model with weights mapped from ``source`` (a folder, or its resolved source),
    zero-copy when dtype matches."""
    from ..formats.dispatch import open_catalog

    if not isinstance(source, ModelSource):
        source = resolve_source(source)
    return map_weights(Llama(LlamaShape.from_source(source)), open_catalog(source), dtype)


def map_weights(model: Llama, catalog: Catalog, dtype: torch.dtype | None = None) -> Llama:
    """``catalog``'s weights mapped into ``model`` (zero-copy when ``dtype`` is theirs), ready to run.

    A projection stored with its rows in another order (q and k in Meta's rotary order: a llama2.c file,
    Meta's release, a GGUF) is mapped as stored, and its output put back in the model's order (a
    permutation of its output features per token, ``to_logical``) instead of copying the matrix; kept
    quantized weights stay quantized so. One with a bias is served in the model's order (a copy).
    """
    from ..checkpoint import inverse_order
    from ..loader import load as load_weights

    modules = dict(model.named_modules())
    entries = dict(catalog.items())
    for name, entry in catalog.items():
        module = modules.get(name.removesuffix(".weight"))
        if entry.order is None or entry.order_dim != 0 or not isinstance(module, Linear) \
                or module.bias is not None or not name.endswith(".weight"):
            continue
        # to_logical[j]: the stored output feature that is the model's feature j.
        module.register_buffer("to_logical", inverse_order(entry.order), persistent=False)
        module.register_forward_hook(_in_logical_order)
        entries[name] = entry._replace(order=None)
    as_stored = Catalog(catalog.source, catalog.format, entries, catalog.metadata, catalog.stamps,
                        catalog.quantized)
    # Old checkpoints saved rotary caches; this runtime computes them. Built on meta already: no skeleton.
    return load_weights(model, as_stored, dtype=dtype, skip=["*.rotary_emb.inv_freq"]).eval()


def _in_logical_order(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """A projection's output, (..., out_features), from its stored row order to the model's."""
    return out.index_select(-1, module.to_logical)


class ChatTokenizer:
    """``tokenizers`` plus the model's chat template (rendered in a sandboxed Jinja environment)."""

    def __init__(self, source: ModelSource | str | os.PathLike[str]) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        if isinstance(source, ModelSource):  # the resolver's answer (a GGUF's vocabulary is not for us)
            path, where = (None if source.is_gguf else source.tokenizer), source.folder
        else:  # a folder holding tokenizer.json, or that file
            where = Path(source)
            path = str(where / "tokenizer.json") if where.is_dir() else str(where)
            path = path if Path(path).is_file() else None
        if path is None:
            raise BadInputError("no tokenizer.json (use --engine transformers for other tokenizers)",
                                path=where)
        self.tokenizer = Tokenizer.from_file(path)
        folder = Path(path).parent  # its companions (template, special tokens) lie beside it
        config = json.loads((folder / "tokenizer_config.json").read_text()) \
            if (folder / "tokenizer_config.json").is_file() else {}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        special_map = folder / "special_tokens_map.json"
        sources = [json.loads(special_map.read_text()) if special_map.is_file() else {}, config]
        # Special tokens come as strings or as {"content": ...} (AddedToken) objects.
        self.special = {k: (v["content"] if isinstance(v, dict) else v)
                        for src in sources for k, v in src.items()
                        if k.endswith("_token")
                        and isinstance(v.get("content") if isinstance(v, dict) else v, str)}
        self.folder = folder
        self.template = None  # a base model has none: its prompts are completed as they are
        if template:
            # The same environment transformers renders chat templates in.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self.template = env.from_string(template)

    def raw_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as text to continue (with the tokenizer's own special tokens, e.g. BOS)."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=True).ids)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the user turn, with the assistant turn opened."""
        if self.template is None:
            raise BadInputError("the tokenizer has no chat template (tokenizer_config.json or "
                                "chat_template.jinja): complete the prompt as raw text instead (--raw)",
                                path=self.folder)
        messages = [{"role": "user", "content": prompt}]
        text = self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _raise_template_error(message: str) -> None:
    raise BadInputError(f"chat template refused the prompt: {message}")


