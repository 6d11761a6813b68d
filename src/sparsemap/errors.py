"""Every error sparsemap raises on purpose.

One class per kind of fault, so callers (and tests) can tell them apart, all
under :class:`SparsemapError`. Faults in an input file also derive from
``ValueError``; the CLI maps them to exit code 2 ("bad input").

Messages name the file, the tensor and the numbers involved: a user reading
one line should know what is wrong and where.
"""

from __future__ import annotations

import os
from typing import Any


class SparsemapError(Exception):
    """Base class of every sparsemap error."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 tensor: str | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        where = []
        if self.path is not None:
            where.append(self.path)
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        self.detail = message
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class BadInputError(SparsemapError, ValueError):
    """The input (a file, a folder, an argument) is wrong; exit code 2 in the CLI."""


# ---------------------------------------------------------------- finding sources

class SourceNotFoundError(BadInputError, FileNotFoundError):
    """The path does not exist, or a folder holds no checkpoint we recognise."""


class NotRegularFileError(BadInputError):
    """The path is a FIFO, a socket, a device or a kernel file (/proc, /sys): not a checkpoint to read."""


class UnknownFormatError(BadInputError):
    """The file is not a checkpoint in any format sparsemap reads."""


# ---------------------------------------------------------------- any format

class FormatError(BadInputError):
    """Base class of faults found while parsing and validating a checkpoint."""


class TruncatedFileError(FormatError):
    """The file is shorter than its header says it must be."""


class TrailingBytesError(FormatError):
    """The file has bytes after the last tensor that no tensor accounts for."""


class UnknownDtypeError(FormatError):
    """A tensor's dtype is not one sparsemap (or this torch build) knows."""


class InvalidShapeError(FormatError):
    """A shape is not a list of non-negative integers."""


class SizeOverflowError(FormatError):
    """A size computed from the header exceeds what any file can hold."""


class ByteLengthMismatchError(FormatError):
    """A tensor's byte range does not match numel * itemsize."""


class DuplicateTensorError(FormatError):
    """Two tensors share one name."""


class InvalidNameError(FormatError):
    """A tensor name is not valid UTF-8 (a lone surrogate, undecodable bytes)."""


class AmplificationError(FormatError):
    """A header would cost far more memory or time than its size justifies (each parser states its bound):
    containers shared or nested without end, memo indexes far past the data, counts the bytes cannot hold,
    views that repeat elements the file stores once."""


class NestingError(AmplificationError):
    """Containers nest deeper than a parser allows, or contain themselves."""


# ---------------------------------------------------------------- safetensors

class HeaderTooShortError(FormatError):
    """The file is too short to hold the 8-byte header length."""


class HeaderTooLargeError(FormatError):
    """The declared header length exceeds the cap or the file."""


class HeaderEncodingError(FormatError):
    """The header is not valid UTF-8."""


class HeaderJSONError(FormatError):
    """The header is not JSON, not an object, or an entry has the wrong fields."""


class InvalidOffsetsError(FormatError):
    """A tensor's data_offsets are not two non-negative integers, begin <= end."""


class TensorGapError(FormatError):
    """Bytes between two tensors belong to no tensor."""


class TensorOverlapError(FormatError):
    """Two tensors claim the same bytes."""


class MetadataError(FormatError):
    """``__metadata__`` is not a map of strings to strings."""


class LayoutError(FormatError):
    """The layout metadata of a converted file is malformed or points outside its stored tensors."""


# ---------------------------------------------------------------- PyTorch zip checkpoints

class LegacyPickleError(FormatError):
    """A pre-1.6 (non-zip) torch pickle, which cannot be read without running pickle code."""


class UnsafePickleError(FormatError):
    """The pickle asks for something outside the weights-only allowlist."""


class CorruptCheckpointError(FormatError):
    """The zip checkpoint's structure is broken (missing record, compressed storage, ...)."""


class StorageBoundsError(FormatError):
    """A tensor view reaches outside its storage."""


# ---------------------------------------------------------------- sharded folders

class ShardIndexError(FormatError):
    """A shard index (``*.index.json``) is malformed or disagrees with its shards."""


class MissingShardError(ShardIndexError, SourceNotFoundError):
    """A shard named by the index is not on disk."""


# ---------------------------------------------------------------- GGUF

class GGUFError(FormatError):
    """The GGUF file is malformed."""


class UnsupportedQuantizationError(FormatError):
    """A GGUF tensor uses a quantization sparsemap cannot dequantize."""


