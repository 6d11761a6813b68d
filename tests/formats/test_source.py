"""sparsemap.formats.source: what a path holds, decided in one place for every entry point.

The folder rules are tested on files written by hand (a few bytes each, in
the format's real framing), so no torch is needed for most of them. The last
tests check that the entry points agree on a folder that once split them: a
config.json beside a single GGUF file.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sparsemap.errors import LegacyPickleError, SourceNotFoundError, UnknownFormatError
from sparsemap.formats.source import WEIGHT_NAMES, resolve_source, sniff_format

GGUF_BYTES = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)  # version 3, no tensors, no metadata
ZIP_BYTES = b"PK\x03\x04" + bytes(26)
LEGACY_PICKLE = b"\x80\x02\x8a\x0alp\xfc\x9cF\xf9 j\xa8P\x19."  # what torch's legacy save starts with


def safetensors_bytes() -> bytes:
    header = b'{"__metadata__":{"format":"pt"}}'
    return struct.pack("<Q", len(header)) + header


def put(folder: Path, **files: bytes | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name.replace("__", ".")
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


# ---------------------------------------------------------------- folders

@pytest.mark.parametrize("present", [WEIGHT_NAMES[i:] for i in range(len(WEIGHT_NAMES))],
                         ids=lambda names: names[0])
def test_hugging_face_names_win_in_order(tmp_path: Path, present: tuple[str, ...]) -> None:
    for name in present:
        content = b'{"weight_map": {}}' if name.endswith(".json") else (
            safetensors_bytes() if name.endswith(".safetensors") else ZIP_BYTES)
        (tmp_path / name).write_bytes(content)
    (tmp_path / "other.gguf").write_bytes(GGUF_BYTES)  # never preferred over a Hugging Face name
    src = resolve_source(tmp_path)
    assert src.weights == str(tmp_path / present[0])
    assert src.format == {"model.safetensors": "safetensors", "model.sparsemap.safetensors": "safetensors",
                          "pytorch_model.bin": "torch-zip"}.get(
        present[0], "sharded")


def test_folder_with_config_and_one_gguf_is_a_gguf_source(tmp_path: Path) -> None:
    put(tmp_path, config__json="{}", tokenizer__json="{}", generation_config__json="{}",
        model__Q4_1__gguf=GGUF_BYTES)
    src = resolve_source(tmp_path)
    assert src.is_gguf and src.weights == str(tmp_path / "model.Q4_1.gguf")
    assert src.config is None  # the header is the config: names, shapes and order from one file
    assert src.tokenizer == src.weights  # the vocabulary is in the header too
    assert src.generation_config == str(tmp_path / "generation_config.json")


def test_folder_with_a_hugging_face_checkpoint(tmp_path: Path) -> None:
    put(tmp_path, model__safetensors=safetensors_bytes(), config__json="{}", tokenizer__json="{}")
    src = resolve_source(tmp_path)
    assert (src.format, src.folder, src.path) == ("safetensors", str(tmp_path), str(tmp_path))
    assert src.config == str(tmp_path / "config.json") and src.tokenizer == str(tmp_path / "tokenizer.json")
    assert src.generation_config is None and not src.is_gguf


def test_folder_with_several_ggufs_names_them(tmp_path: Path) -> None:
    put(tmp_path, a__gguf=GGUF_BYTES, b__gguf=GGUF_BYTES)
    with pytest.raises(SourceNotFoundError, match=r"2 GGUF files \(a.gguf, b.gguf\); name the one to load"):
        resolve_source(tmp_path)


def test_folder_with_no_weights_says_what_was_looked_for(tmp_path: Path) -> None:
    put(tmp_path, config__json="{}")
    looked_for = r"looked for model.sparsemap.safetensors, model.safetensors, .*, \*.gguf"
    with pytest.raises(SourceNotFoundError, match=looked_for) as info:
        resolve_source(tmp_path)
    assert str(tmp_path) in str(info.value)


# ---------------------------------------------------------------- files

def test_a_file_names_its_own_weights_and_finds_its_config_beside_it(tmp_path: Path) -> None:
    put(tmp_path, config__json="{}", weights__bin=ZIP_BYTES)
    src = resolve_source(tmp_path / "weights.bin")
    assert (src.format, src.weights, src.folder) == ("torch-zip", str(tmp_path / "weights.bin"),
                                                     str(tmp_path))
    assert src.config == str(tmp_path / "config.json")


def test_a_gguf_file_beside_a_config_still_takes_its_config_from_the_header(tmp_path: Path) -> None:
    put(tmp_path, config__json="{}", m__gguf=GGUF_BYTES)
    assert resolve_source(tmp_path / "m.gguf").config is None


def test_an_index_is_a_sharded_source(tmp_path: Path) -> None:
    put(tmp_path, model__safetensors__index__json='{"weight_map": {}}')
    assert resolve_source(tmp_path / "model.safetensors.index.json").format == "sharded"


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, model__safetensors=safetensors_bytes())
    monkeypatch.chdir(tmp_path)
    src = resolve_source("model.safetensors")
    assert os.path.isabs(src.path) and src.weights == str(tmp_path / "model.safetensors")


@pytest.mark.parametrize(("content", "name", "fmt"), [
    (GGUF_BYTES, "renamed.bin", "gguf"),
    (ZIP_BYTES, "weights.safetensors", "torch-zip"),
    (safetensors_bytes(), "model.pt", "safetensors"),
    (struct.pack("<Q", 640) + b"{}", "odd.bin", "safetensors"),  # a length whose bytes look like PROTO 2
    (b"not a checkpoint", "broken.safetensors", "safetensors"),  # its own parser names the fault
])
def test_formats_are_told_by_content_not_by_name(tmp_path: Path, content: bytes, name: str, fmt: str) -> None:
    (tmp_path / name).write_bytes(content)
    assert sniff_format(str(tmp_path / name)) == fmt


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="no such file or folder"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "old.pt").write_bytes(LEGACY_PICKLE)
    with pytest.raises(LegacyPickleError, match=r"legacy pre-1.6 torch file"):
        resolve_source(tmp_path / "old.pt")
    (tmp_path / "notes.txt").write_bytes(b"hello, world")
    with pytest.raises(UnknownFormatError, match="first bytes 68 65 6c 6c 6f 2c 20 77"):
        resolve_source(tmp_path / "notes.txt")


def test_resolving_imports_no_parser_and_no_torch(tmp_path: Path) -> None:
    put(tmp_path, model__safetensors=safetensors_bytes(), config__json="{}")
    code = ("import sys\nfrom sparsemap.formats.source import resolve_source\n"
            f"resolve_source({str(tmp_path)!r})\n"
            "print(sorted(m for m in sys.modules "
            "if m.startswith(('torch', 'gguf', 'zipfile', 'sparsemap.formats.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.replace("'", '"'))
    assert loaded == ["sparsemap.formats.catalog", "sparsemap.formats.dispatch", "sparsemap.formats.dtypes",
                      "sparsemap.formats.reserved", "sparsemap.formats.source"]  # reserved: names, no code


# ---------------------------------------------------------------- every entry point agrees

@pytest.mark.model
def test_entry_points_agree_on_a_config_beside_a_gguf(tmp_path: Path, smollm2_gguf: Path) -> None:
    """Regression: `open` picked the GGUF in such a folder while `from_pretrained` did not, so a model
    could get llama.cpp's names without the q/k reordering. Now all of them see a GGUF source."""
    import torch

    import sparsemap
    from sparsemap.models.generate import check_model, resolve_model

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))  # would mislead if it were used
    assert sparsemap.open(folder).source == str(folder / smollm2_gguf.name)
    check_model(resolve_model(folder))  # run's early check: a GGUF whose names map to transformers'
    from_folder = sparsemap.from_pretrained(folder)
    from_file = sparsemap.from_pretrained(smollm2_gguf)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.inference_mode():
        assert torch.equal(from_folder(ids).logits, from_file(ids).logits)
    q = from_folder.model.layers[0].self_attn.q_proj.weight
    raw = sparsemap.Checkpoint(smollm2_gguf).tensor("blk.0.attn_q.weight")
    # rows reordered
    assert not torch.equal(q, raw) and torch.equal(q.sort(dim=0).values, raw.sort(dim=0).values)


def test_the_legacy_hint_command_converts_a_file_saved_on_a_gpu(tmp_path: Path, monkeypatch) -> None:
    """The command the error gives must work as written, also for a checkpoint saved on a GPU (its
    storages record 'cuda:0', which torch.load refuses on a CPU-only machine without map_location)."""
    import shlex
    import subprocess
    import sys

    import torch

    import sparsemap

    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"w": torch.arange(4.0)}, old, _use_new_zipfile_serialization=False)
    monkeypatch.undo()
    with pytest.raises(LegacyPickleError) as info:
        sparsemap.open(old)
    command = str(info.value).split("with python -c ", 1)[1].split(" (or save it", 1)[0]
    code = shlex.split(command)[0].replace("'OLD'", repr(str(old))).replace("'NEW.pt'", repr(str(new)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(sparsemap.Checkpoint(new).tensor("w"), torch.arange(4.0))
