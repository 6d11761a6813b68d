"""Reading checkpoint names as model names: explicit renames, a prefix found by itself, ignore lists."""

from __future__ import annotations

import pytest

from sparsemap.errors import BadInputError
from sparsemap.names import PrefixChange, find_prefix_change, ignored_names, renamer

MODEL = {"embeddings.weight", "encoder.0.weight", "encoder.0.bias"}


def test_the_names_as_they_are_win_when_nothing_explains_more() -> None:
    assert find_prefix_change(MODEL, MODEL | {"extra.weight"}) is None
    assert find_prefix_change(MODEL, {"unrelated.a", "unrelated.b"}) is None


@pytest.mark.parametrize("wrap", ["module.", "state_dict.", "state_dict.module."])
def test_a_wrapping_prefix_of_every_checkpoint_name_is_stripped(wrap: str) -> None:
    assert find_prefix_change(MODEL, {wrap + n for n in MODEL}) == PrefixChange(strip=wrap)


def test_a_prefix_every_model_name_has_is_added() -> None:
    model = {"bert." + n for n in MODEL}
    assert find_prefix_change(model, MODEL) == PrefixChange(add="bert.")


def test_the_base_model_prefix_explains_a_head_beside_the_base() -> None:
    head = {"bert." + n for n in MODEL} | {"cls.weight"}  # not every model name starts with bert.
    assert find_prefix_change(head, MODEL, "bert") == PrefixChange(add="bert.")
    assert find_prefix_change(MODEL, head, "bert") == PrefixChange(strip="bert.")  # head names stay, unused
    assert PrefixChange(strip="bert.")("cls.weight") == "cls.weight"


def test_renamer_reads_prefix_maps_functions_and_the_prefix_shorthand() -> None:
    by_map = renamer({"": "bert.", "module.": ""})
    assert by_map is not None and by_map("module.fc.w") == "fc.w" and by_map("fc.w") == "bert.fc.w"
    shorthand = renamer(prefix="module.")
    assert shorthand is not None and shorthand("module.fc.w") == "fc.w" and shorthand("fc.w") == "fc.w"
    assert renamer(str.upper) is str.upper and renamer() is None
    with pytest.raises(BadInputError, match="not both"):
        renamer({"a.": ""}, prefix="a.")
    with pytest.raises(BadInputError, match="must map name prefixes"):
        renamer({"a.": 1})  # type: ignore[dict-item]


def test_options_are_named_as_load_takes_them() -> None:
    assert PrefixChange(strip="module.").option() == "prefix='module.'"
    assert PrefixChange(add="bert.").option() == "rename={'': 'bert.'}"


class _Declares:
    _keys_to_ignore_on_load_unexpected = (r"\.attn\.bias$",)
    _keys_to_ignore_on_load_missing = (r"lm_head",)


def test_what_the_model_declares_is_ignored() -> None:
    leave_out, not_required = ignored_names(_Declares(), ["embeddings.position_ids"])
    assert leave_out("h.0.attn.bias") and leave_out("embeddings.position_ids")
    assert leave_out("layers.0.rotary_emb.inv_freq") and not leave_out("h.0.attn.weight")
    assert not_required("lm_head.weight") and not not_required("h.0.attn.weight")
