"""PyTorch zip checkpoints (``torch.save`` since 1.6: ``.pt``, ``.pth``, ``.bin``).

A zip archive holding ``<root>/data.pkl`` (a pickle of the object saved) and
one uncompressed member ``<root>/data/<key>`` per storage. We read the pickle
with an unpickler whose ``find_class`` knows a short allowlist and returns our
own inert records: no class from the file is ever imported or called, so a
malicious pickle cannot run code. Tensors become :class:`TensorEntry` records
pointing at their storage's bytes inside the zip, which we map like any file.

Legacy (pre-1.6, non-zip) pickles interleave pickled objects with raw data and
cannot be indexed without running the pickle; they are refused. No torch here.

Hostile files
-------------
A file must mean one model to every reader, and opening it must cost time and
memory in proportion to its size. So:

* The zip (:func:`_check_members`): no member name twice or holding a NUL byte
  (torch and Python's zipfile would read different copies, or different
  names); every member stored, with equal stored and real sizes (a deflated
  ``data.pkl`` is a zip bomb; ``torch.save`` compresses nothing); a storage's
  local header names the member the central directory names.
* The pickle, before the C unpickler sees it (:func:`_scan_pickle`, one pass
  over its opcodes that follows the shape of the unpickler's stack): every
  length within the data; memo indexes dense (``LONG_BINPUT 2**31`` makes the
  C unpickler allocate and zero 2**32 slots: 32 GiB from 12 bytes); dict keys
  only of kinds whose hash the file cannot choose (str, bytes, None, bool, int
  of at most 64 bits: tuples, floats and wider ints collide at will, and
  colliding keys make building a dict quadratic); no sets (216 bytes of memory
  per byte of pickle; at protocol 2 a set is a ``builtins.set`` call, which the
  allowlist refuses anyway); calls with at most :data:`MAX_CALL_ARGS`
  arguments and BUILD states of at most :data:`MAX_BUILD_STATE_ITEMS` items (a
  memoized argument tuple or state is copied by every call that names it).
* The object built (:func:`_flatten`): nested dicts walked without recursion,
  at most :data:`MAX_NESTING` deep, never a dict inside itself, and within a
  budget of :data:`MAX_ENTRIES_PER_BYTE` dict entries and
  :data:`MAX_NAME_CHARS_PER_BYTE` name characters per byte of ``data.pkl``
  (dicts that share substructure name 2**40 tensors from a few hundred bytes);
  names valid UTF-8.
* Every view (:func:`_entry`): shape, strides and offset fit int64, at most
  :data:`MAX_DIMS` dimensions, inside its storage, and repeating no element, so
  a tensor never holds more bytes than its storage stores (``torch.save`` of an
  ``.expand()``-ed tensor keeps its stride 0: refused, save ``.contiguous()``);
  an empty tensor's shape needs at most 2**63 - 1 bytes with its empty
  dimensions counted as 1, the bound torch's int64 strides and sizes impose.

The bound, measured (CPython 3.11, tracemalloc, 2 shared cores) on floods of
the cheapest opcodes and on every case of ``tests/hostile/test_torchzip_round2.py``:
opening takes at most 64 KiB + 90 bytes of memory per byte of ``data.pkl``
(the worst: ``EMPTY_DICT`` or ``EMPTY_LIST`` floods, where the pre-scan's
record of each container is the peak; an accepted tensor's catalog entry is
about 330 bytes, from at least 8 bytes of pickle) and under 1 s per MB of
``data.pkl`` (0.1 to 0.85 s/MB). The pre-scan costs about 0.2 us per opcode:
3.3 ms for a 291-tensor checkpoint, whose whole open went from 3.6 to 7.2 ms.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..errors import (
    AmplificationError,
    CorruptCheckpointError,
    DuplicateTensorError,
    InvalidShapeError,
    LegacyPickleError,
    NestingError,
    SizeOverflowError,
    SparsemapError,
    StorageBoundsError,
    UnknownDtypeError,
    UnsafePickleError,
)
from .catalog import Catalog, FileStamp, TensorEntry, check_name, contiguous_strides, repeated_stride
from .dtypes import FROM_TORCH_NAME, ITEMSIZE
from .source import LEGACY_HINT, PICKLE_PROTOS, ZIP_MAGIC, open_regular

# Legacy typed-storage classes name the element type.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
}

# ---------------------------------------------------------------- limits (why: the module docstring)

MAX_INT64 = (1 << 63) - 1  # torch's sizes, strides and offsets are int64; no file holds more bytes
MAX_DIMS = 64  # dimensions of one view; bounds the work per tensor (no checkpoint comes near)
MAX_NESTING = 64  # dicts inside dicts; real checkpoints nest a state dict 2 or 3 deep
MAX_ENTRIES_PER_BYTE = 1  # dict entries _flatten may visit per byte of data.pkl (an entry costs >= 4)
MAX_NAME_CHARS_PER_BYTE = 32  # characters of dotted names per byte of data.pkl (a real file: < 2)
MAX_CALL_ARGS = 16  # arguments of one REDUCE; torch's rebuild functions take at most 8
MAX_BUILD_STATE_ITEMS = 8  # items of one BUILD state (torch's: {"_metadata": ...}); each BUILD copies them

# ---------------------------------------------------------------- inert records the pickle builds
# pickle's BUILD opcode calls __setstate__, or writes into __dict__: a hostile
# pickle could rewrite a record after validation, or poison the shared
# allowlist objects for every later file in the process. So records have no
# __dict__ (slots) and a __setstate__ that refuses. It is installed after
# @dataclass, which adds a __setstate__ of its own to slotted frozen classes
# (one that ignores `frozen`).


def _inert(cls: Any) -> Any:
    def refuse(self: Any, state: Any) -> None:
        raise UnsafePickleError(f"pickle tries to set the state of a {type(self).__name__.lstrip('_')} "
                                "(BUILD opcode); refused")

    cls.__setstate__ = refuse
    return cls


@_inert
@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str  # element dtype of a typed storage; "U8" for UntypedStorage (bytes)


@_inert
@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str  # element type it was saved as; "U8" for an UntypedStorage
    numel: int  # in elements of dtype

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@_inert
@dataclass(frozen=True, slots=True)
class _TensorRecord:
    storage: _Storage
    dtype: str
    storage_offset: int  # in elements of dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]


@_inert
@dataclass(frozen=True, slots=True)
class _Call:
    """An allowlisted callable, frozen so BUILD cannot decorate it."""

    fn: Any

    def __call__(self, *args: Any) -> Any:
        # At most MAX_CALL_ARGS arguments from REDUCE (_scan_pickle); INST and OBJ take theirs off the
        # stack, where each costs a byte of the file.
        return self.fn(*args)


def _view_args(storage: Any, storage_offset: Any, size: Any, stride: Any) -> tuple[int, tuple[int, ...],
                                                                                    tuple[int, ...]]:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not (isinstance(size, tuple | list) and isinstance(stride, tuple | list)
            and len(size) == len(stride) and type(storage_offset) is int):
        raise InvalidShapeError(f"tensor view has malformed size {_short(size)} / stride {_short(stride)} / "
                                f"offset {_short(storage_offset)}")
    if len(size) > MAX_DIMS:
        raise InvalidShapeError(f"tensor view has {len(size)} dimensions; at most {MAX_DIMS} are read")
    if not all(type(v) is int for v in (*size, *stride)):
        raise InvalidShapeError(f"tensor view has malformed size {_short(size)} / stride {_short(stride)} / "
                                f"offset {_short(storage_offset)}")
    return storage_offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRecord:
    offset, shape, strides = _view_args(storage, storage_offset, size, stride)
    return _TensorRecord(storage, storage.dtype, offset, shape, strides)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = None,
                       hooks: Any = None, dtype: Any = None, *_: Any) -> _TensorRecord:
    # Untyped (byte) storage; the element type comes as an argument (fp8, uint16...).
    offset, shape, strides = _view_args(storage, storage_offset, size, stride)
    if not isinstance(dtype, _StorageType):
        raise UnsafePickleError(f"tensor dtype is {type(dtype).__name__}, not a torch dtype")
    return _TensorRecord(storage, dtype.dtype, offset, shape, strides)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    # OrderedDict(iterable) would copy a memoized iterable once per call; torch.save never passes one.
    if args:
        raise UnsafePickleError(f"pickle calls collections.OrderedDict with {len(args)} argument(s); "
                                "torch.save calls it with none and adds the items after (SETITEMS)")
    return OrderedDict()


# The allowlist: (module, name) -> what the unpickler gets instead. Everything
# here returns plain data; nothing from torch is imported.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Call(_ordered_dict),
    ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"): _Call(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageType("U8"),
}
for _name, _dtype in STORAGE_DTYPES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_dtype)
# Newer checkpoints may name a torch dtype (``torch.float8_e4m3fn``) instead.
for _name, _dtype in FROM_TORCH_NAME.items():
    _ALLOWED[("torch", _name)] = _StorageType(_dtype)


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path
        self.storages: dict[str, tuple[str, int]] = {}  # key -> (dtype, numel) as first declared

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle references {_clip(module)}.{_clip(name)}, which is not on the weights-only "
                "allowlist; refusing to load it (no pickle code is ever run)", path=self.path) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, numel in elements of storage_type)
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or type(pid[4]) is not int or not 0 <= pid[4] <= MAX_INT64):
            raise CorruptCheckpointError(f"malformed storage record {_short(pid)}", path=self.path)
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if dtype not in ITEMSIZE:
            raise UnknownDtypeError(f"unknown storage dtype {dtype!r}", path=self.path)
        # torch.save writes one type and size per storage; torch.load refuses a second type, and
        # serves a second size from the first: two records, two readings of the same bytes.
        first = self.storages.setdefault(key, (dtype, numel))
        if first != (dtype, numel):
            raise CorruptCheckpointError(
                f"storage {_short(key)} is declared as {first[1]} {first[0]} elements and as {numel} {dtype} "
                "elements; torch.save writes one type and size per storage", path=self.path)
        return _Storage(key=key, dtype=dtype, numel=numel)


# ---------------------------------------------------------------- the pickle pre-scan
# The C unpickler is fast and exact, but some opcodes cost far more than their
# bytes, and it cannot be stopped once it runs. So one pass over the opcodes
# first, in Python, following the unpickler's stack with the kind of each value
# instead of the value (the same MARK, fence and underflow rules as
# Modules/_pickle.c). Mutable containers are [kind, n_items] lists shared by
# reference, as the memo and DUP share the objects they stand for, so their
# sizes stay exact as SETITEMS, APPENDS and ADDITEMS grow them; immutable ones
# are (kind, n_items) tuples.

_STR, _INT, _ATOM, _BIGINT, _FLOAT, _OBJ = 1, 2, 3, 4, 5, 6  # scalars; _STR is str or bytes (SipHash)
_TUPLE = 10  # (kind, n_items)
_LIST, _DICT, _CALLED = 11, 12, 13  # [kind, n_items]; _CALLED: what REDUCE & co. return
_SMALL_TUPLES = [(_TUPLE, n) for n in range(4)]  # EMPTY_TUPLE, TUPLE1..3: one shared record each
_KIND_NAMES = {_STR: "str", _INT: "int", _ATOM: "None or bool", _BIGINT: "int wider than 64 bits",
               _FLOAT: "float", _OBJ: "object", _TUPLE: "tuple", _LIST: "list", _DICT: "dict",
               _CALLED: "object"}

# Argument layouts: n > 0 fixed bytes; the others below. From pickletools.opcodes.
_NONE, _LINE, _LINES2, _LEN1, _LEN4S, _LEN4U, _LEN8 = 0, -1, -2, -3, -4, -5, -6
_LEN_WIDTH = {_LEN1: 1, _LEN4S: 4, _LEN4U: 4, _LEN8: 8}
_OPCODES: dict[int, tuple[str, int]] = {ord(c): (name, layout) for c, name, layout in [
    ("I", "INT", _LINE), ("J", "BININT", 4), ("K", "BININT1", 1), ("M", "BININT2", 2), ("L", "LONG", _LINE),
    ("\x8a", "LONG1", _LEN1), ("\x8b", "LONG4", _LEN4S), ("S", "STRING", _LINE), ("T", "BINSTRING", _LEN4S),
    ("U", "SHORT_BINSTRING", _LEN1), ("B", "BINBYTES", _LEN4U), ("C", "SHORT_BINBYTES", _LEN1),
    ("\x8e", "BINBYTES8", _LEN8), ("\x96", "BYTEARRAY8", _LEN8), ("\x97", "NEXT_BUFFER", _NONE),
    ("\x98", "READONLY_BUFFER", _NONE), ("N", "NONE", _NONE), ("\x88", "NEWTRUE", _NONE),
    ("\x89", "NEWFALSE", _NONE), ("V", "UNICODE", _LINE), ("\x8c", "SHORT_BINUNICODE", _LEN1),
    ("X", "BINUNICODE", _LEN4U), ("\x8d", "BINUNICODE8", _LEN8), ("F", "FLOAT", _LINE), ("G", "BINFLOAT", 8),
    ("]", "EMPTY_LIST", _NONE), ("a", "APPEND", _NONE), ("e", "APPENDS", _NONE), ("l", "LIST", _NONE),
    (")", "EMPTY_TUPLE", _NONE), ("t", "TUPLE", _NONE), ("\x85", "TUPLE1", _NONE), ("\x86", "TUPLE2", _NONE),
    ("\x87", "TUPLE3", _NONE), ("}", "EMPTY_DICT", _NONE), ("d", "DICT", _NONE), ("s", "SETITEM", _NONE),
    ("u", "SETITEMS", _NONE), ("\x8f", "EMPTY_SET", _NONE), ("\x90", "ADDITEMS", _NONE),
    ("\x91", "FROZENSET", _NONE), ("0", "POP", _NONE), ("2", "DUP", _NONE), ("(", "MARK", _NONE),
    ("1", "POP_MARK", _NONE), ("g", "GET", _LINE), ("h", "BINGET", 1), ("j", "LONG_BINGET", 4),
    ("p", "PUT", _LINE), ("q", "BINPUT", 1), ("r", "LONG_BINPUT", 4), ("\x94", "MEMOIZE", _NONE),
    ("\x82", "EXT1", 1), ("\x83", "EXT2", 2), ("\x84", "EXT4", 4), ("c", "GLOBAL", _LINES2),
    ("\x93", "STACK_GLOBAL", _NONE), ("R", "REDUCE", _NONE), ("b", "BUILD", _NONE), ("i", "INST", _LINES2),
    ("o", "OBJ", _NONE), ("\x81", "NEWOBJ", _NONE), ("\x92", "NEWOBJ_EX", _NONE), ("\x80", "PROTO", 1),
    (".", "STOP", _NONE), ("\x95", "FRAME", 8), ("P", "PERSID", _LINE), ("Q", "BINPERSID", _NONE)]}
_SCALAR_PUSH = {ord("J"): _INT, ord("K"): _INT, ord("M"): _INT, ord("S"): _STR, ord("T"): _STR,
                ord("U"): _STR, ord("B"): _STR, ord("C"): _STR, 0x8e: _STR, 0x96: _OBJ, 0x97: _OBJ,
                ord("N"): _ATOM, 0x88: _ATOM, 0x89: _ATOM, ord("V"): _STR, 0x8c: _STR, ord("X"): _STR,
                0x8d: _STR, ord("F"): _FLOAT, ord("G"): _FLOAT, ord("c"): _OBJ, 0x82: _OBJ, 0x83: _OBJ,
                0x84: _OBJ, ord("P"): _OBJ}
_EMPTY_PUSH = {ord("]"): _LIST, ord("}"): _DICT}


def _text_int_kind(line: bytes) -> int:
    if line in (b"00", b"01"):  # protocol 0 spells False and True this way
        return _ATOM
    if len(line) > 24:  # more digits than any 64-bit int (or garbage the unpickler refuses)
        return _BIGINT
    try:
        value = int(line.rstrip(b"L"))
    except ValueError:
        return _OBJ  # the unpickler refuses it
    return _INT if -(1 << 63) <= value < (1 << 64) else _BIGINT


def _scan_pickle(data: bytes, path: str) -> None:
    """Refuse a pickle whose unpickling would cost more than linear time or memory; see the module docstring.

    Raises what the C unpickler would fail on anyway as :class:`CorruptCheckpointError` (truncation,
    stack underflow, an unknown opcode), and the costly-but-valid as :class:`AmplificationError`.
    """
    end = len(data)
    stack: list[Any] = []
    marks: list[int] = []  # stack heights at each MARK; the top one is the fence pops may not cross
    memo: list[Any] = []
    pos = 0
    name, at = "", 0

    def corrupt(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"data.pkl is not a valid pickle: {what} ({name} at byte {at})",
                                      path=path)

    def pop_mark() -> int:
        if not marks:
            raise corrupt("no MARK to pop to")
        return marks.pop()

    def need(n: int) -> None:  # n values above the fence
        if len(stack) - n < (marks[-1] if marks else 0):
            raise corrupt("stack underflow")

    def check_keys(items: list[Any], what: str) -> None:
        for k in items:
            if type(k) is not int or k > _ATOM:
                raise AmplificationError(
                    f"{what} of type {_KIND_NAMES[k if type(k) is int else k[0]]} ({name} at byte {at}): the "
                    "file chooses its hash, and colliding keys make building a dict quadratic; only str, "
                    "bytes, None, bool and int keys of at most 64 bits are read", path=path)

    def call_args(args: Any, arguments: str) -> None:
        if type(args) is not tuple or args[0] != _TUPLE:
            raise AmplificationError(f"{name} at byte {at} takes {arguments} that are not a tuple built in "
                                     "data.pkl, so their count cannot be bounded before the call", path=path)
        if args[1] > MAX_CALL_ARGS:
            raise AmplificationError(
                f"{name} at byte {at} passes {args[1]} arguments (at most {MAX_CALL_ARGS}; a memoized tuple "
                "is copied by every call that names it)", path=path)

    while True:
        if pos >= end:
            raise CorruptCheckpointError(f"data.pkl ends at byte {end} without a STOP opcode", path=path)
        at, code = pos, data[pos]
        # ---- fast paths for the opcodes that make up nearly all of a torch.save pickle; each commits only
        # in the plain case, and leaves anything else (a short read, an underflow) to the full path below.
        fence = marks[-1] if marks else 0
        if code == 0x72 or code == 0x71:  # LONG_BINPUT, BINPUT of the next index
            width = 4 if code == 0x72 else 1
            if (pos + 1 + width <= end and len(stack) > fence
                    and int.from_bytes(data[pos + 1:pos + 1 + width], "little") == len(memo)):
                memo.append(stack[-1])
                pos += 1 + width
                continue
        elif code == 0x4b and pos + 2 <= end:  # BININT1
            stack.append(_INT)
            pos += 2
            continue
        elif code == 0x68 or code == 0x6a:  # BINGET, LONG_BINGET
            width = 4 if code == 0x6a else 1
            if pos + 1 + width <= end:
                index = int.from_bytes(data[pos + 1:pos + 1 + width], "little")
                if index < len(memo):
                    stack.append(memo[index])
                    pos += 1 + width
                    continue
        elif code == 0x58 and pos + 5 <= end:  # BINUNICODE
            length = int.from_bytes(data[pos + 1:pos + 5], "little")
            if length <= end - pos - 5:
                stack.append(_STR)
                pos += 5 + length
                continue
        elif code == 0x28:  # MARK
            marks.append(len(stack))
            pos += 1
            continue
        elif code == 0x74 and marks:  # TUPLE
            top = marks.pop()
            n_items = len(stack) - top
            del stack[top:]
            stack.append(_SMALL_TUPLES[n_items] if n_items < 4 else (_TUPLE, n_items))
            pos += 1
            continue
        elif code == 0x86 and len(stack) - 2 >= fence:  # TUPLE2
            del stack[-2:]
            stack.append(_SMALL_TUPLES[2])
            pos += 1
            continue
        elif code == 0x52 and len(stack) - 2 >= fence:  # REDUCE with a small tuple of arguments
            args = stack[-1]
            if type(args) is tuple and args[0] == _TUPLE and args[1] <= MAX_CALL_ARGS:
                del stack[-2:]
                stack.append([_CALLED, 0])
                pos += 1
                continue
        elif code == 0x51 and len(stack) > fence:  # BINPERSID
            stack[-1] = _OBJ
            pos += 1
            continue
        elif code == 0x89 or code == 0x88 or code == 0x4e:  # NEWFALSE, NEWTRUE, NONE
            stack.append(_ATOM)
            pos += 1
            continue
        elif code == 0x29:  # EMPTY_TUPLE
            stack.append(_SMALL_TUPLES[0])
            pos += 1
            continue
        # ---- the full path
        op = _OPCODES.get(code)
        if op is None:
            raise CorruptCheckpointError(f"data.pkl has an unknown opcode {code:#04x} at byte {at}",
                                         path=path)
        name, layout = op
        pos += 1
        # ---- the argument: every length is checked against the bytes left before anything trusts it
        arg = b""
        if layout > 0:
            arg, pos = data[pos:pos + layout], pos + layout
            if pos > end:
                raise corrupt("cut short")
        elif layout in (_LINE, _LINES2):
            newline = data.find(b"\n", pos)
            if layout == _LINES2 and newline >= 0:
                newline = data.find(b"\n", newline + 1)
            if newline < 0:
                raise corrupt("no newline before the end")
            arg, pos = data[pos:newline], newline + 1
        elif layout != _NONE:
            width = _LEN_WIDTH[layout]
            if pos + width > end:
                raise corrupt("cut short")
            length = int.from_bytes(data[pos:pos + width], "little", signed=layout == _LEN4S)
            pos += width
            if length < 0:
                raise corrupt(f"negative length {length}")
            if length > end - pos:
                raise AmplificationError(f"{name} at byte {at} claims {length} bytes, but only {end - pos} "
                                         "remain in data.pkl", path=path)
            pos += length
            if code in (0x8a, 0x8b):  # LONG1, LONG4: two's complement of `length` bytes
                stack.append(_INT if length <= 8 else _BIGINT)
                continue
        # ---- the effect on the stack, most frequent first
        if code in (0x71, 0x72, 0x70, 0x94):  # BINPUT, LONG_BINPUT, PUT, MEMOIZE
            need(1)
            if code == 0x94:
                index = len(memo)
            elif code == 0x70:
                if len(arg) > 20:
                    index = MAX_INT64
                else:
                    try:
                        index = int(arg)
                    except ValueError:
                        raise corrupt(f"PUT index {_short(arg)}") from None
            else:
                index = int.from_bytes(arg, "little")
            if index < 0:
                raise corrupt(f"negative memo index {index}")
            if index == len(memo):
                memo.append(stack[-1])
            elif index < len(memo):
                memo[index] = stack[-1]
            else:
                raise AmplificationError(
                    f"{name} at byte {at} stores memo index {_num(index)}, but the memo holds {len(memo)} "
                    "entries: picklers number them in order, and the C unpickler would allocate a slot for "
                    "every index up to it", path=path)
        elif code in (0x68, 0x6a, 0x67):  # BINGET, LONG_BINGET, GET
            try:
                index = int(arg) if code == 0x67 else int.from_bytes(arg, "little")
            except ValueError:
                raise corrupt(f"GET index {_short(arg)}") from None
            if not 0 <= index < len(memo):
                raise corrupt(f"memo index {_num(index)} was never stored ({len(memo)} are)")
            stack.append(memo[index])
        elif code == 0x28:  # MARK
            marks.append(len(stack))
        elif code in _SCALAR_PUSH:
            stack.append(_SCALAR_PUSH[code])
        elif code in (0x49, 0x4c):  # INT, LONG (text)
            stack.append(_text_int_kind(arg))
        elif code in _EMPTY_PUSH:
            stack.append([_EMPTY_PUSH[code], 0])
        elif code in (0x74, 0x6c):  # TUPLE, LIST: everything above the mark
            top = pop_mark()
            n_items = len(stack) - top
            del stack[top:]
            stack.append((_TUPLE, n_items) if code == 0x74 else [_LIST, n_items])
        elif code in (0x85, 0x86, 0x87, 0x29):  # TUPLE1, TUPLE2, TUPLE3, EMPTY_TUPLE
            n_items = code - 0x84 if code != 0x29 else 0
            need(n_items)
            del stack[len(stack) - n_items:]
            stack.append(_SMALL_TUPLES[n_items])
        elif code in (0x52, 0x81):  # REDUCE (callable, args), NEWOBJ (cls, args)
            need(2)
            call_args(stack[-1], "arguments")
            del stack[-2:]
            stack.append([_CALLED, 0])
        elif code == 0x92:  # NEWOBJ_EX (cls, args, kwargs)
            need(3)
            call_args(stack[-2], "arguments")
            del stack[-3:]
            stack.append([_CALLED, 0])
        elif code in (0x73, 0x75, 0x64):  # SETITEM, SETITEMS, DICT
            top = len(stack) - 2 if code == 0x73 else pop_mark()
            if code != 0x64 and not 0 < top <= len(stack):  # SETITEM(S) fill the container below
                raise corrupt("stack underflow")
            if (len(stack) - top) % 2:
                raise corrupt("odd number of items")
            check_keys(stack[top::2], "dict key")
            n_items = (len(stack) - top) // 2
            del stack[top:]
            if code == 0x64:
                stack.append([_DICT, n_items])
            elif type(stack[-1]) is list:
                stack[-1][1] += n_items
        elif code in (0x61, 0x65):  # APPEND, APPENDS
            top = len(stack) - 1 if code == 0x61 else pop_mark()
            if not 0 < top <= len(stack):
                raise corrupt("stack underflow")
            n_items = len(stack) - top
            del stack[top:]
            if type(stack[-1]) is list:
                stack[-1][1] += n_items
        elif code in (0x8f, 0x90, 0x91):  # EMPTY_SET, ADDITEMS, FROZENSET
            # A set costs 216 bytes of memory per byte of pickle, and hashes its items like dict keys.
            # Below protocol 4 pickle writes one as a call of builtins.set, which find_class refuses:
            # refused here too, whatever the protocol.
            raise UnsafePickleError(f"data.pkl builds a set ({name} at byte {at}); a weights-only checkpoint "
                                    "holds none (at torch.save's protocol 2 a set is a builtins.set call, "
                                    "refused as well)", path=path)
        elif code == 0x51 or code == 0x98:  # BINPERSID, READONLY_BUFFER
            need(1)
            stack[-1] = _OBJ
        elif code == 0x62:  # BUILD: state, applied to the object below it
            need(2)
            state = stack.pop()
            kind = state if type(state) is int else state[0]
            if kind != _ATOM and (kind != _DICT or state[1] > MAX_BUILD_STATE_ITEMS):
                what = f"a dict of {state[1]} items" if kind == _DICT else f"a {_KIND_NAMES[kind]}"
                raise AmplificationError(
                    f"BUILD at byte {at} applies {what} as state; at most a dict of {MAX_BUILD_STATE_ITEMS} "
                    "items is read (a memoized state is copied by every BUILD that names it)", path=path)
        elif code == 0x93:  # STACK_GLOBAL
            need(2)
            del stack[-2:]
            stack.append(_OBJ)
        elif code in (0x69, 0x6f):  # INST (args above the mark), OBJ (cls and args above the mark)
            top = pop_mark()
            if code == 0x6f and len(stack) - top < 1:
                raise corrupt("stack underflow")
            del stack[top:]
            stack.append([_CALLED, 0])
        elif code == 0x30:  # POP: a mark on top of the stack goes first
            if marks and marks[-1] == len(stack):
                marks.pop()
            else:
                need(1)
                stack.pop()
        elif code == 0x31:  # POP_MARK
            del stack[pop_mark():]
        elif code == 0x32:  # DUP
            need(1)
            stack.append(stack[-1])
        elif code == 0x95:  # FRAME: the next `length` bytes come as one read
            length = int.from_bytes(arg, "little")
            if length > end - pos:
                raise AmplificationError(f"FRAME at byte {at} claims {_num(length)} bytes, but only "
                                         f"{end - pos} remain in data.pkl", path=path)
        elif code == 0x2e:  # STOP: the unpickler reads no further
            return
        # PROTO changes nothing here.


# ---------------------------------------------------------------- the archive

def _check_members(archive: zipfile.ZipFile, path: str) -> dict[str, zipfile.ZipInfo]:
    """Members by name, once each refused unless every reader of zips would read it the same way."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        if "\0" in info.orig_filename:
            raise CorruptCheckpointError(
                f"member name {_short(info.orig_filename)} holds a NUL byte: Python's zipfile reads it as "
                f"{name!r}, torch as the whole name", path=path)
        if name in members:
            raise CorruptCheckpointError(
                f"member {name!r} appears twice in the zip: torch.load reads one copy and Python's zipfile "
                "the other, so the file holds two models", path=path)
        if info.flag_bits & 0x1:
            raise CorruptCheckpointError(f"member {name!r} is encrypted", path=path)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(
                f"member {name!r} is compressed (zip method {info.compress_type}): torch.save stores every "
                "member, and inflating one costs memory the file's size does not bound (a zip bomb)",
                path=path)
        if info.compress_size != info.file_size:
            raise CorruptCheckpointError(
                f"stored member {name!r} has {info.compress_size} bytes in the zip but a size of "
                f"{info.file_size}", path=path)
        members[name] = info
    return members


