"""Sharded datastores: build throughput (one process against Ray workers) and query latency by shard count.

usage: python tools/bench_shards.py build [--copies N] [--shards N] [--workers N] [--keep DIR]
       python tools/bench_shards.py query [--shards 1,4,16] [--queries N] [--copies N]

``build`` writes a corpus of the Python standard library's sources, repeated --copies times
with variations (identifiers renamed per copy, so copies are not duplicates), to a temporary
directory; builds it once as one datastore in a child process (its peak memory measured) and
once as --shards shards on a local Ray of --workers CPUs (each worker's peak memory
measured); prints tokens/s of both; deletes everything unless --keep. ``query`` builds the
corpus as 1, 4 and 16 shards (in this process) and one datastore, and times the corpus
drafter on contexts cut from the corpus (their last token changed in half of them, for
shorter, more frequent matches): p50/p99 per shard count, and whether every draft equals
the one datastore's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

RENAMES = ("self", "value", "result", "name", "data", "line", "path", "args")


def write_corpus(out: Path, copies: int) -> int:
    """The stdlib's .py files (site-packages and tests left out), ``copies`` times; returns bytes written."""
    src = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(src.rglob("*.py"))
             if "site-packages" not in f.parts and "test" not in f.parts and "__pycache__" not in f.parts]
    pattern = re.compile(r"\b(" + "|".join(RENAMES) + r")\b")
    total = 0
    for c in range(copies):
        for f in files:
            try:
                text = f.read_text("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if c:
                text = f"# copy {c} of {f.name}\n" + pattern.sub(lambda m, c=c: f"{m.group(1)}_{c}", text)
            dest = out / f"copy{c:03d}" / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, "utf-8")
            total += len(text)
    return total


