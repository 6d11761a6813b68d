"""sparsemap.formats.layout: the layout metadata of converted files, validated before anything is mapped.

Each malformed document is written by hand into an otherwise valid
safetensors file and must fail with :class:`LayoutError`, its message naming
the file, the view and the numbers involved. The typed records
(:class:`LayoutDocument`, :class:`LayoutView`) round-trip through JSON, and a
document as sparsemap has always written it parses and is written back byte
for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors
from sparsemap.formats.dtypes import ITEMSIZE
from sparsemap.formats.layout import LAYOUT_KEY, PAD_PREFIX, SUFFIXES, LayoutDocument, LayoutView

from ..helpers import raises

STORED = "emb@rows"  # (4, 8) float32: 32 elements


def layout_file(tmp_path: Path, layout: object, *, raw: str | None = None,
                extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A safetensors file holding ``emb@rows`` (4, 8) F32 and ``bias`` (8,), with ``layout`` as metadata."""
    tensors = {STORED: torch.arange(32, dtype=torch.float32).view(4, 8), "bias": torch.ones(8)}
    tensors.update(extra or {})
    path = tmp_path / "laid-out.safetensors"
    text = raw if raw is not None else json.dumps(layout)
    save_file(tensors, str(path), metadata={"format": "pt", LAYOUT_KEY: text})
    return path


def doc(**views: object) -> dict[str, object]:
    return {"version": 1, "align": 4096, "views": views}


def view(stored: str = STORED, kind: str = "rows", offset: object = 0, shape: object = (4, 6),
         strides: object = (8, 1)) -> dict[str, object]:
    return {"stored": stored, "kind": kind, "offset": offset,
            "shape": list(shape) if isinstance(shape, tuple) else shape,
            "strides": list(strides) if isinstance(strides, tuple) else strides}


# ---------------------------------------------------------------- valid documents

def test_a_valid_view_is_served_and_its_stored_tensor_hidden(tmp_path: Path) -> None:
    path = layout_file(tmp_path, doc(emb=view()), extra={f"{PAD_PREFIX}0": torch.zeros(8, dtype=torch.uint8)})
    cat = sparsemap.open(path)
    assert set(cat) == {"emb", "bias"}  # stored name and padding hidden
    want = torch.arange(32, dtype=torch.float32).view(4, 8)[:, :6]
    assert torch.equal(sparsemap.Checkpoint(cat).tensor("emb"), want)
    assert cat["emb"].strides == (8, 1)


def test_a_view_reaching_exactly_the_last_element_is_allowed(tmp_path: Path) -> None:
    # offset 2 + (4-1)*8 + (6-1)*1 = 31, the last of 32 elements.
    path = layout_file(tmp_path, doc(emb=view(offset=2)))
    got = sparsemap.Checkpoint(path).tensor("emb")
    assert torch.equal(got, torch.arange(32, dtype=torch.float32).view(4, 8)[:, 2:])


def test_transposed_and_alias_views(tmp_path: Path) -> None:
    path = layout_file(tmp_path, doc(embT=view(kind="transpose", shape=(8, 4), strides=(1, 8)),
                                     bias2=view(stored="bias", kind="alias", shape=(8,), strides=(1,))))
    ckpt = sparsemap.Checkpoint(path)
    assert set(ckpt) == {"embT", "bias", "bias2"}  # an alias's stored tensor stays a tensor of its own
    assert torch.equal(ckpt.tensor("embT"), torch.arange(32, dtype=torch.float32).view(4, 8).t())
    assert torch.equal(ckpt.tensor("bias2"), torch.ones(8))


def test_an_empty_view_inside_its_stored_tensor_opens(tmp_path: Path) -> None:
    path = layout_file(tmp_path, doc(e=view(offset=8, shape=(0, 6))))
    assert sparsemap.Checkpoint(path).tensor("e").shape == (0, 6)