def _member_data_offset(raw: io.BufferedReader, info: zipfile.ZipInfo, path: str) -> int:
    # The central directory's extra field can differ from the local one (torch
    # pads the local extra field to align data), so read the local header.
    if not 0 <= info.header_offset <= os.fstat(raw.fileno()).st_size - 30:
        raise CorruptCheckpointError(f"member {info.filename!r} starts at {info.header_offset}, outside the "
                                     "file", path=path)
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != ZIP_MAGIC:
        raise CorruptCheckpointError(f"bad local header for member {info.filename!r} at "
                                     f"{info.header_offset}", path=path)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    # A reader that walks local headers (a streaming unzip) must find the same name here.
    local_name = raw.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
    if local_name != info.orig_filename:
        raise CorruptCheckpointError(f"member {info.filename!r}: its local header names {_short(local_name)}",
                                     path=path)
    return info.header_offset + 30 + name_len + extra_len


# What the zipfile module raises on a damaged member: bad headers, offsets, CRCs, compression.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
               RuntimeError, zlib.error)


def _read_member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    # Stored (checked by _check_members): reads at most the member's bytes in the file.
    try:
        return archive.read(name)
    except _ZIP_ERRORS as e:
        raise CorruptCheckpointError(f"member {name!r} cannot be read: {type(e).__name__}: {e}",
                                     path=path) from None


