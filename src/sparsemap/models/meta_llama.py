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

- :func:`prepare`: what ``sparsemap run`` / ``chat`` / ``serve FOLDER`` run a release from: that folder,
  written once into sparsemap's cache (``$SPARSEMAP_CACHE/meta-llama/``) and run mapped from there, every
  weight a view of its file (q and k too, their rows reordered once on disk). Later runs take it as it is
  while the release's files keep their stamps (size, modification and change times, inode); a changed
  file makes it again. A tokenizer that cannot be converted refuses the run before anything is written.

A release in several files is not loaded as one model (each file holds a slice of every matrix, so no
tensor of the model is a view of one file); :func:`~sparsemap.formats.meta_llama.read_release` gives each
file's tensors for a tensor-parallel load, rank ``i`` mapping file ``i``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError, DestinationError, MissingExtraError, SourceNotFoundError
from ..formats.meta_llama import Release, read_release, shard_files
from ..formats.source import META_PARAMS, ModelSource, resolve_source
from .hf_folder import (
    COMPLETE_MARK,
    cached_folder,
    check_folder_destination,
    name_weights,
    save_configs,
    staged_folder,
)

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
# A tokenizer in transformers' own files beside params.json is taken as it is (how a Llama 3 release,
# whose tokenizer.model is tiktoken's, gets one: its Hugging Face repo's files); else tokenizer.model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
SENTENCEPIECE_MODEL = "tokenizer.model"
# In each cached folder's mark: a folder an older sparsemap wrote differently is written again.
FOLDER_VERSION = "meta-llama folder 1"
CACHE_SUBDIR = "meta-llama"


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
    """Convert the release's ``tokenizer.model`` with transformers' ``LlamaTokenizer`` into ``folder``, or
    copy transformers' tokenizer files (:data:`TOKENIZER_FILES`) where a ``tokenizer.json`` lies beside
    ``params.json``.

    Llama 1 and 2's SentencePiece model converts where the ``sentencepiece`` package is installed (the
    conversion reads it through it). Llama 3's tokenizer.model is tiktoken's ranks, which this does not
    convert. Either way a tokenizer that is not written is said (a warning, :func:`check_tokenizer`'s
    reason) and the weights are unaffected.

    Returns:
        Whether a tokenizer was written.
    """
    given = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(release.folder, name))]
    if "tokenizer.json" in given:
        for name in given:
            shutil.copyfile(os.path.join(release.folder, name), folder / name)
        return True
    try:
        check_tokenizer(release)
    except (BadInputError, MissingExtraError) as e:
        logger.warning("%s; the folder has no tokenizer", e)
        return False
    path = release.tokenizer
    assert path is not None  # check_tokenizer refuses a release without one
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained reads tokenizer.model from a folder
        os.symlink(os.path.abspath(path), os.path.join(tmp, "tokenizer.model"))
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)  # as Meta's generate() encodes
    tokenizer.save_pretrained(folder)
    return True


def check_tokenizer(release: Release) -> None:
    """Refuse, in one line that says what to do, a release whose tokenizer :func:`write_tokenizer` cannot
    write. No torch.

    Raises:
        SourceNotFoundError: no tokenizer.model and no tokenizer.json beside params.json.
        BadInputError: a tokenizer.model that is not SentencePiece (Llama 3's tiktoken ranks).
        MissingExtraError: sentencepiece, protobuf or transformers, which the conversion needs, is not
            installed.
    """
    if os.path.isfile(os.path.join(release.folder, "tokenizer.json")):
        return  # copied as it is
    path = release.tokenizer
    if path is None:
        raise SourceNotFoundError(f"no {SENTENCEPIECE_MODEL} (nor tokenizer.json) beside {META_PARAMS}: the "
                                  "release has no tokenizer", path=release.folder)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"\x0a"):  # a SentencePiece ModelProto starts with field 1 (pieces)
        raise BadInputError("not a SentencePiece model (Llama 3's tiktoken ranks?), which sparsemap does not "
                            "convert: put tokenizer.json and tokenizer_config.json from the model's Hugging "
                            f"Face repo beside {META_PARAMS}", path=path)
    import importlib.util

    from ..extras import check

    check("transformers", needed_for=f"converting the SentencePiece {path}")
    missing = []
    for module, distribution in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent missing, or a module set to None in sys.modules
            found = False
        if not found:
            missing.append(distribution)
    if missing:  # transformers' conversion reads the model's protobuf through both
        raise MissingExtraError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                                f"installed, and converting the SentencePiece {path} needs "
                                f"{'it' if len(missing) == 1 else 'them'}: pip install {' '.join(missing)}")


# ---------------------------------------------------------------- sparsemap run: joined once, cached

def cache_folder(source: str | os.PathLike[str] | ModelSource) -> Path:
    """Where :func:`prepare` keeps the release at ``source``: one folder per release folder
    (``$SPARSEMAP_CACHE/meta-llama/<name>-<hash of its path>``), made again when the release changes."""
    from .assets import cache_dir

    folder = _folder_of(source)
    key = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:12]  # one per release, however named
    return cache_dir() / CACHE_SUBDIR / f"{os.path.basename(folder)}-{key}"


