"""Which checkpoint tensor is which model tensor: renames, a prefix found by itself, ignore lists. No torch.

Checkpoints and models often disagree on names by one prefix: a model saved
inside ``nn.DataParallel`` (``module.``), a training checkpoint that nests the
state dict (``state_dict.``, ``model.``), a transformers base model loaded
into a model with a head (``bert.`` missing) or the reverse. transformers
resolves the last case with its ``base_model_prefix``; sparsemap does the
same for any model, by names alone, before any data is read:

- ``rename``: a mapping of checkpoint-name prefixes to model-name prefixes
  (``{"module.": ""}`` strips, ``{"": "bert."}`` adds; the longest prefix that
  matches wins), or a function from a checkpoint name to a model name (``None``
  leaves the tensor out); ``prefix="module."`` is short for ``{"module.": ""}``.
- With neither, :func:`find_prefix_change` tries the few changes of one prefix
  that could explain the difference (the checkpoint's common leading
  components, the model's, the model's ``base_model_prefix``) and keeps the
  one that matches the most model names, when it matches more than the names
  as they are.
- :func:`ignored_names` gives what the model itself says never to expect:
  transformers' ``_keys_to_ignore_on_load_unexpected`` /
  ``_keys_to_ignore_on_load_missing`` patterns, non-persistent buffers (saved
  by older versions, e.g. ``position_ids``) and rotary ``inv_freq`` caches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from .errors import BadInputError

Rename = Mapping[str, str] | Callable[[str], str | None] | None


@dataclass(frozen=True)
class PrefixChange:
    """Read a checkpoint name ``strip + rest`` as the model name ``add + rest``.

    Names that do not start with ``strip`` are kept as they are (a head's own
    tensors beside a base model's, for instance).

    Example:
        >>> PrefixChange(strip="module.")("module.fc.weight")
        'fc.weight'
        >>> PrefixChange(add="bert.")("encoder.layer.0.output.dense.bias")
        'bert.encoder.layer.0.output.dense.bias'
    """

    strip: str = ""
    add: str = ""

    def __call__(self, name: str) -> str:
        if self.strip and name.startswith(self.strip):
            return self.add + name[len(self.strip):]
        return name if self.strip else self.add + name

    def option(self) -> str:
        """How to ask for this change in :func:`sparsemap.load`."""
        if not self.add:
            return f"prefix={self.strip!r}"
        return f"rename={{{self.strip!r}: {self.add!r}}}"


def renamer(rename: Rename = None, prefix: str | None = None) -> Callable[[str], str | None] | None:
    """``rename`` and ``prefix`` as one function from checkpoint names to model names (``None``: none given).

    Raises:
        BadInputError: both given, or a mapping that is not of strings to strings.
    """
    if prefix is not None:
        if rename is not None:
            raise BadInputError("pass prefix= or rename=, not both (prefix='p.' is rename={'p.': ''})")
        return PrefixChange(strip=prefix)
    if rename is None or callable(rename):
        return rename
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in rename.items()):
        raise BadInputError(f"rename= must map name prefixes to name prefixes (strings), got {rename!r}")
    ordered = sorted(rename.items(), key=lambda kv: -len(kv[0]))  # the longest prefix that matches wins

    def by_prefix(name: str) -> str:
        for old, new in ordered:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    return by_prefix


def _dotted_prefixes(names: Iterable[str]) -> list[str]:
    """The leading components every name shares, as prefixes: ['a.', 'a.b.'] for a.b.x and a.b.y."""
    common: list[str] | None = None
    for name in names:
        parts = name.split(".")[:-1]  # a name's last component is never a prefix
        if common is None:
            common = parts
        else:
            n = 0
            while n < min(len(common), len(parts)) and common[n] == parts[n]:
                n += 1
            common = common[:n]
        if not common:
            return []
    return [".".join(common[:k]) + "." for k in range(1, len(common or []) + 1)]


def find_prefix_change(model_names: Collection[str], checkpoint_names: Collection[str],
                       base_prefix: str | None = None) -> PrefixChange | None:
    """The change of one prefix that makes the most model names found in the checkpoint, if it finds
    more than the names as they are; ``None`` otherwise.

    Example:
        >>> find_prefix_change({"fc.weight", "fc.bias"}, {"module.fc.weight", "module.fc.bias"})
        PrefixChange(strip='module.', add='')
    """
    wanted = set(model_names)
    if not wanted or not checkpoint_names:
        return None
    candidates = [PrefixChange(strip=p) for p in _dotted_prefixes(checkpoint_names)]
    candidates += [PrefixChange(add=p) for p in _dotted_prefixes(wanted)]
    if base_prefix:
        candidates += [PrefixChange(strip=base_prefix + "."), PrefixChange(add=base_prefix + ".")]

    def found(change: PrefixChange | None) -> int:
        return len(wanted.intersection(map(change, checkpoint_names) if change else checkpoint_names))

    best, best_found = None, found(None)
    for change in candidates:
        n = found(change)
        if n > best_found:
            best, best_found = change, n
    return best


def ignored_names(model: object, buffer_names: Iterable[str]) -> tuple[Callable[[str], bool],
                                                                     Callable[[str], bool]]:
    """What the model says never to expect: (checkpoint names to leave out, model names not to require).

    Args:
        model: any module; transformers models declare ``_keys_to_ignore_on_load_unexpected`` and
            ``_keys_to_ignore_on_load_missing`` (regular expressions, searched in the name).
        buffer_names: the model's non-persistent buffers (computed, never saved by current versions;
            older versions saved some, such as BERT's ``position_ids``).
    """
    computed = set(buffer_names)
    unexpected = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]

    def leave_out(name: str) -> bool:
        return (name in computed or name.endswith("rotary_emb.inv_freq")
                or any(p.search(name) for p in unexpected))

    return leave_out, lambda name: any(p.search(name) for p in missing)