def _unpickle(pickled: bytes, path: str) -> Any:
    _scan_pickle(pickled, path)
    try:
        return _WeightsUnpickler(pickled, path).load()
    except SparsemapError as e:
        if e.path is None:  # raised by a rebuild function, which does not know the file
            raise type(e)(e.detail, path=path, tensor=e.tensor) from None
        raise
    except Exception as e:  # any malformed pickle stream, BUILD refused included
        raise CorruptCheckpointError(f"data.pkl is not a valid pickle: {type(e).__name__}: {e}",
                                     path=path) from None


def open_torch_zip(path: str, stamp: FileStamp) -> Catalog:
    """Index a torch zip checkpoint's tensors without reading their data or running pickle code.

    ``stamp`` is the file's version when opened (recorded in the catalog).
    """
    with open_regular(path) as raw:
        magic = raw.read(4)
        if magic.startswith(PICKLE_PROTOS):
            raise LegacyPickleError(f"a legacy (pre-1.6, non-zip) torch pickle; {LEGACY_HINT}", path=path)
        if magic != ZIP_MAGIC:
            raise CorruptCheckpointError("not a zip archive", path=path)
        raw.seek(0, io.SEEK_END)
        file_nbytes = raw.tell()
        try:
            archive = zipfile.ZipFile(raw)
        except _ZIP_ERRORS as e:
            raise CorruptCheckpointError(f"not a readable zip archive: {e}", path=path) from None
        with archive:
            members = _check_members(archive, path)
            pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CorruptCheckpointError(
                    f"expected one <root>/data.pkl, found {len(pickles)} "
                    "(is this a torch.save checkpoint?)", path=path)
            root = pickles[0][: -len("data.pkl")]
            order = members.get(root + "byteorder")
            byteorder = _read_member(archive, order.filename, path).strip() if order is not None else b""
            if byteorder not in (b"little", b""):
                raise CorruptCheckpointError(
                    f"big-endian checkpoint ({_short(byteorder)}); only little-endian is supported",
                    path=path)
            pickled = _read_member(archive, pickles[0], path)
            records = _flatten(_unpickle(pickled, path), len(pickled), path)
            entries: dict[str, TensorEntry] = {}
            storages: dict[str, tuple[int, int]] = {}  # key -> (absolute data offset, nbytes)
            for name, rec in records.items():
                st = rec.storage
                if st.key not in storages:
                    member = members.get(f"{root}data/{st.key}")
                    if member is None:
                        raise CorruptCheckpointError(
                            f"storage {_short(st.key)} has no member {_short(f'{root}data/{st.key}')}",
                            path=path, tensor=name)
                    start = _member_data_offset(raw, member, path)
                    if start + member.file_size > file_nbytes:
                        raise CorruptCheckpointError(
                            f"storage {_short(st.key)} runs to byte {start + member.file_size}, past the end "
                            f"of the file ({file_nbytes} bytes)", path=path, tensor=name)
                    storages[st.key] = (start, member.file_size)
                entries[name] = _entry(name, rec, storages[st.key], path)
            _check_disjoint(storages, path)
    return Catalog(source=path, format="torch-zip", entries=entries, stamps={path: stamp})


