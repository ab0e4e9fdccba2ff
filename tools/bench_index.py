"""Speed of the index structures in index/ (issue 3): a benchmark, not a test.

usage: python tools/bench_index.py [--only SECTION[,SECTION]] [--tokens N] [--json FILE]

Sections, run in this order (default: all):
  sa         suffix_array.build on N random ids (vocab 49152) and N real tokens: rate and peak
             memory / final array; then longest_match (context <= 32, and <= 4 for large
             ranges) + continuations (512 positions, depth 16, budget 64) on the real stream
  tree       SuffixTree (depth 64, max_tokens = history) over N/10 real tokens in 256-token
             sequences: append per token, one-token appends at the budget (evicting), and
             draft (64-token context, budget 64), half in the history and half unseen
  recycling  TokenRecycling (49152 x 8): update with 64 positions, draft with budget 64
  ngram      NgramTable (n <= 4, top 8): build on N/5 real tokens, lookup of an 8-token context
  knn        exact fp16 top-8 over N/10 x 576 random keys: queries/s (ip, l2; 1 and 16 queries
             a call, best of 3) and search_rows over 4096 rows (NEST's second stage)
  nest       a real datastore of ~N/10 stdlib tokens with synthetic (random) 576-d hidden
             states as keys (128-d after the stored PCA, fp16): key build rate and bytes per
             token, stage 1 per request (BM25 + gathering the chosen documents' keys) and a
             NEST drafting step (project the hidden state, exact kNN over the gathered keys,
             spans into a tree), over 20 requests x 50 steps

Real tokens: the Python standard library's .py sources through the default model's tokenizer,
-1 between files, tiled to N when the sources are shorter. Every Numba kernel is compiled (or
loaded from Numba's cache) before any clock starts. Latencies: p50/p99 over 2000 calls; the
issue's goal is p99 < 1 ms for every draft query.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import sys
import sysconfig
import time
import tracemalloc
from pathlib import Path


import numba
import numpy as np

from retrodraft.index import suffix_array
from retrodraft.index.knn import search, search_rows
from retrodraft.index.ngram import NgramTable
from retrodraft.index.recycling import TokenRecycling
from retrodraft.index.suffix_tree import SuffixTree

VOCAB = 49152  # the default model's vocabulary
CALLS = 2000  # calls per latency figure
BUDGET = 64  # draft budget everywhere
FIGURES: list[dict] = []


def timed(fn, inputs) -> tuple[np.ndarray, list]:
    """Seconds of each call fn(x) for x in inputs, and the results, in order."""
    secs, results = np.empty(len(inputs)), []
    for i, x in enumerate(inputs):
        t = time.perf_counter()
        results.append(fn(x))
        secs[i] = time.perf_counter() - t
    return secs, results


def record(section: str, name: str, value: float, unit: str, note: str = "") -> None:
    FIGURES.append(dict(section=section, name=name, value=float(value), unit=unit, note=note))
    v = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    print(f"{section:<9} {name:<50} {v:>12} {unit:<9} {note}".rstrip(), flush=True)


def record_latency(section: str, name: str, secs: np.ndarray) -> None:
    p50, p99 = np.percentile(secs, [50, 99]) * 1e6
    record(section, f"{name} p50", p50, "us")
    record(section, f"{name} p99", p99, "us", "" if p99 < 1000 else "above the 1 ms goal")


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@functools.cache
def real_tokens(n: int) -> tuple[np.ndarray, str]:
    """int32[n] real token ids with -1 between files, and how they were made."""
    from retrodraft.decode import load_tokenizer

    t = time.perf_counter()
    tok = load_tokenizer()
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    parts, total, used = [], 0, 0
    while total < n and used < len(files):
        texts = [f.read_text(errors="replace") for f in files[used : used + 64]]
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            parts.append(np.array(ids + [-1], np.int32))
            total += len(ids) + 1
        used += len(texts)
    one = np.concatenate(parts)
    reps = -(-n // one.shape[0])
    how = (f"stdlib .py through the default tokenizer: {one.shape[0]:,} tokens from {used} "
           f"files{f', tiled x{reps}' if reps > 1 else ''} ({time.perf_counter() - t:.0f} s)")
    print(f"# real tokens: {how}", flush=True)
    return np.tile(one, reps)[:n], how


def warm_up() -> float:
    """Compile (or load from Numba's cache) every kernel timed below; returns seconds."""
    t = time.perf_counter()
    s = np.array([3, 1, -1, 3, 1, 2], np.int32)
    sa = suffix_array.build(s)
    suffix_array.continuations(s, sa, *suffix_array.longest_match(s, sa, s[:2], 4), 4, 4, 4)
    tree = SuffixTree(max_depth=8, max_tokens=300)  # small enough to grow, rehash and evict
    for _ in range(3):
        sid = tree.add_sequence(np.arange(200, dtype=np.int32) % 50)
    tree.append(sid, s[:1])
    tree.draft(np.arange(10, dtype=np.int32), 8)
    NgramTable.build(s).lookup(s[:3])
    rec = TokenRecycling(16, 2)
    rec.update(np.array([1, 2]), np.array([[3, 4], [5, 6]]))
    rec.draft(1, 4)
    keys = np.ones((3 * 4096, 8), np.float16)  # past one chunk: the parallel scan too
    for k in (keys[:100], keys):
        search(k, keys[:2], 2), search(k, keys[:2], 2, "l2")
        search_rows(keys, keys[:1], np.arange(k.shape[0]), 2)
    return time.perf_counter() - t


def bench_sa(n: int) -> None:
    real, _ = real_tokens(n)
    rand = np.random.default_rng(0).integers(0, VOCAB, n, dtype=np.int32)
    for name, stream in (("random", rand), ("real", real)):
        tracemalloc.start()  # every build allocation is a numpy array, so it is traced
        secs, (sa,) = timed(suffix_array.build, [stream])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        record("sa", f"build {n:,} {name} tokens", n / secs[0], "tokens/s")
        record("sa", f"build {name} peak memory / final array", peak / sa.nbytes, "x")
    contexts = [real[e - 32 : e] for e in np.random.default_rng(1).integers(32, n, CALLS)]
    for max_len in (32, 4):
        def query(c):
            lo, hi, length = suffix_array.longest_match(real, sa, c, max_len)
            return length, suffix_array.continuations(real, sa, lo, hi, length, 512, 16, BUDGET)[0]

        secs, res = timed(query, contexts)
        label = f"match<={max_len} + continuations, real"
        record_latency("sa", label, secs)
        record("sa", f"{label}: mean match, nodes", np.mean([r[0] for r in res]), "tokens",
               f"{np.mean([r[1].shape[0] for r in res]):.1f} nodes")


def bench_tree(n: int) -> None:
    pos = real_tokens(n)[0][real_tokens(n)[0] >= 0]  # the tree takes no separators
    h = n // 10
    tree = SuffixTree(max_depth=64, max_tokens=h)
    rss0 = rss_mb()
    secs, _ = timed(tree.add_sequence, [pos[s : s + 256] for s in range(0, h, 256)])
    record("tree", f"append {h:,} tokens, 256 a call", secs.sum() / h * 1e6, "us/token")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record("tree", f"memory for {h:,} tokens at depth 64", rss_mb() - rss0, "MB",
           f"{tree.num_nodes / 1e6:.1f}M nodes; bounded by max_tokens; process peak so far {peak:,.0f} MB")
    sid = tree.add_sequence()
    secs, _ = timed(lambda t: tree.append(sid, t), [pos[h + i : h + i + 1] for i in range(CALLS)])
    record_latency("tree", "append 1 token at the budget (evicts)", secs)
    rng = np.random.default_rng(2)
    ends = np.concatenate([rng.integers(64, h, CALLS // 2), rng.integers(h + CALLS + 64, 2 * h, CALLS // 2)])
    secs, res = timed(lambda c: tree.draft(c, BUDGET), [pos[e - 64 : e] for e in ends])
    record_latency("tree", f"draft budget {BUDGET}, half unseen", secs)
    record("tree", "draft: mean match, nodes", np.mean([r[3] for r in res]), "tokens",
           f"{np.mean([r[0].shape[0] for r in res]):.1f} nodes")


def bench_recycling(n: int) -> None:
    rng = np.random.default_rng(3)
    rec = TokenRecycling(VOCAB, 8)
    rec.update(np.arange(VOCAB), rng.integers(0, VOCAB, (VOCAB, 8)))  # every row filled
    inputs = rng.integers(0, VOCAB, (CALLS, BUDGET), dtype=np.int32)
    topks = rng.integers(0, VOCAB, (CALLS, BUDGET, 8), dtype=np.int32)
    secs, _ = timed(lambda i: rec.update(inputs[i], topks[i]), range(CALLS))
    record_latency("recycling", f"update {BUDGET} positions x top-8", secs)
    secs, _ = timed(lambda t: rec.draft(t, BUDGET), rng.integers(0, VOCAB, CALLS).tolist())
    record_latency("recycling", f"draft budget {BUDGET}", secs)


def bench_ngram(n: int) -> None:
    stream = real_tokens(n)[0][: n // 5]
    secs, (table,) = timed(NgramTable.build, [stream])
    record("ngram", f"build on {stream.shape[0]:,} real tokens", stream.shape[0] / secs[0], "tokens/s",
           f"{len(table):,} n-grams")
    ends = np.random.default_rng(4).integers(8, stream.shape[0], CALLS)
    secs, _ = timed(table.lookup, [stream[e - 8 : e] for e in ends])
    record_latency("ngram", "lookup, 8-token context", secs)


def bench_knn(n: int) -> None:
    rows, d, rng = n // 10, 576, np.random.default_rng(5)
    keys = np.empty((rows, d), np.float16)
    for s in range(0, rows, 100_000):  # float32 in slices: bounded memory
        keys[s : s + 100_000] = rng.standard_normal((min(100_000, rows - s), d), np.float32)
    queries = rng.standard_normal((16, d), np.float32)
    for metric in ("ip", "l2"):
        for q in (1, 16):
            secs, _ = timed(lambda _: search(keys, queries[:q], 8, metric), range(3))
            record("knn", f"{rows:,} x {d} fp16, {metric}, {q} per call", q / secs.min(), "queries/s")
    subset = rng.choice(rows, 4096, replace=False)
    secs, _ = timed(lambda _: search_rows(keys, queries[:1], subset, 8), range(200))
    record_latency("knn", "search_rows, 4096 rows, 1 query (200 calls)", secs)


class RandomEncoder:
    """Synthetic hidden states (standard normal, 576-d) in place of a model's: the cost of
    NEST's search does not depend on the values."""

    info = {"name": "random", "fingerprint": "0" * 16}
    hidden_size = 576
    settings: dict = {}

    def __init__(self):
        self.rng = np.random.default_rng(6)

    def __call__(self, docs):
        return [self.rng.standard_normal((len(d), self.hidden_size), np.float32) for d in docs]


def bench_nest(n: int) -> None:
    import tempfile

    from retrodraft.decode import load_tokenizer
    from retrodraft.retrieval import Datastore, Document
    from retrodraft.retrieval.keys_store import KeyBuilder
    from retrodraft.retrieval.nest import NestDrafter

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    docs, chars = [], 0
    for f in files:  # ~3.6 characters per token in these sources
        if chars >= 3.6 * n // 10:
            break
        docs.append(Document(str(f), 0, f.read_text(errors="replace")))
        chars += len(docs[-1].text)
    with tempfile.TemporaryDirectory() as tmp:
        ds = Datastore.build(Path(tmp) / "nest.rdstore", docs, load_tokenizer(), progress=False,
                             keys=KeyBuilder(RandomEncoder()))
        keys = ds.array("keys")
        record("nest", f"keys: {ds.num_tokens:,} tokens, {len(docs)} documents", ds.stats.tokens_per_second()["keys"],
               "tok/s", "synthetic encoder: projection + fp16 + copy only")
        record("nest", "keys on disk", keys.nbytes / ds.num_tokens, "B/token")
        index, rng = ds.nest_index(), np.random.default_rng(7)
        o = ds.doc_offsets
        stage1, stage2, cpu2 = [], [], []
        for d in rng.choice(ds.num_documents, 20, replace=False):
            prompt = np.asarray(ds.tokens[o[d] : min(o[d] + 64, o[d + 1] - 1)])
            drafter = NestDrafter(index)
            t = time.perf_counter()
            drafter.search(prompt)  # stage 1: BM25, then the chosen documents' keys
            stage1.append(time.perf_counter() - t)
            for _ in range(50):
                h = rng.standard_normal(576).astype(np.float32)
                t, c = time.perf_counter(), time.process_time()
                drafter.observe(prompt, prompt[-1:], None, hidden=h[None])
                drafter.propose(prompt, BUDGET)
                stage2.append(time.perf_counter() - t)
                cpu2.append(time.process_time() - c)
        record_latency("nest", "stage 1 per request (BM25 + key gather)", np.array(stage1))
        record_latency("nest", f"step: project + kNN over <= {drafter.max_rows:,} rows + spans", np.array(stage2))
        # CPU seconds of all threads: what the step costs whatever else the machine runs
        record_latency("nest", "same step, CPU time (all threads)", np.array(cpu2))
        ds.close()


SECTIONS = {"sa": bench_sa, "tree": bench_tree, "recycling": bench_recycling,
            "ngram": bench_ngram, "knn": bench_knn, "nest": bench_nest}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown")
    return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                cores=os.cpu_count(), cpu=cpu, numba_threads=numba.get_num_threads(),
                load_avg_1min=os.getloadavg()[0], numpy=np.__version__, numba=numba.__version__)


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), metavar="SECTION[,SECTION]",
                    help=f"sections to run, comma-separated: {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--tokens", type=int, default=10_000_000, metavar="N",
                    help="stream size N (default 10,000,000; >= 100,000); the other sizes scale with it")
    ap.add_argument("--json", metavar="FILE", help="also write the machine and the figures to FILE")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not only or any(s not in SECTIONS for s in only):
        die(f"--only takes sections among {', '.join(SECTIONS)}, got {args.only!r}")
    if args.tokens < 100_000:
        die(f"--tokens must be >= 100,000, got {args.tokens:,}")
    info = machine()
    print(f"# {info['date']}  {info['cores']} cores, {info['cpu']}  (numba {info['numba_threads']} threads, "
          f"load average {info['load_avg_1min']:.1f} at start)")
    info["warm_up_s"] = warm_up()
    print(f"# Numba kernels compiled/loaded in {info['warm_up_s']:.1f} s (not in any figure)")
    for s in SECTIONS:
        if s in only:
            SECTIONS[s](args.tokens)
    if args.json:
        if any(s in only for s in ("sa", "tree", "ngram")):
            info["real_tokens"] = real_tokens(args.tokens)[1]
        Path(args.json).write_text(json.dumps(dict(machine=info, tokens=args.tokens, figures=FIGURES), indent=1))


if __name__ == "__main__":
    main()
