"""sparsemap.load: meta-device models get mapped weights, ties kept, mismatches refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import sparsemap
from sparsemap.errors import (
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UninitializedTensorError,
)
from sparsemap.mapped import mapping_of

from .conftest import tiny_llama_config


def _ids() -> torch.Tensor:
    return torch.arange(12).unsqueeze(0) % 128


def test_loaded_model_computes_what_transformers_computes(tiny_llama):
    reference, folder = tiny_llama
    model = sparsemap.load(lambda: LlamaForCausalLM(tiny_llama_config()), folder).eval()
    with torch.inference_mode():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)


def test_weights_are_zero_copy_views_of_the_file(tiny_llama):
    _, folder = tiny_llama
    ckpt = sparsemap.Checkpoint(folder)
    model = sparsemap.load(lambda: LlamaForCausalLM(tiny_llama_config()), ckpt)
    params = dict(model.named_parameters())
    assert params and all(ckpt.owns(p) for p in params.values())
    # The rotary inv_freq buffer is computed at construction, never saved: it must be real.
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_dtype_cast_converts_floating_tensors_only(tmp_path):
    path = tmp_path / "m.safetensors"
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    save_file({"lin.weight": weight, "lin.bias": torch.zeros(8, dtype=torch.bfloat16),
               "steps": torch.tensor([3], dtype=torch.int64)}, path)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 8)
            self.register_buffer("steps", torch.zeros(1, dtype=torch.int64))

    model = sparsemap.load(M, path, dtype=torch.float32)
    assert model.lin.weight.dtype == torch.float32
    assert torch.equal(model.lin.weight, weight.float())
    assert model.steps.dtype == torch.int64 and model.steps.item() == 3


def test_tied_weights_stay_tied(tmp_path):
    config = tiny_llama_config(tie_word_embeddings=True)
    torch.manual_seed(1)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)  # safetensors keeps one copy of a shared tensor
    model = sparsemap.load(lambda: LlamaForCausalLM(config), tmp_path).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)


def test_tied_weights_from_a_torch_checkpoint_that_saves_both_names(tmp_path):
    config = tiny_llama_config(tie_word_embeddings=True)
    reference = LlamaForCausalLM(config)
    torch.save(reference.state_dict(), tmp_path / "m.pt")
    model = sparsemap.load(lambda: LlamaForCausalLM(config), tmp_path / "m.pt")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _small_module():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_missing_tensors_are_listed_with_shapes_and_model_left_unchanged(tmp_path):
    sd = {k: v for k, v in _small_module().state_dict().items() if k != "1.weight"}
    save_file(sd, tmp_path / "m.safetensors")
    with sparsemap.skeleton():
        model = _small_module()
    with pytest.raises(MissingKeysError, match=r"1\.weight \(2, 3\)") as info:
        sparsemap.load(model, tmp_path / "m.safetensors")
    assert info.value.missing == ["1.weight (2, 3)"]
    assert all(p.is_meta for p in model.parameters())


def test_unexpected_tensors_are_listed(tmp_path):
    sd = _small_module().state_dict() | {"extra.weight": torch.zeros(5, 5)}
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(UnexpectedKeysError, match=r"extra\.weight \(5, 5\)"):
        sparsemap.load(_small_module, tmp_path / "m.safetensors")
    model = sparsemap.load(_small_module, tmp_path / "m.safetensors", skip=["extra.*"])
    assert not any(p.is_meta for p in model.parameters())


def test_shape_mismatch_names_both_shapes(tmp_path):
    sd = _small_module().state_dict()
    sd["0.weight"] = torch.zeros(3, 5)
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"0\.weight: \(3, 5\) vs \(3, 4\)"):
        sparsemap.load(_small_module, tmp_path / "m.safetensors")


def test_strict_false_initialises_a_missing_module_on_the_cpu_with_a_warning(tmp_path):
    sd = {k: v for k, v in _small_module().state_dict().items() if not k.startswith("1.")}
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="2 missing"):
        model = sparsemap.load(_small_module, tmp_path / "m.safetensors", strict=False)
    assert model[1].weight.device.type == "cpu" and not model[1].weight.is_meta
    assert model[1].weight.abs().sum() > 0  # reset_parameters ran: not left as uninitialised memory zeros
    assert model(torch.ones(1, 4)).shape == (1, 2)  # runs: nothing left on meta
    assert torch.equal(model[0].weight, sd["0.weight"])


def test_strict_false_initialises_only_the_missing_half_of_a_module(tmp_path):
    """The loaded weight stays the file's bytes (a view of the mapping, never written by the initialiser)."""
    sd = {k: v for k, v in _small_module().state_dict().items() if k != "1.bias"}
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="1 missing"):
        model = sparsemap.load(_small_module, tmp_path / "m.safetensors", strict=False)
    assert torch.equal(model[1].weight, sd["1.weight"]) and mapping_of(model[1].weight) is not None
    bound = 1 / 3 ** 0.5  # nn.Linear's bias init: uniform within 1/sqrt(fan_in)
    assert not model[1].bias.is_meta and model[1].bias.abs().max() <= bound


