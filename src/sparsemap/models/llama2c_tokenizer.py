"""llama2.c's ``tokenizer.bin``: ``run.c``'s tokenizer, read, encoded and decoded as ``run.c`` does. No torch.

The file: an int32 ``max_token_length``, then for each token of the model's vocabulary (the file
does not say how many: the model's header does) a float32 score, an int32 length and that many
bytes. Pieces are SentencePiece's with ``▁`` written as a space; ids 0, 1 and 2 are ``<unk>``, BOS and
EOS, ids 3 to 258 the byte-fallback pieces ``<0x00>`` ... ``<0xFF>`` (``export`` in llama2.c's
``tokenizer.py``).

:meth:`Llama2cTokenizer.encode` is ``run.c``'s ``encode``: BOS, a dummy-prefix space token when the
text is not empty, one token per UTF-8 character found in the vocabulary (else one byte-fallback
token per byte, id ``byte + 3``), then the pair whose merged piece has the highest score merged,
again and again, until no pair merges. :meth:`Llama2cTokenizer.decode` is its ``decode``: a piece
after BOS loses its leading space, ``<0xNN>`` pieces are the byte they name. Where ``run.c`` has
undefined behaviour this reader refuses instead: a piece longer than ``max_token_length`` (it
would overflow ``run.c``'s merge buffer), a byte-fallback id past the vocabulary.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Sequence

from ..errors import BadInputError, Llama2cFormatError, TrailingBytesError, TruncatedFileError
from ..formats.source import open_regular

BOS, EOS = 1, 2
BYTE_FALLBACK = 3  # id of the piece for byte 0; byte b is id b + 3
_HEAD = struct.Struct("<i")
_TOKEN = struct.Struct("<fi")  # score, length
# run.c parses a piece with sscanf("<0x%02hhX>"): one or two hex digits after "<0x" make a byte piece.
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{1,2})")
NO_MERGE = -1e10  # run.c's starting best score: a merge must score above it
MAX_TOKEN_NBYTES = 1 << 16  # real vocabularies' longest pieces are tens of bytes (Llama 2's: 27)


class Llama2cTokenizer:
    """The pieces, scores and ``max_token_length`` of a ``tokenizer.bin``.

    Args:
        pieces: each token's bytes, by id.
        scores: each token's merge score, by id.
        max_token_length: the longest piece's length in bytes, as the file states it.
        path: where it was read from, for messages.

    Example:
        >>> tok = Llama2cTokenizer.from_file("tokenizer.bin", vocab_size=32000)   # doctest: +SKIP
        >>> ids = tok.encode("Once upon a time")
        >>> ids[0], tok.decode(ids)
        (1, 'Once upon a time')
    """

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], max_token_length: int,
                 path: str | None = None) -> None:
        self.pieces = list(pieces)
        self.scores = list(scores)
        self.max_token_length = max_token_length
        self.path = path
        self.ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):  # the first of equal pieces wins (run.c's bsearch: any)
            self.ids.setdefault(piece, i)

    def __len__(self) -> int:
        return len(self.pieces)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], vocab_size: int) -> Llama2cTokenizer:
        """Read ``vocab_size`` tokens (the model header's count) from ``path``.

        Raises:
            TruncatedFileError: the file ends before the last token.
            TrailingBytesError: bytes after the last token (a tokenizer of a larger vocabulary).
            Llama2cFormatError: a negative length, a piece longer than ``max_token_length``.
        """
        path = os.fspath(path)
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            # Each token takes 8 bytes at least: a count the file cannot hold is refused before reading.
            least = _HEAD.size + _TOKEN.size * vocab_size
            if size < least:
                raise TruncatedFileError(f"{vocab_size} tokens need at least {least} bytes, the file has "
                                         f"{size}", path=path)
            (max_len,) = _HEAD.unpack(f.read(_HEAD.size))
            if not 0 < max_len <= MAX_TOKEN_NBYTES:
                raise Llama2cFormatError(f"max_token_length is {max_len} (1 to {MAX_TOKEN_NBYTES})",
                                         path=path)
            # And at most max_len bytes each: a larger file is refused before it is read into memory.
            most = least + max_len * vocab_size
            if size > most:
                raise TrailingBytesError(f"the file has {size} bytes, but {vocab_size} tokens of at most "
                                         f"{max_len} bytes take at most {most} (a tokenizer of another "
                                         "vocabulary?)", path=path)
            raw = _HEAD.pack(max_len) + f.read()
        pieces: list[bytes] = []
        scores: list[float] = []
        pos = _HEAD.size
        for i in range(vocab_size):
            if len(raw) - pos < _TOKEN.size:
                raise TruncatedFileError(f"token {i}'s score and length need {_TOKEN.size} bytes at offset "
                                         f"{pos}, {len(raw) - pos} left", path=path)
            score, length = _TOKEN.unpack_from(raw, pos)
            pos += _TOKEN.size
            if length < 0:
                raise Llama2cFormatError(f"token {i} at offset {pos - 4} has length {length}", path=path)
            if length > max_len:
                raise Llama2cFormatError(f"token {i} is {length} bytes, over max_token_length {max_len} "
                                         "(run.c's merge buffer holds two pieces of that length)", path=path)
            if len(raw) - pos < length:
                raise TruncatedFileError(f"token {i}'s {length} bytes at offset {pos}: {len(raw) - pos} left",
                                         path=path)
            pieces.append(raw[pos:pos + length])
            scores.append(score)
            pos += length
        if pos != len(raw):
            raise TrailingBytesError(f"{len(raw) - pos} bytes after the model's {vocab_size} tokens (a "
                                     "tokenizer of another vocabulary?)", path=path)
        return cls(pieces, scores, max_len, path)

    # ------------------------------------------------------------ encoding

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """``text``'s ids as ``run.c`` encodes a prompt (``bos=True``, ``eos=False`` there).

        Raises:
            BadInputError: a byte with no token (its byte-fallback id is past the vocabulary).
        """
        data = text.encode("utf-8")
        ids = [BOS] if bos else []
        if data:
            space = self.ids.get(b" ")  # run.c's dummy prefix (it appends -1 when there is none)
            if space is not None:
                ids.append(space)
        ids.extend(self._characters(data))
        self._merge(ids)
        if eos:
            ids.append(EOS)
        return ids

    def _characters(self, data: bytes) -> Iterable[int]:
        """One id per UTF-8 character in the vocabulary, else one per byte: run.c's first pass, stray
        continuation bytes and over-long sequences (at most 4 bytes a "character") included."""
        start = 0
        for i, byte in enumerate(data):
            if byte & 0xC0 != 0x80:  # not a continuation byte: a new character starts here
                start = i
            following = data[i + 1] if i + 1 < len(data) else 0
            if following & 0xC0 == 0x80 and i + 1 - start < 4:
                continue
            char = data[start:i + 1]
            found = self.ids.get(char)
            if found is not None:
                yield found
            else:
                for b in char:
                    if b + BYTE_FALLBACK >= len(self.pieces):
                        raise BadInputError(f"byte {b:#04x} of the text has no token: its byte-fallback id "
                                            f"{b + BYTE_FALLBACK} is past the vocabulary of "
                                            f"{len(self.pieces)}", path=self.path)
                    yield b + BYTE_FALLBACK
            start = i + 1  # run.c resets after each character, so stray continuations start afresh

    def _merge(self, ids: list[int]) -> None:
        """Merge the best-scoring pair (the first of equals) until none merges, in place."""
        pieces, scores, lookup = self.pieces, self.scores, self.ids
        while True:
            best_score, best_id, best_at = NO_MERGE, -1, -1
            for i in range(len(ids) - 1):
                merged = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
                if merged is not None and scores[merged] > best_score:
                    best_score, best_id, best_at = scores[merged], merged, i
            if best_at < 0:
                return
            ids[best_at:best_at + 2] = [best_id]

    # ------------------------------------------------------------ decoding

    def piece(self, token: int, prev: int | None = None) -> bytes:
        """The bytes ``token`` stands for after ``prev``: ``run.c``'s ``decode``."""
        piece = self.pieces[token]
        if prev == BOS and piece[:1] == b" ":  # SentencePiece drops the space after BOS
            piece = piece[1:]
        byte = _BYTE_PIECE.match(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece

    def decode(self, ids: Sequence[int], *, prev: int | None = None) -> str:
        """The text of ``ids`` (after ``prev``, when given), BOS and EOS left out; bytes that are not
        UTF-8 become U+FFFD."""
        out = []
        for token in ids:
            if token not in (BOS, EOS):
                out.append(self.piece(token, prev))
            prev = token
        return b"".join(out).decode("utf-8", errors="replace")


def write_tokenizer(path: str | os.PathLike[str], pieces: Sequence[bytes], scores: Sequence[float],
                    max_token_length: int | None = None) -> None:
    """Write a ``tokenizer.bin`` as llama2.c's ``tokenizer.py`` does (``max_token_length``: the longest
    piece when omitted)."""
    if max_token_length is None:
        max_token_length = max((len(p) for p in pieces), default=0)
    out = bytearray(_HEAD.pack(max_token_length))
    for piece, score in zip(pieces, scores, strict=True):
        out += _TOKEN.pack(score, len(piece)) + piece
    with open(path, "wb") as f:
        f.write(out)
