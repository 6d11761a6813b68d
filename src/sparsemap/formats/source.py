"""What a path holds: the one place that decides it, for every entry point. No torch here.

``sparsemap.open``, ``from_pretrained``, ``run`` and ``convert`` all start from
:func:`resolve_source`, which turns a path (a checkpoint file, a shard index,
or a folder) into a frozen :class:`ModelSource`: which file holds the weights
and in what format, and where the config, tokenizer and generation config
are. Checkpoint files are told apart by content (magic bytes), not by file
name: a ``.bin`` may be a torch zip or a legacy pickle, and users rename files.
A shard index is JSON and is known by its name (``*.index.json``, or any
``.json`` given as the path); its shards are then sniffed one by one.

A path that names nothing on disk but reads as a Hugging Face repo id
(``"HuggingFaceTB/SmolLM2-135M"``) is the snapshot folder of that repo in the
local Hugging Face cache (:func:`locate`). No network is ever contacted: a
repo that is not in the cache is an error that says how to fetch it. A path
that exists always wins over a repo id of the same spelling.

Folder rules, in order:

1. sparsemap's laid-out weights (``model.sparsemap.safetensors``), then Hugging Face
   weight names: ``model.safetensors``, ``model.safetensors.index.json``,
   ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (the first present wins).
2. Otherwise exactly one ``*.gguf`` file (several: an error naming them).
3. Otherwise an MLC-LLM / TVM parameter cache: ``ndarray-cache.json`` (``tensor-cache.json`` in
   newer TVM), which lists the arrays of its ``params_shard_*.bin`` files.
4. Otherwise Meta's original Llama release: ``params.json`` beside ``consolidated.NN.pth`` files
   (``params.json`` is then the weights' entry, as an index is, and the config:
   :mod:`sparsemap.formats.meta_llama`).
5. Otherwise an error listing what was looked for.

A llama2.c model (``model.bin``) is never picked from a folder: its legacy
layout has no magic number, so it is read only when named.

The config is ``config.json`` beside the weights, except for GGUF, whose
header is the config (as transformers reads it with ``gguf_file=``): a
``config.json`` beside a GGUF is not used, so the names, shapes and row order
always come from the same file; llama2.c's header is its config too. The
tokenizer is the GGUF itself for GGUF weights (its vocabulary is in the
header), ``tokenizer.bin`` beside a llama2.c model (as ``run.c`` finds it),
otherwise ``tokenizer.json``.
"""

from __future__ import annotations

import os
import re
import stat
from typing import BinaryIO, NamedTuple

from ..errors import LegacyPickleError, NotRegularFileError, SourceNotFoundError, UnknownFormatError
from .reserved import WEIGHTS_NAME

GGUF_MAGIC = b"GGUF"
RWKV_CPP_MAGIC = b"fmgg"  # rwkv.cpp's 0x67676d66, little-endian
LLAMA2C_MAGIC = b"24ka"  # llama2.c's versioned files: 0x616b3432 ("ak42"), little-endian
ZIP_MAGIC = b"PK\x03\x04"
# Any pickle of protocol 2 to 5 starts with PROTO n; torch.save's legacy format
# is one (protocol 2, then a pickled magic number).
PICKLE_PROTOS = tuple(bytes([0x80, n]) for n in range(2, 6))

