"""Sharded Hugging Face checkpoints: ``*.index.json`` plus one file per shard.

The index is ``{"metadata": {...}, "weight_map": {tensor name: shard file}}``;
shards are safetensors or torch zip files in the index's folder. The catalog
merges the shards' entries and checks that they agree with the index: every
mapped tensor is in its shard, no tensor is in two shards. No torch here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ..errors import DuplicateTensorError, MissingShardError, ShardIndexError
from .catalog import Catalog, FileStamp, TensorEntry, check_name

# An index is a small JSON file; anything bigger is not an index.
MAX_INDEX_NBYTES = 64 << 20


def read_index(path: str) -> dict[str, str]:
    """Return the index's weight map (tensor name -> shard file name), validated."""
    nbytes = os.path.getsize(path)
    if nbytes > MAX_INDEX_NBYTES:
        raise ShardIndexError(f"index is {nbytes} bytes, over the {MAX_INDEX_NBYTES}-byte cap", path=path)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ShardIndexError(f"index is not UTF-8 JSON: {e}", path=path) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ShardIndexError("index must be an object whose \"weight_map\" maps tensor names to "
                              "shard file names", path=path)
    for name, shard in weight_map.items():
        check_name(name, path)
        check_name(shard, path, f"shard file name of {name!r}")
        # A shard must be a plain file name next to the index: "../x" or an
        # absolute path would let an index read any file on the machine.
        if shard != os.path.basename(shard) or shard in ("", ".", ".."):
            raise ShardIndexError(f"shard {shard!r} is not a file name in the index's folder",
                                  path=path, tensor=name)
    return weight_map


def open_sharded(index_path: str, open_file: Callable[[str], Catalog]) -> Catalog:
    """Open every shard an index names and merge them into one catalog.

    Args:
        index_path: the ``*.index.json`` file.
        open_file: opens one shard (dispatches on its format).
    """
    weight_map = read_index(index_path)
    folder = os.path.dirname(index_path)
    shards = list(dict.fromkeys(weight_map.values()))
    found: dict[str, list[TensorEntry]] = {}
    metadata: dict[str, str] = {}
    formats: set[str] = set()
    stamps: dict[str, FileStamp] = {}
    quantized: dict[str, Any] = {}
    for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):  # a FIFO or device is refused by name when opened
            raise MissingShardError(f"shard {shard!r} named by the index is missing "
                                    f"({len(shards)} shards in all)", path=index_path)
        cat = open_file(shard_path)
        stamps.update(cat.stamps)
        formats.add(cat.format)
        metadata.update(cat.metadata)
        quantized.update(cat.quantized)
        for name, entry in cat.entries.items():
            found.setdefault(name, []).append(entry)
    # Every shard is read before judging, so the error does not depend on shard order.
    entries: dict[str, TensorEntry] = {}
    for name, copies in found.items():
        if len(copies) > 1:
            where = " and ".join(repr(os.path.basename(e.file)) for e in copies)
            raise DuplicateTensorError(f"in {len(copies)} shards: {where}", path=index_path, tensor=name)
        (entry,) = copies
        listed = weight_map.get(name)
        if listed != os.path.basename(entry.file):
            raise ShardIndexError(f"found in shard {os.path.basename(entry.file)!r} but the index maps it "
                                  f"to {listed!r}", path=index_path, tensor=name)
        entries[name] = entry
    missing = [n for n in weight_map if n not in entries]
    if missing:
        raise ShardIndexError(f"{len(missing)} tensors in the index are in no shard, e.g. "
                              f"{missing[0]!r} (index says {weight_map[missing[0]]!r})", path=index_path)
    fmt = "sharded-" + "+".join(sorted(formats))
    return Catalog(source=index_path, format=fmt, entries=entries, metadata=metadata, stamps=stamps,
                   quantized=quantized)


def index_metadata(index_path: str) -> dict[str, Any]:
    """The index's own ``metadata`` object (total_size and the like), or ``{}``."""
    with open(index_path, "rb") as f:
        doc = json.loads(f.read())
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else {}
