"""sparsemap.rows: evict, mask, restore and prefetch rows of a mapped tensor; row vs page sparsity.

Tensors here hold a known bit pattern: element ``i`` of a tensor is the
float32 whose bits are ``base + i``, so any row's expected value is computed,
not stored, and a wrong row, a shifted row or a stray zero shows up in a
bit-exact comparison.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparsemap
from sparsemap.errors import NotMappedError, RowAlignmentError, RowError
from sparsemap.memory import MiB, Snapshot
from sparsemap.pages import PAGE_SIZE

ONE = 0x3F800000  # bits of 1.0f: every pattern value is a normal float, never zero


def pattern(n_rows: int, n_cols: int, base: int = ONE, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Rows ``lo:hi`` of the pattern tensor, as int32 bits, (hi - lo, n_cols)."""
    hi = n_rows if hi is None else hi
    bits = torch.arange(lo * n_cols, hi * n_cols, dtype=torch.int64) + base
    return bits.to(torch.int32).view(hi - lo, n_cols)


def pattern_f32(n_rows: int, n_cols: int, base: int = ONE) -> torch.Tensor:
    return pattern(n_rows, n_cols, base).view(torch.float32)


def check_rows(t: torch.Tensor, masked: np.ndarray, base: int = ONE, chunk: int = 4096) -> None:
    """Every row of ``t`` (n_rows, n_cols) float32 is its pattern row, or all zeros where ``masked``."""
    n_rows, n_cols = t.shape
    masked_t = torch.from_numpy(np.asarray(masked, dtype=bool))
    for lo in range(0, n_rows, chunk):
        hi = min(n_rows, lo + chunk)
        want = pattern(n_rows, n_cols, base, lo, hi)
        want[masked_t[lo:hi]] = 0
        got = t[lo:hi].view(torch.int32)
        if not torch.equal(got, want):
            bad = (got != want).any(dim=1).nonzero().flatten()[:5] + lo
            raise AssertionError(f"rows {bad.tolist()} differ (masked: {masked[bad.numpy()].tolist()})")


def bool_rows(n: int, rows) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[np.asarray(list(rows), dtype=np.int64)] = True
    return out


