"""Meta's original Llama release as transformers' model: its config, and the folder ``convert`` makes.

:mod:`sparsemap.formats.meta_llama` reads the release (``params.json`` and the ``consolidated.NN.pth``
headers) and names its tensors as transformers does. Here:

- :func:`hf_config`: transformers' ``LlamaConfig`` from ``params.json`` (the feed-forward width from
  ``multiple_of`` and ``ffn_dim_multiplier``, the vocabulary from the embedding where params.json says -1,
  Llama 3.1's scaled rotary frequencies), which ``sparsemap.from_pretrained(folder)`` builds the model from;
- :func:`write_folder`: ``sparsemap convert FOLDER OUT/``, the release as a transformers folder
  (``model.safetensors`` in transformers' names and row order, ``config.json``,
  ``generation_config.json``, the tokenizer converted where it can be). A release in several files is
  joined there, one tensor at a time: each file's part is read (``pread``, never mapped: see
  :mod:`sparsemap.converter`) straight into its place in the joined tensor (a part split by columns a
  block of rows at a time), written, and let go.

A release in several files is not loaded as one model (each file holds a slice of every matrix, so no
tensor of the model is a view of one file); :func:`~sparsemap.formats.meta_llama.read_release` gives each
file's tensors for a tensor-parallel load, rank ``i`` mapping file ``i``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..formats.meta_llama import Release, read_release
from ..formats.source import ModelSource
from .hf_folder import COMPLETE_MARK, check_folder_destination, name_weights, save_configs, staged_folder

if TYPE_CHECKING:
    import torch

    from ..converter import ConvertSummary
    from ..formats.planner import Layout

logger = logging.getLogger("sparsemap")
# The buffer a part split by columns is read through (rows at a time): joining holds the joined tensor and
# at most this much besides (q and k, whose rows are reordered, are read whole: a part of one projection).
CHUNK_NBYTES = 16 << 20

LLAMA3_VOCAB = 128000  # Llama 3's vocabulary (128256) and above; Llama 1 and 2 have 32000
# Context lengths of Meta's releases (transformers' conversion script has the same table): params.json
# rarely says it, and the rotary frequencies tell the families apart.
CONTEXT_LLAMA3_1 = 131072  # use_scaled_rope
CONTEXT_LLAMA3 = 8192
CONTEXT_CODE_LLAMA = 16384  # rope_theta 1e6 with Llama 2's vocabulary
CONTEXT_LLAMA2 = 4096  # Llama 1's was 2048; nothing in its params.json tells the two apart
# Meta's apply_scaling (Llama 3.1's reference code): factor 8, low 1, high 4, over Llama 3's 8192 positions.
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": CONTEXT_LLAMA3}


def hf_config(release: Release) -> Any:
    """transformers' ``LlamaConfig`` of a release, as transformers' conversion script makes it.

    Example:
        >>> hf_config(read_release("Llama-2-7b/")).intermediate_size     # doctest: +SKIP
        11008
    """
    from transformers import LlamaConfig

    p = release.params
    llama3 = release.vocab_size >= LLAMA3_VOCAB
    if p.max_seq_len is not None:
        context = p.max_seq_len
    elif p.use_scaled_rope:
        context = CONTEXT_LLAMA3_1
    elif llama3:
        context = CONTEXT_LLAMA3
    else:
        context = CONTEXT_CODE_LLAMA if p.rope_theta > 10000.0 else CONTEXT_LLAMA2
    scaling = None
    if p.use_scaled_rope:
        scaling = dict(LLAMA3_ROPE_SCALING)
        if p.rope_scaling_factor is not None:  # later releases state it (Llama 3.2 1B and 3B: 32)
            scaling["factor"] = p.rope_scaling_factor
    config = LlamaConfig(
        vocab_size=release.vocab_size, hidden_size=p.dim, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads, num_key_value_heads=p.n_kv_heads,
        head_dim=p.head_dim, rms_norm_eps=p.norm_eps, rope_theta=p.rope_theta, rope_scaling=scaling,
        max_position_embeddings=context, tie_word_embeddings=release.tied,
        bos_token_id=LLAMA3_VOCAB if llama3 else 1, eos_token_id=LLAMA3_VOCAB + 1 if llama3 else 2)
    config.architectures = ["LlamaForCausalLM"]
    return config


def config(source: ModelSource) -> Any:
    """The config of the release at ``source`` (for ``sparsemap.from_pretrained``)."""
    return hf_config(read_release(source))


# ---------------------------------------------------------------- sparsemap convert

def write_folder(source: str | os.PathLike[str] | ModelSource, destination: str | os.PathLike[str], *,
                 layout: Layout | None = None, mark: str = "",
                 on_bytes: Callable[[int], None] | None = None) -> ConvertSummary:
    """Write a Meta release as a transformers folder at ``destination`` (absent or empty), joining its
    files: what ``sparsemap convert FOLDER OUT/`` does.

    Memory stays bounded by one joined tensor (and a 16 MiB buffer, or one file's part of q or k): each
    tensor is read into its place, written and let go before the next, and each source range is dropped
    from the page cache once written.

    Args:
        source: the release's folder (or its ``params.json``).
        destination: the folder to create.
        layout: how ``model.safetensors`` is laid out (alignment by default; a layout that changes stored
            shapes writes ``model.sparsemap.safetensors``, which other loaders do not take for the model).
        mark: text written into the folder's ``.complete`` marker.
        on_bytes: called with the bytes written so far, for a progress bar.

    Returns:
        The :class:`~sparsemap.converter.ConvertSummary` of the weights file.

    Raises:
        DestinationError: ``destination`` is a file, or a folder holding something.
        MetaLlamaFormatError: the release's files do not describe one model (see
            :func:`~sparsemap.formats.meta_llama.read_release`).
        FileChangedError: a file changed while it was read.

    Example:
        >>> write_folder("Llama-2-13b/", "llama-2-13b-hf/")                 # doctest: +SKIP
        >>> sparsemap.from_pretrained("llama-2-13b-hf/")                     # doctest: +SKIP
    """
    import time

    from ..converter import ConvertSummary
    from ..formats.planner import Layout
    from ..formats.reserved import WEIGHTS_NAME

    out = check_folder_destination(destination, "a Meta release")
    release = read_release(source)
    config = hf_config(release)
    start = time.perf_counter()
    with staged_folder(out) as staging:
        the_plan = _write_weights(release, staging / WEIGHTS_NAME, layout or Layout(), on_bytes)
        weights = name_weights(staging)
        save_configs(config, staging)
        write_tokenizer(release, staging)
        (staging / COMPLETE_MARK).write_text(mark or f"{release.folder}\n")
    return ConvertSummary(source=release.folder, destination=str(out / weights),
                          tensors=len(release.ranks[0]), file_nbytes=the_plan.file_nbytes,
                          padding_nbytes=the_plan.padding_nbytes, seconds=time.perf_counter() - start)


def _write_weights(release: Release, path: Path, layout: Layout,
                   on_bytes: Callable[[int], None] | None) -> Any:
    """Plan and write the joined tensors to ``path``; returns the plan."""
    from ..converter import SourceFiles
    from ..formats.planner import Spec, plan
    from ..writer import FileRange, write

    first = release.ranks[0]
    specs = [Spec(name, release.shape(name), entry.dtype) for name, entry in first.items()]
    int4 = None
    if layout.quantize is not None:
        from ..quantize import int4_layout

        int4 = int4_layout()
    the_plan = plan(specs, layout, {"sparsemap.source_format": "meta-llama"}, int4_layout=int4)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(SourceFiles(catalog)) for catalog in release.ranks]

        def get(name: str) -> torch.Tensor | FileRange:
            return _joined(release, files, name)

        def done(name: str) -> None:
            for f, catalog in zip(files, release.ranks, strict=True):
                entry = catalog.entries.get(name)
                if entry is None:  # a quantized weight's part
                    f.check_all()
                    continue
                f.check(entry.file)  # a change during the copy would mix two versions into the output
                f.drop_cache(entry)

        if layout.quantize is not None:
            from ..quantize import from_float, part_getter

            mode = layout.quantize
            get = part_getter(the_plan, get,  # type: ignore[arg-type]
                              lambda name: from_float(_as_tensor(_joined(release, files, name)), mode))
        write(the_plan, get, path, on_bytes=on_bytes, on_tensor=done)
    return the_plan


def _joined(release: Release, files: list[Any], name: str) -> torch.Tensor | Any:
    """Tensor ``name`` of the whole model: one file's own (a byte range where it is stored plainly), or
    each file's part read into its place in a new tensor. Replicated tensors are checked to be equal."""
    import torch

    from ..errors import MetaLlamaFormatError
    from ..mapped import torch_dtype

    entries = [catalog[name] for catalog in release.ranks]
    dim = release.split_dims[name]
    if dim is None:
        if len(entries) > 1:  # the norms: the same in every file, or the files are not one model
            first = files[0].read(entries[0])
            for f, e in zip(files[1:], entries[1:], strict=True):
                if not torch.equal(f.read(e), first):
                    raise MetaLlamaFormatError(f"differs from the same tensor in "
                                               f"{os.path.basename(entries[0].file)}, which every file holds "
                                               "whole", path=e.file, tensor=name)
            return first
        return files[0].serve(entries[0])
    joined = torch.empty(release.shape(name), dtype=torch_dtype(entries[0].dtype, path=entries[0].file,
                                                                 tensor=name))
    step = entries[0].shape[dim]
    for rank, (f, e) in enumerate(zip(files, entries, strict=True)):
        place = joined.narrow(dim, rank * step, step)
        part = f.serve(e)  # its bytes in the file where stored plainly; else read whole (q and k: reordered)
        if isinstance(part, torch.Tensor):
            place.copy_(part)
        elif dim == 0:  # a run of whole rows: read straight into its place
            part.read_into(0, place)
        else:  # columns of every row: a bounded block of rows at a time
            _read_columns(part, place)
    return joined


