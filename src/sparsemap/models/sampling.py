"""The next token from a step's logits: greedy, or drawn at a temperature. Shared by every engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token(logits: torch.Tensor, temperature: float = 0.0) -> int:
    """The argmax of ``logits`` (vocab,) when ``temperature`` is 0, else a draw from softmax(logits / T).

    Draws use torch's global generator: ``torch.manual_seed`` makes a run repeatable.

    Example:
        >>> next_token(torch.tensor([0.1, 2.0, -1.0]))
        1
    """
    if temperature < 0:
        raise ValueError(f"temperature must be 0 or more, not {temperature}")
    if temperature == 0:
        return int(logits.argmax())
    probabilities = F.softmax(logits.reshape(-1).float() / temperature, dim=-1)  # (vocab,)
    return int(torch.multinomial(probabilities, 1))
