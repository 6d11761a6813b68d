"""safetensors' ``safe_open``, over every checkpoint sparsemap reads, zero-copy.

Code written against ``safetensors.safe_open`` (``keys()``, ``get_tensor``,
``get_slice(...)[...]``, ``metadata()``) runs unchanged on a sharded folder, a
PyTorch zip (``.pt``/``.bin``/``.pth``), a GGUF or an rwkv.cpp file, and gets
the same tensors as views of one copy-on-write mapping per file. This is a thin
adapter: :func:`sparsemap.open` describes the checkpoint, a
:class:`~sparsemap.Checkpoint` maps it and serves the views; the handle owns
that checkpoint and lets go of its mappings on ``close()`` (or when leaving
``with``, or when it is garbage collected).

Where it differs from safetensors, on purpose:

- a slice is a view of the mapping (indexing reads nothing; safetensors copies
  the bytes out), and it needs its handle open (safetensors' outlives it);
- ``device`` is checked when the handle is made, and a device this machine
  lacks is a :class:`~sparsemap.errors.UnsupportedArgumentError`, not torch's error
  at the first tensor;
- tensors stored quantized (GGUF blocks, int4/int8 weights) or with rows
  reordered are served as computed copies, as :meth:`Checkpoint.tensor` does.

The module is not named ``safe_open``: importing a submodule binds its name in
the package, which would shadow the function ``sparsemap.safe_open``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import TensorNotFoundError, UnsupportedArgumentError
from .formats.catalog import Catalog, TensorEntry

# framework as the caller spells it -> what the tensors become. safetensors' own spellings; it also takes
# "tf", "flax", "jax", "mlx" and "paddle", which need libraries sparsemap does not map into.
FRAMEWORKS = {"pt": "pt", "torch": "pt", "np": "np", "numpy": "np"}

Device = str | int | torch.device
Index = Any  # what torch indexing takes: int, slice, Ellipsis, None, a tuple of those, a list, a tensor


def safe_open(path: str | os.PathLike[str] | Catalog, framework: str = "pt",
              device: Device = "cpu") -> SafeOpen:
    """Open a checkpoint as ``safetensors.safe_open`` does, in any format sparsemap reads.

    Reads headers only; each file is mapped on its first tensor.

    Args:
        path: a checkpoint file (safetensors, torch zip, GGUF, rwkv.cpp), a
            shard index, a folder holding either, or a catalog from
            :func:`sparsemap.open`.
        framework: ``"pt"`` or ``"torch"`` for torch tensors; ``"np"`` or
            ``"numpy"`` for numpy arrays (zero-copy too; not for bf16 or fp8).
        device: ``"cpu"`` (the default) serves views of the mapped files; any
            other torch device (``"cuda:0"``, ``0`` as in safetensors, a
            ``torch.device``) gets a copy of each tensor, read when asked for.

    Returns:
        A :class:`SafeOpen` handle: a context manager, usable without ``with`` too.

    Raises:
        UnsupportedArgumentError: ``framework`` is not one of :data:`FRAMEWORKS`,
            or ``device`` is not a torch device this machine has.
        SparsemapError: the checkpoint cannot be read (each fault its own
            class, see :mod:`sparsemap.errors`).

    Example:
        >>> with sparsemap.safe_open("model.pt", framework="pt") as f:   # doctest: +SKIP
        ...     embed = f.get_tensor("embed.weight")                       # a view of the mapped file
        ...     head = f.get_slice("lm_head.weight")[:1024]                # rows 0..1023, still a view
    """
    return SafeOpen(path, framework=framework, device=device)


class SafeOpen:
    """An open checkpoint with safetensors' ``safe_open`` methods; made by :func:`safe_open`.

    Owns one :class:`~sparsemap.Checkpoint` (so its mappings) until :meth:`close`;
    tensors already served stay valid after it, as views keep their mapping alive.
    Every method but :meth:`close` raises ``ValueError`` once closed, as a
    closed Python file does.

    Example:
        >>> f = sparsemap.safe_open("model.gguf")                         # doctest: +SKIP
        >>> f.keys()[:2], f.get_slice("token_embd.weight").get_shape()
        (['blk.0.attn_k.weight', 'blk.0.attn_norm.weight'], [49152, 576])
        >>> f.close()
    """

    def __init__(self, path: str | os.PathLike[str] | Catalog, *, framework: str = "pt",
                 device: Device = "cpu") -> None:
        # The arguments are checked before the file is opened: a bad one costs no parsing.
        self._framework = _framework(framework)
        self._device = _device(device, self._framework)
        self._ckpt: Checkpoint | None = Checkpoint(path if isinstance(path, Catalog) else os.fspath(path))
        self._source = self._ckpt.source

    def __repr__(self) -> str:
        state = "closed" if self._ckpt is None else f"{len(self._ckpt)} tensors"
        return (f"safe_open({self._source!r}, framework={self._framework!r}, device={str(self._device)!r}, "
                f"{state})")

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Let go of the mappings (views already served keep theirs); later calls raise ``ValueError``.

        Closing twice is allowed. Without ``with`` or ``close()``, the mappings
        go when the handle is garbage collected.
        """
        ckpt, self._ckpt = self._ckpt, None
        if ckpt is not None:
            ckpt.close()

    def __enter__(self) -> SafeOpen:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called (or the ``with`` block left)."""
        return self._ckpt is None

    @property
    def catalog(self) -> Catalog:
        """Where every tensor is (file, offset, dtype, shape): the checkpoint's :class:`Catalog`."""
        return self._open().catalog

    def _open(self) -> Checkpoint:
        ckpt = self._ckpt
        if ckpt is None:
            raise ValueError(f"{self._source}: this safe_open handle is closed; open the checkpoint again "
                             "(tensors served before closing stay valid)")
        return ckpt

    # ------------------------------------------------------------ what the header says

    def keys(self) -> list[str]:
        """The tensor names, sorted (as safetensors lists them)."""
        return sorted(self._open().catalog)

    def offset_keys(self) -> list[str]:
        """The tensor names in storage order: file by file (shards in index order), by byte offset.

        Ties (empty tensors, views of one storage) are broken by name; safetensors leaves them in an
        arbitrary order.
        """
        catalog = self._open().catalog
        rank = {path: i for i, path in enumerate(catalog.files)}
        entries = sorted(catalog.values(), key=lambda e: (rank[e.file], e.offset, e.end, e.name))
        return [e.name for e in entries]

    def metadata(self) -> dict[str, str] | None:
        """The checkpoint's string metadata (safetensors' ``__metadata__``, GGUF scalars); ``None`` if none.

        An empty ``__metadata__`` reads as ``None`` too (safetensors gives ``{}``): the catalog does not
        tell an empty map from a missing one.
        """
        metadata = self._open().catalog.metadata
        return dict(metadata) if metadata else None

    # ------------------------------------------------------------ tensors

    def get_tensor(self, name: str) -> Any:
        """The tensor ``name``: a zero-copy view of the mapped file on the CPU (a computed copy if stored
        quantized or reordered), a copy on another device, a numpy array for ``framework="np"``.

        Raises:
            TensorNotFoundError: no tensor of that name; the message lists close names.
            FileChangedError: the file was modified, truncated or replaced since it was opened.
        """
        ckpt = self._open()
        return self._deliver(ckpt.tensor(self._entry(ckpt, name).name), name)

    def get_slice(self, name: str) -> TensorSlice:
        """A lazy handle on the tensor ``name``: its shape and dtype from the header, and ``[index]``.

        Raises:
            TensorNotFoundError: no tensor of that name; the message lists close names.
        """
        return TensorSlice(self, self._entry(self._open(), name))

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, by name, in :meth:`offset_keys` order: ``get_tensor`` of each, with one ``fstat``
        per file instead of one per tensor when the views read nothing."""
        ckpt = self._open()
        reads = self._device.type != "cpu"  # a copy to a device reads each tensor's pages now
        return {name: self._deliver(t, name) for name, t in ckpt.tensors(self.offset_keys(), reads=reads)}

    def _entry(self, ckpt: Checkpoint, name: str) -> TensorEntry:
        try:
            return ckpt.catalog[name]
        except KeyError:
            pass
        names = list(ckpt.catalog)
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = (f"close names: {', '.join(map(repr, close))}" if close
                else f"it has {', '.join(map(repr, sorted(names)[:3]))}{', ...' if len(names) > 3 else ''}")
        raise TensorNotFoundError(f"no such tensor among the {len(names)} of this checkpoint; {hint}",
                                  path=self._source, tensor=str(name)) from None

    def _deliver(self, t: torch.Tensor, name: str) -> Any:
        """``t`` (served on the CPU) as the caller asked for it: on its device, in its framework."""
        if self._device.type != "cpu":
            return t.to(self._device)
        if self._framework == "np":
            try:
                return t.numpy()
            except TypeError:  # numpy has no bf16 or fp8
                raise UnsupportedArgumentError(
                    f"framework='numpy' cannot hold {t.dtype} (numpy has no such dtype): open it with "
                    "framework='pt'", path=self._source, tensor=name) from None
        return t


class TensorSlice:
    """One tensor of an open :class:`SafeOpen`, not yet read: safetensors' ``PySafeSlice``.

    ``s[index]`` is ``f.get_tensor(name)[index]``, with torch's indexing rules
    (ints, negative ints, slices with positive steps, ``...``, ``None``), taken
    on the mapped view: a basic index is a view too, and reads only the pages
    it touches (copied to the device, only those). Needs its handle open.

    Example:
        >>> s = f.get_slice("embed.weight")                 # doctest: +SKIP
        >>> s.get_shape(), s.get_dtype()
        ([50304, 768], 'BF16')
        >>> s[:8, ::2].shape                                 # (8, 384)
        torch.Size([8, 384])
    """

    def __init__(self, owner: SafeOpen, entry: TensorEntry) -> None:
        self._owner = owner
        self._entry = entry

    def __repr__(self) -> str:
        entry = self._entry
        return f"TensorSlice({entry.name!r}, shape={list(entry.shape)}, dtype={entry.dtype!r})"

    def get_shape(self) -> list[int]:
        """The tensor's shape, from the header."""
        return list(self._entry.shape)

    def get_dtype(self) -> str:
        """The tensor's dtype as safetensors names it (``"F32"``, ``"BF16"``, ``"I64"``...), as served."""
        return self._entry.dtype

    def __getitem__(self, index: Index) -> Any:
        owner = self._owner
        values = owner._open().tensor(self._entry.name)[index]
        return owner._deliver(values, self._entry.name)