# Looked for, in this order, in a folder: first sparsemap's laid-out file (tensors stored in other
# shapes than the model's, named so that no other loader takes it for the model), then Hugging Face's.
WEIGHT_NAMES = (
    WEIGHTS_NAME,
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
FORMATS = ("safetensors", "torch-zip", "gguf", "rwkv-cpp", "llama2c", "sharded", "mlc", "meta-llama")
# MLC-LLM / TVM parameter caches: the JSON that lists every array of the params_shard_*.bin files (TVM
# renamed ndarray to tensor; the -b16 variants list float32 arrays stored as bfloat16 as bfloat16).
MLC_NAMES = ("ndarray-cache.json", "tensor-cache.json", "ndarray-cache-b16.json", "tensor-cache-b16.json")
# Meta's original Llama release: its architecture, and one torch.save'd file per model-parallel rank.
META_PARAMS = "params.json"
META_SHARD = re.compile(r"consolidated\.(\d{2,3})\.pth")
LEGACY_HINT = (
    "convert it once, in an environment you trust, with "
    "python -c \"import torch; torch.save(torch.load('OLD', map_location='cpu', weights_only=True), "
    "'NEW.pt')\" "
    "(or save it as safetensors)")


# Hugging Face repo ids: "name" or "namespace/name", of letters, digits, "-", "_", "." (huggingface_hub's
# validate_repo_id, without importing it to decide). Anything else ("./x", "/abs", "a/b/c") is only a path.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?", re.ASCII)
# A missing "model.safetensors" is a missing file, not the repo of that name.
CHECKPOINT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".json")


class ModelSource(NamedTuple):
    """Where a model's parts are, decided once from a path. Immutable.

    Attributes:
        path: the path given, made absolute.
        folder: the folder holding the weights (where config and tokenizer are looked for).
        weights: the file holding the tensors, or the shard index (``*.index.json``).
        format: ``"safetensors"``, ``"torch-zip"``, ``"gguf"``, ``"rwkv-cpp"``, ``"llama2c"`` (by
            content), ``"sharded"`` or ``"mlc"`` (by the JSON's name).
        config: ``config.json`` beside the weights; ``None`` for GGUF and llama2.c (their header
            is the config) or when there is none.
        tokenizer: ``tokenizer.json``, the GGUF file itself for GGUF weights, llama2.c's
            ``tokenizer.bin`` beside a llama2.c model; ``None`` if none is there.
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
            under the names above; or a Hugging Face repo id in the local cache
            (its ``main`` snapshot, see :func:`locate`).

    Raises:
        SourceNotFoundError: nothing there (and no such repo in the local Hugging Face cache), or a
            folder with no weights (or several GGUF files).
        UnknownFormatError: a file in no format sparsemap reads.
        LegacyPickleError: a pre-1.6 torch pickle (cannot be read without running it).

    Example:
        >>> resolve_source("model.gguf").is_gguf                 # doctest: +SKIP
        True
    """
    path = locate(path)
    if os.path.isdir(path):
        folder, weights = path, _weights_in_folder(path)
    elif os.path.exists(path):
        folder, weights = os.path.dirname(path), path
    else:
        raise SourceNotFoundError("no such file or folder", path=path)
    check_regular_file(weights)  # a FIFO named model.gguf in a folder would block the first read
    if os.path.basename(weights) in MLC_NAMES:
        fmt = "mlc"
    elif os.path.basename(weights) == META_PARAMS and is_meta_release(folder):
        fmt = "meta-llama"
    else:
        fmt = "sharded" if weights.endswith(".json") else sniff_format(weights)

    def beside(name: str) -> str | None:
        candidate = os.path.join(folder, name)
        return candidate if os.path.isfile(candidate) else None

    gguf = fmt == "gguf"
    # llama2.c's run.c reads tokenizer.bin from beside the model; its header is the config.
    tokenizer = weights if gguf else beside("tokenizer.bin" if fmt == "llama2c" else "tokenizer.json")
    return ModelSource(path=path, folder=folder, weights=weights, format=fmt,
                       config=None if gguf or fmt in ("llama2c", "meta-llama") else beside("config.json"),
                       tokenizer=tokenizer,
                       generation_config=beside("generation_config.json"))