@pytest.mark.parametrize("offset, shape", [(1000, (0, 6)), (0, (0, 2**62)), (0, (2**12, 0, 2**13))])
def test_an_empty_view_must_still_fit_its_stored_tensor(tmp_path: Path, offset: int, shape: tuple) -> None:
    strides = [2**13, 2**13, 1][-len(shape):]
    path = layout_file(tmp_path, doc(e=view(offset=offset, shape=shape, strides=strides)))
    with pytest.raises(errors.LayoutError, match="is wider than its stored tensor"):
        sparsemap.open(path)


def test_without_layout_metadata_padding_names_are_ordinary(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({f"{PAD_PREFIX}0": torch.zeros(4, dtype=torch.uint8), "a": torch.ones(2)}, str(path))
    assert set(sparsemap.open(path)) == {f"{PAD_PREFIX}0", "a"}


# ---------------------------------------------------------------- the document itself

@pytest.mark.parametrize("text", ["{not json", "", "[1, 2", '{"version": 1, "views": {"a": }}'])
def test_not_json(tmp_path: Path, text: str) -> None:
    raises(errors.LayoutError, layout_file(tmp_path, None, raw=text), LAYOUT_KEY, "is not JSON")


@pytest.mark.parametrize("document", [{"version": 2, "views": {}}, {"views": {}}, {"version": "1"},
                                      [1], "text", 1, None])
def test_wrong_version_or_not_an_object(tmp_path: Path, document: object) -> None:
    raises(errors.LayoutError, layout_file(tmp_path, document), "must be an object with version 1")


@pytest.mark.parametrize("views", [[], "emb", 3, None])
def test_views_not_an_object(tmp_path: Path, views: object) -> None:
    path = layout_file(tmp_path, {"version": 1, "views": views})
    raises(errors.LayoutError, path, f"{LAYOUT_KEY}.views must be an object")


# ---------------------------------------------------------------- one view

@pytest.mark.parametrize("bad", [
    {k: v for k, v in view().items() if k != "strides"},            # a field missing
    {k: v for k, v in view().items() if k != "stored"},
    {k: v for k, v in view().items() if k != "offset"},
    view(offset=-1),                                                # negative offset
    view(offset=1.0),                                               # not an integer
    view(offset=True),                                              # bool is not an integer here
    view(offset="0"),
    view(shape=(4, 6, 1), strides=(8, 1)),                          # shape and strides lengths differ
    view(shape=(4,), strides=(8, 1)),
    view(shape=(4, -6)),                                            # negative dimension
    view(strides=(8, -1)),                                          # negative stride
    view(shape="4x6"),
    view(kind="zigzag"),                                            # unknown kind
    view(stored=7),
    "not a view",
], ids=["no-strides", "no-stored", "no-offset", "negative-offset", "float-offset", "bool-offset",
        "string-offset", "longer-shape", "longer-strides", "negative-dim", "negative-stride", "string-shape",
        "unknown-kind", "stored-not-a-name", "not-an-object"])
def test_malformed_view(tmp_path: Path, bad: object) -> None:
    path = layout_file(tmp_path, doc(emb=bad))
    raises(errors.LayoutError, path, "'emb'", "view must be {stored, kind, offset, shape, strides}")


def test_view_of_a_missing_stored_tensor(tmp_path: Path) -> None:
    path = layout_file(tmp_path, doc(emb=view(stored="ghost@rows")))
    raises(errors.LayoutError, path, "'emb'", "'ghost@rows'", "which the file lacks")


@pytest.mark.parametrize(("bad", "last"), [
    (view(offset=3), 32),                                # one element past the end
    (view(shape=(5, 6)), 37),                            # one row too many
    (view(shape=(4, 8), strides=(9, 1)), 34),            # a stride too long
    (view(offset=40, shape=(1, 1)), 40),                 # starts outside
    (view(kind="transpose", shape=(8, 5), strides=(1, 8)), 39),
])
def test_view_reaching_outside_its_stored_tensor(tmp_path: Path, bad: dict[str, object], last: int) -> None:
    path = layout_file(tmp_path, doc(emb=bad))
    raises(errors.LayoutError, path, "'emb'", f"reaches element {last} of '{STORED}', which has 32")


def test_view_name_colliding_with_a_plain_tensor(tmp_path: Path) -> None:
    path = layout_file(tmp_path, doc(bias=view()))
    raises(errors.LayoutError, path, "'bias'", "collides with a stored tensor")


def test_errors_are_found_before_anything_is_mapped(tmp_path: Path) -> None:
    # Validation is parsing: it needs no torch, and fails on the document alone.
    with pytest.raises(errors.LayoutError, match="views must be an object"):
        LayoutDocument.parse(json.dumps({"version": 1, "views": []}), "somewhere.safetensors")
    assert LayoutDocument.parse(json.dumps(doc(emb=view())), "x").views["emb"].offset == 0


@pytest.mark.parametrize(("field", "value", "what"), [
    ("align", 0, "a positive integer or null"),
    ("align", "4096", "a positive integer or null"),
    ("align", True, "a positive integer or null"),
    ("page", -4096, "a positive integer or null"),
    ("dtype", "float32", "a safetensors dtype name or null"),
    ("dtype", 7, "a safetensors dtype name or null"),
    ("pad_rows", "emb", "a list of strings"),
    ("transpose", [1], "a list of strings"),
    ("reorder", {"emb": [1, 2]}, "a list of strings"),
    ("bundle_ffn", 1, "true or false"),
])
def test_malformed_document_field(tmp_path: Path, field: str, value: object, what: str) -> None:
    path = layout_file(tmp_path, {**doc(emb=view()), field: value})
    raises(errors.LayoutError, path, f"{LAYOUT_KEY}.{field} must be {what}")


# ---------------------------------------------------------------- the typed records

# A document exactly as sparsemap's writer has written it since version 1 (align 64, a BF16 cast, a
# reordered bundle, padded rows shared by a tie, a transposed tensor): files holding it must keep opening.
WRITTEN = ('{"version":1,"align":64,"page":64,"dtype":"BF16","pad_rows":["emb"],"transpose":["w"],'
           '"bundle_ffn":true,"reorder":["x.mlp.down_proj.weight"],"views":{'
           '"x.mlp.gate_proj.weight":{"stored":"x.mlp@bundle","kind":"bundle","offset":0,"shape":[4,2],'
           '"strides":[8,1],"order":[3,1,2,0],"order_dim":0},'
           '"x.mlp.up_proj.weight":{"stored":"x.mlp@bundle","kind":"bundle","offset":2,"shape":[4,2],'
           '"strides":[8,1],"order":[3,1,2,0],"order_dim":0},'
           '"x.mlp.down_proj.weight":{"stored":"x.mlp@bundle","kind":"bundle","offset":4,"shape":[2,4],'
           '"strides":[1,8],"order":[3,1,2,0],"order_dim":1},'
           '"emb":{"stored":"emb@rows","kind":"rows","offset":0,"shape":[6,3],"strides":[4,1]},'
           '"head":{"stored":"emb@rows","kind":"rows","offset":0,"shape":[6,3],"strides":[4,1]},'
           '"w":{"stored":"w@T","kind":"transpose","offset":0,"shape":[2,5],"strides":[1,2]}}}')


def test_a_written_document_parses_to_typed_records_and_back_byte_for_byte() -> None:
    parsed = LayoutDocument.parse(WRITTEN, "old.safetensors")
    order = (3, 1, 2, 0)
    assert parsed == LayoutDocument(
        align=64, page=64, dtype="BF16", pad_rows=("emb",), transpose=("w",), bundle_ffn=True,
        reorder=("x.mlp.down_proj.weight",), views={
            "x.mlp.gate_proj.weight": LayoutView("x.mlp@bundle", "bundle", 0, (4, 2), (8, 1), order, 0),
            "x.mlp.up_proj.weight": LayoutView("x.mlp@bundle", "bundle", 2, (4, 2), (8, 1), order, 0),
            "x.mlp.down_proj.weight": LayoutView("x.mlp@bundle", "bundle", 4, (2, 4), (1, 8), order, 1),
            "emb": LayoutView("emb@rows", "rows", 0, (6, 3), (4, 1)),
            "head": LayoutView("emb@rows", "rows", 0, (6, 3), (4, 1)),
            "w": LayoutView("w@T", "transpose", 0, (2, 5), (1, 2)),
        })
    assert parsed.to_json() == WRITTEN


def test_a_minimal_document_takes_defaults() -> None:
    parsed = LayoutDocument.parse('{"version":1}', "x")
    assert parsed == LayoutDocument()
    assert parsed.views == {} and parsed.align is None and parsed.dtype is None and parsed.bundle_ffn is False


def test_a_view_without_order_writes_no_order_fields() -> None:
    v = LayoutView("a@rows", "rows", 0, (2, 3), (4, 1))
    assert v.to_json() == {"stored": "a@rows", "kind": "rows", "offset": 0, "shape": [2, 3],
                           "strides": [4, 1]}
    assert LayoutView.from_json("a", v.to_json(), "x") == v
    # order_dim without an order means nothing: it is dropped, not kept.
    assert LayoutView.from_json("a", {**v.to_json(), "order_dim": 1}, "x") == v


@pytest.mark.parametrize(("bad", "needle"), [
    ({"order": [0, 0]}, "permutation"),
    ({"order": [1, 0], "order_dim": -1}, "permutation"),
    ({"order": [1, 0], "order_dim": True}, "permutation"),
    ({"order": [2, 1, 0]}, "row order has 3 entries for dimension 0 of shape [2, 3]"),
    ({"order": [1, 0], "order_dim": 2}, "row order has 2 entries for dimension 2 of shape [2, 3]"),
    ({"strides": [2, 1]}, "overlap"),
])
def test_from_json_checks_a_view_on_its_own(bad: dict[str, object], needle: str) -> None:
    obj = {**LayoutView("a@rows", "rows", 0, (2, 3), (4, 1)).to_json(), **bad}
    with pytest.raises(errors.LayoutError, match="'a'") as info:
        LayoutView.from_json("a", obj, "file.safetensors")
    assert needle in str(info.value) and "file.safetensors" in str(info.value)


@st.composite
def views(draw: st.DrawFn) -> LayoutView:
    """Any well-formed view: 0-size and unit dimensions, non-overlapping strides, maybe an order."""
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    strides, extent = [], 1
    for d in reversed(shape):  # each stride reaches past what the inner dimensions span
        stride = extent + draw(st.integers(0, 3))
        strides.append(stride)
        extent = stride * max(d, 1)
    order, order_dim = None, 0
    if shape and draw(st.booleans()):
        order_dim = draw(st.integers(0, len(shape) - 1))
        order = tuple(draw(st.permutations(range(shape[order_dim]))))
    return LayoutView(draw(st.text(min_size=1, max_size=8)), draw(st.sampled_from(sorted(SUFFIXES))),
                      draw(st.integers(0, 2**40)), shape, tuple(reversed(strides)), order, order_dim)


@st.composite
def documents(draw: st.DrawFn) -> LayoutDocument:
    names = st.lists(st.text(max_size=6), max_size=3).map(tuple)
    return LayoutDocument(
        align=draw(st.none() | st.integers(0, 21).map(lambda k: 1 << k)),
        page=draw(st.none() | st.integers(0, 16).map(lambda k: 1 << k)),
        dtype=draw(st.none() | st.sampled_from(sorted(ITEMSIZE))),
        pad_rows=draw(names), transpose=draw(names), bundle_ffn=draw(st.booleans()), reorder=draw(names),
        views=draw(st.dictionaries(st.text(max_size=10), views(), max_size=4)))


@settings(max_examples=200, deadline=None)
@given(documents())
def test_any_document_round_trips_through_json(document: LayoutDocument) -> None:
    text = document.to_json()
    assert LayoutDocument.parse(text, "x") == document
    assert LayoutDocument.parse(text, "x").to_json() == text
