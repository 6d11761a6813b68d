"""How the next token is chosen, shared by every engine: the settings (:class:`Sampling`) and one
generation's state (:class:`Sampler`).

The rules are transformers' ``generate``, step for step, so that the lean engines and transformers
choose the same tokens from the same logits and seed:

1. the repetition penalty on every token already in the sequence, prompt included
   (``RepetitionPenaltyLogitsProcessor``: a positive logit is divided by it, a negative one multiplied);
2. greedy (temperature 0) takes the argmax here; sampling goes on with
3. the temperature (``TemperatureLogitsWarper``), 4. top-k (``TopKLogitsWarper``),
   5. top-p (``TopPLogitsWarper``), 6. min-p (``MinPLogitsWarper``), each skipped at its neutral value as
   transformers skips it;
7. ``torch.multinomial(softmax(scores), 1)`` on torch's global generator, seeded with
   ``torch.manual_seed(seed)`` when a seed is given.

What else a ``generation_config.json`` may ask of transformers' ``generate`` (typical-p, banned words, beam
search, ...) is not applied here; :func:`unapplied` names what a file asks that these rules leave out.

Importing this module does not import torch (``sparsemap.models.generate`` imports it before the
measured "import torch" phase); :class:`Sampler` imports it when a generation starts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BadInputError

if TYPE_CHECKING:
    import torch

# The largest seed torch.manual_seed takes: 2**64 - 1 (a 64-bit unsigned state).
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Sampling:
    """How a generation chooses tokens; the defaults are transformers' own (``GenerationConfig``).

    Args:
        temperature: 0 for greedy decoding (the argmax); above 0, draws from softmax(logits / T).
        top_k: draw only among the ``top_k`` most likely tokens; 0 turns it off. Sampling only.
        top_p: draw only among the most likely tokens whose probabilities add up to ``top_p``
            (nucleus sampling, at least one token kept); 1 turns it off. Sampling only.
        min_p: draw only among tokens at least ``min_p`` times as likely as the likeliest one (after
            the temperature, top-k and top-p), as llama.cpp's ``--min-p``; 0 turns it off. Sampling only.
        repetition_penalty: above 1, tokens already in the sequence (prompt included) get less likely;
            below 1, more likely; 1 turns it off. Applies to greedy decoding too, as in transformers.
        seed: the seed of torch's global generator for this generation (``torch.manual_seed``);
            ``None`` leaves the generator as it is.

    Raises:
        BadInputError: a value out of its range; the message names the setting and the value.

    Example:
        >>> Sampling(temperature=0.7, top_p=0.9, seed=42).greedy
        False
        >>> Sampling(top_p=1.5)
        Traceback (most recent call last):
        ...
        sparsemap.errors.BadInputError: top_p must be between 0 and 1, not 1.5
    """

    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # The one place the settings are checked: the CLI, generation_config.json and the API all come here.
        temperature = _number("temperature", self.temperature)
        if temperature < 0:
            raise BadInputError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        top_p = _number("top_p", self.top_p)
        if not 0 <= top_p <= 1:
            raise BadInputError(f"top_p must be between 0 and 1, not {self.top_p}")
        min_p = _number("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise BadInputError(f"min_p must be between 0 (off) and 1, not {self.min_p}")
        penalty = _number("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise BadInputError("repetition_penalty must be above 0 (1 turns it off), "
                                f"not {self.repetition_penalty}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise BadInputError(f"top_k must be a whole number, 0 (off) or more, not {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise BadInputError(f"seed must be a whole number from 0 to 2**64 - 1, not {self.seed!r}")
        # Whole-number floats (a JSON 1.0) are kept as floats; ints given for floats become floats.
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                            ("repetition_penalty", penalty)):
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        """Whether the argmax is taken (temperature 0): top-k, top-p, min-p and the seed then change
        nothing."""
        return self.temperature == 0

    @classmethod
    def for_model(cls, generation_config: str | os.PathLike[str] | None, *, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  repetition_penalty: float | None = None, seed: int | None = None) -> Sampling:
        """The settings for a model: transformers' defaults, then its ``generation_config.json`` (when
        there is one), then the values given here (``None``: not given), as transformers' ``generate``
        merges them.

        The file's ``do_sample`` decides greedy or not: without ``do_sample: true`` its temperature is
        ignored (transformers ignores it too) and decoding is greedy unless ``temperature`` is given.

        Raises:
            BadInputError: the file is not a JSON object, or one of its values (not overridden) or of
                the given ones is out of range.

        Example:
            >>> Sampling.for_model(None, temperature=0.8, seed=1)
            Sampling(temperature=0.8, top_k=50, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=1)
        """
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repetition_penalty": repetition_penalty, "seed": seed}
        base = cls()
        if generation_config is not None:
            from_file = {k: v for k, v in _read_generation_config(generation_config).items()
                         if given.get(k) is None}
            try:
                base = cls(**from_file)
            except BadInputError as e:
                raise BadInputError(e.detail, path=generation_config) from None
        return replace(base, **{k: v for k, v in given.items() if v is not None})

    def transformers_kwargs(self) -> dict[str, Any]:
        """The same settings as keyword arguments of transformers' ``generate`` (the seed is not one:
        see :meth:`seed_generator`)."""
        if self.greedy:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        # min_p 0 as None, transformers' off: given, so the model's generation_config cannot turn it on.
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p or None, "repetition_penalty": self.repetition_penalty}

    def seed_generator(self) -> None:
        """Seed torch's global generator with :attr:`seed`, when there is one: transformers' draws and
        the lean engines' come from it."""
        if self.seed is not None:
            import torch

            torch.manual_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (for reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}