def touch(t: torch.Tensor) -> None:
    """Fault in every page of ``t``: one read per page (padded rows: one per row, rows < a page apart)."""
    bits = t.view(torch.int32)
    if t.is_contiguous():
        int(bits.reshape(-1)[:: PAGE_SIZE // 4].sum())
    else:
        assert t.stride(0) * 4 <= PAGE_SIZE
        int(bits[:, 0].sum())


def saved(path: Path, n_rows: int, n_cols: int, *, padded: bool = False, base: int = ONE) -> torch.Tensor:
    layout = sparsemap.Layout(pad_rows=("emb",)) if padded else None
    sparsemap.save({"emb": pattern_f32(n_rows, n_cols, base)}, path, layout=layout)
    return sparsemap.Checkpoint(path).tensor("emb")


# ---------------------------------------------------------------- the acceptance test

@pytest.mark.slow
def test_mask_and_evict_90_percent_of_a_512_mib_embedding(tmp_path: Path) -> None:
    n_rows, n_cols = 65536, 2048  # 8 KiB rows, 512 MiB
    nbytes = n_rows * n_cols * 4
    path = tmp_path / "big.safetensors"
    src = pattern_f32(n_rows, n_cols)
    sparsemap.save({"emb": src}, path)
    del src
    gc.collect()
    try:
        t = sparsemap.Checkpoint(path).tensor("emb")
        assert t.data_ptr() % PAGE_SIZE == 0 and t.shape == (n_rows, n_cols)
        # The pattern is what safetensors itself reads from the file (spot check, first and last rows).
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice("emb")
            assert torch.equal(sl[0:64].view(torch.int32), pattern(n_rows, n_cols, ONE, 0, 64))
            assert torch.equal(sl[n_rows - 64:n_rows].view(torch.int32),
                               pattern(n_rows, n_cols, ONE, n_rows - 64, n_rows))
        touch(t)

        rng = np.random.default_rng(1234)
        chosen = rng.choice(n_rows, int(0.9 * n_rows), replace=False)
        masked = bool_rows(n_rows, chosen)

        before = Snapshot.take()
        ctl = sparsemap.rows(t, name="emb")
        ctl.mask(chosen)
        after = Snapshot.take()  # immediately: the pages are gone at once, not when the kernel gets to it
        dropped = before.rss - after.rss
        assert dropped >= 0.85 * nbytes, f"RSS dropped {dropped / MiB:.0f} MiB of {nbytes / MiB:.0f} MiB"
        res = ctl.residency()
        assert res.rows_masked == len(chosen) and res.row_sparsity == pytest.approx(0.9, abs=1e-4)
        assert res.page_sparsity == res.row_sparsity  # 8 KiB rows own their pages

        check_rows(t, masked)
        ctl.restore(chosen)
        check_rows(t, np.zeros(n_rows, dtype=bool))
        assert not ctl.masked.any()

        touch(t)
        before = Snapshot.take()
        released = ctl.evict(chosen)
        after = Snapshot.take()
        evicted_nbytes = len(chosen) * n_cols * 4
        assert released * PAGE_SIZE == evicted_nbytes
        dropped = before.rss - after.rss
        assert dropped >= 0.85 * evicted_nbytes, f"RSS dropped {dropped / MiB:.0f} MiB of " \
                                                 f"{evicted_nbytes / MiB:.0f} MiB evicted"
        check_rows(t, np.zeros(n_rows, dtype=bool))  # faulted back from the file
    finally:
        os.unlink(path)


# ---------------------------------------------------------------- row sparsity vs page sparsity

SMALL_ROWS, SMALL_COLS = 4096, 384  # 1536-byte rows


def _pairs(seed: int = 0, n_pairs: int = SMALL_ROWS // 2, *, keep_last: bool = True) -> np.ndarray:
    """Rows 2k, 2k+1 for half of the k (exactly), sorted; the last pair excluded when ``keep_last``."""
    rng = np.random.default_rng(seed)
    candidates = np.arange(n_pairs - 1 if keep_last else n_pairs)
    ks = np.sort(rng.choice(candidates, n_pairs // 2, replace=False))
    return np.sort(np.concatenate([2 * ks, 2 * ks + 1]))


def test_padded_rows_make_page_sparsity_equal_row_sparsity(tmp_path: Path) -> None:
    t = saved(tmp_path / "padded.safetensors", SMALL_ROWS, SMALL_COLS, padded=True)
    assert t.stride() == (512, 1)  # rows padded to 2048 bytes: two per page
    ctl = sparsemap.rows(t, name="emb")
    chosen = _pairs()
    freed = ctl.mask(chosen)
    res = ctl.residency()
    assert freed == len(chosen) // 2
    assert res.row_sparsity == 0.5
    assert res.page_sparsity == res.row_sparsity == 0.5
    assert res.pages_shared == 0
    assert "50.0% of rows" in str(res) and "50.0% of pages" in str(res)
    check_rows(t, bool_rows(SMALL_ROWS, chosen))


def test_unpadded_small_rows_share_pages(tmp_path: Path) -> None:
    t = saved(tmp_path / "plain.safetensors", SMALL_ROWS, SMALL_COLS)
    assert t.stride() == (SMALL_COLS, 1)
    ctl = sparsemap.rows(t, name="emb")
    chosen = _pairs()
    ctl.mask(chosen)
    res = ctl.residency()
    assert res.row_sparsity == 0.5
    assert 0 < res.page_sparsity < res.row_sparsity
    assert res.pages_shared > 0
    assert res.pages_freed + res.pages_shared <= res.n_pages
    assert f"{100 * res.row_sparsity:.1f}% of rows" in str(res)
    assert f"{100 * res.page_sparsity:.1f}% of pages" in str(res)
    # Shared pages that hold zeroed masked rows stay, as private copies.
    assert res.pages_private >= res.pages_shared
    check_rows(t, bool_rows(SMALL_ROWS, chosen))


def test_rows_of_two_pages_each_free_exactly_their_pages(tmp_path: Path) -> None:
    n_rows, n_cols = 512, 2048  # 8 KiB rows: every row owns 2 pages
    t = saved(tmp_path / "big-rows.safetensors", n_rows, n_cols)
    ctl = sparsemap.rows(t, name="emb")
    chosen = np.random.default_rng(3).choice(n_rows, 150, replace=False)
    assert ctl.mask(chosen, strict=True) == 2 * len(chosen)
    res = ctl.residency()
    assert res.page_sparsity == res.row_sparsity == 150 / 512
    assert res.pages_shared == 0
    check_rows(t, bool_rows(n_rows, chosen))


def test_rows_of_an_nd_tensor(tmp_path: Path) -> None:
    # Row-major N-D: the first dimension indexes rows of 4 x 512 float32 (8 KiB).
    sparsemap.save({"w": pattern_f32(64, 2048).view(64, 4, 512)}, tmp_path / "nd.safetensors")
    t = sparsemap.Checkpoint(tmp_path / "nd.safetensors").tensor("w")
    ctl = sparsemap.rows(t)
    assert ctl.mask([1, 5, 63]) == 6
    check_rows(t.view(64, 2048), bool_rows(64, [1, 5, 63]))
    ctl.restore(slice(None))
    check_rows(t.view(64, 2048), np.zeros(64, dtype=bool))


def test_padded_layout_frees_the_page_of_the_last_rows(tmp_path: Path) -> None:
    # Regression: the view ends at the last row's bytes, not its padded slot, so the last page
    # counted as shared: never freed, and strict=True refused.
    t = saved(tmp_path / "padded.safetensors", SMALL_ROWS, SMALL_COLS, padded=True)
    ctl = sparsemap.rows(t, name="emb")
    ctl.mask(range(SMALL_ROWS))
    res = ctl.residency()
    assert res.page_sparsity == res.row_sparsity == 1.0
    ctl.restore(range(SMALL_ROWS))
    ctl.mask([SMALL_ROWS - 2, SMALL_ROWS - 1], strict=True)


# ---------------------------------------------------------------- shared pages: kept rows are never corrupted

def test_masking_and_restoring_rows_on_shared_pages(tmp_path: Path) -> None:
    t = saved(tmp_path / "plain.safetensors", SMALL_ROWS, SMALL_COLS)
    ctl = sparsemap.rows(t, name="emb")
    rng = np.random.default_rng(7)
    chosen = np.union1d(rng.choice(SMALL_ROWS, 1500, replace=False), [0, 1, 2, SMALL_ROWS - 1])
    masked = bool_rows(SMALL_ROWS, chosen)
    ctl.mask(chosen)
    assert np.array_equal(ctl.masked, masked)
    check_rows(t, masked)

    # Restore every other masked row: many share a page with a row that stays masked.
    back = chosen[::2]
    ctl.restore(back)
    masked[back] = False
    assert np.array_equal(ctl.masked, masked)
    first_page = (back * SMALL_COLS * 4) // PAGE_SIZE
    last_page = ((back + 1) * SMALL_COLS * 4 - 1) // PAGE_SIZE
    still = np.flatnonzero(masked)
    still_pages = set(((still * SMALL_COLS * 4) // PAGE_SIZE).tolist()) | set(
        (((still + 1) * SMALL_COLS * 4 - 1) // PAGE_SIZE).tolist())
    assert any(p in still_pages for p in np.concatenate([first_page, last_page]).tolist())
    check_rows(t, masked)

    # Masking again, then restoring everything, gives the file back everywhere.
    ctl.mask(back)
    masked[back] = True
    check_rows(t, masked)
    ctl.restore(range(SMALL_ROWS))
    check_rows(t, np.zeros(SMALL_ROWS, dtype=bool))
    res = ctl.residency()
    assert res.rows_masked == 0 and res.pages_freed == 0 and res.pages_shared == 0


def test_masked_rows_stay_zero_after_evicting_their_neighbours(tmp_path: Path) -> None:
    # A shared page holds zeroed (private) bytes of masked rows: releasing it would bring the file back.
    t = saved(tmp_path / "plain.safetensors", SMALL_ROWS, SMALL_COLS)
    ctl = sparsemap.rows(t, name="emb")
    chosen = np.arange(1, SMALL_ROWS, 3)
    ctl.mask(chosen)
    ctl.evict(range(SMALL_ROWS))
    ctl.evict(np.setdiff1d(np.arange(SMALL_ROWS), chosen))
    check_rows(t, bool_rows(SMALL_ROWS, chosen))


def test_strict_refuses_shared_pages_and_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    t = saved(path, SMALL_ROWS, SMALL_COLS)
    ctl = sparsemap.rows(t, name="emb")
    for op in (ctl.mask, ctl.evict):
        with pytest.raises(RowAlignmentError) as info:
            op(_pairs(), strict=True)
        message = str(info.value)
        assert "'emb'" in message and str(path) in message
        assert "sparsemap convert" in message and "--pad-rows" in message
    assert not ctl.masked.any()  # refused before changing anything
    check_rows(t, np.zeros(SMALL_ROWS, dtype=bool))


def test_strict_mask_succeeds_on_the_padded_file(tmp_path: Path) -> None:
    t = saved(tmp_path / "padded.safetensors", SMALL_ROWS, SMALL_COLS, padded=True)
    ctl = sparsemap.rows(t, name="emb")
    chosen = _pairs(seed=5)
    assert ctl.mask(chosen, strict=True) == len(chosen) // 2
    assert ctl.evict(np.setdiff1d(np.arange(SMALL_ROWS - 2), chosen), strict=True) > 0
    check_rows(t, bool_rows(SMALL_ROWS, chosen))
    assert ctl.restore(chosen) == len(chosen) // 2
    check_rows(t, np.zeros(SMALL_ROWS, dtype=bool))


def test_neighbouring_tensors_on_one_page_never_change_each_other(tmp_path: Path) -> None:
    # Plain safetensors: no alignment, so "a" shares its first page with the header and its
    # last page with "b". Rows of 6000 bytes also span whole pages, which are remapped.
    path = tmp_path / "two.safetensors"
    a_shape, b_shape, a_base, b_base = (30, 1500), (20, 1500), ONE, ONE + (1 << 24)
    save_file({"a": pattern_f32(*a_shape, a_base), "b": pattern_f32(*b_shape, b_base)}, str(path))
    file_bytes = path.read_bytes()
    ckpt = sparsemap.Checkpoint(path)
    assert ckpt.catalog["b"].offset == ckpt.catalog["a"].end and ckpt.catalog["a"].offset % PAGE_SIZE != 0
    assert ckpt.catalog["a"].end // PAGE_SIZE == ckpt.catalog["b"].offset // PAGE_SIZE  # one page holds both
    a, b = ckpt.tensor("a"), ckpt.tensor("b")
    ca, cb = sparsemap.rows(a, name="a"), sparsemap.rows(b, name="b")
    none_a, none_b = np.zeros(a_shape[0], dtype=bool), np.zeros(b_shape[0], dtype=bool)

    assert ca.mask(range(a_shape[0])) > 0  # interior pages freed, edge pages zeroed by writing
    check_rows(a, ~none_a, a_base)
    check_rows(b, none_b, b_base)
    masked_b = bool_rows(b_shape[0], [0, 1, 7, 19])
    cb.mask(np.flatnonzero(masked_b))
    check_rows(a, ~none_a, a_base)
    check_rows(b, masked_b, b_base)
    ca.restore(range(a_shape[0]))
    check_rows(a, none_a, a_base)
    check_rows(b, masked_b, b_base)
    ca.evict(range(a_shape[0]), drop_cache=True)
    cb.restore([0, 1, 7, 19])
    check_rows(a, none_a, a_base)
    check_rows(b, none_b, b_base)
    assert path.read_bytes() == file_bytes  # copy-on-write: the file never changes


@pytest.mark.parametrize("cols", [slice(0, 1536), slice(512, 2048), slice(100, 200)],
                         ids=["head-of-row", "tail-of-row", "middle"])
def test_a_view_of_some_columns_never_touches_the_other_columns(tmp_path: Path, cols: slice) -> None:
    # Rows of 8 KiB, viewed in part: the gaps between the view's rows hold the other columns.
    n_rows, n_cols = 64, 2048
    full = saved(tmp_path / "wide.safetensors", n_rows, n_cols)
    part = full[:, cols]
    ctl = sparsemap.rows(part, name="part")
    chosen = np.arange(0, n_rows, 3)
    freed = ctl.mask(chosen)
    if cols.stop - cols.start >= 1536:
        assert freed == len(chosen)  # the one page each 6 KiB row owns wholly
    want = pattern(n_rows, n_cols)
    want[torch.from_numpy(chosen), cols] = 0
    assert torch.equal(full.view(torch.int32), want)
    ctl.evict(range(n_rows), drop_cache=True)
    assert torch.equal(full.view(torch.int32), want)
    ctl.restore(chosen)
    assert torch.equal(full.view(torch.int32), pattern(n_rows, n_cols))


@pytest.mark.parametrize("hidden", [2048, 10], ids=["8KiB-parts", "small-parts"])
def test_masking_one_part_of_an_ffn_bundle_never_touches_the_others(tmp_path: Path, hidden: int) -> None:
    inter = 8
    bases = {"gate": ONE, "up": ONE + (1 << 22), "down": ONE + (1 << 23)}
    tensors = {"l.mlp.gate_proj.weight": pattern_f32(inter, hidden, bases["gate"]),
               "l.mlp.up_proj.weight": pattern_f32(inter, hidden, bases["up"]),
               "l.mlp.down_proj.weight": pattern_f32(hidden, inter, bases["down"])}
    path = tmp_path / "bundle.safetensors"
    sparsemap.save(tensors, path, layout=sparsemap.Layout(bundle_ffn=True))
    ckpt = sparsemap.Checkpoint(path)
    gate, up, down = (ckpt.tensor(f"l.mlp.{p}_proj.weight") for p in ("gate", "up", "down"))
    assert gate.stride(0) == up.stride(0) and gate.stride(0) >= 3 * hidden  # one record per neuron
    with pytest.raises(RowError, match="contiguous"):
        sparsemap.rows(down)  # a neuron of down is a column of the record: not a row view
    ctl = sparsemap.rows(gate, name="gate")
    if hidden * 4 < PAGE_SIZE:
        with pytest.raises(RowAlignmentError):
            ctl.mask([1, 2], strict=True)  # no page is the gate's alone
    freed = ctl.mask([1, 2, 7])
    assert freed == (3 * 2 if hidden == 2048 else 0)
    check_rows(gate, bool_rows(inter, [1, 2, 7]), bases["gate"])
    check_rows(up, np.zeros(inter, dtype=bool), bases["up"])
    assert torch.equal(down.view(torch.int32), pattern(hidden, inter, bases["down"]))
    sparsemap.rows(up, name="up").evict(range(inter), drop_cache=True)
    ctl.restore([1, 2, 7])
    check_rows(gate, np.zeros(inter, dtype=bool), bases["gate"])
    check_rows(up, np.zeros(inter, dtype=bool), bases["up"])
    assert torch.equal(down.view(torch.int32), pattern(hidden, inter, bases["down"]))


# ---------------------------------------------------------------- residency: the process vs the page cache

def _wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_evict_prefetch_and_the_two_residency_figures(tmp_path: Path) -> None:
    t = saved(tmp_path / "padded.safetensors", SMALL_ROWS, SMALL_COLS, padded=True)
    ctl = sparsemap.rows(t, name="emb")
    touch(t)
    res = ctl.residency()
    assert res.pages_present == res.n_pages and (res.row_present == 1).all() and (res.row_cached == 1).all()

    evicted = np.arange(0, 1024)  # pages 0..511, wholly
    assert ctl.evict(evicted) == 512
    res = ctl.residency()
    assert (res.row_present[evicted] == 0).all()
    # Not ==: where the kernel maps file pages by 2 MiB (large folios, PMD-mapped), a partial
    # MADV_DONTNEED unmaps the whole 2 MiB; those neighbours fault back from the cache.
    assert res.pages_present <= res.n_pages - 512
    # Gone from the process, still in the page cache: mincore is a separate figure.
    assert (res.row_cached == 1).all() and res.pages_cached == res.n_pages
    check_rows(t, np.zeros(SMALL_ROWS, dtype=bool))

    touch(t)
    # Nearly the whole tensor (file bytes 4 KiB to 8 MiB): the kernel drops only page-cache folios
    # wholly inside the range, and folios can be up to 2 MiB, so a small range may stay cached.
    evicted = np.arange(0, SMALL_ROWS - 2)
    assert ctl.evict(evicted, drop_cache=True) == res.n_pages - 1
    res = ctl.residency()
    assert (res.row_present[evicted] == 0).all()
    assert res.row_cached[evicted].mean() < 0.3  # dropped from the cache too (clean pages, mapped nowhere)

    ctl.prefetch(evicted)
    assert _wait_until(lambda: (ctl.residency().row_cached[evicted] == 1).all())
    # Read ahead into the cache, not into the process.
    assert (ctl.residency().row_present[evicted] == 0).all()
    check_rows(t, np.zeros(SMALL_ROWS, dtype=bool))
    assert (ctl.residency().row_present == 1).all()


def test_prefetch_leaves_masked_rows_zero(tmp_path: Path) -> None:
    t = saved(tmp_path / "plain.safetensors", SMALL_ROWS, SMALL_COLS)
    ctl = sparsemap.rows(t, name="emb")
    ctl.mask(range(100, 900))
    ctl.prefetch(range(SMALL_ROWS))
    ctl.evict(range(SMALL_ROWS), drop_cache=True)
    check_rows(t, bool_rows(SMALL_ROWS, range(100, 900)))


# ---------------------------------------------------------------- concurrency

def test_readers_see_true_values_while_rows_are_evicted_masked_and_restored(tmp_path: Path) -> None:
    t = saved(tmp_path / "plain.safetensors", SMALL_ROWS, SMALL_COLS)  # shared pages: the hard case
    ctl = sparsemap.rows(t, name="emb")
    rng = np.random.default_rng(11)
    order = rng.permutation(SMALL_ROWS)
    kept, churned = np.sort(order[: SMALL_ROWS // 2]), np.sort(order[SMALL_ROWS // 2:])
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def guarded(fn):
        def run(seed: int) -> None:
            try:
                fn(np.random.default_rng(seed))
            except BaseException as e:  # reported by the main thread
                errors.append(e)
                stop.set()
        return run

    @guarded
    def reader(r: np.random.Generator) -> None:
        while not stop.is_set():
            rows = r.choice(kept, 16)
            for row in rows.tolist():
                got = t[row].view(torch.int32)
                want = pattern(SMALL_ROWS, SMALL_COLS, ONE, row, row + 1)[0]
                if not torch.equal(got, want):
                    raise AssertionError(f"kept row {row} read wrong values")
            # A churned row is, element by element, its value or zero (mid-mask), never anything else.
            row = int(r.choice(churned))
            got = t[row].view(torch.int32).clone()  # one read: the row may change between two
            want = pattern(SMALL_ROWS, SMALL_COLS, ONE, row, row + 1)[0]
            if not bool(((got == want) | (got == 0)).all()):
                raise AssertionError(f"churned row {row} read garbage")
            reads[0] += 1

    @guarded
    def evicter(r: np.random.Generator) -> None:
        while not stop.is_set():
            ctl.evict(r.choice(SMALL_ROWS, 512, replace=False), drop_cache=bool(r.integers(2)))

    @guarded
    def masker(r: np.random.Generator) -> None:
        while not stop.is_set():
            some = r.choice(churned, 700, replace=False)
            ctl.mask(some)
            ctl.restore(r.choice(churned, 900, replace=False))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=evicter, args=(10,)), threading.Thread(target=masker, args=(20,))]
    for th in threads:
        th.start()
    time.sleep(3.0)
    stop.set()
    for th in threads:
        th.join(timeout=30)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors[0]
    assert reads[0] > 100
    assert not ctl.masked[kept].any()
    masked = ctl.masked
    check_rows(t, masked)
    ctl.restore(range(SMALL_ROWS))
    check_rows(t, np.zeros(SMALL_ROWS, dtype=bool))


# ---------------------------------------------------------------- errors and row arguments

def test_a_tensor_that_is_not_mapped_is_refused() -> None:
    with pytest.raises(NotMappedError, match="sparsemap convert"):
        sparsemap.rows(torch.randn(64, 32), name="w")


def test_a_view_with_strided_rows_is_refused(tmp_path: Path) -> None:
    t = saved(tmp_path / "plain.safetensors", 64, 32)
    with pytest.raises(RowError, match="contiguous") as info:
        sparsemap.rows(t[:, ::2], name="emb")
    assert type(info.value) is RowError
    assert "'emb'" in str(info.value)


def test_bad_rows_are_refused(tmp_path: Path) -> None:
    t = saved(tmp_path / "plain.safetensors", 64, 32)
    ctl = sparsemap.rows(t, name="emb")
    for bad in ([64], [0, 1, 200], [-65], np.array([64]), torch.tensor([99])):
        with pytest.raises(RowError, match="out of range"):
            ctl.mask(bad)
    for bad in (np.ones(63, dtype=bool), [True] * 65, torch.zeros(10, dtype=torch.bool)):
        with pytest.raises(RowError, match="64 entries"):
            ctl.mask(bad)
    with pytest.raises(RowError):
        ctl.evict([64])
    with pytest.raises(RowError):
        ctl.restore([64])
    assert not ctl.masked.any()
    check_rows(t, np.zeros(64, dtype=bool))


def test_a_tensor_on_the_meta_device_or_scalar_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RowError):
        sparsemap.rows(torch.empty(4, 4, device="meta"))
    sparsemap.save({"s": torch.tensor(1.0), "t": torch.ones(3)}, tmp_path / "s.safetensors")
    with pytest.raises(RowError):
        sparsemap.rows(sparsemap.Checkpoint(tmp_path / "s.safetensors").tensor("s"))


@pytest.mark.parametrize(("rows", "want"), [
    (slice(10, 20), range(10, 20)),
    (slice(None, None, 7), range(0, 64, 7)),
    (range(3, 60, 5), range(3, 60, 5)),
    ([1, 5, 5, 9], [1, 5, 9]),
    ([-1, -64], [63, 0]),
    (7, [7]),
    (np.array([2, 40], dtype=np.int32), [2, 40]),
    (torch.tensor([4, 8, 15]), [4, 8, 15]),
    (np.arange(64) % 2 == 1, range(1, 64, 2)),
    (torch.arange(64) >= 60, range(60, 64)),
    ([], []),
], ids=["slice", "slice-step", "range", "list", "negative", "int", "numpy", "torch", "bool-numpy",
        "bool-torch", "empty"])
def test_row_arguments(tmp_path: Path, rows, want) -> None:
    t = saved(tmp_path / "plain.safetensors", 64, 32)
    ctl = sparsemap.rows(t, name="emb")
    expected = bool_rows(64, want)
    ctl.mask(rows)
    assert np.array_equal(ctl.masked, expected)
    check_rows(t, expected)
    ctl.restore(rows)
    assert not ctl.masked.any()
    check_rows(t, np.zeros(64, dtype=bool))


def test_row_state_survives_a_controller_nobody_kept(tmp_path: Path) -> None:
    """Regression: controllers lived in a weak global registry, so rows(t).mask(...) followed by
    rows(t).restore(...) got a fresh controller that knew of no masked row, and restored nothing."""
    t = saved(tmp_path / "plain.safetensors", 64, 1024)  # 4 KiB rows: rows 8..15 own whole pages
    sparsemap.rows(t).mask(range(8, 16))
    gc.collect()  # nothing but the mapping refers to that controller now
    check_rows(t, bool_rows(64, range(8, 16)))
    assert sparsemap.rows(t).masked[8:16].all()
    assert sparsemap.rows(t).restore(range(8, 16)) == 8  # eight pages mapped back from the file
    check_rows(t, np.zeros(64, dtype=bool))


def test_rows_of_a_checkpoint_tensor_by_name(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    t = saved(path, 64, 32)
    ckpt = sparsemap.Checkpoint(path)
    ctl = sparsemap.rows(ckpt, "emb")
    assert sparsemap.rows(ckpt.tensor("emb")) is ctl and sparsemap.rows(t) is not ctl  # per mapping
    ctl.mask([5])
    check_rows(ckpt.tensor("emb"), bool_rows(64, [5]))
    with pytest.raises(RowError, match="name the checkpoint's tensor"):
        sparsemap.rows(ckpt)


def test_a_controller_outliving_its_mapping_refuses_instead_of_remapping(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    t = saved(path, 64, 1024)
    ctl = sparsemap.rows(t)
    ctl.mask([1])
    del t
    gc.collect()  # the last view is gone: the file is unmapped, its address range is no longer ours
    for op in (lambda: ctl.restore([1]), lambda: ctl.mask([2]), lambda: ctl.evict([3]),
               lambda: ctl.prefetch([4]), ctl.residency):
        with pytest.raises(NotMappedError, match="mapping these rows lived in was released"):
            op()


def test_two_views_of_the_same_bytes_never_undo_each_other(tmp_path: Path) -> None:
    """Regression: t and t[:128] had separate controllers, and evicting through one discarded the
    zeros the other had written, so masked rows read their file values again."""
    t = saved(tmp_path / "plain.safetensors", 256, 100)  # 400-byte rows: pages shared by rows
    full = sparsemap.rows(t)
    full.mask(range(20))
    part = sparsemap.rows(t[:128])
    assert part is not full
    refusal = r"20 rows of another view of the same bytes .* rows 0..19\) are masked"
    for op in (lambda: part.evict(range(128)), lambda: part.mask([100])):
        with pytest.raises(RowError, match=refusal):
            op()
    with pytest.raises(RowError, match="are masked"):
        sparsemap.rows(t.view(128, 200)).evict(range(128))  # another geometry over the same bytes
    check_rows(t, bool_rows(256, range(20)))  # nothing was undone
    full.restore(range(20))
    assert part.evict(range(128)) >= 0 and part.mask([100]) >= 0  # free to act once the other holds none
    check_rows(t, bool_rows(256, [100]))
    with pytest.raises(RowError, match="are masked"):
        full.mask([0])


def test_controllers_without_state_are_not_kept(tmp_path: Path) -> None:
    from sparsemap.mapped import mapping_of

    t = saved(tmp_path / "plain.safetensors", 64, 1024)
    for i in range(32):
        sparsemap.rows(t[i:]).prefetch([0])  # 32 geometries, none masking anything
    sparsemap.rows(t).mask([3])
    gc.collect()
    mm = mapping_of(t)
    assert list(mm.row_state) == [sparsemap.rows(t).key] and len(mm.row_controllers) <= 1


def test_one_controller_per_tensor(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    t = saved(path, 64, 32)
    again = sparsemap.Checkpoint(path).tensor("emb")  # another catalog maps the file again: a new tensor
    ctl = sparsemap.rows(t)
    assert sparsemap.rows(t) is ctl
    assert sparsemap.rows(t[:]) is ctl  # same rows of the same mapping
    assert sparsemap.rows(again) is not ctl
    ctl.mask([3])
    assert sparsemap.rows(t).masked[3]
    check_rows(again, np.zeros(64, dtype=bool))  # a separate mapping is untouched