def locate(path: str | os.PathLike[str], *, revision: str | None = None,
           cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``path`` made absolute when something is there; otherwise, when it reads as a Hugging Face repo
    id, the folder of that repo's snapshot in the local Hugging Face cache. Never contacts the network.

    Args:
        path: a file or folder, or a repo id (``"HuggingFaceTB/SmolLM2-135M"``).
        revision: the branch, tag or commit of a repo id (``"main"`` when omitted); unused for a path.
        cache_dir: the Hugging Face hub cache to look in; huggingface_hub's ``HF_HUB_CACHE`` (read by
            it when it is imported) when omitted. Unused for a path.

    Returns:
        An absolute path. A missing path that is no repo id comes back as it is, for
        :func:`resolve_source` to refuse.

    Raises:
        SourceNotFoundError: a repo id (and nothing at that path) whose snapshot is not in the cache,
            or is there only in part; the message names the cache and how to fetch the repo.

    Example:
        >>> locate("HuggingFaceTB/SmolLM2-135M")             # doctest: +SKIP
        '/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/93efa2f0...'
    """
    text = os.fspath(path)
    absolute = os.path.abspath(text)
    if os.path.exists(absolute) or not reads_as_repo_id(text):
        return absolute
    return _cached_snapshot(text, absolute, revision, cache_dir)


def reads_as_repo_id(text: str) -> bool:
    """Whether a path that names nothing is a Hugging Face repo id (``"org/name"`` or ``"name"``) rather
    than a missing file; ``models/llama`` where ``models/`` is a local folder is a missing path."""
    if "/" in text and os.path.isdir(text.split("/", 1)[0]):
        return False
    return (REPO_ID.fullmatch(text) is not None and "--" not in text and ".." not in text
            and not text.endswith(CHECKPOINT_SUFFIXES))


def _cached_snapshot(repo_id: str, absolute: str, revision: str | None,
                     cache_dir: str | os.PathLike[str] | None) -> str:
    """The snapshot folder of ``repo_id`` at ``revision`` in the local cache, through huggingface_hub
    with ``local_files_only=True`` (it reads ``refs/<revision>`` and ``snapshots/<commit>``: no request)."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise SourceNotFoundError("no such file or folder (huggingface_hub, which finds repo ids in the "
                                  "local Hugging Face cache, is not installed)", path=absolute) from None
    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    rev = revision or "main"
    try:
        return snapshot_download(repo_id, revision=rev, cache_dir=cache, local_files_only=True)
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, a bad revision
        if type(e).__name__ == "IncompleteSnapshotError":
            first_line = str(e).splitlines()[0][:300]
            what = f"the local Hugging Face cache holds only part of {repo_id!r}: {first_line}"
        else:
            what = f"the Hugging Face repo {repo_id!r} (revision {rev!r}) is not in the local cache {cache}"
        fetch = f"download {repo_id}" + ("" if revision is None else f" --revision {revision}")
        # `hf` is huggingface_hub's CLI since 1.0, which removed `huggingface-cli`; both are named.
        raise SourceNotFoundError(
            f"no such file or folder, and {what}. sparsemap never downloads: fetch it on a machine with "
            f"internet with `hf {fetch}` (`huggingface-cli {fetch}` before huggingface_hub 1.0), then copy "
            "the cache here or point HF_HUB_CACHE or cache_dir= at it; or pass the model's folder",
            path=absolute) from None


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
        raise NotRegularFileError(f"is {_kind(st.st_mode)}, not a checkpoint file (nothing was read from it)",
                                  path=path)
    for root in KERNEL_FILE_SYSTEMS:
        try:
            if os.stat(root).st_dev == st.st_dev:
                raise NotRegularFileError(f"is a kernel file under {root}, not a checkpoint file (nothing "
                                          "was read from it)", path=path)
        except FileNotFoundError:
            continue
    return st


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def open_regular_fd(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of ``path``, refused unless what was opened is a regular file.

    The check is on the descriptor (``fstat``), not the path: a FIFO or a device swapped in after
    :func:`resolve_source` looked at the path is refused, never read. ``O_NONBLOCK`` keeps the open of a
    FIFO from waiting for a writer; the descriptor is made blocking again once it is known to be a file.

    Raises:
        NotRegularFileError: naming the path and what it turned out to be.
        SourceNotFoundError: nothing there (any more).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SourceNotFoundError("no such file", path=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"is {_kind(mode)}, not a checkpoint file (nothing was read from it)",
                                      path=path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """:func:`open_regular_fd` as a binary file object (``with open_regular(path) as f:``)."""
    return os.fdopen(open_regular_fd(path), "rb")


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
    for name in MLC_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    if is_meta_release(folder):
        return os.path.join(folder, META_PARAMS)
    raise SourceNotFoundError(f"folder holds no checkpoint (looked for {', '.join(WEIGHT_NAMES)}, "
                              f"*.gguf, {', '.join(MLC_NAMES[:2])}, {META_PARAMS} with consolidated.NN.pth)",
                              path=folder)


def is_meta_release(folder: str) -> bool:
    """Whether ``folder`` holds Meta's original Llama release: ``params.json`` and ``consolidated.NN.pth``
    files (Mistral's ``params.json`` beside ``consolidated.safetensors`` is another format)."""
    if not os.path.isfile(os.path.join(folder, META_PARAMS)):
        return False
    try:
        return any(META_SHARD.fullmatch(name) for name in os.listdir(folder))
    except OSError:
        return False


def sniff_format(path: str) -> str:
    """``"safetensors"``, ``"torch-zip"``, ``"gguf"``, ``"rwkv-cpp"`` or ``"llama2c"`` from the file's
    first bytes.

    llama2.c's legacy files have no magic number: a ``*.bin`` is one only when its first 28 bytes read
    as a consistent llama2.c header whose sizes add up to the file's exactly (see
    :func:`sparsemap.formats.llama2c_header.read_legacy`).

    Raises:
        LegacyPickleError: a pickle that is not a zip checkpoint.
        TruncatedFileError, TrailingBytesError, Llama2cFormatError: a ``*.bin`` whose first bytes are a
            llama2.c legacy header but whose size is not that header's.
        UnknownFormatError: anything else.
    """
    with open_regular(path) as f:
        prefix = f.read(32)
        size = os.fstat(f.fileno()).st_size
    if prefix.startswith(GGUF_MAGIC):
        return "gguf"
    if prefix.startswith(RWKV_CPP_MAGIC):
        return "rwkv-cpp"
    if prefix.startswith(LLAMA2C_MAGIC):
        return "llama2c"
    if prefix.startswith(ZIP_MAGIC):
        return "torch-zip"
    # Before the pickle check: a safetensors header length can begin with the
    # bytes of a pickle PROTO opcode (640 = 80 02 00 ...), but no pickle has a
    # '{' at byte 8 (a legacy torch file has its magic number there).
    if _looks_like_safetensors(prefix):
        return "safetensors"
    # So can a llama2.c dim (640 = 80 02 00 00, which no pickle continues with: 00 is no opcode). A
    # consistent legacy header describing a model of a possible size is taken for one.
    if path.endswith(".bin"):
        from .llama2c_header import read_legacy

        legacy = read_legacy(prefix, size, path)
        if legacy is not None:
            if legacy.fault is not None:
                raise legacy.fault
            return "llama2c"
    if prefix.startswith(PICKLE_PROTOS):
        raise LegacyPickleError(f"a pickle, not a zip checkpoint (a legacy pre-1.6 torch file?); "
                                f"{LEGACY_HINT}", path=path)
    if path.endswith(".safetensors"):
        return "safetensors"  # its own parser names what is wrong with it
    raise UnknownFormatError(
        f"not a checkpoint sparsemap reads (first bytes {prefix[:8].hex(' ')}); expected safetensors, "
        "a torch zip (.pt/.pth/.bin), GGUF, an rwkv.cpp or llama2.c model (.bin), a *.index.json, or an "
        "MLC ndarray-cache.json", path=path)


def _looks_like_safetensors(prefix: bytes) -> bool:
    # 8-byte length then a JSON object: '{' (after optional spaces, which the
    # format allows as header padding only at the end, so '{' comes first).
    return len(prefix) >= 9 and prefix[8:9] == b"{"