def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: object) -> float:
    """``value`` as a finite float, or an error naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``generation_config.json``'s object, or an error naming the file."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read generation_config.json: {e}", path=path) from None
    if not isinstance(config, dict):
        raise BadInputError("generation_config.json is not a JSON object", path=path)
    return config


def _read_generation_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sampling settings a ``generation_config.json`` holds, in :class:`Sampling`'s terms."""
    config = _read_json_object(path)
    values: dict[str, Any] = {k: config[k] for k in ("top_k", "top_p", "min_p", "repetition_penalty")
                              if config.get(k) is not None}
    if config.get("do_sample") is True:
        # transformers' default temperature (1.0) when the file samples without naming one.
        temperature = config.get("temperature")
        values["temperature"] = 1.0 if temperature is None else temperature
    return values


GREEDY = Sampling()  # transformers' default: the argmax

# What a generation_config.json may ask of transformers' generate that Sampler leaves out, each with the
# value at which it does nothing. The second group acts only when sampling, in transformers too.
_LEFT_OUT = {"no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
             "min_length": 0, "min_new_tokens": 0, "sequence_bias": None, "suppress_tokens": None,
             "begin_suppress_tokens": None, "forced_eos_token_id": None, "num_beams": 1,
             "encoder_repetition_penalty": 1.0, "guidance_scale": 1, "exponential_decay_length_penalty": None}
_LEFT_OUT_WHEN_SAMPLING = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}


def unapplied(generation_config: str | os.PathLike[str] | None, *, sampling: bool) -> list[str]:
    """The settings of ``generation_config`` (a ``generation_config.json``; ``None``: none) that
    transformers' ``generate`` would apply and :class:`Sampler` does not, as ``"name value"``: what a lean
    engine says it leaves out, rather than leaving it out unsaid. ``sampling``: for a generation that
    samples (typical-p and the like act only then, in transformers too).

    Raises:
        BadInputError: the file is not a JSON object.

    Example:
        >>> unapplied(None, sampling=False)
        []
    """
    if generation_config is None:
        return []
    config = _read_json_object(generation_config)
    asked = {**_LEFT_OUT, **_LEFT_OUT_WHEN_SAMPLING} if sampling else _LEFT_OUT
    return [f"{name} {config[name]}" for name, off in asked.items()
            if config.get(name) not in (None, off, [], {})]


def resolve(sampling: Sampling | None, temperature: float | None) -> Sampling:
    """The settings a ``generate(..., sampling=, temperature=)`` call asked for: ``sampling``, or the
    ``temperature=`` shorthand for ``Sampling(temperature=...)`` (older callers); greedy when neither."""
    if sampling is not None and temperature is not None:
        raise BadInputError("give sampling= or temperature=, not both")
    if temperature is not None:
        return Sampling(temperature=temperature)
    return sampling if sampling is not None else GREEDY


