"""RWKV's World tokenizer in a few megabytes: greedy longest match over a byte vocabulary. No torch.

The World vocabulary (``rwkv_vocab_v20230424.txt``: one token per line, ``id
literal length``, the literal a Python str or bytes) is encoded by taking, at
each position, the longest token the remaining bytes start with. The
reference (the ``rwkv`` package's ``TRIE_TOKENIZER``) builds a trie with a
256-way node per byte of every token (297 MB, measured); a Rust port on PyPI
(``pyrwkv-tokenizer``) gives the same ids in 236 MB. This one keeps a dict
from token bytes to id, the tokens by id, and for each three-byte prefix the
lengths of the longer tokens that start with it, longest first: each position
tries only lengths that exist.

Two facts make it fast. A space that follows a byte which no token ever has
before a space (in the World vocabulary anything but tab, newline and space)
is a hard boundary: no token spans it, so the greedy walk lands on it whatever
came before, and the text between two such boundaries (a word with its
leading space) always encodes the same way. :meth:`WorldTokenizer.encode_bytes`
splits there and encodes each distinct piece once per call.

The vocabulary file is parsed as literals, never evaluated: plain quoted
strings directly, anything else with :func:`ast.literal_eval` (the reference
``eval``\\ s each line).
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable, Iterable

from ..errors import BadInputError

SPACE = 0x20


class WorldTokenizer:
    """Encode text to World token ids and back, exactly as the ``rwkv`` package's ``TRIE_TOKENIZER``.

    Args:
        vocab: path of ``rwkv_vocab_v20230424.txt`` (or a vocabulary in its format).

    Example:
        >>> tok = WorldTokenizer("rwkv_vocab_v20230424.txt")        # doctest: +SKIP
        >>> tok.decode(tok.encode("Today is a beautiful day."))
        'Today is a beautiful day.'
    """

    def __init__(self, vocab: str | os.PathLike[str]) -> None:
        self.ids: dict[bytes, int] = {}
        self.tokens: list[bytes | None] = []  # by id
        try:
            with open(vocab, encoding="utf-8") as f:
                prefixes = self._read(f, vocab)
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"cannot read the vocabulary: {e}", path=vocab) from None
        missing = [b for b in range(256) if bytes([b]) not in self.ids]
        if missing:
            raise BadInputError(f"the vocabulary lacks single bytes {missing[:8]}: not every text encodes",
                                path=vocab)
        self.longer = self._longer_lengths(prefixes)
        self._split = self._hard_boundaries()

    def _read(self, lines: Iterable[str], vocab: object) -> dict[bytes, int]:
        """Fill ``ids`` and ``tokens``; return, per three-byte prefix, its tokens' lengths as bits."""
        ids, tokens = self.ids, self.tokens
        prefixes: dict[bytes, int] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                first, last = line.index(" "), line.rindex(" ")
                token_id, length = int(line[:first]), int(line[last:])
                token = _literal(line[first + 1:last])
            except (ValueError, SyntaxError):
                raise BadInputError(f"line {n} is not 'id literal length': {line[:80]!r}",
                                    path=vocab) from None
            if not isinstance(token, bytes) or len(token) != length or not token:
                raise BadInputError(f"line {n}: token {token!r} is not {length} bytes", path=vocab)
            if not 0 <= token_id < 1 << 20 or token in ids:
                raise BadInputError(f"line {n}: id {token_id} out of range, or token {token!r} given twice",
                                    path=vocab)
            ids[token] = token_id
            if token_id >= len(tokens):
                tokens.extend([None] * (token_id + 1 - len(tokens)))
            tokens[token_id] = token
            if length >= 3:
                prefixes[token[:3]] = prefixes.get(token[:3], 0) | 1 << length
        return prefixes

    def _longer_lengths(self, prefixes: dict[bytes, int]) -> dict[bytes, tuple[int, ...]]:
        """Per three-byte prefix with a token longer than three bytes: the lengths to try, longest first.

        A prefix whose only token is itself is left out (the walk tries three bytes next anyway); a
        prefix that is a token is keyed by that token's own bytes object, and prefixes with the same
        lengths share one tuple: about 1 MB less than one dict entry per prefix.
        """
        ids, tokens = self.ids, self.tokens
        shared: dict[int, tuple[int, ...]] = {}
        return {(tokens[ids[key]] if key in ids else key):  # type: ignore[misc]
                shared.setdefault(bits, tuple(b for b in range(bits.bit_length() - 1, 2, -1)
                                              if bits >> b & 1))
                for key, bits in prefixes.items() if bits != 1 << 3}

    def _hard_boundaries(self) -> Callable[[bytes], list[bytes]]:
        """A splitter at each space no token can span: one whose previous byte never precedes a space."""
        before_space = sorted({token[j - 1] for token in self.ids for j in range(1, len(token))
                               if token[j] == SPACE})
        if len(before_space) == 256:
            return lambda data: [data]
        allowed = b"".join(re.escape(bytes([b])) for b in before_space)
        return re.compile(rb"(?<=[^" + allowed + rb"])(?= )" if allowed else rb"(?<=.)(?= )", re.DOTALL).split

    def __len__(self) -> int:
        return len(self.ids)

    def _greedy(self, data: bytes) -> list[int]:
        """Token ids of ``data``: at each position, the longest token it starts with."""
        ids, get, longer, out = self.ids, self.ids.get, self.longer.get, []
        append = out.append
        i, n = 0, len(data)
        while i < n:
            for length in longer(data[i:i + 3], ()):
                if length <= n - i:
                    token_id = get(data[i:i + length])
                    if token_id is not None:
                        append(token_id)
                        i += length
                        break
            else:  # three bytes, two, else the byte itself (each byte is a token)
                token_id = get(data[i:i + 3]) if i + 3 <= n else None
                if token_id is not None:
                    i += 3
                else:
                    token_id = get(data[i:i + 2]) if i + 2 <= n else None
                    if token_id is not None:
                        i += 2
                    else:
                        token_id = ids[data[i:i + 1]]
                        i += 1
                append(token_id)
        return out

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of ``data``, encoding each distinct piece between hard boundaries once."""
        out: list[int] = []
        encoded: dict[bytes, list[int]] = {}  # lives for this call: at most one entry per piece of data
        append, extend, token, greedy, known = out.append, out.extend, self.ids.get, self._greedy, encoded.get
        for piece in self._split(data):
            token_id = token(piece)  # most pieces (a word and its space) are one token: the longest match
            if token_id is not None:
                append(token_id)
                continue
            piece_ids = known(piece)
            if piece_ids is None:
                piece_ids = encoded[piece] = greedy(piece)
            extend(piece_ids)
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        """The bytes of ``token_ids`` (which need not be valid UTF-8 on their own)."""
        tokens = self.tokens
        try:
            return b"".join(tokens[t] for t in token_ids)  # type: ignore[misc]
        except (IndexError, TypeError):
            bad = next(t for t in token_ids if not 0 <= t < len(tokens) or tokens[t] is None)
            raise BadInputError(f"token id {bad} is not in the vocabulary ({len(self)} tokens)") from None

    def decode(self, token_ids: list[int], errors: str = "replace") -> str:
        return self.decode_bytes(token_ids).decode("utf-8", errors=errors)


def _literal(text: str) -> object:
    """A vocabulary line's token literal: a plain quoted string read directly, anything else as a literal."""
    quote = text[:1]
    if len(text) >= 2 and quote in "'\"" and text[-1] == quote and "\\" not in text \
            and quote not in text[1:-1]:
        return text[1:-1].encode("utf-8")
    value = ast.literal_eval(text.strip())
    return value.encode("utf-8") if isinstance(value, str) else value


class ByteTokenizer:
    """The tokenizer of byte-level RWKV models (a 256-token vocabulary): each byte is its own id."""

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], errors: str = "replace") -> str:
        return bytes(token_ids).decode("utf-8", errors=errors)
