"""sparsemap.formats.planner: a plan's header, read back by the real parser, is exactly the plan. No torch.

The property test draws any tensors (0-size and scalar shapes, every dtype,
ties) and any layout (alignments, padded rows, transposes, Llama FFN bundles,
usage profiles), and reads the planned header back through
:func:`sparsemap.formats.safetensors.validate` and
:func:`~sparsemap.formats.layout.apply_layout`, as a reader of the written file
would: the views must be the plan's and the logical tensors the specs'. No
byte of data is written; the writer's round trips are in ``tests/test_writer.py``.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemap.errors import LayoutOptionError, ReservedNameError
from sparsemap.formats import planner
from sparsemap.formats.catalog import TensorEntry
from sparsemap.formats.dtypes import FLOATING, ITEMSIZE
from sparsemap.formats.layout import (
    LAYOUT_KEY,
    PAD_PREFIX,
    LayoutDocument,
    LayoutView,
    apply_layout,
    is_padding,
)
from sparsemap.formats.planner import Layout, Plan, Spec, plan
from sparsemap.formats.reserved import reserved_reason
from sparsemap.formats.safetensors import validate

PATH = "planned.safetensors"
DTYPES = sorted(ITEMSIZE)
LLAMA = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def read_back(the_plan: Plan) -> tuple[list[TensorEntry], list[TensorEntry], dict[str, str]]:
    """``(stored entries, logical entries, metadata)`` of the planned file, as a reader sees it."""
    stored, metadata = validate(the_plan.header, the_plan.file_nbytes, PATH)
    return stored, apply_layout(stored, metadata, PATH), metadata


# ---------------------------------------------------------------- property: any specs, any layout

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._", min_size=1, max_size=12).filter(
    lambda n: reserved_reason(n) is None)  # "__metadata__" fits the alphabet: refused, tested below


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Spec], Layout, dict[str, str]]:
    """Specs and a layout the planner must accept: only 2-D tensors transposed, profiles of right length."""
    specs: list[Spec] = []
    groups = draw(st.lists(st.sampled_from(["model.layers.0.", "model.layers.1.", "h.", ""]), unique=True,
                           max_size=2))
    bundled: set[str] = set()
    for prefix in groups:  # Llama FFNs: one dtype, consistent shapes; sometimes a member missing
        inter, hidden, dtype = draw(st.integers(0, 6)), draw(st.integers(0, 6)), draw(st.sampled_from(DTYPES))
        shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
        members = [Spec(prefix + s, shape, dtype) for s, shape in zip(LLAMA, shapes, strict=True)]
        if draw(st.booleans()):
            members.pop(draw(st.integers(0, 2)))
        else:
            bundled.update(m.name for m in members)
        specs += members
    taken = {s.name for s in specs}
    for name in draw(st.lists(NAMES.filter(lambda n: n not in taken), max_size=8, unique=True)):
        shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))  # () is a scalar
        specs.append(Spec(name, shape, draw(st.sampled_from(DTYPES))))
    # Ties: a second name for some tensor's bytes, both given the same identity.
    tied = draw(st.lists(st.integers(0, len(specs) - 1), max_size=2)) if specs else []
    for k, i in enumerate(tied):
        base = specs[i]
        identity = base.identity if base.identity is not None else ("tie", k)
        specs[i] = Spec(base.name, base.shape, base.dtype, identity)
        specs.append(Spec(f"tied{k}", base.shape, base.dtype, identity))
    specs = draw(st.permutations(specs))

    bundle_ffn = draw(st.booleans())
    bundled = bundled if bundle_ffn else set()
    two_d = [s.name for s in specs if len(s.shape) == 2]
    transpose = draw(st.lists(st.sampled_from(two_d), unique=True)) if two_d else []
    if all(len(s.shape) == 2 for s in specs if s.name.endswith("_proj.weight")) and draw(st.booleans()):
        transpose.append("*_proj.weight")
    names = [s.name for s in specs]
    pad_rows = draw(st.lists(st.sampled_from([*names, "*", "*.weight", "h.*"]), unique=True)) if names else []
    layout_for_rows = Layout(transpose=transpose)

    def n_rows(s: Spec) -> int:
        if s.name in bundled:
            return s.shape[1] if s.name.endswith("down_proj.weight") else s.shape[0]
        return s.shape[1] if planner._matches(s.name, layout_for_rows.transpose) else s.shape[0]

    reorder = {}
    for s in draw(st.lists(st.sampled_from(specs), unique_by=lambda s: s.name)) if specs else []:
        n = n_rows(s) if s.shape else 0  # a scalar's profile is ignored
        reorder[s.name] = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    powers_of_two = st.integers(0, 16).map(lambda k: 1 << k)
    layout = Layout(align=draw(powers_of_two), page=draw(st.none() | powers_of_two),
                    dtype=draw(st.none() | st.sampled_from(DTYPES)), pad_rows=pad_rows, transpose=transpose,
                    bundle_ffn=bundle_ffn, reorder=reorder or None, fillers=draw(st.booleans()))
    keys = st.text(max_size=5).filter(lambda k: k != LAYOUT_KEY)
    metadata = draw(st.dictionaries(keys, st.text(max_size=5), max_size=2))
    return specs, layout, metadata


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_the_parsed_header_is_exactly_the_plan(case: tuple[list[Spec], Layout, dict[str, str]]) -> None:
    specs, layout, metadata = case
    the_plan = plan(specs, layout, metadata)
    stored, logical, meta = read_back(the_plan)

    # The file: data starts aligned, after the header. With fillers every non-empty stored tensor is
    # aligned; without, there is no filler and every tensor of whole pages is.
    assert the_plan.data_start % layout.align == 0 and the_plan.data_start == 8 + len(the_plan.header)
    assert [(e.name, e.offset - the_plan.data_start, e.nbytes) for e in stored] == [
        (r.name, r.offset, r.nbytes) for r in the_plan.records]
    for e in stored:
        aligned = (e.offset - the_plan.data_start) % layout.align == 0
        if layout.fillers or meta["format"] == "sparsemap":
            assert e.nbytes == 0 or is_padding(e.name) or aligned
        else:
            assert not is_padding(e.name)
            assert aligned or e.nbytes == 0 or e.nbytes % layout.align, e
    assert {k: v for k, v in meta.items() if k not in ("format", LAYOUT_KEY)} == metadata
    assert 0 <= the_plan.padding_nbytes <= the_plan.file_nbytes

    # The layout document: exactly the plan's views, and the options it was planned with.
    if LAYOUT_KEY in meta:
        document = LayoutDocument.parse(meta[LAYOUT_KEY], PATH)
        assert document.views == the_plan.views
        assert document == layout.document(the_plan.views)
    else:
        assert the_plan.views == {} and layout.align == 1

    # The logical tensors: the specs' names, shapes and (cast) dtypes, nothing else.
    by_name = {e.name: e for e in logical}
    assert len(by_name) == len(logical)
    assert set(by_name) == {s.name for s in specs}
    base = {e.name: e for e in stored}
    for s in specs:
        e = by_name[s.name]
        assert (e.shape, e.dtype) == (s.shape, layout.output_dtype(s.dtype)), s
        v = the_plan.views.get(s.name)
        if v is None:  # stored plainly under its own name
            assert (e.strides, e.order, e.nbytes) == (None, None, math.prod(s.shape) * ITEMSIZE[e.dtype])
        else:
            assert (e.strides, e.order, e.order_dim) == (v.strides, v.order, v.order_dim)
            assert e.offset == base[v.stored].offset + v.offset * ITEMSIZE[e.dtype]
    # Tied tensors not split up by a bundle read the same bytes.
    bundled = _bundled(specs, layout)
    for s in specs:
        for t in specs:
            if s.identity is not None and s.identity == t.identity and not {s.name, t.name} & bundled:
                assert by_name[s.name].offset == by_name[t.name].offset


def _bundled(specs: list[Spec], layout: Layout) -> set[str]:
    return {p.name for r in plan(specs, layout).records if r.kind == "bundle" for p in r.parts}


# ---------------------------------------------------------------- what sparsemap has always written

# The header sparsemap's writer produced for these tensors and this layout before the planner moved
# here (BF16 cast, a reordered bundle, padded rows shared by a tie, a transposed tensor, align 64), but
# for its format, now "sparsemap": its stored shapes are not the model's.
WRITTEN = (
    b'{"__metadata__":{"format":"sparsemap","sparsemap.layout":"{\\"version\\":1,\\"align\\":64,\\"page\\":64,'
    b'\\"dtype\\":\\"BF16\\",\\"pad_rows\\":[\\"emb\\"],\\"transpose\\":[\\"w\\"],\\"bundle_ffn\\":true,'
    b'\\"reorder\\":[\\"x.mlp.down_proj.weight\\"],\\"views\\":{\\"x.mlp.gate_proj.weight\\":{\\"stored\\":'
    b'\\"x.mlp@bundle\\",\\"kind\\":\\"bundle\\",\\"offset\\":0,\\"shape\\":[4,2],\\"strides\\":[8,1],'
    b'\\"order\\":[3,1,2,0],\\"order_dim\\":0},\\"x.mlp.up_proj.weight\\":{\\"stored\\":\\"x.mlp@bundle\\",'
    b'\\"kind\\":\\"bundle\\",\\"offset\\":2,\\"shape\\":[4,2],\\"strides\\":[8,1],\\"order\\":[3,1,2,0],'
    b'\\"order_dim\\":0},\\"x.mlp.down_proj.weight\\":{\\"stored\\":\\"x.mlp@bundle\\",\\"kind\\":\\"bundle\\",'
    b'\\"offset\\":4,\\"shape\\":[2,4],\\"strides\\":[1,8],\\"order\\":[3,1,2,0],\\"order_dim\\":1},'
    b'\\"emb\\":{\\"stored\\":\\"emb@rows\\",\\"kind\\":\\"rows\\",\\"offset\\":0,\\"shape\\":[6,3],'
    b'\\"strides\\":[4,1]},\\"head\\":{\\"stored\\":\\"emb@rows\\",\\"kind\\":\\"rows\\",\\"offset\\":0,'
    b'\\"shape\\":[6,3],\\"strides\\":[4,1]},\\"w\\":{\\"stored\\":\\"w@T\\",\\"kind\\":\\"transpose\\",'
    b'\\"offset\\":0,\\"shape\\":[2,5],\\"strides\\":[1,2]}}}"},'
    b'"x.mlp@bundle":{"dtype":"BF16","shape":[4,8],"data_offsets":[0,64]},'
    b'"emb@rows":{"dtype":"BF16","shape":[6,4],"data_offsets":[64,112]},'
    b'"__sparsemap_pad__.2":{"dtype":"U8","shape":[16],"data_offsets":[112,128]},'
    b'"w@T":{"dtype":"BF16","shape":[5,2],"data_offsets":[128,148]},'
    b'"__sparsemap_pad__.4":{"dtype":"U8","shape":[44],"data_offsets":[148,192]},'
    b'"b":{"dtype":"I64","shape":[3],"data_offsets":[192,216]}}'
)


def test_the_header_is_byte_for_byte_what_sparsemap_has_always_written() -> None:
    specs = [Spec("emb", (6, 3), "F32", "e"), Spec("head", (6, 3), "F32", "e"), Spec("w", (2, 5), "F16"),
             Spec("x.mlp.gate_proj.weight", (4, 2), "F32"), Spec("x.mlp.up_proj.weight", (4, 2), "F32"),
             Spec("x.mlp.down_proj.weight", (2, 4), "F32"), Spec("b", (3,), "I64")]
    layout = Layout(align=64, dtype="BF16", pad_rows=("emb",), transpose=("w",), bundle_ffn=True,
                    reorder={"x.mlp.down_proj.weight": (1, 5, 2, 9)})
    the_plan = plan(specs, layout)
    assert the_plan.header == WRITTEN + b" " * (1464 - len(WRITTEN))  # padded so the data starts at 1472
    assert (the_plan.data_start, the_plan.file_nbytes) == (1472, 1688)
    # Row padding: bundle 2 of 8 columns x 4 rows, emb 1 of 4 x 6, in BF16; then 60 bytes of padding tensors
    # and the header's 1464 - len(WRITTEN) spaces.
    assert the_plan.padding_nbytes == (2 * 4 + 1 * 6) * 2 + 60 + (1464 - len(WRITTEN))
    assert [r.kind for r in the_plan.records] == ["bundle", "rows", "pad", "transpose", "pad", "plain"]


def test_a_plain_layout_keeps_names_shapes_and_dtypes() -> None:
    specs = [Spec("a", (3, 4), "F32"), Spec("s", (), "F64"), Spec("e", (0, 5), "I8")]
    the_plan = plan(specs, Layout())
    _, logical, meta = read_back(the_plan)
    assert sorted((e.name, e.shape, e.dtype) for e in logical) == [("a", (3, 4), "F32"), ("e", (0, 5), "I8"),
                                                                   ("s", (), "F64")]
    assert json.loads(meta[LAYOUT_KEY])["views"] == {} and meta["format"] == "pt"


# ---------------------------------------------------------------- the options

class _FakeTorchDtype:
    """Prints like ``torch.bfloat16``: what the planner sees of a torch dtype, without torch."""

    def __str__(self) -> str:
        return "torch.bfloat16"


@pytest.mark.parametrize("dtype", [_FakeTorchDtype(), "bfloat16", "BF16"])
def test_layout_dtype_is_normalised_to_the_safetensors_name(dtype: object) -> None:
    assert Layout(dtype=dtype).dtype == "BF16"
    assert Layout(dtype=dtype) == Layout(dtype="BF16")


@pytest.mark.parametrize("dtype", ["bf16", "torch.float4", 3])
def test_layout_refuses_an_unknown_dtype(dtype: object) -> None:
    with pytest.raises(LayoutOptionError, match="dtype must be a torch dtype or a safetensors dtype name"):
        Layout(dtype=dtype)


def test_the_cast_applies_to_floating_point_tensors_only() -> None:
    layout = Layout(dtype="F16")
    assert {d: layout.output_dtype(d) for d in ("F32", "BF16", "I64", "BOOL", "U8")} == {
        "F32": "F16", "BF16": "F16", "I64": "I64", "BOOL": "BOOL", "U8": "U8"}
    assert all(layout.output_dtype(d) == "F16" for d in FLOATING)


def test_regression_a_pattern_given_as_a_string_is_one_pattern() -> None:
    # Layout(pad_rows="pages") was iterated as the patterns "p", "a", "g", "e", "s": it padded a tensor
    # named "p" and not "pages"; "embed.*" as characters held "*" and padded everything.
    specs = [Spec("pages", (4, 100), "F32"), Spec("p", (4, 100), "F32")]
    assert set(plan(specs, Layout(pad_rows="pages")).views) == {"pages"}
    assert Layout(pad_rows="embed.*", transpose="half").pad_rows == ("embed.*",)
    assert Layout(transpose="half").transpose == ("half",)


@pytest.mark.parametrize("patterns", [[1], ("a", None)])
def test_patterns_must_be_strings(patterns: object) -> None:
    with pytest.raises(LayoutOptionError, match="pad_rows must be glob patterns"):
        Layout(pad_rows=patterns)  # type: ignore[arg-type]


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Layout(4096)  # type: ignore[misc]


def test_row_page_is_the_alignment_up_to_64k() -> None:
    assert [Layout(align=a).row_page for a in (1, 4096, 64 << 10, 2 << 20)] == [1, 4096, 64 << 10, 64 << 10]
    assert Layout(align=2 << 20, page=16 << 10).row_page == 16 << 10


# ---------------------------------------------------------------- refused plans

@pytest.mark.parametrize(("specs", "layout", "message"), [
    ([Spec("a", (2,), "F32"), Spec("a", (3,), "F32")], Layout(), "a: two tensors have this name"),
    ([Spec("a", (2,), "float32")], Layout(), "a: dtype 'float32' has no safetensors name"),
    ([Spec("a", (2, -1), "F32")], Layout(), "a: shape must be non-negative integers, got [2, -1]"),
    ([Spec("cube", (2, 3, 4), "F32")], Layout(transpose="cube"), "cube: only 2-D tensors can be transposed"),
    ([Spec("v", (5,), "F32")], Layout(transpose="v"), "v: only 2-D tensors can be transposed, shape is [5]"),
    ([Spec("x.mlp.gate_proj.weight", (4, 2), "F32"), Spec("x.mlp.up_proj.weight", (4, 2), "F16"),
      Spec("x.mlp.down_proj.weight", (2, 4), "F32")], Layout(bundle_ffn=True),
     "x.mlp@bundle: cannot bundle tensors of different dtypes ['F16', 'F32']"),
    ([Spec("x.mlp.gate_proj.weight", (4, 2), "F32"), Spec("x.mlp.up_proj.weight", (4, 2), "F32"),
      Spec("x.mlp.down_proj.weight", (2, 5), "F32")], Layout(bundle_ffn=True),
     "x.mlp@bundle: x.mlp.down_proj.weight has 5 rows, the others 4"),
    ([Spec("emb", (3, 2), "F32")], Layout(reorder={"emb": [1, 2]}),
     "emb: usage profile has 2 counts for 3 rows"),
    ([Spec("w", (3, 2), "F32")], Layout(transpose="w", reorder={"w": [1, 2, 3]}),
     "w: usage profile has 3 counts for 2 rows"),
    ([Spec("a", (2, 3), "F32", "t"), Spec("b", (3, 2), "F32", "t")], Layout(),
     "b: tied to 'a' but is F32 [3, 2], it F32 [2, 3]"),
], ids=["duplicate", "dtype", "shape", "transpose-3d", "transpose-1d", "bundle-dtypes", "bundle-rows",
        "profile-rows", "profile-transposed", "tie"])
def test_refused_plans_name_the_tensor_and_the_numbers(specs: list[Spec], layout: Layout,
                                                       message: str) -> None:
    with pytest.raises(LayoutOptionError) as info:
        plan(specs, layout)
    assert message in str(info.value)


@pytest.mark.parametrize(("specs", "layout", "name", "message"), [
    ([Spec(f"{PAD_PREFIX}0", (2,), "U8")], Layout(), f"{PAD_PREFIX}0", "names starting with '__sparsemap'"),
    ([Spec("__sparsemap", (2,), "U8")], Layout(), "__sparsemap", "names starting with '__sparsemap'"),
    ([Spec("__metadata__", (2,), "U8")], Layout(), "__metadata__", "the safetensors header's metadata key"),
    ([Spec("emb@rows", (2, 2), "F32")], Layout(), "emb@rows", "ends in '@rows'"),
    ([Spec("w@T", (2, 2), "F32")], Layout(), "w@T", "ends in '@T'"),
    ([Spec("x.mlp@bundle", (2, 2), "F32")], Layout(), "x.mlp@bundle", "ends in '@bundle'"),
    ([Spec("w@int8.scale", (2, 2), "F32")], Layout(), "w@int8.scale", "contains '@int8'"),
    ([Spec("a.intermediate.dense.weight", (4, 2), "F32"), Spec("a.output.dense.weight", (2, 4), "F32"),
      Spec("a_intermediate.dense.weight", (4, 2), "F32"), Spec("a_output.dense.weight", (2, 4), "F32")],
     Layout(bundle_ffn=True), "a@bundle", "two FFN bundles would be stored under this name"),
], ids=["pad-prefix", "namespace", "metadata-key", "rows-suffix", "T-suffix", "bundle-suffix", "quant-mark",
        "bundle-names"])
def test_reserved_and_colliding_names_are_refused(specs: list[Spec], layout: Layout, name: str,
                                                  message: str) -> None:
    with pytest.raises(ReservedNameError) as info:
        plan(specs, layout)
    assert info.value.tensor == name and message in str(info.value)


@pytest.mark.parametrize(("metadata", "message"), [
    ({LAYOUT_KEY: "{}"}, f"metadata key {LAYOUT_KEY!r} is the planner's to write"),
    ({"n": 1}, "metadata must map strings to strings, got 'n': 1"),
])
def test_refused_metadata(metadata: dict[str, object], message: str) -> None:
    with pytest.raises(LayoutOptionError) as info:
        plan([Spec("a", (2,), "F32")], Layout(), metadata)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_views_are_layout_view_records_shared_by_ties() -> None:
    the_plan = plan([Spec("emb", (3, 5), "F32", 1), Spec("head", (3, 5), "F32", 1), Spec("a", (2,), "I8", 2),
                     Spec("b", (2,), "I8", 2)], Layout(pad_rows="emb"))
    assert the_plan.views == {"emb": LayoutView("emb@rows", "rows", 0, (3, 5), (8, 1)),
                              "head": LayoutView("emb@rows", "rows", 0, (3, 5), (8, 1)),
                              "b": LayoutView("a", "alias", 0, (2,), (1,))}


# ---------------------------------------------------------------- no torch, anywhere in the planner

def test_the_planner_module_never_imports_torch() -> None:
    # Not at the top, not in a function, not under TYPE_CHECKING: planning must run where torch cannot.
    tree = ast.parse(Path(planner.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


def test_planning_runs_without_torch() -> None:
    code = ("import sys\nfrom sparsemap.formats.planner import Layout, Spec, plan\n"
            "p = plan([Spec('w', (4, 300), 'F32'), Spec('x.mlp.gate_proj.weight', (4, 2), 'BF16'), "
            "Spec('x.mlp.up_proj.weight', (4, 2), 'BF16'), Spec('x.mlp.down_proj.weight', (2, 4), 'BF16')], "
            "Layout(dtype='F16', pad_rows='w', bundle_ffn=True, reorder={'w': [3, 1, 2, 0]}))\n"
            "assert p.file_nbytes and p.views\n"
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
