"""Writers of formats no installable library writes, following their published layouts byte for byte.

- llama2.c (``export.py`` of karpathy/llama2.c): ``legacy_export`` (v0), ``version1_export`` (v1) and
  ``version2_export`` (v2, Q8_0), from a transformers ``LlamaForCausalLM`` the way ``export.py``'s
  ``load_hf_model`` takes one (q and k rows permuted back to Meta's interleaved order);
- MLC-LLM / TVM parameter caches (``tvm.contrib.tvmjs.dump_ndarray_cache``): ``ndarray-cache.json`` and
  ``params_shard_N.bin``, in ``"raw"`` or ``"f32-to-bf16"`` encoding;
- Meta's original Llama release (``params.json``, ``consolidated.NN.pth``): a transformers Llama split the
  way Meta's model-parallel code saves it (``write_meta_release``), each file written by ``torch.save``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

AK42 = 0x616B3432


# ---------------------------------------------------------------- llama2.c

def meta_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """export.py's ``permute_reverse``: transformers' q/k rows (halves per head) to Meta's (interleaved)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_arrays(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    """export.py's view of a transformers Llama state dict: its tensors under llama2.c's names (per-layer
    arrays as lists), q and k rows in Meta's order."""
    sd = {k: v.detach().float() for k, v in sd.items()}
    layers = range(cfg["num_hidden_layers"])
    at = "model.layers.{}."
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return {
        "tok_embeddings": sd["model.embed_tokens.weight"],
        "attention_norm": [sd[at.format(i) + "input_layernorm.weight"] for i in layers],
        "wq": [meta_order(sd[at.format(i) + "self_attn.q_proj.weight"], heads) for i in layers],
        "wk": [meta_order(sd[at.format(i) + "self_attn.k_proj.weight"], kv_heads) for i in layers],
        "wv": [sd[at.format(i) + "self_attn.v_proj.weight"] for i in layers],
        "wo": [sd[at.format(i) + "self_attn.o_proj.weight"] for i in layers],
        "ffn_norm": [sd[at.format(i) + "post_attention_layernorm.weight"] for i in layers],
        "w1": [sd[at.format(i) + "mlp.gate_proj.weight"] for i in layers],
        "w2": [sd[at.format(i) + "mlp.down_proj.weight"] for i in layers],
        "w3": [sd[at.format(i) + "mlp.up_proj.weight"] for i in layers],
        "norm": sd["model.norm.weight"],
        "output": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
    }


def random_state(cfg: dict[str, Any], *, seed: int = 0, shared: bool = False) -> dict[str, torch.Tensor]:
    """A random Llama state dict under transformers' names, without transformers (``cfg``: config.json's
    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    vocab_size)."""
    gen = torch.Generator().manual_seed(seed)
    d, h, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = d
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": 1 + w(d)}
    for i in range(cfg["num_hidden_layers"]):
        at = f"model.layers.{i}."
        sd.update({at + "input_layernorm.weight": 1 + w(d), at + "self_attn.q_proj.weight": w(q, d),
                   at + "self_attn.k_proj.weight": w(kv, d), at + "self_attn.v_proj.weight": w(kv, d),
                   at + "self_attn.o_proj.weight": w(d, q), at + "post_attention_layernorm.weight": 1 + w(d),
                   at + "mlp.gate_proj.weight": w(h, d), at + "mlp.down_proj.weight": w(d, h),
                   at + "mlp.up_proj.weight": w(h, d)})
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if shared else w(v, d)
    return sd


def _fp32(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).to(torch.float32).numpy().astype("<f4").tobytes()


def quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """export.py's ``quantize_q80``: symmetric int8 in groups of the flattened tensor, scale = max / 127."""
    w = w.float().reshape(-1, group_size)
    scale = torch.abs(w).max(dim=1).values / 127.0
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def write_llama2c(path: Path, model: Any, version: int, *, group_size: int = 64, seq_len: int | None = None,
                  shared: bool | None = None) -> Path:
    """A llama2.c file of ``version`` (0 legacy, 1 float32, 2 Q8_0) as export.py writes it, from a
    transformers Llama or a ``(state dict, config dict)`` pair. ``shared``: the classifier is the
    embedding (default: when the two weights are equal)."""
    sd, cfg = model if isinstance(model, tuple) else (model.state_dict(), model.config.to_dict())
    a = llama2c_arrays(sd, cfg)
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hidden = a["w1"][0].shape[0]
    seq_len = seq_len or cfg.get("max_position_embeddings", 16)
    if shared is None:
        shared = bool(torch.equal(a["tok_embeddings"], a["output"]))
    params = [dim, hidden, cfg["num_hidden_layers"], heads, cfg["num_key_value_heads"], cfg["vocab_size"],
              seq_len]
    out = bytearray()
    if version == 0:
        if not shared:
            params[5] = -params[5]
        out += struct.pack("7i", *params)
        out += _fp32(a["tok_embeddings"])
        for key in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
            out += b"".join(_fp32(t) for t in a[key])
        out += _fp32(a["norm"])
        head = dim // heads  # freqs_cos / freqs_sin of llama2.c's model.py, (seq_len, head / 2) each
        freqs = 1.0 / (10000.0 ** (torch.arange(0, head, 2)[: head // 2].float() / head))
        angles = torch.outer(torch.arange(seq_len).float(), freqs)
        out += _fp32(torch.cos(angles)) + _fp32(torch.sin(angles))
        if not shared:
            out += _fp32(a["output"])
    elif version == 1:
        out += struct.pack("I", AK42) + struct.pack("i", 1) + struct.pack("7i", *params)
        out += struct.pack("B", int(shared))
        out += bytes(256 - len(out))
        weights = [*a["attention_norm"], *a["ffn_norm"], a["norm"], a["tok_embeddings"], *a["wq"], *a["wk"],
                   *a["wv"], *a["wo"], *a["w1"], *a["w2"], *a["w3"]]
        if not shared:
            weights.append(a["output"])
        out += b"".join(_fp32(w) for w in weights)
    else:
        while dim % group_size:
            group_size //= 2  # export.py's back-off
        weights = [a["tok_embeddings"], *a["wq"], *a["wk"], *a["wv"], *a["wo"], *a["w1"], *a["w2"], *a["w3"]]
        if not shared:
            weights.append(a["output"])
        out += struct.pack("I", AK42) + struct.pack("i", 2) + struct.pack("7i", *params)
        out += struct.pack("B", int(shared)) + struct.pack("i", group_size)
        out += bytes(256 - len(out))
        for norm in (*a["attention_norm"], *a["ffn_norm"], a["norm"]):
            out += _fp32(norm)
        for w in weights:
            q, s = quantize_q80(w, group_size)
            out += q.numpy().tobytes() + _fp32(s)
    path.write_bytes(bytes(out))
    return path


def tiny_llama(*, shared: bool = False, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random LlamaForCausalLM, shaped as a llama2.c model can be (even head size, SiLU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 32,
          "tie_word_embeddings": shared, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------- MLC / TVM

TVM_NAMES = {np.dtype("float32"): "float32", np.dtype("float16"): "float16", np.dtype("int8"): "int8",
             np.dtype("uint8"): "uint8", np.dtype("int32"): "int32", np.dtype("uint32"): "uint32",
             np.dtype("int64"): "int64", np.dtype("float64"): "float64", np.dtype("uint16"): "bfloat16"}


def f32_to_bf16(value: np.ndarray) -> np.ndarray:
    """tvmjs's ``_convert_f32_to_bf16``: round to nearest even within bf16's range, truncate outside it."""
    cap = np.finfo("float32").max
    limit = ((np.array([cap.view("uint32")]) >> 16) << 16).view("float32")[0]
    data = value.view("uint32")
    bias = np.where(np.logical_and(value < limit, value > -limit), ((data >> 16) & 1) + 0x7FFF,
                    np.zeros_like(data))
    return ((data + bias) >> 16).astype("uint16")


def write_mlc(folder: Path, params: dict[str, np.ndarray], *, encode_format: str = "f32-to-bf16",
              shard_cap_nbytes: int = 32 << 20, metadata: dict | None = None,
              name: str = "ndarray-cache.json") -> Path:
    """An MLC/TVM parameter cache as ``dump_ndarray_cache`` writes it: records appended to a shard until
    it would reach the cap (an array of half the cap or more goes alone into a shard of its own).
    ``uint16`` arrays are written as TVM's ``bfloat16``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: list[dict] = []
    data = bytearray()

    def commit(blob: bytes, records: list[dict]) -> None:
        data_path = f"params_shard_{len(shards)}.bin"
        (folder / data_path).write_bytes(bytes(blob))
        shards.append({"dataPath": data_path, "format": "raw-shard", "nbytes": len(blob), "records": records,
                       "md5sum": "0" * 32})

    for key, v in params.items():
        dtype = TVM_NAMES[v.dtype]
        as_bf16 = encode_format == "f32-to-bf16" and dtype == "float32"
        blob = f32_to_bf16(v).tobytes() if as_bf16 else v.tobytes()
        rec = {"name": key, "shape": list(v.shape), "dtype": dtype, "format": encode_format,
               "nbytes": len(blob)}
        if len(data) + len(blob) >= shard_cap_nbytes:
            if len(blob) * 2 >= shard_cap_nbytes:  # out of band
                rec["byteOffset"] = 0
                commit(blob, [rec])
                continue
            commit(data, pending)
            data, pending = bytearray(), []
        rec["byteOffset"] = len(data)
        pending.append(rec)
        data += blob
    if data:
        commit(data, pending)
    path = folder / name
    path.write_text(json.dumps({"metadata": metadata or {"ParamSize": len(params)}, "records": shards},
                               indent=4))
    return path


# ---------------------------------------------------------------- Meta's original Llama release

# transformers' name after "model.layers.N." -> Meta's after "layers.N.", and the dimension fairscale's
# ColumnParallelLinear (0) / RowParallelLinear (1) splits it along; None: whole in every file.
META_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def meta_state_dicts(model: Any, n_files: int, *, embedding_dim: int = 1) -> list[dict[str, torch.Tensor]]:
    """A transformers Llama's weights as Meta's ``n_files`` model-parallel state dicts: Meta's names, q and
    k rows interleaved per head, column-parallel weights split by rows, row-parallel ones by columns, the
    embedding by columns (``embedding_dim=1``, Llama 1 and 2) or rows (0, Llama 3), norms whole in each."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n_files)]

    def put(meta: str, w: torch.Tensor, dim: int | None) -> None:
        parts = [w] * n_files if dim is None else list(w.chunk(n_files, dim=dim))
        for d, part in zip(out, parts, strict=True):
            d[meta] = part.contiguous().clone()  # its own storage: torch.save writes a view's whole storage

    put("tok_embeddings.weight", sd["model.embed_tokens.weight"], embedding_dim)
    put("norm.weight", sd["model.norm.weight"], None)
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"], 0)
    for i in range(cfg.num_hidden_layers):
        for hf, (meta, dim) in META_LAYER.items():
            w = sd[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q_proj"):
                w = meta_order(w, cfg.num_attention_heads)
            elif hf.startswith("self_attn.k_proj"):
                w = meta_order(w, cfg.num_key_value_heads)
            put(f"layers.{i}.{meta}", w, dim)
    return out


def write_meta_release(folder: Path, model: Any, n_files: int = 1, *, embedding_dim: int = 1,
                       vocab_size: int | None = -1, **params: Any) -> Path:
    """Write ``model`` as Meta's release in ``folder``: ``params.json`` (``vocab_size`` -1 as Llama 2's, or
    the given number; more keys through ``params``) and ``consolidated.00.pth`` ... by ``torch.save``."""
    cfg = model.config
    folder.mkdir(parents=True, exist_ok=True)
    rope = getattr(cfg, "rope_parameters", None) or {}
    doc = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
           "n_kv_heads": cfg.num_key_value_heads,
           "vocab_size": cfg.vocab_size if vocab_size is None else vocab_size,
           "multiple_of": 32, "ffn_dim_multiplier": 0.5, "norm_eps": cfg.rms_norm_eps,
           "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))}
    doc.update(params)
    (folder / "params.json").write_text(json.dumps(doc))
    for i, sd in enumerate(meta_state_dicts(model, n_files, embedding_dim=embedding_dim)):
        torch.save(sd, folder / f"consolidated.{i:02d}.pth")
    return folder