def _read_columns(part: Any, place: torch.Tensor) -> None:
    """A file's part ``(rows, cols)`` (a :class:`~sparsemap.writer.FileRange`) into ``place``, the columns it
    fills in the joined tensor, through a buffer of at most :data:`CHUNK_NBYTES`."""
    import torch

    rows = part.shape[0]
    row_nbytes = part.nbytes // max(rows, 1)
    block_rows = max(1, CHUNK_NBYTES // max(row_nbytes, 1))
    buffer = torch.empty((min(block_rows, rows), *part.shape[1:]), dtype=part.dtype)
    for first in range(0, rows, block_rows):
        n = min(block_rows, rows - first)
        part.read_into(first * row_nbytes, buffer[:n])
        place[first:first + n].copy_(buffer[:n])


def _as_tensor(value: Any) -> torch.Tensor:
    """A :class:`~sparsemap.writer.FileRange` read whole (to quantize it), or the tensor itself."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    out = torch.empty(value.shape, dtype=value.dtype)
    value.read_into(0, out)
    return out


# ---------------------------------------------------------------- the tokenizer

def write_tokenizer(release: Release, folder: Path) -> bool:
    """Convert the release's ``tokenizer.model`` with transformers' ``LlamaTokenizer`` into ``folder``.

    Llama 1 and 2's SentencePiece model converts where the ``sentencepiece`` package is installed (the
    conversion reads it through it). Llama 3's tokenizer.model is tiktoken's ranks, which this does not
    convert. Either way a tokenizer that is not written is said (a warning) and the weights are unaffected.

    Returns:
        Whether a tokenizer was written.
    """
    path = release.tokenizer
    if path is None:
        logger.warning("%s: no tokenizer.model; the folder has no tokenizer", release.folder)
        return False
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"\x0a"):  # a SentencePiece ModelProto starts with field 1 (pieces)
        logger.warning("%s: not a SentencePiece model (Llama 3's tiktoken ranks?); not converted, the folder "
                       "has no tokenizer (take tokenizer.json from the model's Hugging Face repo)", path)
        return False
    try:
        import sentencepiece  # noqa: F401  (transformers' conversion of a .model needs it)
    except ImportError:
        logger.warning("%s: not converted: converting a SentencePiece tokenizer.model needs the "
                       "sentencepiece package (pip install sentencepiece); the folder has no tokenizer", path)
        return False
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained reads tokenizer.model from a folder
        os.symlink(os.path.abspath(path), os.path.join(tmp, "tokenizer.model"))
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)  # as Meta's generate() encodes
    tokenizer.save_pretrained(folder)
    return True
