"""sparsemap.stream: the bounded ring of host buffers, tested with a CPU destination
(and a GPU where present)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsemap
from sparsemap.errors import BadInputError, FileChangedError
from sparsemap.stream import MAX_GAP, PAGE, parse_size, plan_chunks, stream_tensors

from .conftest import ModuleFolders
from .helpers import assert_bit_identical, random_tensor, run_isolated

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.fixture(scope="module")
def every_dtype(module_folders: ModuleFolders) -> Path:
    gen = torch.Generator().manual_seed(0)
    state = {f"t.{str(d).removeprefix('torch.')}": random_tensor(d, (333, 77), gen) for d in DTYPES}
    state["big"] = torch.randn(1024, 300, generator=gen)  # 1.2 MB: larger than every ring below
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 5)
    path = module_folders.make("stream") / "every_dtype.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize(("staging", "readers", "direct"), [
    ("256M", 2, None), ("64K", 3, None), (PAGE, 1, False), (PAGE, 4, False), ("1M", 2, True),
    ("1M", 2, False)])
def test_streamed_tensors_are_bit_identical(every_dtype: Path, staging: object, readers: int,
                                            direct: bool | None) -> None:
    want = load_file(every_dtype)
    got, report = stream_tensors(sparsemap.open(every_dtype), staging=staging, readers=readers, direct=direct)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert_bit_identical(got[name], t)
    assert report.nbytes == sum(t.numel() * t.element_size() for t in want.values())
    assert report.buffers * report.buffer_nbytes <= max(parse_size(staging), PAGE)
    if parse_size(staging) <= PAGE:
        assert report.buffers == 1  # a ring of one small buffer still moves everything
    assert not [t for t in threading.enumerate() if t.name.startswith("sparsemap-reader")]


def test_cast_happens_after_the_copy(every_dtype: Path) -> None:
    got, _ = stream_tensors(sparsemap.open(every_dtype), dtype=torch.float16, staging="64K")
    want = load_file(every_dtype)
    assert got["big"].dtype == torch.float16 and torch.equal(got["big"], want["big"].to(torch.float16))
    assert got["t.int32"].dtype == torch.int32  # integers keep their dtype


def test_chunk_plan_covers_every_byte_once(every_dtype: Path) -> None:
    catalog = sparsemap.open(every_dtype)
    chunks = plan_chunks(catalog.values(), 64 << 10)
    covered: dict[str, int] = {}
    for c in chunks:
        assert 0 < c.nbytes <= 64 << 10
        for p in c.pieces:
            assert p.src >= 0 and p.src + p.nbytes <= c.nbytes
            assert p.dst == covered.get(p.name, 0)  # pieces of a tensor arrive in order, no holes
            covered[p.name] = p.dst + p.nbytes
    assert covered == {e.name: e.nbytes for e in catalog.values() if e.nbytes}
    assert len(chunks) < sum(1 for e in catalog.values() if e.nbytes) + 30  # small neighbours share reads
    assert MAX_GAP >= PAGE


def test_load_streams_into_anonymous_memory(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    factory, path = tiny_llama
    mapped = sparsemap.load(factory, path)
    streamed = sparsemap.load(factory, path, staging="64K", readers=2)
    for (name, a), (_, b) in zip(mapped.state_dict().items(), streamed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(sparsemap.errors.NotMappedError):
        sparsemap.rows(streamed.get_input_embeddings().weight)  # a copy, not a view of the file


def test_reader_error_surfaces_and_no_thread_survives(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.full((256, 1024), float(i)) for i in range(16)}, path)  # 16 MiB
    catalog = sparsemap.open(path)
    cut = [False]

    def truncate_after_first_chunk(_: int) -> None:
        if not cut[0]:
            cut[0] = True
            with open(path, "r+b") as f:
                f.truncate(8 << 20)

    with pytest.raises(FileChangedError) as info:  # truncated under the readers: a change, with the sizes
        stream_tensors(catalog, staging="2M", readers=3, on_bytes=truncate_after_first_chunk)
    assert path.name in str(info.value) and "truncated" in str(info.value) and str(8 << 20) in str(info.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("sparsemap-reader")]
    with pytest.raises(FileChangedError):  # opened before the cut: refused before a byte is read
        stream_tensors(catalog)


def test_bad_arguments_are_refused(every_dtype: Path) -> None:
    catalog = sparsemap.open(every_dtype)
    for kwargs in ({"staging": "lots"}, {"staging": 0}, {"staging": 100}, {"readers": 0},
                   {"names": ["nope"]}):
        with pytest.raises(BadInputError):
            stream_tensors(catalog, **kwargs)  # type: ignore[arg-type]
    assert parse_size("256M") == 256 << 20 and parse_size("1.5G") == 3 << 29 and parse_size("64KiB") == 65536


@pytest.mark.slow
def test_host_anonymous_memory_stays_within_the_ring(tmp_path: Path) -> None:
    """A 1 GiB load: anonymous memory beyond the destination tensors stays within staging + 64 MiB."""
    path = tmp_path / "one_gib.safetensors"
    save_file({f"w{i}": torch.arange(64 << 20, dtype=torch.int32).reshape(-1, 4096) for i in range(4)}, path)
    result = run_isolated(f"""
        import json, sparsemap
        from sparsemap.memory import AnonSampler, rss_anon
        from sparsemap.stream import stream_tensors
        catalog = sparsemap.open({str(path)!r})
        base = rss_anon()
        with AnonSampler() as sampler:
            tensors, report = stream_tensors(catalog, staging="64M", readers=2, drop_cache=True)
        ok = all(bool((t[0, :8] == __import__("torch").arange(8, dtype=t.dtype)).all())
                 for t in tensors.values())
        print(json.dumps({{"growth": sampler.peak - base, "nbytes": report.nbytes, "ok": ok}}))
    """, timeout=300)
    assert result["ok"]
    beyond = result["growth"] - result["nbytes"]
    assert beyond <= (64 << 20) + (64 << 20), f"{beyond / 2**20:.0f} MiB beyond the destination"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the pinned-buffer GPU path needs one")
def test_gpu_destination_is_bit_identical(every_dtype: Path) -> None:
    got, report = stream_tensors(sparsemap.open(every_dtype), device="cuda:0", staging="1M", readers=2)
    for name, t in load_file(every_dtype).items():
        assert got[name].device.type == "cuda"
        assert_bit_identical(got[name].cpu(), t)
    assert report.device.startswith("cuda")