def _check_disjoint(storages: dict[str, tuple[int, int]], path: str) -> None:
    """Refuse storages whose members share bytes (a member's data holding the next member): torch.load
    reads them as independent storages, sparsemap would map one set of bytes under two tensors, and a
    converter would write them N times over."""
    spans = sorted((start, start + nbytes, key) for key, (start, nbytes) in storages.items() if nbytes)
    for (_, a_end, a_key), (b_start, _, b_key) in itertools.pairwise(spans):
        if b_start < a_end:
            raise CorruptCheckpointError(
                f"storages {_short(a_key)} and {_short(b_key)} share the bytes [{b_start}, {a_end}) of the "
                "file: the archive's members overlap", path=path)


# ---------------------------------------------------------------- names and views

def _clip(text: str, limit: int = 100) -> str:
    """A name from the file for a message: cut short, surrogates escaped (a message must print)."""
    clipped = text[:limit].encode("utf-8", "backslashreplace").decode()
    return clipped + ("..." if len(text) > limit else "")


def _num(value: int) -> str:
    """An int for a message; one of thousands of digits is described (its repr raises ValueError)."""
    if value.bit_length() <= 128:
        return str(value)
    return f"<a {value.bit_length()}-bit {'negative ' if value < 0 else ''}int>"


def _dims(values: tuple[int, ...]) -> str:
    """A shape or strides for a message (at most MAX_DIMS ints, each possibly huge)."""
    return f"[{', '.join(_num(v) for v in values)}]"