def prepare(source: str | os.PathLike[str] | ModelSource, *,
            progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]] | None = None,
            on_note: Callable[[str], None] | None = None) -> ModelSource:
    """The release as ``sparsemap run``, ``chat`` and ``serve`` run it, with what it lacks written once into
    sparsemap's cache (:func:`cache_folder`):

    * a release in one file runs from that file, mapped as it lies (the lean engine maps q and k as stored
      and reorders their outputs: :func:`sparsemap.models.llama.map_weights`); the cache folder holds
      only its ``config.json``, generation config and ``tokenizer.json``;
    * a release in several files is joined there into a transformers folder by :func:`write_folder`, and
      runs from it.

    The folder is taken as it is while the release's files (``params.json``, every
    ``consolidated.NN.pth``, the tokenizer's) have the stamps its mark records: size, modification and
    change times, inode (a file rewritten in place with its old modification time is still seen, as
    :class:`~sparsemap.formats.catalog.FileStamp` sees it). Otherwise the release is checked, its tokenizer
    first (so a run that cannot tokenize is refused before gigabytes are written), the disk's free space
    against the weights to be joined, and the folder is written beside the old one and put in its place
    when complete. A cached folder is taken without importing torch.

    Args:
        source: the release's folder (or its ``params.json``, or the source resolved from either).
        progress: ``progress(description, total_nbytes)``, a context manager that gives the callback of
            bytes written: a progress bar while the weights are written.
        on_note: hears the one line that says the release is being written, where and how large (default:
            printed on stderr).

    Raises:
        MissingExtraError: the tokenizer.model needs sentencepiece, protobuf or transformers, not
            installed.
        BadInputError: no tokenizer, or Llama 3's tiktoken tokenizer.model without a tokenizer.json.
        DestinationError: the cache's disk has no room for the weights.
        MetaLlamaFormatError: the release's files do not describe one model.

    Example:
        >>> prepare("Llama-2-13b/").folder                                     # doctest: +SKIP
        '/home/me/.cache/sparsemap/meta-llama/Llama-2-13b-3f1c2a9b0d4e'
        >>> prepare("Llama-2-7b/").weights                                     # doctest: +SKIP
        '/data/Llama-2-7b/consolidated.00.pth'
    """
    folder = _folder_of(source)
    target = cache_folder(folder)
    one_file = len(shard_files(folder)) == 1
    made_of = [FOLDER_VERSION, "companions" if one_file else "joined", *_stamp_lines(folder)]

    def build(staging: Path, mark: str) -> None:  # only when the cache does not hold it as made_of says
        release = read_release(folder)
        check_tokenizer(release)  # a run that cannot tokenize is refused before anything is written
        if one_file:
            _write_companions(release, staging, target, mark, on_note)
        else:
            _write_joined(release, staging, target, mark, progress, on_note)
        if not (staging / "tokenizer.json").is_file():  # checked above; a folder without one never runs
            raise BadInputError("the tokenizer was not written (see the warning above)", path=folder)

    cached_folder(target, made_of, build)
    if not one_file:
        return resolve_source(target)
    # The weights are the release's own file, mapped as they lie; config and tokenizer come from the cache.
    return resolve_source(folder)._replace(config=str(target / "config.json"),
                                           tokenizer=str(target / "tokenizer.json"),
                                           generation_config=str(target / "generation_config.json"))


def _write_companions(release: Release, staging: Path, target: Path, mark: str,
                      on_note: Callable[[str], None] | None) -> None:
    """What a release in one file lacks to run mapped as it lies (``config.json``, the generation config and
    the tokenizer), written into ``staging``, the folder that becomes ``target``."""
    (on_note or _to_stderr)(f"sparsemap: {release.folder} is a Meta release: writing its config and "
                            f"tokenizer once into {target}; its weights are mapped from the release")
    staging.mkdir()
    save_configs(hf_config(release), staging)
    write_tokenizer(release, staging)
    (staging / COMPLETE_MARK).write_text(mark)


def _write_joined(release: Release, staging: Path, target: Path, mark: str,
                  progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]] | None,
                  on_note: Callable[[str], None] | None) -> None:
    """A release in several files joined into a transformers folder at ``staging``, the folder that becomes
    ``target``, the disk's free space checked first."""
    from ..units import format_size

    nbytes = sum(entry.nbytes for catalog in release.ranks for entry in catalog.values())
    free = shutil.disk_usage(target.parent).free
    if free < nbytes:
        raise DestinationError(f"has {format_size(free)} free; the release's weights need about "
                               f"{format_size(nbytes)} there (free some space, or set SPARSEMAP_CACHE to a "
                               "folder on a disk with room)", path=target.parent)
    (on_note or _to_stderr)(f"sparsemap: {release.folder} is a Meta release: writing it once as a "
                            f"transformers folder (its {len(release.ranks)} files joined, "
                            f"{format_size(nbytes)}) into {target}; later runs map it from there")
    bar = progress(f"joining {len(release.ranks)} files", nbytes) if progress is not None \
        else contextlib.nullcontext(None)
    with bar as advance:
        write_folder(release.folder, staging, mark=mark, on_bytes=advance)


def _folder_of(source: str | os.PathLike[str] | ModelSource) -> str:
    if isinstance(source, ModelSource):
        return source.folder
    path = os.path.abspath(os.fspath(source))
    return path if os.path.isdir(path) else os.path.dirname(path)


def _stamp_lines(folder: str) -> list[str]:
    """One line per file the cached folder is made from: its name and stamp (the device left out: it
    can change across reboots for the same file on some filesystems)."""
    names = [META_PARAMS, *(os.path.basename(p) for p in shard_files(folder)), SENTENCEPIECE_MODEL,
             *TOKENIZER_FILES]
    lines = []
    for name in names:
        try:
            st = os.stat(os.path.join(folder, name))
        except FileNotFoundError:
            continue  # an optional tokenizer file; a missing shard or params.json is read_release's to say
        lines.append(f"{name} size {st.st_size} mtime_ns {st.st_mtime_ns} ctime_ns {st.st_ctime_ns} "
                     f"inode {st.st_ino}")
    return lines


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
