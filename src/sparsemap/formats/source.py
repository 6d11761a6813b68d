"""What a path holds: the one place that decides it, for every entry point. No torch here.

``sparsemap.open``, ``from_pretrained``, ``run`` and ``convert`` all start from
:func:`resolve_source`, which turns a path (a checkpoint file, a shard index,
or a folder) into a frozen :class:`ModelSource`: which file holds the weights
and in what format, and where the config, tokenizer and generation config
are. Checkpoint files are told apart by content (magic bytes), not by file
name: a ``.bin`` may be a torch zip or a legacy pickle, and users rename files.
A shard index is JSON and is known by its name (``*.index.json``, or any
``.json`` given as the path); its shards are then sniffed one by one.

Folder rules, in order:

1. Hugging Face weight names: ``model.safetensors``, ``model.safetensors.index.json``,
   ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (the first present wins).
2. Otherwise exactly one ``*.gguf`` file (several: an error naming them).
3. Otherwise an error listing what was looked for.

The config is ``config.json`` beside the weights, except for GGUF, whose
header is the config (as transformers reads it with ``gguf_file=``): a
``config.json`` beside a GGUF is not used, so the names, shapes and row order
always come from the same file. The tokenizer is the GGUF itself for GGUF
weights (its vocabulary is in the header), otherwise ``tokenizer.json``.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from ..errors import LegacyPickleError, NotRegularFileError, SourceNotFoundError, UnknownFormatError

GGUF_MAGIC = b"GGUF"
RWKV_CPP_MAGIC = b"fmgg"  # rwkv.cpp's 0x67676d66, little-endian
ZIP_MAGIC = b"PK\x03\x04"
# Any pickle of protocol 2 to 5 starts with PROTO n; torch.save's legacy format
# is one (protocol 2, then a pickled magic number).
PICKLE_PROTOS = tuple(bytes([0x80, n]) for n in range(2, 6))

# Looked for, in this order, in a folder.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
FORMATS = ("safetensors", "torch-zip", "gguf", "rwkv-cpp", "sharded")
LEGACY_HINT = (
    "convert it once, in an environment you trust, with "
    "python -c \"import torch; torch.save(torch.load('OLD', map_location='cpu', weights_only=True), "
    "'NEW.pt')\" "
    "(or save it as safetensors)")


class ModelSource(NamedTuple):
    """Where a model's parts are, decided once from a path. Immutable.

    Attributes:
        path: the path given, made absolute.
        folder: the folder holding the weights (where config and tokenizer are looked for).
        weights: the file holding the tensors, or the shard index (``*.index.json``).
        format: ``"safetensors"``, ``"torch-zip"``, ``"gguf"`` or ``"sharded"`` (by content).
        config: ``config.json`` beside the weights; ``None`` for GGUF (its header
            is the config) or when there is none.
        tokenizer: ``tokenizer.json``, or the GGUF file itself for GGUF weights; ``None`` if neither.
        generation_config: ``generation_config.json`` beside the weights, or ``None``.

    Example:
        >>> src = resolve_source("SmolLM2-135M-Instruct/")     # doctest: +SKIP
        >>> src.format, os.path.basename(src.weights), src.config is not None
        ('safetensors', 'model.safetensors', True)
    """

    path: str
    folder: str
    weights: str
    format: str
    config: str | None
    tokenizer: str | None
    generation_config: str | None

    @property
    def is_gguf(self) -> bool:
        """GGUF weights carry llama.cpp's names and row order, and their config in the header."""
        return self.format == "gguf"