class _NoInit(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.scale = torch.nn.Parameter(torch.ones(3))


def test_strict_false_refuses_by_name_a_parameter_nothing_can_initialise(tmp_path):
    save_file({"fc.weight": torch.ones(3, 3), "fc.bias": torch.ones(3)}, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning), pytest.raises(MissingKeysError, match="no initialiser") as info:
        sparsemap.load(_NoInit, tmp_path / "m.safetensors", strict=False)
    assert info.value.missing == ["scale"]


@pytest.mark.parametrize("wrap", ["module.", "state_dict.", "state_dict.module."])
def test_a_single_wrapping_prefix_is_found_by_itself(tmp_path, wrap):
    """DataParallel's module., a nested {'state_dict': ...} (flattened to state_dict.), or both."""
    sd = _small_module().state_dict()
    save_file({wrap + k: v for k, v in sd.items()}, tmp_path / "m.safetensors")
    model = sparsemap.load(_small_module, tmp_path / "m.safetensors")
    assert torch.equal(model[1].weight, sd["1.weight"])


def test_a_nested_state_dict_in_a_torch_zip_loads(tmp_path):
    sd = _small_module().state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    model = sparsemap.load(_small_module, tmp_path / "ckpt.pt")
    assert torch.equal(model[0].bias, sd["0.bias"])


def test_rename_and_prefix_say_it_explicitly(tmp_path):
    sd = _small_module().state_dict()
    save_file({"net." + k: v for k, v in sd.items()}, tmp_path / "m.safetensors")
    a = sparsemap.load(_small_module, tmp_path / "m.safetensors", prefix="net.")
    b = sparsemap.load(_small_module, tmp_path / "m.safetensors", rename={"net.": ""})
    c = sparsemap.load(_small_module, tmp_path / "m.safetensors", rename=lambda n: n.removeprefix("net."))
    assert all(torch.equal(m[1].weight, sd["1.weight"]) for m in (a, b, c))
    with pytest.raises(sparsemap.errors.BadInputError, match="not both"):
        sparsemap.load(_small_module, tmp_path / "m.safetensors", prefix="net.", rename={"net.": ""})


def test_an_explicit_wrong_rename_is_refused_naming_what_matched_nothing(tmp_path):
    sd = _small_module().state_dict()
    save_file({"net." + k: v for k, v in sd.items()}, tmp_path / "m.safetensors")
    with pytest.raises(MissingKeysError, match="no tensor of the checkpoint is a tensor of the model"):
        sparsemap.load(_small_module, tmp_path / "m.safetensors", prefix="other.")


def test_two_checkpoint_names_that_rename_to_one_model_name_are_refused(tmp_path):
    sd = _small_module().state_dict()
    save_file({**sd, **{"module." + k: v.clone() for k, v in sd.items()}}, tmp_path / "m.safetensors")
    with pytest.raises(sparsemap.errors.LoadError, match=r"would both load into '0\.bias'"):
        sparsemap.load(_small_module, tmp_path / "m.safetensors", prefix="module.")


def test_skip_never_touches_the_skipped_tensors(tiny_llama, monkeypatch):
    _, folder = tiny_llama
    served = []
    original = sparsemap.Checkpoint._serve

    def spy(self, entry, **kwargs):
        served.append(entry.name)
        return original(self, entry, **kwargs)

    monkeypatch.setattr(sparsemap.Checkpoint, "_serve", spy)
    model = sparsemap.load(lambda: LlamaForCausalLM(tiny_llama_config()), folder, skip=["lm_head.*"])
    assert "lm_head.weight" not in served and "model.embed_tokens.weight" in served
    assert model.lm_head.weight.is_meta


def test_model_built_wholly_on_meta_reports_uncomputed_buffers(tiny_llama):
    _, folder = tiny_llama
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(UninitializedTensorError, match="inv_freq"):
        sparsemap.load(model, folder)


def test_conversion_holds_one_converted_tensor_in_flight(tmp_path):
    """bf16 -> fp32 of 8 x 16 MiB: peak anonymous growth stays near the result, not 2x."""
    from sparsemap.memory import AnonSampler, rss_anon

    n_tensors, rows = 8, 1024
    sd = {f"{i}.weight": torch.ones(rows, 2048, dtype=torch.bfloat16) for i in range(n_tensors)}
    save_file(sd, tmp_path / "m.safetensors")
    del sd

    def factory():
        return torch.nn.Sequential(*[torch.nn.Linear(2048, rows, bias=False) for _ in range(n_tensors)])

    before = rss_anon()
    with AnonSampler() as sampler:
        model = sparsemap.load(factory, tmp_path / "m.safetensors", dtype=torch.float32)
    result_nbytes = sum(p.numel() * 4 for p in model.parameters())  # 64 MiB
    one_tensor = rows * 2048 * 4
    assert sampler.peak - before <= result_nbytes + one_tensor + (24 << 20)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_load_state_dict_returns_views_of_every_tensor(tiny_llama):
    reference, folder = tiny_llama
    sd = sparsemap.load_state_dict(folder)
    expected = reference.state_dict()
    assert sd.keys() == expected.keys()
    assert all(torch.equal(sd[k], expected[k]) for k in sd)


class _Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.bn = torch.nn.BatchNorm1d(3)


def test_initialising_a_missing_weight_keeps_the_loaded_running_statistics(tmp_path):
    """BatchNorm's reset_parameters also resets its running statistics: those loaded stay the file's."""
    stats = {"bn.running_mean": torch.tensor([1.0, 2.0, 3.0]),
             "bn.running_var": torch.tensor([4.0, 5.0, 6.0]), "bn.num_batches_tracked": torch.tensor(7)}
    save_file({"fc.weight": torch.ones(3, 3), "fc.bias": torch.ones(3), **stats}, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="2 missing"):
        model = sparsemap.load(_Normed, tmp_path / "m.safetensors", strict=False)
    assert torch.equal(model.bn.running_mean, stats["bn.running_mean"])
    assert torch.equal(model.bn.running_var, stats["bn.running_var"])
    assert int(model.bn.num_batches_tracked) == 7
    assert torch.equal(model.bn.weight, torch.ones(3)) and torch.equal(model.bn.bias, torch.zeros(3))


@pytest.mark.parametrize("tied", [True, False])
def test_a_model_built_with_accelerates_init_empty_weights_loads(tmp_path, tied):
    """accelerate re-wraps each parameter assigned under init_empty_weights, so transformers' tie of lm_head
    to embed_tokens comes out as two meta tensors; load ties them again (as the config says) before
    matching names."""
    from accelerate import init_empty_weights

    config = tiny_llama_config(tie_word_embeddings=tied)
    torch.manual_seed(2)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)  # tied: one tensor stored, under embed_tokens' name
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    # What accelerate 1.x leaves (were it to keep the tie, this would test nothing more than skeleton()).
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert all(p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())  # rotary inv_freq: computed for real
    model = sparsemap.load(model, tmp_path).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for name, p in model.named_parameters():
        mapping_of(p, name)  # zero-copy
    with torch.inference_mode():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)