class Sampler:
    """One generation's token choices: the settings, and which tokens the sequence holds so far (for the
    repetition penalty). Creating it seeds torch's global generator when the settings have a seed.

    Example:
        >>> import torch
        >>> sampler = Sampler(Sampling(temperature=0.7, seed=0), prompt_ids=[1, 2, 3])
        >>> token = sampler(torch.randn(32))   # the chosen token, now part of the sequence too
    """

    def __init__(self, settings: Sampling, prompt_ids: Iterable[int]) -> None:
        self.settings = settings
        self.seen: torch.Tensor | None = None  # (vocab,) bool: tokens in the sequence; made at the first step
        self.pending = list(prompt_ids)  # ids not yet marked in ``seen``
        settings.seed_generator()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed scores of one step's ``logits`` (vocab,) or (1, vocab): float32, (1, vocab),
        -inf for filtered tokens; what the draw (or the argmax) is taken from."""
        import torch

        s = self.settings
        scores = logits.reshape(1, -1).float()  # (1, vocab): transformers processes float32 rows
        vocab = scores.shape[-1]
        if s.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(vocab, dtype=torch.bool)
            if self.pending:
                ids = torch.tensor(self.pending, dtype=torch.long)
                self.seen[ids[ids < vocab]] = True  # ids past the head's rows can never be produced
                self.pending.clear()
            # The same two float ops as transformers' gather/where/scatter, on a mask: equal bits.
            penalized = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
            scores = torch.where(self.seen, penalized, scores)
        if s.greedy:
            return scores
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k != 0:
            # Ties with the k-th score are kept, as transformers keeps them.
            kth = torch.topk(scores, min(s.top_k, vocab))[0][..., -1, None]  # (1, 1)
            scores = scores.masked_fill(scores < kth, -math.inf)
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)  # (1, vocab) each
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - s.top_p)  # the unlikely tail whose mass stays within 1 - top_p
            drop[..., -1:] = False  # the likeliest token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
        if s.min_p > 0.0:
            # The likeliest token is never below min_p (at most 1) times itself, so one always stays.
            probs = scores.softmax(dim=-1)  # (1, vocab)
            scores = scores.masked_fill(probs < s.min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
        return scores

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token for ``logits`` (vocab,) or (1, vocab); it joins the sequence."""
        import torch

        scores = self.scores(logits)
        if self.settings.greedy:
            token = int(scores.argmax())
        else:
            # Over the whole vocabulary, filtered tokens at probability 0: the draw consumes the same
            # random numbers as transformers' (multinomial takes one per entry of its input).
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1))
        self.pending.append(token)
        return token


class Feeds(Protocol):
    """What a generation loop needs of a model's running sequence: run more ids, get the next logits."""

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` after those fed so far; the logits after the last of them, (vocab,)."""
        ...


def generate_from(state: Feeds, logits: torch.Tensor, choose: Sampler, max_new_tokens: int, *,
                  stop_ids: Iterable[int] = (), on_token: Callable[[int], bool | None] | None = None,
                  ) -> list[int]:
    """The tokens that follow ``logits`` (those after the last id fed to ``state``), chosen by ``choose``,
    each fed back in turn; every engine's generation and each turn of a conversation run this loop.

    Generation ends after ``max_new_tokens``, at a token of ``stop_ids`` (kept in the result), or where
    ``on_token(token)`` (which hears each token as it comes) answers true. The last token is never fed:
    nothing needs its logits, so ``state`` ends one token short of prompt + result.

    Example:
        >>> import torch
        >>> class Counter:   # a "model" whose next token is always the last one plus one
        ...     def feed(self, ids):
        ...         return torch.nn.functional.one_hot(torch.tensor(ids[-1] + 1), 10).float()
        >>> state = Counter()
        >>> generate_from(state, state.feed([3]), Sampler(GREEDY, [3]), 8, stop_ids=(7,))
        [4, 5, 6, 7]
    """
    stop = frozenset(stop_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = choose(logits)
        out.append(token)
        if on_token is not None and on_token(token):
            break
        if token in stop or len(out) == max_new_tokens:
            break
        logits = state.feed([token])
    return out
