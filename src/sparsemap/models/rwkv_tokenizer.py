"""RWKV's World tokenizer in a few megabytes: greedy longest match over a byte vocabulary. No torch.

The World vocabulary (``rwkv_vocab_v20230424.txt``: one token per line, ``id
literal length``, the literal a Python str or bytes) is encoded by taking, at
each position, the longest token the remaining bytes start with. The
reference (the ``rwkv`` package's ``TRIE_TOKENIZER``) builds a trie with a
256-way node per byte of every token (297 MB, measured); a Rust port on PyPI
(``pyrwkv-tokenizer``) gives the same ids in 236 MB. This one keeps a dict
from token bytes to id, the tokens by id, and for each three-byte prefix the
lengths of the tokens that start with it, longest first: each position tries
only lengths that exist.

The vocabulary file is parsed with :func:`ast.literal_eval` (literals only):
the reference ``eval``s each line.
"""

from __future__ import annotations

import ast
import os

from ..errors import BadInputError


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
        lengths: dict[int, int] = {}  # three-byte prefix (big-endian) -> its tokens' lengths, as bits
        try:
            with open(vocab, encoding="utf-8") as f:
                self._read(f, lengths, vocab)
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"cannot read the vocabulary: {e}", path=vocab) from None
        shared: dict[int, tuple[int, ...]] = {}  # prefixes with the same lengths share one tuple
        self.lengths = {key: shared.setdefault(bits, tuple(b for b in range(bits.bit_length(), 2, -1)
                                                           if bits >> b & 1))
                        for key, bits in lengths.items()}
        missing = [b for b in range(256) if bytes([b]) not in self.ids]
        if missing:
            raise BadInputError(f"the vocabulary lacks single bytes {missing[:8]}: not every text encodes",
                                path=vocab)

    def _read(self, lines: object, lengths: dict[int, int], vocab: object) -> None:
        for n, line in enumerate(lines, 1):  # type: ignore[call-overload]
            if not line.strip():
                continue
            try:
                first, last = line.index(" "), line.rindex(" ")
                token_id, literal, length = int(line[:first]), ast.literal_eval(line[first:last].strip()), \
                    int(line[last:])
            except (ValueError, SyntaxError):
                raise BadInputError(f"line {n} is not 'id literal length': {line[:80]!r}",
                                    path=vocab) from None
            token = literal.encode("utf-8") if isinstance(literal, str) else literal
            if not isinstance(token, bytes) or len(token) != length or not token:
                raise BadInputError(f"line {n}: token {token!r} is not {length} bytes", path=vocab)
            if not 0 <= token_id < 1 << 20 or token in self.ids:
                raise BadInputError(f"line {n}: id {token_id} out of range, or token {token!r} given twice",
                                    path=vocab)
            self.ids[token] = token_id
            if token_id >= len(self.tokens):
                self.tokens.extend([None] * (token_id + 1 - len(self.tokens)))
            self.tokens[token_id] = token
            if len(token) >= 3:
                key = int.from_bytes(token[:3], "big")
                lengths[key] = lengths.get(key, 0) | 1 << len(token)

    def __len__(self) -> int:
        return len(self.ids)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of ``data``: at each position, the longest token it starts with."""
        ids, get, lengths, out = self.ids, self.ids.get, self.lengths.get, []
        append = out.append
        i, n = 0, len(data)
        while i < n:
            key = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2] if i + 2 < n else -1
            for length in lengths(key, ()):
                if length <= n - i:
                    token_id = get(data[i:i + length])
                    if token_id is not None:
                        append(token_id)
                        i += length
                        break
            else:
                token_id = get(data[i:i + 2])  # a two-byte token, else the byte itself (each is a token)
                if token_id is not None and i + 1 < n:
                    append(token_id)
                    i += 2
                else:
                    append(ids[data[i:i + 1]])
                    i += 1
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


class ByteTokenizer:
    """The tokenizer of byte-level RWKV models (a 256-token vocabulary): each byte is its own id."""

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], errors: str = "replace") -> str:
        return bytes(token_ids).decode("utf-8", errors=errors)
