"""Assertions shared by the format tests."""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import sparsemap
from sparsemap.errors import SparsemapError


def raises(cls: type[SparsemapError], path: Path, *needles: object) -> SparsemapError:
    """Open ``path``; assert it fails with exactly ``cls`` and a message naming ``path`` and ``needles``."""
    with pytest.raises(SparsemapError) as info:
        sparsemap.open(path)
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    assert isinstance(err, ValueError)
    message = str(err)
    assert str(path) in message
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in {message!r}"
    return err


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, (nbytes,) uint8, for bit-exact comparison (NaNs included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(as_bytes(got), as_bytes(want))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs, infs and subnormals included; bool is 0/1)."""
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def run_isolated(code: str, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object on its last line.

    Memory measurements belong in a fresh process: after earlier tests, this
    one holds hundreds of MiB of freed-but-resident heap and threads that
    change what an allocation costs.
    """
    import json
    import subprocess
    import sys
    import textwrap

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- hand-built torch pickles

class FakeStorage:
    """Stands for a storage in a hand-built pickle; pickled as a persistent id."""

    def __init__(self, key: str, numel: int, storage_type: object = None) -> None:
        self.key = key
        self.numel = numel
        self.storage_type = storage_type if storage_type is not None else torch.FloatStorage


class FakeTensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage: object, offset: object, size: object, stride: object) -> None:
        self.args = (storage, offset, size, stride)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (torch._utils._rebuild_tensor_v2, (*self.args, False, OrderedDict()))


class FakeTensorV3(FakeTensor):
    """Pickles as ``_rebuild_tensor_v3(untyped storage, offset, size, stride, ..., dtype)`` (fp8, u16)."""

    def __init__(self, storage: object, offset: object, size: object, stride: object,
                 dtype: torch.dtype) -> None:
        super().__init__(storage, offset, size, stride)
        self.dtype = dtype

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (torch._utils._rebuild_tensor_v3, (*self.args, False, OrderedDict(), self.dtype))


class _CheckpointPickler(pickle.Pickler):
    def persistent_id(self, obj: object):  # type: ignore[no-untyped-def]
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def pickle_checkpoint(obj: object) -> bytes:
    buf = io.BytesIO()
    _CheckpointPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_gguf(path: Path, tensors: dict, metadata: dict[str, int | str] | None = None) -> Path:
    """A GGUF file written by ``gguf.GGUFWriter``: ``tensors`` maps a name to ``(array, raw_dtype)``
    (``raw_dtype`` ``None`` for a plain array, else the quantization of raw blocks); ``metadata``
    values are stored as uint32 (ints) or strings."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (metadata or {}).items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    for name, (array, raw_dtype) in tensors.items():
        if raw_dtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
