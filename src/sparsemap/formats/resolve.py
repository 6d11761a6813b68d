"""``sparsemap.open``: find what a path holds and hand it to the right reader.

Dispatch is by content (magic bytes), not by file name: a ``.bin`` may be a
torch zip or a legacy pickle, and users rename files. A folder is searched for
the file names Hugging Face uses. No torch here.
"""

from __future__ import annotations

import os

from ..errors import FileChangedError, LegacyPickleError, SourceNotFoundError, UnknownFormatError
from .catalog import Catalog, FileStamp
from .gguf import GGUF_MAGIC, open_gguf
from .safetensors import open_safetensors
from .sharded import open_sharded
from .torchzip import LEGACY_HINT, open_torch_zip, sniff

# Looked for, in this order, in a folder.
FOLDER_CANDIDATES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def open_catalog(path: str | os.PathLike[str]) -> Catalog:
    """Index the checkpoint at ``path`` (a file, an index, or a folder) without reading tensor data.

    Args:
        path: a ``.safetensors`` file, a torch zip checkpoint (``.pt``, ``.pth``,
            ``.bin``), a ``.gguf`` file, a ``*.index.json`` shard index, or a
            folder holding one of these under a Hugging Face file name.

    Returns:
        A :class:`~sparsemap.formats.catalog.Catalog`.

    Raises:
        SourceNotFoundError: nothing there, or a folder with no checkpoint.
        UnknownFormatError: a file in no format we read.
        FormatError: a file in a known format that breaks its rules (a subclass names the rule).

    Example:
        >>> cat = sparsemap.open("SmolLM2/")            # doctest: +SKIP
        >>> len(cat), cat.format
        (272, 'safetensors')
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return open_catalog(_pick_in_folder(path))
    if not os.path.exists(path):
        raise SourceNotFoundError("no such file or folder", path=path)
    if path.endswith(".json"):
        return open_sharded(path, open_file=_open_file)
    return _open_file(path)


def _pick_in_folder(folder: str) -> str:
    for name in FOLDER_CANDIDATES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    ggufs = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(folder, ggufs[0])
    if len(ggufs) > 1:
        raise SourceNotFoundError(f"folder holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); "
                                  "name the one to load", path=folder)
    raise SourceNotFoundError(f"folder holds no checkpoint (looked for {', '.join(FOLDER_CANDIDATES)}, "
                              "*.gguf)", path=folder)


def _open_file(path: str) -> Catalog:
    """Parse one file, and record which version of it was parsed (refusing one that changed meanwhile)."""
    before = FileStamp.of(path)
    catalog = _parse_file(path)
    after = FileStamp.of(path)
    if after != before:
        raise FileChangedError(f"changed while its header was read: {before.differences(after)}", path=path)
    catalog.stamps = {path: before}
    return catalog


def _parse_file(path: str) -> Catalog:
    with open(path, "rb") as f:
        prefix = f.read(16)
    if prefix.startswith(GGUF_MAGIC):
        return open_gguf(path)
    kind = sniff(prefix)
    if kind == "zip":
        return open_torch_zip(path)
    # Before the pickle check: a safetensors header length can begin with the
    # bytes of a pickle PROTO opcode (640 = 80 02 00 ...), but no pickle has a
    # '{' at byte 8 (a legacy torch file has its magic number there).
    if _looks_like_safetensors(prefix):
        return open_safetensors(path)
    if kind == "legacy":
        raise LegacyPickleError(f"a pickle, not a zip checkpoint (a legacy pre-1.6 torch file?); "
                                f"{LEGACY_HINT}", path=path)
    if path.endswith(".safetensors"):
        return open_safetensors(path)
    raise UnknownFormatError(
        f"not a checkpoint sparsemap reads (first bytes {prefix[:8].hex(' ')}); expected safetensors, "
        "a torch zip (.pt/.pth/.bin), GGUF, or a *.index.json", path=path)


def _looks_like_safetensors(prefix: bytes) -> bool:
    # 8-byte length then a JSON object: '{' (after optional spaces, which the
    # format allows as header padding only at the end, so '{' comes first).
    return len(prefix) >= 9 and prefix[8:9] == b"{"