def _bounded_repr(value: Any, depth: int) -> str:
    if type(value) is int:
        return _num(value)
    if isinstance(value, str | bytes):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if value is None or isinstance(value, bool | float | int):
        return repr(value)
    if isinstance(value, tuple | list | dict):
        left, right = "()" if isinstance(value, tuple) else "[]" if isinstance(value, list) else "{}"
        if depth <= 0:
            return f"{left}...{right}" if value else left + right
        if isinstance(value, dict):
            parts = [f"{_bounded_repr(k, depth - 1)}: {_bounded_repr(v, depth - 1)}"
                     for k, v in itertools.islice(value.items(), 4)]
        else:
            parts = [_bounded_repr(v, depth - 1) for v in itertools.islice(value, 4)]
        if len(value) > 4:
            parts.append("...")
        return left + ", ".join(parts) + ("," if isinstance(value, tuple) and len(value) == 1 else "") + right
    return f"<{type(value).__name__.lstrip('_')}>"


def _short(value: Any, limit: int = 120) -> str:
    """A repr for messages that is safe on anything a pickle builds: containers nested 100,000 deep or
    inside themselves, ints of thousands of digits."""
    text = _bounded_repr(value, 3)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(obj: Any, pickle_nbytes: int, path: str) -> dict[str, _TensorRecord]:
    """Tensor records of nested dicts under dotted names; other leaves are skipped.

    Checkpoints are usually a flat state dict; training checkpoints nest it
    (``{"model": {...}, "epoch": 3}``), which becomes ``model.<name>``. A walk
    with an explicit stack, within the limits of the module docstring: dicts
    can nest 100,000 deep, contain themselves, or share one dict under many
    keys at every level (2**40 names from 40 levels).
    """
    if isinstance(obj, _TensorRecord):
        return {"": obj}  # torch.save(tensor)
    records: dict[str, _TensorRecord] = {}
    if not isinstance(obj, dict):
        return records
    entries_left = MAX_ENTRIES_PER_BYTE * pickle_nbytes
    chars_left = MAX_NAME_CHARS_PER_BYTE * pickle_nbytes
    walk = [("", iter(obj.items()))]  # (dotted name of the dict, its items not yet visited)
    on_path = [id(obj)]  # the dicts being walked, outermost first (they stay alive: obj holds them)
    while walk:
        prefix, items = walk[-1]
        item = next(items, None)
        if item is None:
            walk.pop()
            on_path.pop()
            continue
        entries_left -= 1
        if entries_left < 0:
            raise AmplificationError(
                f"data.pkl ({pickle_nbytes} bytes) holds dicts of more than "
                f"{MAX_ENTRIES_PER_BYTE * pickle_nbytes} entries in all ({MAX_ENTRIES_PER_BYTE} per byte): "
                "dicts shared under many keys", path=path)
        key, value = item
        is_tensor = isinstance(value, _TensorRecord)
        if not isinstance(key, str) or not (is_tensor or isinstance(value, dict)):
            continue
        name = f"{prefix}.{key}" if prefix else key
        if not key.isascii():  # the prefix is checked already; ASCII needs no check
            check_name(name, path, "name")
        chars_left -= len(name)
        if chars_left < 0:
            raise AmplificationError(
                f"data.pkl ({pickle_nbytes} bytes) spells more than "
                f"{MAX_NAME_CHARS_PER_BYTE * pickle_nbytes} characters of names "
                f"({MAX_NAME_CHARS_PER_BYTE} per byte): dicts shared under many keys", path=path)
        if is_tensor:
            if name in records:
                raise DuplicateTensorError("name appears twice after flattening nested dicts",
                                           path=path, tensor=name)
            records[name] = value
        elif id(value) in on_path:  # at most MAX_NESTING ids to compare
            raise NestingError(f"dict {_short(name)} contains itself (a cycle in data.pkl)", path=path)
        elif len(walk) >= MAX_NESTING:
            raise NestingError(f"dicts nest deeper than {MAX_NESTING} levels (at {_short(name)})", path=path)
        else:
            walk.append((name, iter(value.items())))
            on_path.append(id(value))
    return records


