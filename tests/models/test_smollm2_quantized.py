"""SmolLM2-135M-Instruct with its GGUF blocks kept quantized and used in place.

The weights stay in the file (int4 for Q4_1, int8 for the Q8_0 embedding),
repacked for torch's kernels, mapped, and multiplied there; the reference is
the same GGUF dequantized once to float32 and run the same way. Greedy tokens
must be the same over 64 tokens of three prompts; the logits differ by the
bf16 rounding of the kernels' inputs, reported and bounded.
"""

from __future__ import annotations

import pytest
import torch

from sparsemap.checkpoint import Checkpoint
from sparsemap.formats.source import resolve_source
from sparsemap.mapped import mapping_of
from sparsemap.qtensor import QuantizedTensor

PROMPTS = ("Write a haiku about memory.", "What is the capital of France? Explain briefly.",
           "List three uses of a paperclip.")
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def models():
    from sparsemap.models import assets, llama, smollm2

    try:
        quantized, floats = smollm2.prepare_quantized(quiet=True), smollm2.prepare(quiet=True)
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    tokenizer = llama.ChatTokenizer(resolve_source(floats))
    return quantized, llama.load(quantized), llama.load(floats), tokenizer


def test_every_matrix_is_a_quantized_view_of_the_file(models):
    folder, model, _, _ = models
    ckpt = Checkpoint(folder / "model.sparsemap.safetensors")
    assert len(ckpt.catalog.quantized) == 211  # 210 Q4_1 matrices and the Q8_0 embedding
    schemes = {w.scheme for w in ckpt.catalog.quantized.values()}
    assert schemes == {"int4", "int8"}
    weights = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), QuantizedTensor)]
    assert len({id(w) for w in weights}) == 211
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, one set of parts
    for w in weights:
        for part in w.parts:  # each part lies in the file's mapping: page cache, not anonymous memory
            assert mapping_of(part).path == str(folder / "model.sparsemap.safetensors")
    # About a fifth of the float32 file: what a token reads.
    assert sum(w.nbytes_stored for w in {id(w): w for w in weights}.values()) < 100e6


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_greedy_tokens_as_the_dequantized_model(models, prompt):
    _, quantized, floats, tokenizer = models
    ids = tokenizer.prompt_ids(prompt)
    with torch.inference_mode():
        expected = floats.generate(ids, NEW_TOKENS)
        got = quantized.generate(ids, NEW_TOKENS)
        diff = (quantized(torch.tensor([ids])) - floats(torch.tensor([ids]))).abs().max().item()
    print(f"{prompt!r}: logits max difference {diff:.3f}")
    assert got == expected
    assert diff < 1.0  # measured 0.25 to 0.34 (logits span about 30)
