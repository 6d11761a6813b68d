"""Bench folders: synthetic Llama checkpoints of named sizes, or a real model folder's weights, written
once by the real writers and cached.

Random weights in a real architecture's shape. One folder holds the same
weights three ways: ``model.safetensors`` (safetensors.torch.save_file),
``model.pt`` (torch.save) and ``sharded/`` (transformers' save_pretrained
with shards), plus config.json, so every strategy loads what it is made for.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..extras import require

SIZES: dict[str, dict[str, object]] = {
    # hidden, layers, heads, kv heads, intermediate, vocab: Llama-family shapes.
    "llama-tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096},
    "llama-0.1b": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 26,
                 "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 32000},
}


def folder_for(name: str) -> Path:
    from ..models.assets import cache_dir

    return cache_dir() / "bench" / f"{name}-bf16"


def generate(name: str, *, quiet: bool = False) -> Path:
    """The cached folder of synthetic model ``name`` (written on first use)."""
    if name not in SIZES:
        raise KeyError(f"unknown synthetic size {name!r}; known: {', '.join(SIZES)}")
    folder = folder_for(name)
    if (folder / ".complete").is_file():
        return folder
    import torch

    for module in ("safetensors", "transformers"):  # the peers' own writers write the folder
        require(module, extra="bench", needed_for="writing the bench's checkpoints")
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..loader import skeleton

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SIZES[name], max_position_embeddings=2048, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    config.save_pretrained(folder)
    with skeleton():
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
             for n, p in model.state_dict().items()}
    if not quiet:
        n = sum(t.numel() for t in state.values())
        print(f"writing {name}: {n / 1e6:,.0f} M parameters, {2 * n / 1e9:.2f} GB bf16, to {folder}",
              file=sys.stderr)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch.save(state, folder / "model.pt")
    # save_pretrained of the real model class writes the sharded layout transformers itself reads:
    # four shards or so, whatever the size.
    model.load_state_dict(state, assign=True)
    shard_mib = max(1, sum(t.numel() * 2 for t in state.values()) // 4 // 2**20)
    model.save_pretrained(folder / "sharded", max_shard_size=f"{shard_mib}MB")
    (folder / ".complete").write_text(name + "\n")
    return folder


def from_folder(source: Path, *, quiet: bool = False) -> Path:
    """A bench folder for a real model folder (config.json and weights in any format sparsemap reads),
    written once into the cache: the same weights as a plain ``model.safetensors``, ``model.pt`` and a
    ``sharded/`` save, each by its own library, so that every strategy reads what it is made for.

    A converted file (padding tensors, layouts, quantized parts) would be misread by the peers, so the
    weights are written out again in their logical form, dequantized.
    """
    import hashlib

    from ..models.assets import cache_dir

    source = source.resolve()
    config = source / "config.json"
    if not config.is_file():
        from ..errors import SourceNotFoundError

        raise SourceNotFoundError("no config.json: bench builds the model the config names", path=source)
    stamp = "".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in sorted(source.iterdir())
                    if f.is_file())
    key = hashlib.sha256(f"{source}|{stamp}".encode()).hexdigest()[:10]
    folder = cache_dir() / "bench" / f"{source.name}-{key}"
    if (folder / ".complete").is_file():
        return folder
    import torch

    for module in ("safetensors", "transformers"):
        require(module, extra="bench", needed_for="writing the bench's checkpoints")
    from transformers import AutoConfig

    from ..loader import load, skeleton
    from ..models.hf import class_for
    from ..qtensor import QuantizedTensor

    if not quiet:
        print(f"preparing {source.name} for the bench (once): plain safetensors, torch.save and "
              f"sharded copies in {folder}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.from_pretrained(source)
    with skeleton():
        model = class_for(cfg)(cfg)
    load(model, source, strict=False)
    # Real copies of every weight: the peers' writers refuse tensors that are views of a mapping
    # with padding (strided), and quantized weights are dequantized.
    with torch.no_grad():
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    plain = p.dequantize() if isinstance(p, QuantizedTensor) else p
                    module._parameters[attr] = torch.nn.Parameter(plain.contiguous().clone(),
                                                                  requires_grad=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.save_pretrained(folder, max_shard_size="1000GB")  # one plain model.safetensors, ties saved once
    torch.save(model.state_dict(), folder / "model.pt")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder / "sharded", max_shard_size=f"{max(1, nbytes // 4 // 2**20)}MB")
    (folder / ".complete").write_text(str(source) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    names = argv if argv is not None else sys.argv[1:]
    for name in names or ["llama-tiny"]:
        print(generate(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