def _entry(name: str, rec: _TensorRecord, storage: tuple[int, int], path: str) -> TensorEntry:
    start, member_nbytes = storage
    st = rec.storage
    if rec.dtype not in ITEMSIZE:
        raise UnknownDtypeError(f"unknown dtype {rec.dtype!r}", path=path, tensor=name)
    size = ITEMSIZE[rec.dtype]
    if st.nbytes > member_nbytes:
        raise StorageBoundsError(f"storage {_short(st.key)} claims {st.numel} elements of {st.dtype} "
                                 f"({st.nbytes} bytes) but its member holds {member_nbytes}",
                                 path=path, tensor=name)
    numel_in_storage = st.nbytes // size
    values = (*rec.shape, *rec.strides, rec.storage_offset)  # at most 2 * MAX_DIMS + 1 (_view_args)
    if min(values) < 0:
        raise InvalidShapeError(f"negative size {_dims(rec.shape)}, stride {_dims(rec.strides)} or storage "
                                f"offset {_num(rec.storage_offset)}", path=path, tensor=name)
    # Bytes the shape needs once filled, empty dimensions counted as 1: torch multiplies these (for
    # strides and sizes, in int64) even for an empty tensor, and overflows past 2**63.
    if math.prod([d or 1 for d in rec.shape]) * size > MAX_INT64:
        raise SizeOverflowError(
            f"shape {_dims(rec.shape)} of {rec.dtype} needs more than 2**63 - 1 bytes with its empty "
            "dimensions counted as 1 (torch's int64 strides cannot hold it)", path=path, tensor=name)
    if max(values) > MAX_INT64:
        raise InvalidShapeError(f"stride {_dims(rec.strides)} or storage offset {_num(rec.storage_offset)} "
                                "does not fit int64, torch's index type", path=path, tensor=name)
    numel = math.prod(rec.shape)
    contiguous = contiguous_strides(rec.shape)
    same_layout = _same_layout(rec.shape, rec.strides, contiguous)
    if numel == 0:
        span = 0
    else:
        # Index of the last element the view can touch; it must lie in the storage.
        last = rec.storage_offset + sum((d - 1) * s for d, s in zip(rec.shape, rec.strides, strict=True))
        if last >= numel_in_storage:
            raise StorageBoundsError(
                f"view (offset {rec.storage_offset}, shape {rec.shape}, stride {rec.strides}) reaches "
                f"element {last} of a storage of {numel_in_storage} {rec.dtype} elements", path=path,
                tensor=name)
        span = (last - rec.storage_offset + 1) * size
        if not same_layout:  # a row-major contiguous view repeats nothing
            _check_no_repeats(rec.shape, rec.strides, size, span, name, path)
    strides = None if numel <= 1 or same_layout else rec.strides
    return TensorEntry(name=name, file=path, offset=start + rec.storage_offset * size,
                       nbytes=span if strides is not None else numel * size,
                       dtype=rec.dtype, shape=rec.shape, strides=strides)


def _check_no_repeats(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, span: int, name: str,
                      path: str) -> None:
    """Refuse a view that reads one stored element at two indexes, so that a tensor never holds more bytes
    than its storage stores: (10**9,) with stride (0,) is 4 GB from one float (the rule of
    :func:`~sparsemap.formats.catalog.repeated_stride`, the layout views' too)."""
    repeat = repeated_stride(shape, strides)
    if repeat is not None:
        raise AmplificationError(
            f"view of shape {list(shape)} with strides {list(strides)} repeats elements (a stride of "
            f"{repeat[0]} inside a span of {repeat[1]} elements): {math.prod(shape) * itemsize} bytes read "
            f"from {span} stored. torch.save keeps .expand()-ed and overlapping views so; save "
            "t.contiguous() instead",
            path=path, tensor=name)


def _same_layout(shape: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    # Strides of size-1 dims never matter.
    return all(d == 1 or x == y for d, x, y in zip(shape, a, b, strict=True))