def test_skeleton_skips_initialisers_on_meta_tensors_only_and_puts_them_back():
    original = torch.nn.init.normal_
    with sparsemap.skeleton():
        emb = torch.nn.Embedding(10, 4)
        real = torch.zeros(3)
        torch.nn.init.ones_(real)  # a real tensor is still initialised
    assert emb.weight.device.type == "meta" and torch.equal(real, torch.ones(3))
    assert torch.nn.init.normal_ is original


def test_skeleton_spares_the_import_of_torchs_python_meta_kernels():
    # The first normal_ on a meta tensor imports them (sympy among them): 0.9 s and 70 MB, measured.
    from .helpers import run_isolated

    got = run_isolated("""
        import json, sys, torch
        import sparsemap
        with sparsemap.skeleton():
            torch.nn.Embedding(1000, 64)
        skeleton = "sympy" in sys.modules
        torch.empty(3, device="meta").normal_()
        print(json.dumps({"skeleton": skeleton, "plain meta": "sympy" in sys.modules}))
    """)
    assert got == {"skeleton": False, "plain meta": True}


class _Masked(torch.nn.Module):
    """A saved buffer computed at construction (a causal mask, as LLMs-from-scratch's GPT keeps one) and a
    computed one that is never saved."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("mask", torch.triu(torch.ones(512, 512), diagonal=1))  # 1 MiB
        self.register_buffer("scale", torch.arange(4.0), persistent=False)


def test_skeleton_can_leave_saved_buffers_to_the_checkpoint():
    original = torch.nn.Module.register_buffer
    with sparsemap.skeleton(saved_buffers=False):
        model = _Masked()
    assert model.mask.is_meta and torch.equal(model.scale, torch.arange(4.0))
    with sparsemap.skeleton():
        assert not _Masked().mask.is_meta
    with pytest.raises(RuntimeError, match="the constructor failed"), sparsemap.skeleton(saved_buffers=False):
        raise RuntimeError("the constructor failed")
    assert torch.nn.Module.register_buffer is original  # put back, after an error too


def test_a_factory_gets_saved_buffers_from_the_file_and_computed_ones_from_building(tmp_path):
    path = tmp_path / "m.safetensors"
    saved = dict(_Masked().state_dict())
    saved["mask"] = torch.full((512, 512), 7.0)  # not what the constructor computes: it must come from here
    save_file(saved, path)
    model = sparsemap.load(_Masked, path)
    assert torch.equal(model.mask, saved["mask"]) and mapping_of(model.mask, "mask").path == str(path)
    assert torch.equal(model.scale, torch.arange(4.0))


def test_a_saved_buffer_the_checkpoint_lacks_gets_its_computed_value(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({k: v for k, v in _Masked().state_dict().items() if k != "mask"}, path)
    with pytest.warns(UserWarning):  # strict=False: a missing tensor is said, not refused
        model = sparsemap.load(_Masked, path, strict=False)
    assert not model.mask.is_meta and torch.equal(model.mask, torch.triu(torch.ones(512, 512), diagonal=1))


def test_a_skipped_saved_buffer_keeps_its_computed_value(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(dict(_Masked().state_dict()), path)
    model = sparsemap.load(_Masked, path, skip=["mask"])
    assert torch.equal(model.mask, torch.triu(torch.ones(512, 512), diagonal=1))


class _Rotary(torch.nn.Module):
    """Older rotary code: a saved buffer, and one computed from it at construction."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2.0) / 8))
        self.register_buffer("cos", self.inv_freq.cos(), persistent=False)


