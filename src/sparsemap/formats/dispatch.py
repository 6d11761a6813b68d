"""``sparsemap.open``: hand a resolved source to its format's reader, and stamp what was read. No torch.

Which file and which format come from :func:`~sparsemap.formats.source.resolve_source`;
this module only dispatches. The readers are imported on first use, so
``import sparsemap`` does not pay for zip, pickle or GGUF support it may never use.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import FileChangedError
from .catalog import Catalog, FileStamp
from .source import ModelSource, check_regular_file, resolve_source, sniff_format


def open_catalog(path: str | os.PathLike[str] | ModelSource) -> Catalog:
    """Index the checkpoint at ``path`` (a file, an index, or a folder) without reading tensor data.

    Args:
        path: a ``.safetensors`` file, a torch zip checkpoint (``.pt``, ``.pth``,
            ``.bin``), a ``.gguf`` file, an rwkv.cpp or llama2.c model (``.bin``),
            a ``*.index.json`` shard index, an MLC ``ndarray-cache.json``, Meta's
            Llama release (``params.json`` + ``consolidated.00.pth``, seen under
            transformers' names), a folder holding one of these under its usual
            file name, or a
            :class:`~sparsemap.formats.source.ModelSource` already resolved.

    Returns:
        A frozen :class:`~sparsemap.formats.catalog.Catalog`, with each file's stamp.

    Raises:
        SourceNotFoundError: nothing there, or a folder with no checkpoint.
        ShardedReleaseError: a Meta release in several model-parallel files (join it with
            ``sparsemap convert``).
        UnknownFormatError: a file in no format we read.
        FormatError: a file in a known format that breaks its rules (a subclass names the rule).
        FileChangedError: a file changed while its header was read.

    Example:
        >>> cat = sparsemap.open("SmolLM2/")            # doctest: +SKIP
        >>> len(cat), cat.format
        (272, 'safetensors')
    """
    source = path if isinstance(path, ModelSource) else resolve_source(path)
    if source.format == "sharded":
        from .sharded import open_sharded

        return open_sharded(source.weights, open_file=_open_shard)
    if source.format == "mlc":
        from .mlc import open_mlc

        return open_mlc(source.weights)
    if source.format == "meta-llama":  # one file, under transformers' names; several are refused
        from .meta_llama import open_release

        return open_release(source)
    return _open_file(source.weights, source.format)


def _open_shard(path: str) -> Catalog:
    check_regular_file(path)  # a shard named by an index may be a FIFO or a device: never open one
    return _open_file(path, sniff_format(path))


def _reader(fmt: str) -> Callable[[str, FileStamp], Catalog]:
    if fmt == "safetensors":
        from .safetensors import open_safetensors

        return open_safetensors
    if fmt == "torch-zip":
        from .torchzip import open_torch_zip

        return open_torch_zip
    if fmt == "rwkv-cpp":
        from .rwkvcpp import open_rwkvcpp

        return open_rwkvcpp
    if fmt == "llama2c":
        from .llama2c import open_llama2c

        return open_llama2c
    assert fmt == "gguf", fmt  # resolve_source names no other single-file format
    from .gguf import open_gguf

    return open_gguf


def _open_file(path: str, fmt: str) -> Catalog:
    """Parse one file, recording which version of it was parsed (refusing one that changed meanwhile)."""
    before = FileStamp.of(path)
    catalog = _reader(fmt)(path, before)
    after = FileStamp.of(path)
    if after != before:
        raise FileChangedError(f"changed while its header was read: {before.differences(after)}", path=path)
    return catalog