# ---------------------------------------------------------------- the arguments, checked once

def _framework(framework: str) -> str:
    try:
        return FRAMEWORKS[framework]
    except (KeyError, TypeError):  # TypeError: an unhashable value
        raise UnsupportedArgumentError(
            f"framework {framework!r} is not supported: sparsemap serves {sorted(FRAMEWORKS)} "
            "(torch tensors or numpy arrays)") from None


def _device(device: Device, framework: str) -> torch.device:
    """``device`` as a torch device this machine has, for ``framework``."""
    # An int is a CUDA ordinal, as in safetensors (and torch); a bool is a mistake, not 0 or 1.
    spec = f"cuda:{device}" if isinstance(device, int) and not isinstance(device, bool) else device
    try:
        dev = torch.device(spec)  # type: ignore[arg-type]  # anything else is refused just below
    except (RuntimeError, TypeError):
        raise UnsupportedArgumentError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda:0', 0)") \
            from None
    if dev.type == "cpu":
        return dev
    if framework == "np":
        raise UnsupportedArgumentError(f"framework='numpy' serves arrays on the CPU only, not on device "
                                       f"{device!r}: open it with framework='pt'")
    if dev.type == "meta":  # shapes only, no data: nothing to check
        return dev
    # torch.cuda, torch.xpu, torch.mps...: each accelerator's module says whether it is usable here.
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UnsupportedArgumentError(
            f"device {str(dev)!r} is not available here (torch {torch.__version__} finds no usable "
            f"{dev.type} device): use device='cpu', which serves views of the mapped files")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise UnsupportedArgumentError(f"device {str(dev)!r} does not exist: this machine has {count()} "
                                       f"{dev.type} device(s), numbered from 0")
    return dev
