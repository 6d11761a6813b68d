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
held = None
if way == "sparsemap":  # each way's module imported first: the build alone is measured
    from sparsemap.models.rwkv_tokenizer import WorldTokenizer as build
elif way == "rwkv package":
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER as build
else:
    import pyrwkv_tokenizer
    build = lambda vocab: pyrwkv_tokenizer.RWKVTokenizer()
before, t0 = rss(), time.perf_counter()
tok = build(vocab)
built, grown = time.perf_counter() - t0, rss() - before
if way == "sparsemap":  # what the built tokenizer holds, counted object by object (a second build)
    import tracemalloc
    tracemalloc.start()
    again = build(vocab)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del again
def timed(encode):
    times = []
    for _ in range(5):
        t1 = time.perf_counter()
        result = encode()
        times.append(time.perf_counter() - t1)
    return sorted(times)[2], result
encode_s, ids = timed(lambda: tok.encode(text))
chunks = [text[i:i + 4096] for i in range(0, len(text), 4096)]
chunked_s, chunked = timed(lambda: [i for chunk in chunks for i in tok.encode(chunk)])
print(json.dumps({"build_s": built, "rss_added": grown, "held": held, "encode_s": encode_s,
                  "chunked_s": chunked_s,
                  "bytes": len(text.encode()), "ids": len(ids),
                  "sha": hashlib.sha256(json.dumps([ids, chunked]).encode()).hexdigest()[:16]}))
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
    print("| tokenizer | build s | RSS added MiB | held MiB | encode s | in 4 KiB calls s | speed vs rwkv "
          "| ids | same ids |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = rows["rwkv package"]["sha"]
    for way, r in rows.items():
        held = f"{r['held'] / 2**20:.1f}" if r["held"] is not None else "-"
        speed = rows["rwkv package"]["encode_s"] / r["encode_s"]
        chunked = rows["rwkv package"]["chunked_s"] / r["chunked_s"]
        print(f"| {way} | {r['build_s']:.2f} | {r['rss_added'] / 2**20:.1f} | {held} | {r['encode_s']:.3f} | "
              f"{r['chunked_s']:.3f} | {speed:.2f}x, {chunked:.2f}x | {r['ids']:,} | "
              f"{'yes' if r['sha'] == reference else 'NO'} |")
    print(f"\n{rows['sparsemap']['bytes']:,} bytes of mixed text (English, code, CJK, emoji, control "
          "characters); encode times are medians of 5, in one call and in 4 KiB calls; RSS added is the "
          "build alone, after importing the tokenizer's module; 'held' counts the built tokenizer's objects "
          "(tracemalloc, a second build)")


if __name__ == "__main__":
    main()
