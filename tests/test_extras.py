"""sparsemap.extras: a missing optional dependency is a MissingExtraError naming its pip install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sparsemap.errors import MissingExtraError
from sparsemap.extras import check, install_hint, require


def test_require_imports_an_installed_module() -> None:
    assert require("json").dumps([1]) == "[1]"


def test_a_missing_module_names_the_extra_that_brings_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed (an earlier test may
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # have imported it for real)
    with pytest.raises(MissingExtraError) as caught:
        require("matplotlib.pyplot", needed_for="--plot")
    assert str(caught.value) == ("matplotlib is not installed, and --plot needs it: "
                                 "pip install 'sparsemap[bench]'")
    assert isinstance(caught.value, ImportError)
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(MissingExtraError, match=r"sentence-transformers is not installed: pip install "
                                                r"'sparsemap\[test\]'"):
        require("sentence_transformers")
    with pytest.raises(MissingExtraError, match=r"pip install 'sparsemap\[bench\]'"):
        check("json", "matplotlib")


def test_a_module_broken_inside_is_not_called_missing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed, but one of its own imports fails: reinstalling the extra would not help; say what failed."""
    (tmp_path / "halfbroken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        require("halfbroken", extra="bench")
    assert not isinstance(caught.value, MissingExtraError) and caught.value.name == "no_such_dependency_xyz"


def test_install_hints_follow_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert install_hint("transformers") == "pip install 'sparsemap[transformers]'"
    assert install_hint("tokenizers") == "pip install tokenizers"  # a core dependency: a broken install
    from sparsemap.extras import KNOWN

    for module, known in KNOWN.items():
        if known.extra is not None:  # the extra lists the distribution (or pulls in one that does)
            listed = " ".join(extras[known.extra])
            assert known.distribution in listed or "sparsemap[" in listed, (module, known)
