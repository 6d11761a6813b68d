"""sparsemap.formats.catalog: a frozen, torch-free description of a checkpoint."""

from __future__ import annotations

import pickle

import pytest

from sparsemap.formats.catalog import Catalog, FileStamp, TensorEntry


def catalog() -> Catalog:
    a = TensorEntry("a", "/m.safetensors", 4096, 64, "F32", (4, 4))
    tied = a._replace(name="tied")  # same bytes, same view: a tie
    b = TensorEntry("b", "/m.safetensors", 4160, 16, "BF16", (2, 4))
    q = TensorEntry("q", "/n.gguf", 64, 18, "F32", (32,), encoding="Q4_0")
    stamp = FileStamp(1, 2, 4176, 3, 4)
    return Catalog("/m.safetensors", "safetensors", {e.name: e for e in (a, tied, b, q)}, {"format": "pt"},
                   {"/m.safetensors": stamp})


def test_a_catalog_is_frozen() -> None:
    cat = catalog()
    with pytest.raises(AttributeError, match="frozen: cannot set 'stamps'"):
        cat.stamps = {}  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del cat.source
    with pytest.raises(TypeError):
        cat["a"] = cat["b"]  # type: ignore[index]
    entry = cat["a"]
    with pytest.raises(AttributeError):
        entry.offset = 0  # type: ignore[misc]
    for inner in (cat.entries, cat.metadata, cat.stamps):  # read-only all the way down
        with pytest.raises(TypeError):
            inner["x"] = None  # type: ignore[index]


def test_a_catalog_copies_what_it_is_given() -> None:
    entries = dict(catalog().entries)
    stamps = {"/m.safetensors": FileStamp(1, 2, 3, 4, 5)}
    cat = Catalog("/m.safetensors", "safetensors", entries, stamps=stamps)
    entries.clear()
    stamps.clear()  # would have turned the file check off
    assert len(cat) == 4 and "/m.safetensors" in cat.stamps


def test_equal_catalogs_hash_alike_and_removed_names_say_where_they_went() -> None:
    assert catalog() == catalog() and hash(catalog()) == hash(catalog()) and len({catalog(), catalog()}) == 1
    other = Catalog("/other.safetensors", "safetensors", dict(catalog().entries))
    assert other != catalog()
    with pytest.raises(AttributeError, match=r"sparsemap.Checkpoint\(catalog\).tensor\(name\)"):
        catalog().tensor("a")  # type: ignore[attr-defined]


def test_lookups_totals_and_files() -> None:
    cat = catalog()
    assert "a" in cat and "missing" not in cat and len(cat) == 4 and list(cat) == ["a", "tied", "b", "q"]
    assert cat.files == ["/m.safetensors", "/n.gguf"]
    assert cat.nbytes == 64 + 16 + 18  # the tie counted once, the quantized tensor at its packed size
    assert cat.required_nbytes() == {"/m.safetensors": 4176, "/n.gguf": 82}
    assert cat.summary()["bytes_by_dtype"] == {"F32": 64, "BF16": 16, "Q4_0->F32": 18}  # the tie once
    assert cat.stored_nbytes == cat.summary()["stored_nbytes"] == 64 + 16 + 18
    assert repr(cat) == "Catalog('/m.safetensors', format='safetensors', tensors=4, nbytes=98)"


def test_a_catalog_pickles_by_value() -> None:
    cat = catalog()
    again = pickle.loads(pickle.dumps(cat))
    assert dict(again) == dict(cat) and again.stamps == cat.stamps and again.metadata == cat.metadata


def test_entries_know_their_alignment_and_whether_a_view_can_serve_them() -> None:
    cat = catalog()
    assert cat["a"].alignment() == 4096 and cat["b"].alignment() == 64
    assert cat["a"].zero_copy and not cat["q"].zero_copy
    assert cat["b"]._replace(offset=4161).zero_copy is False  # odd offset for 2-byte elements: copied
    assert cat["a"].end == 4160 and cat["a"].numel == 16


def test_views_that_share_a_storage_are_stored_once(tmp_path) -> None:
    """torch.save of x, x.t() and a row slice keeps one storage: the file holds 64 bytes of tensors."""
    import torch

    import sparsemap

    x = torch.arange(16.0).view(4, 4)
    torch.save({"x": x, "xt": x.t(), "rows": x[1:3], "again": x}, tmp_path / "shared.pt")
    cat = sparsemap.open(tmp_path / "shared.pt")
    assert cat.stored_nbytes == 64 and cat.summary()["bytes_by_dtype"] == {"F32": 64}