def resolve_source(path: str | os.PathLike[str]) -> ModelSource:
    """Decide what ``path`` holds: the weights file and its format, config, tokenizer, generation config.

    Args:
        path: a checkpoint file (``.safetensors``, a torch zip, ``.gguf``), a
            shard index (``*.index.json``), or a folder holding one of these
            under the names above.

    Raises:
        SourceNotFoundError: nothing there, or a folder with no weights (or several GGUF files).
        UnknownFormatError: a file in no format sparsemap reads.
        LegacyPickleError: a pre-1.6 torch pickle (cannot be read without running it).

    Example:
        >>> resolve_source("model.gguf").is_gguf                 # doctest: +SKIP
        True
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        folder, weights = path, _weights_in_folder(path)
    elif os.path.exists(path):
        folder, weights = os.path.dirname(path), path
    else:
        raise SourceNotFoundError("no such file or folder", path=path)
    check_regular_file(weights)  # a FIFO named model.gguf in a folder would block the first read
    fmt = "sharded" if weights.endswith(".json") else sniff_format(weights)

    def beside(name: str) -> str | None:
        candidate = os.path.join(folder, name)
        return candidate if os.path.isfile(candidate) else None

    gguf = fmt == "gguf"
    return ModelSource(path=path, folder=folder, weights=weights, format=fmt,
                       config=None if gguf else beside("config.json"),
                       tokenizer=weights if gguf else beside("tokenizer.json"),
                       generation_config=beside("generation_config.json"))


# Kernel file systems: their files claim a size of 0 (or of the whole address space) and produce
# content when read; /proc/self/mem or /proc/kcore is no checkpoint to map.
KERNEL_FILE_SYSTEMS = ("/proc", "/sys")


def check_regular_file(path: str) -> os.stat_result:
    """Refuse, before any ``open``, a path that is not a regular file on a disk: a FIFO (opening it
    blocks until a writer comes), a socket, a device (``/dev/zero`` reads forever), a file of /proc or
    /sys. Symbolic links are followed (``/dev/stdin`` is refused for what it points to).

    Raises:
        NotRegularFileError: naming the path and what it is.
        SourceNotFoundError: nothing there.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceNotFoundError("no such file", path=path) from None
    except OSError as e:
        raise SourceNotFoundError(f"cannot stat it: {e.strerror}", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
        kind = next((what for test, what in kinds if test(st.st_mode)), "not a regular file")
        raise NotRegularFileError(f"is {kind}, not a checkpoint file (nothing was read from it)", path=path)
    for root in KERNEL_FILE_SYSTEMS:
        try:
            if os.stat(root).st_dev == st.st_dev:
                raise NotRegularFileError(f"is a kernel file under {root}, not a checkpoint file (nothing "
                                          "was read from it)", path=path)
        except FileNotFoundError:
            continue
    return st


def _weights_in_folder(folder: str) -> str:
    for name in WEIGHT_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    ggufs = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(folder, ggufs[0])
    if len(ggufs) > 1:
        raise SourceNotFoundError(f"folder holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); "
                                  "name the one to load", path=folder)
    raise SourceNotFoundError(f"folder holds no checkpoint (looked for {', '.join(WEIGHT_NAMES)}, "
                              "*.gguf)", path=folder)


def sniff_format(path: str) -> str:
    """``"safetensors"``, ``"torch-zip"``, ``"gguf"`` or ``"rwkv-cpp"`` from the file's first bytes.

    Raises:
        LegacyPickleError: a pickle that is not a zip checkpoint.
        UnknownFormatError: anything else.
    """
    with open(path, "rb") as f:
        prefix = f.read(16)
    if prefix.startswith(GGUF_MAGIC):
        return "gguf"
    if prefix.startswith(RWKV_CPP_MAGIC):
        return "rwkv-cpp"
    if prefix.startswith(ZIP_MAGIC):
        return "torch-zip"
    # Before the pickle check: a safetensors header length can begin with the
    # bytes of a pickle PROTO opcode (640 = 80 02 00 ...), but no pickle has a
    # '{' at byte 8 (a legacy torch file has its magic number there).
    if _looks_like_safetensors(prefix):
        return "safetensors"
    if prefix.startswith(PICKLE_PROTOS):
        raise LegacyPickleError(f"a pickle, not a zip checkpoint (a legacy pre-1.6 torch file?); "
                                f"{LEGACY_HINT}", path=path)
    if path.endswith(".safetensors"):
        return "safetensors"  # its own parser names what is wrong with it
    raise UnknownFormatError(
        f"not a checkpoint sparsemap reads (first bytes {prefix[:8].hex(' ')}); expected safetensors, "
        "a torch zip (.pt/.pth/.bin), GGUF, an rwkv.cpp model, or a *.index.json", path=path)


def _looks_like_safetensors(prefix: bytes) -> bool:
    # 8-byte length then a JSON object: '{' (after optional spaces, which the
    # format allows as header padding only at the end, so '{' comes first).
    return len(prefix) >= 9 and prefix[8:9] == b"{"