ONE_PROCESS = """
import json, resource, sys, time
from retrodraft.decode import load_tokenizer
from retrodraft.retrieval import Datastore, iter_documents
tok = load_tokenizer()
t0 = time.perf_counter()
Datastore.build(sys.argv[2], iter_documents(sys.argv[1]), tok, progress=False).close()
seconds = time.perf_counter() - t0
with Datastore.open(sys.argv[2]) as ds:
    tokens = ds.num_tokens
print(json.dumps({"seconds": seconds, "tokens": tokens,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def cmd_build(args) -> None:
    import json

    from retrodraft.decode import load_tokenizer
    from retrodraft.retrieval.shard_build import build_sharded, ray_runner

    work = Path(tempfile.mkdtemp(prefix="bench_shards_", dir=args.dir))
    try:
        corpus = work / "corpus"
        t0 = time.perf_counter()
        size = write_corpus(corpus, args.copies)
        print(f"corpus: {args.copies} copies of the stdlib, {size / 1e6:.0f} MB of text ({time.perf_counter() - t0:.0f} s)")
        root = str(Path(__file__).resolve().parents[1])
        p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r})\n" + ONE_PROCESS,
                            str(corpus), str(work / "one")], capture_output=True, text=True, check=True)
        one = json.loads(p.stdout.strip().splitlines()[-1])
        shutil.rmtree(work / "one")
        print(f"one process: {one['tokens']:,} tokens in {one['seconds']:.1f} s = {one['tokens'] / one['seconds']:,.0f} "
              f"tok/s, peak memory {one['peak'] / 2**30:.2f} GiB")
        tok = load_tokenizer()
        t0 = time.perf_counter()
        stats = build_sharded(work / "ray", tok, args.shards, corpus=corpus, runner=ray_runner(workers=args.workers),
                              progress=False)
        seconds = time.perf_counter() - t0
        peak = max(r.peak_rss for r in stats.shards)
        print(f"ray, {args.workers} workers, {args.shards} shards: {stats.total_tokens:,} tokens in {seconds:.1f} s = "
              f"{stats.total_tokens / seconds:,.0f} tok/s (Ray start included), peak memory per worker "
              f"{peak / 2**30:.2f} GiB; shards took {', '.join(f'{r.seconds:.0f}' for r in stats.shards)} s")
        print(f"ratio: {one['seconds'] / seconds:.2f}x")
        if args.keep:
            shutil.move(str(corpus), args.keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_query(args) -> None:
    from retrodraft.decode import load_tokenizer
    from retrodraft.retrieval import Datastore, iter_documents
    from retrodraft.retrieval.drafters import CorpusDrafter
    from retrodraft.retrieval.shard_build import build_sharded
    from retrodraft.retrieval.shard_drafter import ShardedCorpusDrafter

    counts = [int(x) for x in args.shards.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_shards_q_", dir=args.dir))
    try:
        corpus = work / "corpus"
        write_corpus(corpus, args.copies)
        tok = load_tokenizer()
        Datastore.build(work / "one", iter_documents(corpus), tok, progress=False).close()
        for n in counts:
            build_sharded(work / f"s{n}", tok, n, corpus=corpus, progress=False)
        rng = np.random.default_rng(0)
        with Datastore.open(work / "one") as one:
            print(f"corpus: {one.num_tokens:,} tokens, {one.num_documents:,} documents")
            contexts = []
            while len(contexts) < args.queries:
                end = int(rng.integers(64, one.tokens.shape[0]))
                ctx = one.tokens[end - 64 : end].copy()
                if (ctx < 0).any():
                    continue
                if rng.random() < 0.5:
                    ctx[-1] = rng.integers(0, len(tok))
                contexts.append(ctx)
            ref_drafter = CorpusDrafter(one.tokens, one.suffix_array, one._source)
            ref = [ref_drafter.propose(c, 64) for c in contexts]
            rows = [("one datastore", ref_drafter, None)]
            stores = [Datastore.open(work / f"s{n}") for n in counts]
            rows += [(f"{n} shards", ShardedCorpusDrafter(ds.index, ds._source), ds) for n, ds in zip(counts, stores)]
            for _, drafter, _ in rows:
                for c in contexts[:20]:
                    drafter.propose(c, 64)  # compile and warm the maps
            # Interleaved per context, in rotating order: the machine's load hits every row alike.
            times = np.zeros((len(rows), len(contexts)))
            same = [True] * len(rows)
            for i, (c, want) in enumerate(zip(contexts, ref)):
                for j in np.roll(np.arange(len(rows)), i):
                    t0 = time.perf_counter()
                    got = rows[j][1].propose(c, 64)
                    times[j, i] = time.perf_counter() - t0
                    same[j] &= np.array_equal(got.tokens, want.tokens) and np.array_equal(got.scores, want.scores)
            for (label, _, _), t, ok in zip(rows, times * 1e6, same):
                print(f"{label:>14}: p50 {np.percentile(t, 50):7.0f} us  p90 {np.percentile(t, 90):7.0f} us  "
                      f"p99 {np.percentile(t, 99):7.0f} us  drafts equal to one datastore's: {ok}")
            for ds in stores:
                ds.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build throughput: one process against Ray workers")
    b.add_argument("--copies", type=int, default=6, help="stdlib copies (~3.9M tokens each: 13 for the issue's 50M; default 6)")
    b.add_argument("--shards", type=int, default=4)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--keep", type=Path, default=None, help="move the generated corpus here instead of deleting it")
    q = sub.add_parser("query", help="corpus drafter latency at several shard counts")
    q.add_argument("--shards", default="1,4,16")
    q.add_argument("--queries", type=int, default=1000)
    q.add_argument("--copies", type=int, default=1)
    for p in (b, q):
        p.add_argument("--dir", default=None, help="where the temporary corpus and datastores go (default: /tmp)")
    args = ap.parse_args(argv)
    for name in ("copies", "shards", "workers", "queries"):
        v = getattr(args, name, None)
        if isinstance(v, int) and v < 1:
            ap.error(f"--{name} must be >= 1, got {v}")
    {"build": cmd_build, "query": cmd_query}[args.cmd](args)


if __name__ == "__main__":
    main()
