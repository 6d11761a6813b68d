"""sparsemap's RWKV-7, RWKV-6, RWKV-5.2 and RWKV-4 against the reference runtime (the ``rwkv`` package,
``cpu fp32``) on the same ``.pth``.

Checkpoints are written with ``torch.save`` (:mod:`sparsemap.bench.rwkv_synthetic`) in BlinkDL's key names and
shapes, random weights scaled like trained ones. The reference runs in a child
process (it reads environment variables at import and keeps module state).
Logits must agree within 1e-4 over a 64-token prompt and 32 greedy tokens,
with identical tokens; the sparse channel mix must give what the dense one
gives; a malformed checkpoint is refused before any compute, naming the key.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemap.bench.rwkv_synthetic import write_rwkv4, write_rwkv5, write_rwkv6, write_rwkv7
from sparsemap.errors import RwkvFormatError
from sparsemap.mapped import mapping_of
from sparsemap.models import rwkv

from ..conftest import ModuleFolders

pytest.importorskip("rwkv", reason="the reference runtime (PyPI rwkv) is in the test extra")

SHAPES = {  # (layers, width, head size, vocabulary, FFN)
    "small": (2, 64, 16, 256, 256),
    "world-vocab": (3, 128, 32, 65536, 448),
}
PROMPT = [(i * 37 + 11) % 256 for i in range(64)]
NEW = 32

REFERENCE = r"""
import json, os, sys
path, ids, n, version = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["RWKV_V7_ON"] = "1" if version == "7" else "0"  # x070 is a class of its own there
os.environ["RWKV_JIT_ON"] = "0"
import torch
from rwkv.model import RWKV
model = RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
logits, state = model.forward(ids, None)
out, all_logits = [], [logits.tolist()]
for _ in range(n):
    token = int(torch.argmax(logits))
    out.append(token)
    logits, state = model.forward([token], state)
    all_logits.append(logits.tolist())
