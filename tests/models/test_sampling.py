"""The next-token rule shared by the engines: greedy at temperature 0, a repeatable draw above it."""

from __future__ import annotations

import pytest
import torch

from sparsemap.models.sampling import next_token


def test_temperature_zero_is_the_argmax() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert next_token(logits) == 1
    assert next_token(logits.half(), 0.0) == 1


def test_draws_follow_the_softmax_and_repeat_under_one_seed() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    torch.manual_seed(0)
    draws = [next_token(logits, 1.0) for _ in range(3000)]
    shares = [draws.count(i) / len(draws) for i in range(3)]
    assert shares == pytest.approx([0.7, 0.2, 0.1], abs=0.03)
    torch.manual_seed(0)
    assert [next_token(logits, 1.0) for _ in range(3000)] == draws
    assert {next_token(logits, 1e-4) for _ in range(50)} == {0}  # a low temperature is nearly greedy


def test_a_negative_temperature_is_refused() -> None:
    with pytest.raises(ValueError, match="temperature must be 0 or more, not -1"):
        next_token(torch.zeros(3), -1)
