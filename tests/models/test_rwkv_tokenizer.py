"""sparsemap's World tokenizer against the ``rwkv`` package's ``TRIE_TOKENIZER``, on the same vocabulary.

The ids must be the same on about 1 MB of mixed text (English, code, CJK, emoji, control characters),
and the bytes of any id sequence the same (tokens need not be valid UTF-8 on their own). The
vocabulary is parsed as literals, never evaluated: a line that is code is refused.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sparsemap.errors import BadInputError
from sparsemap.models.rwkv_tokenizer import WorldTokenizer

rwkv = pytest.importorskip("rwkv", reason="the reference tokenizer (PyPI rwkv) is in the test extra")
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # noqa: E402 - only after importorskip found it

VOCAB = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
ROOT = Path(__file__).resolve().parents[2]


def mixed_text(nbytes: int = 1_000_000) -> str:
    rng = random.Random(0)
    english = (ROOT / "README.md").read_text()
    code = (ROOT / "src" / "sparsemap" / "budget.py").read_text()
    pieces = ["今天是美好的一天。我们在内存里运行模型。日本語のテキスト。한국어 문장.", "🙂🚀👩‍💻🇫🇷✨🔥 ",
              "\x00\x01\x7f\u200b\ufeff", "ÀÉÎÕÜ ñ ß Ω ж"]
    parts: list[str] = []
    total = 0
    while total < nbytes:
        source = rng.choice([english, code, *pieces])
        start = rng.randrange(0, max(1, len(source) - 400))
        parts.append(source[start:start + rng.randrange(1, 400)])
        total += len(parts[-1].encode())
    return "".join(parts)


@pytest.fixture(scope="module")
def tokenizers() -> tuple[WorldTokenizer, TRIE_TOKENIZER]:
    return WorldTokenizer(VOCAB), TRIE_TOKENIZER(str(VOCAB))


def test_same_ids_as_the_reference_on_mixed_text(tokenizers) -> None:
    ours, reference = tokenizers
    text = mixed_text()
    assert len(text.encode()) > 900_000
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == text


def test_same_bytes_as_the_reference_for_any_ids(tokenizers) -> None:
    ours, reference = tokenizers
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(1, len(ours) + 1) for _ in range(rng.randrange(1, 12))]
        assert ours.decode_bytes(ids) == reference.decodeBytes(ids)  # often not valid UTF-8 alone


def test_an_unknown_id_is_refused(tokenizers) -> None:
    with pytest.raises(BadInputError, match="token id 70000 is not in the vocabulary"):
        tokenizers[0].decode([1, 70000])


@pytest.mark.parametrize(("line", "needle"), [
    ("5 __import__('os').system('true') 4", "not 'id literal length'"),  # code, not a literal
    ("5 'ab' 3", "is not 3 bytes"),
    ("five 'a' 1", "not 'id literal length'"),
])
def test_a_bad_vocabulary_line_is_refused(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text(VOCAB.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    with pytest.raises(BadInputError, match=needle):
        WorldTokenizer(path)


def test_same_ids_on_texts_made_of_spaces_and_word_edges(tokenizers) -> None:
    """Hard boundaries are only where no token spans a space: runs of spaces, tabs and newlines."""
    ours, reference = tokenizers
    rng = random.Random(2)
    alphabet = [" ", "  ", "\t", "\n", "\r\n", "a", "the", "of", ".", ",", "'", "語", "🙂", "\x00", "ing",
                "x "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        assert ours.encode(text) == reference.encode(text), text


def test_a_token_that_spans_a_space_moves_the_boundaries(tmp_path: Path) -> None:
    """The split points come from the vocabulary: a token 'of the' makes 'f the' no boundary."""
    path = tmp_path / "vocab.txt"
    path.write_text(VOCAB.read_text(encoding="utf-8") + "65536 'of the' 6\n", encoding="utf-8")
    ours, reference = WorldTokenizer(path), TRIE_TOKENIZER(str(path))
    text = "of the time, (of them) [of the] proof the " * 3
    assert ours.encode(text) == reference.encode(text)
    assert 65536 in ours.encode(text)