class QuantizationError(FormatError):
    """A file's quantized weights are described wrongly, or packed for another kernel layout."""


class RwkvFormatError(FormatError):
    """An RWKV checkpoint of an unknown version, or with tensors missing or of inconsistent shapes."""


class GGUFArchitectureError(FormatError):
    """The GGUF file's architecture or tensor names are not ones sparsemap maps to transformers."""


# ---------------------------------------------------------------- llama2.c, MLC/TVM

class Llama2cFormatError(FormatError):
    """A llama2.c checkpoint or ``tokenizer.bin`` whose header is inconsistent (a size, the version, a flag,
    the group size), or a legacy file (no magic) whose size fits another reading of its header."""


class MlcFormatError(FormatError):
    """An MLC-LLM / TVM ``ndarray-cache.json`` that is malformed or names shards outside its folder."""


# ---------------------------------------------------------------- loading into a model

class LoadError(BadInputError):
    """The checkpoint and the model disagree."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mismatched: list[tuple[str, Any, Any]] | None = None) -> None:
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []
        super().__init__(message, path=path)


class MissingKeysError(LoadError):
    """The model has parameters the checkpoint lacks."""


class UnexpectedKeysError(LoadError):
    """The checkpoint has tensors the model lacks."""


class ShapeMismatchError(LoadError):
    """A checkpoint tensor's shape differs from the model's parameter."""


class UnsupportedArgumentError(BadInputError, TypeError):
    """An argument another library's API takes (transformers' ``from_pretrained``) that sparsemap
    does not honour; the message says why and what to do instead."""


class TensorNotFoundError(BadInputError, KeyError):
    """A tensor name the checkpoint does not hold (``safe_open``'s ``get_tensor``, ``get_slice``)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return Exception.__str__(self)


class UninitializedTensorError(LoadError):
    """After loading, a parameter or buffer is still on the meta device."""


# ---------------------------------------------------------------- files changing underneath

class FileChangedError(SparsemapError, RuntimeError):
    """A checkpoint was modified, truncated or replaced while sparsemap was reading or mapping it.

    Raised before any page of the changed file is touched: reading a page past
    the end of a truncated mapping would be SIGBUS, and re-reading a modified
    one would mix old and new weights.
    """


# ---------------------------------------------------------------- sparse rows

class RowError(BadInputError):
    """A row operation cannot be done on this tensor as asked."""


class NotMappedError(RowError):
    """The tensor is not a view of a mapped file, so its pages cannot be released or remapped."""


class RowAlignmentError(RowError):
    """Rows share pages with data that is kept, and the caller asked for whole pages only."""


# ---------------------------------------------------------------- writing files

class LayoutOptionError(BadInputError):
    """The layout asked for cannot be applied to these tensors."""


class ReservedNameError(BadInputError):
    """A tensor name collides with a name sparsemap stores or reserves (a padding tensor, a stored form)."""


class DestinationError(BadInputError):
    """The output path cannot receive a file: a directory, a device, a FIFO, a socket, a missing folder."""


class WriteVerificationError(SparsemapError):
    """A file just written did not reopen as what was meant; it was not put in place."""


# ---------------------------------------------------------------- the machine and the network

class BudgetError(BadInputError):
    """A memory limit the runtime cannot keep (below its own baseline, or too small to stream in)."""


class AssetError(SparsemapError):
    """A model asset could not be fetched or extracted."""


class MissingExtraError(SparsemapError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it."""


class CgroupUnavailable(SparsemapError):
    """No memory cgroup can be created here (not Linux, not root, no memory controller...)."""


# ---------------------------------------------------------------- tensor parallelism

class TensorParallelError(BadInputError):
    """A tensor-parallel plan that cannot be applied to this model on this many ranks: a pattern that names
    nothing, a sharded dimension or head count the world size does not divide, a style whose slice is not a
    view. Raised alike on every rank (it depends on the model, the plan and the world size only), before any
    tensor is mapped."""


# ---------------------------------------------------------------- Meta's original Llama release

class MetaLlamaFormatError(FormatError):
    """Meta's original Llama release (``params.json`` + ``consolidated.NN.pth``) breaks its rules: a
    ``params.json`` value, a missing file in the numbering, a tensor whose name or shape is not the model's,
    files that do not slice the same model alike."""


class ShardedReleaseError(BadInputError):
    """A Meta release in several model-parallel files (each a slice of every matrix) asked for as one model:
    it is joined once with ``sparsemap convert``."""
