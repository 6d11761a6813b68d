"""Tensor-parallel loading (sparsemap.parallel): plans checked before anything is mapped, and real runs.

The runs launch ``torchrun`` (gloo, CPU) on tests/tp_worker.py, each rank a real process, with bounded
timeouts. Each rank loads its own copy of the checkpoint (``{rank}`` in --source), dropped from the page
cache first, as if each ran on its own machine: ``mincore`` over its copy afterwards is exactly what that rank
made the kernel read. (Ranks sharing one file share its page cache, and a fault maps whatever neighbouring
pages are cached, so page tables would show the other ranks' pages too.)
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsemap
from sparsemap import pages
from sparsemap.errors import BadInputError, TensorParallelError
from sparsemap.mapped import mapping_of
from sparsemap.parallel import prepare, rowwise_weights
from sparsemap.rank_sources import page_runs

from .conftest import ModuleFolders, tiny_llama_config

WORKER = Path(__file__).resolve().parent / "tp_worker.py"
PAGE = pages.PAGE_SIZE
# What a rank may read beyond its slices and the header: the kernel's readahead behind the header's buffered
# reads, which grows with them (16 KiB measured after a 2 KiB header, 1 MiB after SmolLM2's 44 KiB one).
READAHEAD = 1 << 20


# ---------------------------------------------------------------- models

def llama(**overrides: object) -> nn.Module:
    from transformers import LlamaForCausalLM

    with sparsemap.skeleton():
        return LlamaForCausalLM(tiny_llama_config(**overrides))


# Big enough that a slice is many pages: rows of 2 KiB (attention) and 8 KiB (the MLP's down projection).
TP_LLAMA = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 4,
            "vocab_size": 4096}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.down = nn.Linear(16, 8)


# ---------------------------------------------------------------- the plan, checked on meta

def test_a_llamas_own_plan_splits_its_projections_heads_and_vocabulary() -> None:
    sharding = prepare(llama(num_attention_heads=4, num_key_value_heads=2), None, 2)
    split = sharding.split
    assert split["model.layers.0.self_attn.q_proj.weight"] == 0
    assert split["model.layers.1.self_attn.k_proj.weight"] == 0
    assert split["model.layers.0.self_attn.o_proj.weight"] == 1
    assert split["model.layers.0.mlp.up_proj.weight"] == 0
    assert split["model.layers.0.mlp.down_proj.weight"] == 1
    assert split["model.embed_tokens.weight"] == 0 and split["lm_head.weight"] == 0
    assert "model.norm.weight" not in split and "model.layers.0.input_layernorm.weight" not in split
    assert sharding.hf and sharding.modules["model.layers.1.mlp.down_proj"] == "rowwise"


def test_a_dimension_the_world_size_does_not_divide_is_refused_by_name() -> None:
    with pytest.raises(TensorParallelError) as info:
        prepare(llama(), None, 3)
    assert str(info.value) == ("tp_plan: model.embed_tokens.weight (128, 32) is split on dim 0 by "
                               "'embedding_rowwise': 128 does not divide among 3 ranks")
    assert isinstance(info.value, BadInputError) and "\n" not in str(info.value)


def test_heads_that_do_not_divide_are_refused_even_when_the_width_does() -> None:
    """3 heads of 32: the width 96 divides by 2, but a rank would get one and a half heads (as SmolLM2's 9
    and 3 would)."""
    model = llama(hidden_size=96, num_attention_heads=3, num_key_value_heads=3, intermediate_size=64)
    with pytest.raises(TensorParallelError, match=r"q_proj\.weight \(96, 96\) is split on dim 0 by "
                                                  r"'colwise': its 3 heads \(of 32\) do not divide among 2 "
                                                  r"ranks"):
        prepare(model, None, 2)
    # The MLP divides: split it, and leave the attention whole.
    plan = {"model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
            "model.layers.*.mlp.down_proj": "rowwise"}
    assert sorted(prepare(model, plan, 2).split) == sorted(
        f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down"))


def test_a_pattern_that_names_nothing_is_refused() -> None:
    with pytest.raises(TensorParallelError) as info:
        prepare(llama(), {"layers.*.mlp.up_proj": "colwise"}, 2)
    assert str(info.value) == ("tp_plan pattern 'layers.*.mlp.up_proj' names no module or parameter of "
                               "LlamaForCausalLM (full names, such as 'model.layers.0.self_attn.q_proj')")


@pytest.mark.parametrize(("plan", "message"), [
    ({"model.layers.*.mlp.up_proj": "sideways"}, r"= 'sideways' is not a style sparsemap maps \(known: "),
    ({"model.layers.*.mlp.up_proj": "packed_colwise"}, r"packed and expert styles .* not supported"),
    ({"model.norm": "colwise"}, r"model\.norm is a LlamaRMSNorm, which has no out_features"),
    ({}, r"non-empty mapping"),
])
def test_styles_that_sparsemap_cannot_map_are_refused(plan, message) -> None:
    with pytest.raises(TensorParallelError, match=message):
        prepare(llama(), plan, 2)


def test_tied_tensors_split_differently_are_refused() -> None:
    model = llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(TensorParallelError, match=r"tied tensors are split differently by tp_plan: "
                                                  r"model\.embed_tokens\.weight \(whole\), "
                                                  r"lm_head\.weight \(dim 0\)"):
        prepare(model, {"lm_head": "colwise_gather_output"}, 2)
    assert prepare(model, None, 2).split["lm_head.weight"] == 0  # its own plan splits both on the vocabulary


def test_a_plain_modules_plan_uses_torchs_styles_on_linear_layers_only() -> None:
    with torch.device("meta"):
        model = MLP()
    sharding = prepare(model, {"up": "colwise", "down": "rowwise"}, 2)
    assert not sharding.hf
    assert sharding.split == {"up.weight": 0, "up.bias": 0, "down.weight": 1}  # the rowwise bias is whole
    with pytest.raises(TensorParallelError, match=r"act is a ReLU: torch's colwise splits nn\.Linear and "
                                                  r"nn\.Embedding only"):
        prepare(model, {"act": "colwise"}, 2)
    with pytest.raises(TensorParallelError, match=r"names the parameter up\.weight: torch's styles split "
                                                  r"modules"):
        prepare(model, {"up.weight": "colwise"}, 2)
    with pytest.raises(TensorParallelError, match=r"MLP has no tensor-parallel plan of its own"):
        prepare(model, None, 2)


def test_the_weights_to_store_transposed_are_the_rowwise_ones() -> None:
    plan = prepare(llama(), None, 2).plan
    assert rowwise_weights(plan) == ["model.layers.*.self_attn.o_proj.weight",
                                     "model.layers.*.mlp.down_proj.weight"]


def test_tensor_parallel_arguments_are_checked_before_anything_else(tmp_path: Path) -> None:
    with pytest.raises(TensorParallelError, match=r"tp_plan= needs tp="):
        sparsemap.load(llama(), tmp_path / "absent.safetensors", tp_plan={"lm_head": "colwise"})
    with pytest.raises(TensorParallelError, match=r"staging= streams whole tensors"):
        sparsemap.load(llama(), tmp_path / "absent.safetensors", tp=object(), staging="64M")
    with pytest.raises(TensorParallelError, match=r"tp= takes a torch\.distributed DeviceMesh or "
                                                  r"ProcessGroup"):
        sparsemap.load(llama(), tmp_path / "absent.safetensors", tp=object())


def test_from_pretrained_takes_transformers_tensor_parallel_arguments(tiny_llama, monkeypatch) -> None:
    _, folder = tiny_llama
    with pytest.raises(BadInputError, match=r"tp_size= and device_mesh= go with tp_plan="):
        sparsemap.from_pretrained(folder, tp_size=2)
    with pytest.raises(BadInputError, match=r"tp_plan= and device_map='cpu' are exclusive"):
        sparsemap.from_pretrained(folder, tp_plan="auto", device_map="cpu")
    with pytest.raises(BadInputError, match=r"tp_plan='sideways': pass 'auto'"):
        sparsemap.from_pretrained(folder, tp_plan="sideways")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TensorParallelError, match=r"launch the script with torchrun"):
        sparsemap.from_pretrained(folder, tp_plan="auto")
    # transformers 5's way of asking the same (tp_plan= is deprecated there), as a dict or its dataclass.
    from transformers.distributed import DistributedConfig

    for config in ({"tp_size": 2}, DistributedConfig(tp_plan="auto")):
        with pytest.raises(TensorParallelError, match=r"launch the script with torchrun"):
            sparsemap.from_pretrained(folder, distributed_config=config)
    with pytest.raises(BadInputError, match=r"distributed_config= and tp_plan=/tp_size= are one request"):
        sparsemap.from_pretrained(folder, distributed_config={"tp_size": 2}, tp_plan="auto")


# ---------------------------------------------------------------- the pages a slice spans

@pytest.fixture
def page_aligned() -> torch.Tensor:
    """64 pages of float32, starting on a page (an anonymous mapping)."""
    mm = mmap.mmap(-1, 64 * PAGE)
    return torch.frombuffer(mm, dtype=torch.float32)


def test_a_colwise_slice_is_one_run_of_pages(page_aligned: torch.Tensor) -> None:
    rows = page_aligned.view(64, PAGE // 4)  # a page per row
    base = rows.data_ptr()
    assert page_runs(rows.narrow(0, 32, 32)) == [(base + 32 * PAGE, base + 64 * PAGE)]
    assert page_runs(rows.narrow(0, 0, 1).narrow(1, 10, 5)) == [(base, base + PAGE)]


def test_a_rowwise_slice_spans_part_of_every_row(page_aligned: torch.Tensor) -> None:
    base = page_aligned.data_ptr()
    wide = page_aligned.view(16, 4 * PAGE // 4)  # rows of 4 pages: half a row is 2 of them
    runs = page_runs(wide.narrow(1, 0, wide.shape[1] // 2))
    assert runs == [(base + 4 * r * PAGE, base + (4 * r + 2) * PAGE) for r in range(16)]
    narrow = page_aligned.view(256, PAGE // 16)  # rows of a quarter page: every page holds a part of a slice
    assert page_runs(narrow.narrow(1, 0, 8)) == [(base, base + 64 * PAGE)]
    # Stored transposed, the same slice is a contiguous run again.
    transposed = page_aligned.view(2 * PAGE // 4, 32).t()  # (32, 2048): logical rows, stored columns
    assert page_runs(transposed.narrow(1, 0, 1024)) == [(base, base + 32 * PAGE)]


# ---------------------------------------------------------------- one process: a world of one

def test_a_world_of_one_rank_loads_what_a_plain_load_does(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)
    reference = sparsemap.from_pretrained(tmp_path)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = sparsemap.from_pretrained(tmp_path, tp_plan="auto", device_mesh=init_device_mesh("cpu", (1,)))
        up = model.model.layers[0].mlp.up_proj.weight
        assert isinstance(up, DTensor)
        assert mapping_of(up.to_local()).path == str(tmp_path / "model.safetensors")  # a view of the file
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        # sparsemap.load takes the process group itself, and the model's own plan by default.
        loaded = sparsemap.load(lambda: LlamaForCausalLM(tiny_llama_config()), tmp_path, tp=dist.group.WORLD)
        assert isinstance(loaded.lm_head.weight, DTensor)
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, reference(ids).logits)
            assert torch.equal(loaded.eval()(ids).logits, reference(ids).logits)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- real ranks

def run_ranks(n: int, out: Path, *args: str, timeout: float = 240) -> tuple[int, list[dict]]:
    """``torchrun --nproc-per-node n tests/tp_worker.py --out out *args``: its exit code and each rank's
    result.

    Its own process group, so that a run past ``timeout`` is ended whole (torchrun and every rank).
    """
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",  # a free port, found by c10d
               str(WORKER), "--out", str(out), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"torchrun ran past {timeout} s") from None
    written = [out / f"rank{r}.json" for r in range(n)]
    results = [json.loads(path.read_text()) for path in written if path.exists()]
    assert len(results) == n, log.decode(errors="replace")[-4000:]
    return proc.returncode, results


def reference(out: Path, *args: str, timeout: float = 240) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(WORKER), "--reference", "--out", str(out), *args], check=True,
                   timeout=timeout, capture_output=True)
    return json.loads((out / "reference.json").read_text())


def copies_per_rank(folder: Path, n: int) -> str:
    """``n`` copies of ``folder`` (real copies: each its own page cache), as ``--source`` with ``{rank}``."""
    for rank in range(n):
        shutil.copytree(folder, folder.with_name(f"{folder.name}-rank{rank}"))
    return str(folder.with_name(f"{folder.name}-rank{{rank}}"))


def transposed(folder: Path, plan: dict[str, str], target: Path) -> Path:
    """``folder`` written to ``target`` with the weights ``plan`` splits rowwise stored transposed (a
    converted file, under the name sparsemap gives one); its other files (config, generation config)
    copied."""
    target.mkdir()
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy(path, target)
    sparsemap.convert(folder / "model.safetensors", target / "model.sparsemap.safetensors",
                      layout=sparsemap.Layout(transpose=rowwise_weights(plan)))
    return target


@pytest.fixture(scope="module")
def tp_llama(module_folders: ModuleFolders) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = module_folders.make("tp") / "llama"
    LlamaForCausalLM(tiny_llama_config(**TP_LLAMA)).save_pretrained(folder)
    return folder


def slack(rank: dict) -> int:
    """Bytes a rank may read besides its slices: the header (parsed with reads) and its readahead."""
    return rank["header_bytes"] + READAHEAD


def half_and_whole(rank: dict) -> float:
    """What a rank should read: its share of every split tensor, every replicated tensor whole, the header,
    and a page per tensor for rounding (a tensor that does not fill its last page shares it with the
    next)."""
    return (rank["split_full_bytes"] / rank["size"] + rank["whole_bytes"] + slack(rank)
            + rank["tensors"] * PAGE)


def check_reads(rank: dict) -> None:
    """The pages a rank read are the pages its slices span (and the header), and no more."""
    assert rank["cached_at_start"] == 0
    assert rank["cached_bytes"] <= rank["slice_page_bytes"] + slack(rank)
    assert rank["cached_outside_bytes"] <= slack(rank)
    assert rank["touched_bytes"] <= rank["cached_bytes"]
    # Loading copies nothing: a little bookkeeping beside the slices, never a weight.
    assert rank["anon_growth"] < 0.02 * rank["slice_bytes"] + (4 << 20)


@pytest.mark.parametrize("layout", ["as saved", "rowwise transposed"])
def test_two_ranks_generate_the_single_process_tokens_reading_only_their_slices(
        tp_llama: Path, tmp_path: Path, layout: str) -> None:
    plan = prepare(llama(**TP_LLAMA), None, 2).plan
    folder = (Path(shutil.copytree(tp_llama, tmp_path / "model")) if layout == "as saved"
              else transposed(tp_llama, plan, tmp_path / "model"))
    want = reference(tmp_path / "reference", "--source", str(folder))
    code, ranks = run_ranks(2, tmp_path / "out", "--source", copies_per_rank(folder, 2))
    assert code == 0, ranks
    for rank in ranks:
        assert rank["tokens"] == want["tokens"]
        check_reads(rank)
        assert rank["slice_bytes"] == rank["split_full_bytes"] // 2 + rank["whole_bytes"]
    if layout == "rowwise transposed":
        # Every slice is a contiguous run: each rank reads half the weights (only the norms are whole).
        for rank in ranks:
            assert rank["cached_bytes"] <= half_and_whole(rank)
    else:
        # A rowwise slice of 2 KiB rows is a part of every page: the attention's output is read whole.
        assert all(rank["slice_page_bytes"] > 1.1 * rank["slice_bytes"] for rank in ranks)


def test_a_plain_module_runs_under_torchs_colwise_and_rowwise(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, str(WORKER.parent))
    try:
        from tp_worker import MLP as StackedMLP
    finally:
        sys.path.remove(str(WORKER.parent))
    torch.manual_seed(0)
    source = tmp_path / "mlp" / "mlp.safetensors"
    source.parent.mkdir()
    save_file(StackedMLP(1024, 4096, 2).state_dict(), str(source))
    args = ("--mode", "mlp", "--mlp", "1024", "4096", "2")
    want = reference(tmp_path / "reference", "--source", str(source), *args)
    plan = json.dumps({"layers.*.up": "colwise", "layers.*.down": "rowwise"})
    source_per_rank = copies_per_rank(source.parent, 2) + "/mlp.safetensors"
    code, ranks = run_ranks(2, tmp_path / "out", "--source", source_per_rank, "--plan", plan, *args)
    assert code == 0, ranks
    for rank in ranks:
        assert torch.allclose(torch.tensor(rank["output"]), torch.tensor(want["output"]), atol=1e-5)
        check_reads(rank)


@pytest.mark.parametrize(("config", "plan", "ranks", "error"), [
    ({"hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 3}, "auto", 2,
     "TensorParallelError: tp_plan: model.layers.0.self_attn.q_proj.weight (96, 96) is split on dim 0 by "
     "'colwise': its 3 heads (of 32) do not divide among 2 ranks; replicate model.layers.0.self_attn.q_proj "
     "(tp_plan={...: 'replicate'}) or run a number of ranks that divides the heads"),
    ({}, json.dumps({"model.layers.*.mlp.gate": "colwise"}), 2,
     "TensorParallelError: tp_plan pattern 'model.layers.*.mlp.gate' names no module or parameter of "
     "LlamaForCausalLM (full names, such as 'model.layers.0.self_attn.q_proj')"),
])
def test_a_bad_plan_fails_on_every_rank_with_the_same_line(tmp_path: Path, config, plan, ranks,
                                                           error) -> None:
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config(**config)).save_pretrained(tmp_path / "model")
    code, results = run_ranks(ranks, tmp_path / "out", "--source", str(tmp_path / "model"), "--plan", plan)
    assert code != 0
    assert [r["error"] for r in results] == [error] * ranks


# ---------------------------------------------------------------- SmolLM2

# Rules of the model's own plan overridden, as transformers' tp_plan= takes them: the attention whole, the MLP
# and the (tied) vocabulary split as the model's plan splits them.
SMOLLM2_WHOLE_ATTENTION = {f"model.layers.*.self_attn.{p}_proj": "replicate" for p in "qkvo"}


@pytest.fixture(scope="module")
def smollm2_prompt() -> tuple[Path, str]:
    from transformers import AutoTokenizer

    from sparsemap.models import smollm2

    folder = smollm2.prepare(quiet=True)
    chat = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(chat, add_generation_prompt=True,
                                                                    return_dict=True)["input_ids"]
    return folder, ",".join(map(str, ids))


@pytest.mark.model
def test_smollm2_on_two_ranks_splits_what_divides_and_reads_half_of_it(smollm2_prompt,
                                                                       tmp_path: Path) -> None:
    """9 attention heads and 3 KV heads do not divide by 2: the attention stays whole on every rank, the MLP
    and the (tied) vocabulary are split; with the down projection stored transposed every slice is a run of
    pages."""
    folder, prompt = smollm2_prompt
    args = ("--prompt", prompt, "--new-tokens", "16")
    want = reference(tmp_path / "reference", "--source", str(folder), *args)
    local = transposed(folder, {"model.layers.*.mlp.down_proj": "rowwise"}, tmp_path / "smollm2")
    code, ranks = run_ranks(2, tmp_path / "out", "--source", copies_per_rank(local, 2), "--plan",
                            json.dumps(SMOLLM2_WHOLE_ATTENTION), *args)
    assert code == 0, ranks
    for rank in ranks:
        assert rank["tokens"] == want["tokens"] and len(want["tokens"]) == 16
        check_reads(rank)
        # Half of what is split, all of what is not (the attention, the norms), and a few pages.
        assert rank["cached_bytes"] <= half_and_whole(rank)
        assert rank["whole_bytes"] > 50e6  # the attention: replicated


@pytest.mark.model
def test_smollm2_on_three_ranks_runs_its_own_plan(smollm2_prompt, tmp_path: Path) -> None:
    """3 ranks divide the heads (3 and 1 per rank), the MLP (512) and the vocabulary: the model's own
    plan."""
    folder, prompt = smollm2_prompt
    args = ("--prompt", prompt, "--new-tokens", "16")
    want = reference(tmp_path / "reference", "--source", str(folder), *args)
    code, ranks = run_ranks(3, tmp_path / "out", "--source", str(folder), *args, timeout=400)
    assert code == 0, ranks
    assert [rank["tokens"] for rank in ranks] == [want["tokens"]] * 3
    assert all(rank["slice_bytes"] < 0.34 * rank["file_bytes"] for rank in ranks)


# ---------------------------------------------------------------- Meta's release in files: rank i maps file i

# TP_LLAMA's shape as Meta's params.json gives it (the writer's multiple_of 32 and ffn_dim_multiplier 0.5 make
# the feed-forward 704 wide).
META_LLAMA = {**TP_LLAMA, "intermediate_size": 704}
META_FILES = ("consolidated.00.pth", "consolidated.01.pth")


def meta_release(folder: Path, *, embedding_dim: int, **overrides: object) -> tuple[nn.Module, Path]:
    """A random Llama (``META_LLAMA``) and its release in 2 files, written as Meta's model-parallel code
    splits it: ``(model, folder)``."""
    from .format_writers import tiny_llama, write_meta_release

    model = tiny_llama(**{**META_LLAMA, **overrides})
    return model, write_meta_release(folder, model, 2, embedding_dim=embedding_dim)


def rank_parts(folder: Path, plan: dict[str, str] | None, rank: int) -> dict[str, torch.Tensor]:
    """What rank ``rank`` of 2 is served from ``folder`` under ``plan`` (``None``: the model's own): its slice
    of each split tensor, the whole of the others."""
    from transformers import LlamaForCausalLM

    from sparsemap.formats.meta_llama import read_release
    from sparsemap.models.meta_llama import hf_config
    from sparsemap.rank_sources import RankFiles, open_for_rank

    with sparsemap.skeleton():
        model = LlamaForCausalLM(hf_config(read_release(folder)))
    sharding = prepare(model, plan, 2)
    source = open_for_rank(str(folder), rank, 2)
    assert isinstance(source, RankFiles)
    return dict(source.parts({name: sharding.split.get(name) for name in source.catalog}, reads=False))


def expected(model: nn.Module, plan: dict[str, str] | None, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors cut from the whole model (transformers' names and row order)."""
    split = prepare(llama(**META_LLAMA), plan, 2).split
    return {name: t if name not in split else t.chunk(2, split[name])[rank]
            for name, t in model.state_dict().items()}


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_i_is_served_file_is_tensors_with_q_and_k_rows_in_transformers_order(tmp_path: Path,
                                                                                  rank: int) -> None:
    """Llama 3's split (the embedding by rows) is the one transformers' plan makes: every tensor of rank i
    is file i's. q and k come in transformers' rotary order: the permutation stays within each head and each
    file holds whole heads, so permuting file i's rows gives rank i's slice of the permuted whole."""
    model, folder = meta_release(tmp_path / "llama", embedding_dim=0)
    served, want = rank_parts(folder, None, rank), expected(model, None, rank)
    assert served.keys() == want.keys()
    for name, t in served.items():
        assert torch.equal(t, want[name]), name
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            with pytest.raises(sparsemap.errors.NotMappedError):
                mapping_of(t)  # reordered: a copy of file i's part, as a release in one file serves them
        else:
            assert mapping_of(t).path == str(folder / META_FILES[rank]), name
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(served[q], model.state_dict()[q].chunk(2)[1 - rank])  # not the other rank's heads


@pytest.mark.parametrize("rank", [0, 1])
def test_a_release_in_one_file_serves_q_and_k_slices_reordered_after_slicing(tmp_path: Path, rank: int,
                                                                            monkeypatch) -> None:
    """A checkpoint of whole tensors whose q and k rows are stored in Meta's order (a release in one file, a
    GGUF, llama2.c): each rank reorders its own heads' rows only, never the whole tensor."""
    from transformers import LlamaForCausalLM

    from sparsemap.formats.meta_llama import read_release
    from sparsemap.models.meta_llama import hf_config
    from sparsemap.rank_sources import WholeTensors, open_for_rank

    from .format_writers import tiny_llama, write_meta_release

    model = tiny_llama(**META_LLAMA)
    folder = write_meta_release(tmp_path / "llama", model, 1)
    with sparsemap.skeleton():
        sharding = prepare(LlamaForCausalLM(hf_config(read_release(folder))), None, 2)
    source = open_for_rank(str(folder), rank, 2)
    assert isinstance(source, WholeTensors)
    selected: list[int] = []  # rows of each reordering
    index_select = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select",
                        lambda t, dim, index: (selected.append(t.shape[dim]), index_select(t, dim, index))[1])
    served = dict(source.parts({name: sharding.split.get(name) for name in source.catalog}, reads=False))
    want = expected(model, None, rank)
    for name, t in served.items():
        assert torch.equal(t, want[name]), name
    n_qk = sum(name.endswith(("q_proj.weight", "k_proj.weight")) for name in served)
    assert len(selected) == n_qk and all(rows <= META_LLAMA["hidden_size"] // 2 for rows in selected)


def test_a_plan_that_splits_otherwise_than_the_files_is_joined_from_them(tmp_path: Path, caplog) -> None:
    """Llama 2's embedding is split by columns, transformers' plan splits the vocabulary: each rank's rows
    are gathered from both files (a copy of its slice); a replicated projection is joined whole. Everything
    else is still file i's."""
    model, folder = meta_release(tmp_path / "llama", embedding_dim=1)
    plan = {**llama(**META_LLAMA).tp_plan, "model.layers.*.self_attn.v_proj": "replicate"}
    with caplog.at_level("INFO", logger="sparsemap"):
        served = rank_parts(folder, plan, 1)
    want = expected(model, plan, 1)
    joined = ["model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight",
              "model.layers.1.self_attn.v_proj.weight"]
    for name, t in served.items():
        assert torch.equal(t, want[name]), name
        if name in joined:
            with pytest.raises(sparsemap.errors.NotMappedError):
                mapping_of(t)
        elif not name.endswith(("q_proj.weight", "k_proj.weight")):
            assert mapping_of(t).path == str(folder / META_FILES[1]), name
    assert served["model.layers.0.self_attn.v_proj.weight"].shape == (256, 512)  # whole: 4 heads of 64
    assert (f"{folder}: rank 1 joined 3 tensors from the 2 files (5.0 MiB copied), split by the plan "
            "otherwise than by the files: model.embed_tokens.weight (split on dim 1 in the files, split on "
            "dim 0 by the plan), model.layers.0.self_attn.v_proj.weight (split on dim 0 in the files, whole "
            "by the plan)") in caplog.text
    # A plan that splits the embedding as these files do maps file i only.
    matching = rank_parts(folder, {**plan, "model.embed_tokens": "embedding_colwise"}, 1)
    assert mapping_of(matching["model.embed_tokens.weight"]).path == str(folder / META_FILES[1])


@pytest.mark.parametrize("size", [1, 3])
def test_a_release_in_two_files_needs_two_ranks(tmp_path: Path, size: int) -> None:
    from sparsemap.rank_sources import open_for_rank

    _, folder = meta_release(tmp_path / "llama", embedding_dim=0)
    with pytest.raises(TensorParallelError) as info:
        open_for_rank(str(folder), 0, size)
    assert str(info.value) == (
        f"{folder}: a Meta release in 2 model-parallel files (consolidated.00.pth ... consolidated.01.pth) "
        f"loads on 2 ranks, rank i mapping file i, not on {size}: run 2 (torchrun --nproc-per-node 2), or "
        f"join the files once with `sparsemap convert {folder} OUT/` and load OUT/ on any number")


def meta_reads(rank: dict, joined_bytes: int = 0) -> None:
    """Rank i mapped file i and nothing else, read of the other file only its header (and, where the plan
    joins a tensor, its share of it), and copied nothing but q and k (and what it joined)."""
    own, other = META_FILES[rank["rank"]], META_FILES[1 - rank["rank"]]
    assert rank["mapped_files"] == [own]
    assert rank["cached_at_start"] == 0
    theirs = rank["files"][other]
    # Pages, plus the kernel's readahead behind the header's reads and a page per joined piece for rounding.
    assert theirs["cached_bytes"] <= theirs["header_bytes"] + READAHEAD + joined_bytes + 8 * PAGE, theirs
    assert rank["files"][own]["cached_bytes"] >= rank["slice_bytes"]
    assert rank["slice_bytes"] + rank["copied_bytes"] == rank["split_full_bytes"] // 2 + rank["whole_bytes"]
    assert rank["anon_growth"] < rank["copied_bytes"] + 0.02 * rank["slice_bytes"] + (4 << 20)


@pytest.mark.parametrize("embedding_dim", [0, 1],
                         ids=["llama3-embedding-by-rows", "llama2-embedding-by-columns"])
def test_two_ranks_load_metas_two_files_each_mapping_its_own(tmp_path: Path, embedding_dim: int) -> None:
    """Greedy tokens of the release on 2 ranks are the single-process tokens of the same weights joined
    (``sparsemap convert``). By rows (Llama 3) every tensor is file i's; by columns (Llama 1, 2) each rank
    gathers its rows of the embedding from both files: half of the other file's part."""
    from sparsemap.models.meta_llama import write_folder

    _, folder = meta_release(tmp_path / "llama", embedding_dim=embedding_dim)
    write_folder(folder, tmp_path / "converted")
    want = reference(tmp_path / "reference", "--source", str(tmp_path / "converted"))
    code, ranks = run_ranks(2, tmp_path / "out", "--source", copies_per_rank(folder, 2))
    assert code == 0, ranks
    embedding_part = META_LLAMA["vocab_size"] * META_LLAMA["hidden_size"] * 4 // 2  # float32, one file's
    for rank in ranks:
        assert rank["tokens"] == want["tokens"]
        meta_reads(rank, joined_bytes=0 if embedding_dim == 0 else embedding_part // 2)


def test_a_release_on_the_wrong_number_of_ranks_fails_on_every_rank_alike(tmp_path: Path) -> None:
    _, folder = meta_release(tmp_path / "llama", embedding_dim=0)
    code, results = run_ranks(3, tmp_path / "out", "--source", str(folder))
    assert code != 0
    error = (f"TensorParallelError: {folder}: a Meta release in 2 model-parallel files (consolidated.00.pth "
             "... consolidated.01.pth) loads on 2 ranks, rank i mapping file i, not on 3: run 2 (torchrun "
             f"--nproc-per-node 2), or join the files once with `sparsemap convert {folder} OUT/` and load "
             "OUT/ on any number")
    assert [r["error"] for r in results] == [error] * 3
