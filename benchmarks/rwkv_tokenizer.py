"""The World tokenizer: sparsemap's against the rwkv package's TRIE_TOKENIZER (and pyrwkv-tokenizer, if
installed), each in a fresh process: memory to build it (RSS, and tracemalloc for sparsemap's), build
and encode time on about 1 MB of mixed text, and whether the ids are the same (issue 13).

Usage: python benchmarks/rwkv_tokenizer.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import hashlib, json, os, random, sys, time
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
way, root = sys.argv[1], sys.argv[2]
rng = random.Random(0)
english = open(os.path.join(root, 'README.md')).read()
code = open(os.path.join(root, 'src', 'sparsemap', 'budget.py')).read()
pieces = ["今天是美好的一天。我们在内存里运行模型。日本語のテキスト。한국어 문장.", "🙂🚀👩‍💻🇫🇷✨🔥 ",
          "\x00\x01\x7f\u200b\ufeff", "ÀÉÎÕÜ ñ ß Ω ж"]
parts, total = [], 0
while total < 1_000_000:
    source = rng.choice([english, code, *pieces])
    start = rng.randrange(0, max(1, len(source) - 400))
    parts.append(source[start:start + rng.randrange(1, 400)])
    total += len(parts[-1].encode())
text = "".join(parts)
import rwkv
vocab = os.path.join(os.path.dirname(rwkv.__file__), 'rwkv_vocab_v20230424.txt')
before, t0 = rss(), time.perf_counter()
held = None
if way == "sparsemap":
    from sparsemap.models.rwkv_tokenizer import WorldTokenizer
    tok = WorldTokenizer(vocab)
elif way == "rwkv package":
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    tok = TRIE_TOKENIZER(vocab)
else:
    import pyrwkv_tokenizer
    tok = pyrwkv_tokenizer.RWKVTokenizer()
built, grown = time.perf_counter() - t0, rss() - before
if way == "sparsemap":  # what the built tokenizer holds, counted object by object (a second build)
    import tracemalloc
    tracemalloc.start()
    again = WorldTokenizer(vocab)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del again
t1 = time.perf_counter()
ids = tok.encode(text)
print(json.dumps({"build_s": built, "rss_added": grown, "held": held, "encode_s": time.perf_counter() - t1,
                  "bytes": len(text.encode()), "ids": len(ids),
                  "sha": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}))
"""


def main() -> None:
    import importlib.util
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    ways = ["sparsemap", "rwkv package"]
    if importlib.util.find_spec("pyrwkv_tokenizer"):
        ways.append("pyrwkv-tokenizer")
    rows = {}
    for way in ways:
        proc = subprocess.run([sys.executable, "-c", CHILD, way, root], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{way} failed:\n{proc.stderr[-2000:]}")
        rows[way] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| tokenizer | build s | RSS added MiB | held MiB | encode s | ids | same ids |")
    print("|---|---|---|---|---|---|---|")
    reference = rows["rwkv package"]["sha"]
    for way, r in rows.items():
        held = f"{r['held'] / 2**20:.1f}" if r["held"] is not None else "-"
        print(f"| {way} | {r['build_s']:.2f} | {r['rss_added'] / 2**20:.1f} | {held} | {r['encode_s']:.2f} | "
              f"{r['ids']:,} | {'yes' if r['sha'] == reference else 'NO'} |")
    print(f"\n{rows['sparsemap']['bytes']:,} bytes of mixed text (English, code, CJK, emoji, control "
          "characters)")


if __name__ == "__main__":
    main()