print(json.dumps({"tokens": out, "logits": all_logits}))
"""


WRITERS = {"7": write_rwkv7, "6": write_rwkv6, "5": write_rwkv5, "4": write_rwkv4}


@pytest.fixture(scope="module", params=[(v, s) for v in WRITERS for s in SHAPES],
                ids=lambda p: f"v{p[0]}-{p[1]}")
def checkpoint(request: pytest.FixtureRequest, module_folders: ModuleFolders) -> Path:
    version, shape = request.param
    return WRITERS[version](module_folders.make("rwkv") / f"v{version}-{shape}.pth", *SHAPES[shape])


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict:
    version = checkpoint.name[1]
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(checkpoint), json.dumps(PROMPT), str(NEW),
                           version], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(model: rwkv.Rwkv7) -> tuple[list[int], list[torch.Tensor]]:
    logits, state = model(PROMPT)
    tokens, seen = [], [logits]
    for _ in range(NEW):
        tokens.append(int(logits.argmax()))
        logits, state = model([tokens[-1]], state)
        seen.append(logits)
    return tokens, seen


@pytest.mark.parametrize("sparse", [False, True])
def test_same_logits_and_tokens_as_the_rwkv_package(checkpoint: Path, reference: dict, sparse: bool) -> None:
    model = rwkv.load(checkpoint, sparse=sparse)
    tokens, logits = _run(model)
    assert tokens == reference["tokens"]
    for step, (got, want) in enumerate(zip(logits, reference["logits"], strict=True)):
        diff = (got - torch.tensor(want)).abs().max().item()
        assert diff <= 1e-4, f"step {step}: logits differ by {diff:.2e}"


def test_weights_are_views_of_the_checkpoint(checkpoint: Path) -> None:
    model = rwkv.load(checkpoint)
    for name, p in model.named_parameters():
        assert mapping_of(p).path == str(checkpoint), name


def test_sparse_channel_mix_equals_the_dense_one(checkpoint: Path) -> None:
    dense, sparse = rwkv.load(checkpoint), rwkv.load(checkpoint, sparse=True)
    sparse.count_active()
    (dl, _), (sl, _) = dense(PROMPT[:8]), sparse(PROMPT[:8])
    assert torch.allclose(dl, sl, rtol=1e-5, atol=1e-5 * dl.abs().max().item())
    counts = sparse.count_active(False)
    ffn = sparse.shape.ffn_size
    assert all(0 < n < ffn for layer in counts for n in layer)  # random keys: some neurons off, some on


def test_versions_are_told_apart_by_their_keys() -> None:
    base = {"emb.weight", "blocks.0.ln1.weight"}
    assert rwkv.detect_version(base | {"blocks.0.att.k_k"}) == "7"
    assert rwkv.detect_version(base | {"blocks.0.att.time_maa_x"}) == "6"
    assert rwkv.detect_version(base | {"blocks.0.att.time_first"}) == "4"
    assert rwkv.detect_version({"model.embed_tokens.weight"}) is None


def test_a_missing_tensor_is_refused_by_name(tmp_path: Path) -> None:
    path = write_rwkv7(tmp_path / "m.pth", *SHAPES["small"])
    sd = torch.load(path)  # not mapped: the file is rewritten below
    del sd["blocks.1.ffn.key.weight"]
    torch.save(sd, path)
    with pytest.raises(RwkvFormatError, match=r"blocks\.1\.ffn\.key\.weight.*missing"):
        rwkv.load(path)


def test_an_inconsistent_shape_is_refused_with_the_shapes(tmp_path: Path) -> None:
    path = write_rwkv7(tmp_path / "m.pth", *SHAPES["small"])
    sd = torch.load(path)  # not mapped: the file is rewritten below
    sd["blocks.1.att.key.weight"] = torch.zeros(64, 32)
    torch.save(sd, path)
    wanted = r"blocks\.1\.att\.key\.weight.*\[64, 32\], expected \[64, 64\]"
    with pytest.raises(RwkvFormatError, match=wanted):
        rwkv.load(path)


def test_a_version_not_supported_is_named(tmp_path: Path) -> None:
    path = tmp_path / "v5.1.pth"  # heads and a group norm, but no gate: RWKV 5.0 or 5.1
    torch.save({"emb.weight": torch.zeros(4, 8), "blocks.0.ln1.weight": torch.zeros(8),
                "blocks.0.att.ln_x.weight": torch.zeros(8)}, path)
    with pytest.raises(RwkvFormatError, match=r"RWKV 5\.0 or 5\.1 .* is not supported yet"):
        rwkv.load(path)


def test_value_rows_stored_transposed_serve_the_sparse_path(checkpoint: Path, tmp_path: Path) -> None:
    from sparsemap.converter import convert
    from sparsemap.formats.planner import Layout

    laid = tmp_path / "transposed.safetensors"
    convert(checkpoint, laid, layout=Layout(transpose="*ffn.value.weight", pad_rows="*ffn.value.weight"))
    dense, sparse = rwkv.load(checkpoint), rwkv.load(laid, sparse=True)
    rows = sparse.blocks[0].ffn.value.weight.t()  # (F, C): one neuron a row
    assert rows.is_contiguous() or rows.stride(1) == 1
    assert mapping_of(rows).path == str(laid)
    (dl, _), (sl, _) = dense(PROMPT[:8]), sparse(PROMPT[:8])
    assert torch.allclose(dl, sl, rtol=1e-5, atol=1e-5 * dl.abs().max().item())


@pytest.mark.parametrize("shape", ["small", "world-vocab"])  # bytes; the World vocabulary (rwkv's copy)
def test_sparsemap_run_answers_with_an_rwkv_checkpoint(tmp_path: Path, shape: str) -> None:
    path = write_rwkv7(tmp_path / "model.pth", *SHAPES[shape])
    cmd = [sys.executable, "-m", "sparsemap.cli", "run", str(path), "Hello", "--max-new-tokens", "4",
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["engine"] == "RwkvEngine" and 1 <= report["new_tokens"] <= 4
    phases = [p["name"] for p in report["tracker"]["phases"]]
    assert phases[-3:] == ["tokenizer", "weights", "generate"]  # the same ledger as for Llama


def test_sampling_at_a_temperature_repeats_under_a_seed_and_differs_from_greedy(tmp_path: Path) -> None:
    model = rwkv.load(write_rwkv7(tmp_path / "model.pth", *SHAPES["small"]))
    greedy = model.generate(PROMPT[:8], 24)
    torch.manual_seed(3)
    drawn = model.generate(PROMPT[:8], 24, temperature=2.0)
    torch.manual_seed(3)
    assert model.generate(PROMPT[:8], 24, temperature=2.0) == drawn
    assert drawn != greedy and len(drawn) == 24


def test_sparsemap_run_refuses_a_broken_rwkv_checkpoint_before_compute(tmp_path: Path) -> None:
    path = write_rwkv7(tmp_path / "model.pth", *SHAPES["small"])
    sd = torch.load(path)
    sd["blocks.0.ffn.value.weight"] = torch.zeros(64, 100)
    torch.save(sd, path)
    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "run", str(path), "Hello"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "blocks.0.ffn.value.weight" in proc.stderr and "[64, 100], expected [64, 256]" in proc.stderr


def test_only_the_embedding_rows_of_the_tokens_used_are_read(tmp_path: Path) -> None:
    from sparsemap import pages
    from sparsemap.converter import convert

    raw = write_rwkv7(tmp_path / "model.pth", *SHAPES["world-vocab"])
    laid = tmp_path / "aligned.safetensors"
    convert(raw, laid)
    model = rwkv.load(laid)
    table = model.emb.weight  # (65536, 128): 512-byte rows, 8 to a page
    first, last = pages.pages_covering(table.data_ptr(), table.data_ptr() + table.numel() * 4)
    mapping = mapping_of(table)
    # Reads at random: no readahead, no fault-around (the kernel reads around a fault, so the head's
    # first read would bring in the end of the table before it); and the file starts cold.
    pages.madvise(mapping.address, len(mapping) // pages.PAGE_SIZE * pages.PAGE_SIZE, mmap.MADV_RANDOM)
    pages.release(first, last - first)
    os.fsync(mapping.fd)  # pages still being written back cannot be dropped
    pages.drop_cache(mapping.fd, first - mapping.address, last - first)
    used = [7, 300, 300, 65000, 12345]
    out = model.generate(used, 3)
    rows_read = {t // 8 for t in used + out[:-1]}  # the page of each row the model gathered
    cached = pages.in_page_cache(first, last - first)
    assert {int(i) for i in cached.nonzero()[0]} == rows_read


def test_dropping_the_head_gives_its_pages_back_and_hidden_states_still_come(tmp_path: Path) -> None:
    import sparsemap
    from sparsemap import pages
    from sparsemap.errors import BadInputError

    model = rwkv.load(write_rwkv7(tmp_path / "model.pth", *SHAPES["world-vocab"]))
    head = model.head.weight  # (65536, 128): 32 MiB of the file
    first, last = pages.pages_inside(head.data_ptr(), head.data_ptr() + head.numel() * 4)
    model(PROMPT[:4])  # reads the whole head
    assert int(pages.present_in_process(first, last - first).sum()) == (last - first) // pages.PAGE_SIZE
    expected, _ = model.hidden(PROMPT[:4])
    report = sparsemap.drop(model, ["head.weight"])
    del head
    assert report.released_nbytes >= last - first
    assert not pages.present_in_process(first, last - first).any()
    got, _ = model.hidden(PROMPT[:4])
    assert torch.equal(got, expected)
    with pytest.raises(BadInputError, match="head was dropped"):
        model(PROMPT[:4])


def test_value_rows_a_calibration_never_used_are_released_and_output_stays_exact(tmp_path: Path) -> None:
    from sparsemap import pages
    from sparsemap.converter import convert
    from sparsemap.formats.planner import Layout

    raw = write_rwkv7(tmp_path / "model.pth", 1, 1024, 64, 256, 1024)  # value rows of 4 KiB: one a page
    laid = tmp_path / "rows.safetensors"
    convert(raw, laid, layout=Layout(transpose="*ffn.value.weight", pad_rows="*ffn.value.weight"))
    model = rwkv.load(laid, sparse=True)
    calibration = PROMPT[:1]  # one token: about half the neurons of a random model stay off
    model.count_active()
    expected, _ = model(calibration)
    model.count_active(False)
    used = model.blocks[0].ffn.ever_active
    assert 0 < int(used.sum()) < len(used)
    value_rows = model.blocks[0].ffn.value.weight.t()  # (F, C)
    os.fsync(mapping_of(value_rows).fd)  # the file was just written: pages in writeback cannot be dropped
    released = model.evict_unused(drop_cache=True)
    assert released == int((~used).sum())  # one page per unused neuron
    unused = ~used.numpy()

    def resident() -> np.ndarray:  # per row (one page each): mapped into the process
        # (Not the page cache: it keeps multi-page folios whole while their used rows are mapped.)
        return pages.present_in_process(value_rows.data_ptr(), value_rows.shape[0] * pages.PAGE_SIZE)

    assert not resident()[unused].any()
    again, _ = model(calibration)  # the same tokens read the same rows: nothing evicted is needed
    assert torch.equal(again, expected)
    # (Whether evicted pages come back into the process after this is the kernel's: a fault maps
    # the neighbours a multi-page folio holds, read or not. What is ours is not to ask for them.)
    dense = rwkv.load(laid)  # a dense pass reads every row: evicted ones fault back, values intact
    dense_out, _ = dense(calibration)
    assert torch.allclose(dense_out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