def test_a_buffer_computed_from_a_saved_one_is_computed_again(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(dict(_Rotary().state_dict()), path)
    model = sparsemap.load(_Rotary, path)
    assert torch.equal(model.cos, _Rotary().inv_freq.cos())


class _ReadsItsBuffer(torch.nn.Module):
    """A constructor that reads a saved buffer's values: it cannot run with them on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("steps", torch.tensor(3))
        self.n = int(self.steps.item())


def test_a_constructor_that_reads_a_saved_buffer_is_built_with_real_buffers(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(dict(_ReadsItsBuffer().state_dict()), path)
    model = sparsemap.load(_ReadsItsBuffer, path)
    assert model.n == 3 and int(model.steps) == 3


def test_building_from_a_factory_does_not_hold_what_saved_buffers_cost():
    # Each block computes a 4 MiB mask and a 4 MiB temporary: without trimming, the C heap keeps about
    # 8 MiB a block (measured: +96 MiB of peak RSS for these 12 blocks, 15 MiB with).
    from .helpers import run_isolated

    got = run_isolated("""
        import json, torch
        import sparsemap
        from torch import nn

        class Block(nn.Module):  # as LLMs-from-scratch's: weights allocated around the mask (then on meta)
            def __init__(self):
                super().__init__()
                self.up = nn.Linear(768, 3072)
                self.register_buffer("mask", torch.triu(torch.ones(1024, 1024), diagonal=1))
                self.down = nn.Linear(3072, 768)

        def hwm():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) << 10

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts from what the process holds now, not from the imports' peak
        before = hwm()
        with sparsemap.skeleton(saved_buffers=False):
            nn.Sequential(*[Block() for _ in range(12)])
        print(json.dumps({"growth": hwm() - before}))
    """)
    assert got["growth"] < 40 << 20, f"building grew the peak RSS by {got['growth'] >> 20} MiB"
