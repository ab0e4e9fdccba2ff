"""Inspect a datastore and manage what generation learned in it.

usage: python tools/datastore.py info PATH
       python tools/datastore.py scopes PATH
       python tools/datastore.py export PATH --out FILE.npz [--scope NAME]
       python tools/datastore.py forget PATH --scope NAME
       python tools/datastore.py compact PATH [--scope NAME | --all] [--memory BYTES]
       python tools/datastore.py bench-commit [--stored 1000,100000] [--commits 200]

A datastore holds a corpus (documents, tokens, suffix array: built by tools/build_index.py,
shared by everyone) and learned state per scope: past outputs (a log), the token-recycling
rows and the score calibration counts, written by every generate() call that opens the
datastore writable with that scope (default scope: "default").

info     format version, tokenizer, documents and tokens, bytes per file, and per scope the
         records and bytes of each kind (out: output log, rec: recycling rows, cal:
         calibration cells, ngram: the compacted n-gram snapshot)
scopes   the scope names, one per line
export   a scope's learned state to a .npz file (numpy arrays, no pickles)
forget   delete a scope's learned state for good (one transaction; the corpus stays)
compact  fold a scope's output log into its n-gram snapshot and drop the log entries
         older than the suffix tree's window (--memory: the byte budget deciding that
         window, as given to Datastore.open; default 192 MiB); processes that have the
         datastore open reload the scope on their next call
bench-commit  microseconds per commit (one 40-token call's output, 40 recycling rows and the
         calibration cells a call touches) with N outputs already stored, in a temporary
         datastore: durable (as generate() commits, ending in an fsync) and without the fsync
         (the work in the transaction); beside them, rewriting the whole state as before scopes

Examples:
  python tools/datastore.py info my.rdstore
  python tools/datastore.py export my.rdstore --scope team-a --out team-a.npz
  python tools/datastore.py compact my.rdstore --all
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retrodraft.retrieval import Datastore, DatastoreError, Document, LearnedMemory
from retrodraft.retrieval import learned
from retrodraft.retrieval.calibration import VERDICTS

DEFAULT_STORED = "1000,100000"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def info(args) -> None:
    with Datastore.open(args.path) as ds:
        tok = ds.meta["tokenizer"]
        print(f"datastore {ds.path}")
        print(f"  format version {ds.meta['format_version']}")
        print(f"  tokenizer {tok['name']} (fingerprint {tok['fingerprint']}, vocabulary {tok.get('vocab_size', '?')})")
        print(f"  {ds.num_documents:,} documents, {ds.num_tokens:,} tokens")
        for f in sorted(ds.path.iterdir()):
            size = sum(p.stat().st_size for p in f.iterdir()) if f.is_dir() else f.stat().st_size
            print(f"  {f.name:<22}{_size(size):>12}")
        names = ds.scopes()
        print(f"  scopes: {', '.join(names) if names else 'none (nothing learned yet)'}")
        for scope in names:
            sizes = ds.scope_sizes(scope)
            print(f"    {scope}: " + ", ".join(f"{kind} {n:,} records {_size(b)}" for kind, (n, b) in sizes.items()))


def scopes(args) -> None:
    with Datastore.open(args.path) as ds:
        for name in ds.scopes():
            print(name)


def export(args) -> None:
    with Datastore.open(args.path, scope=args.scope) as ds:
        counts = ds.export_scope(args.out)
    print(f"wrote scope {args.scope!r} to {args.out}: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))


def forget(args) -> None:
    with Datastore.open(args.path, readonly=False, scope=args.scope) as ds:
        n = ds.forget()
    print(f"forgot scope {args.scope!r}: {n:,} records deleted")


def compact(args) -> None:
    with Datastore.open(args.path, readonly=False, memory=args.memory) as ds:
        names = ds.scopes() if args.all else [args.scope]
        for scope in names:
            r = ds.compact(scope)
            print(f"compacted scope {scope!r}: {r['folded']:,} log entries folded into the n-gram snapshot, "
                  f"{r['dropped']:,} dropped, {r['kept']:,} kept (the suffix window)")


def bench_commit(args) -> None:
    """Commit cost with N outputs stored: one temporary datastore per N, the default tokenizer's vocabulary."""
    import lmdb

    from retrodraft.decode import load_tokenizer
    from retrodraft.index.recycling import TokenRecycling
    from retrodraft.retrieval.layout import DBS, MAP_SIZE

    tok = load_tokenizer()
    vocab = len(tok)
    rng = np.random.default_rng(0)

    def one_call(state) -> np.ndarray:
        """What a 40-token call learns: its output, 40 recycling rows, calibration cells."""
        out = rng.integers(0, vocab, 40).astype(np.int32)
        state.recycling.update(out, rng.integers(0, vocab, (40, state.recycling.k)))
        cal = state.calibrator
        for name in ("prompt_lookup", "suffix", "ngram", "recycling", "corpus", "fused:suffix+ngram"):
            i = cal._index(name)
            cal.seen[i, rng.integers(0, VERDICTS), rng.integers(0, 8, 6), rng.integers(0, 20, 6)] += 1
        return out

    print(f"{'stored outputs':>15}{'commit (us)':>13}{'p90':>8}{'no fsync (us)':>15}{'p90':>8}"
          f"{'rewrite all, before (us)':>26}")
    for stored in [int(s) for s in args.stored.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.rdstore"
            Datastore.build(path, [Document("bench", 0, "a tiny corpus")], tok, progress=False).close()
            # durable, as generate() commits: each write transaction ends in an fsync
            with Datastore.open(path, readonly=False) as ds:
                learned.append_outputs(ds._live_env(), ds._dbs[b"state"], ds.scope,
                                       (rng.integers(0, vocab, 40).astype(np.int32) for _ in range(stored)))
                state = ds.online(vocab)
                durable = []
                for _ in range(args.commits):
                    out = one_call(state)
                    t = time.perf_counter()
                    ds.commit(out)
                    durable.append(time.perf_counter() - t)
                # before scopes: every commit rewrote the whole state (outputs up to 256k tokens)
                kept = min(stored * 40, 1 << 18)
                whole = {"outputs": rng.integers(0, vocab, kept).astype(np.int32),
                         "lengths": np.full(kept // 40, 40), "recycling": TokenRecycling(vocab).state()["rows"],
                         **{f"calibration_{k}": v for k, v in state.calibrator.state().items()}}
                rewrite = []
                for _ in range(max(3, args.commits // 20)):
                    t = time.perf_counter()
                    ds.save_state("bench-rewrite", whole)
                    rewrite.append(time.perf_counter() - t)
            # the work inside the transaction alone: the same commits without the fsync
            env = lmdb.open(str(path / "meta.lmdb"), max_dbs=len(DBS), map_size=MAP_SIZE, sync=False)
            scope = learned.ScopeState(env, env.open_db(b"state"), "default", vocab, LearnedMemory(), True)
            fast = []
            for _ in range(args.commits):
                out = one_call(scope.online)
                t = time.perf_counter()
                scope.commit(out)
                fast.append(time.perf_counter() - t)
            env.close()
        us, nosync = np.array(durable) * 1e6, np.array(fast) * 1e6
        print(f"{stored:>15,}{np.median(us):>13.0f}{np.percentile(us, 90):>8.0f}{np.median(nosync):>15.0f}"
              f"{np.percentile(nosync, 90):>8.0f}{np.median(rewrite) * 1e6:>26.0f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    commands = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str, path: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        if path:
            p.add_argument("path", type=Path, help="the datastore directory (built by tools/build_index.py)")
        p.set_defaults(func=func)
        return p

    command("info", info, "sizes per structure, scopes, documents, tokenizer, format version")
    command("scopes", scopes, "list the scopes that hold learned state")
    p = command("export", export, "write a scope's learned state to a .npz file")
    p.add_argument("--scope", default=learned.DEFAULT_SCOPE, help="the scope to export (default: default)")
    p.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    p = command("forget", forget, "delete a scope's learned state (the corpus and other scopes stay)")
    p.add_argument("--scope", required=True, help="the scope to delete (required: there is no undo)")
    p = command("compact", compact, "fold a scope's output log into its n-gram snapshot, drop old log entries")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--scope", default=learned.DEFAULT_SCOPE, help="the scope to compact (default: default)")
    which.add_argument("--all", action="store_true", help="compact every scope")
    p.add_argument("--memory", type=int, default=None,
                   help="byte budget of past outputs as given to Datastore.open (decides the window kept)")
    p = command("bench-commit", bench_commit, "microseconds per commit at several stored sizes", path=False)
    p.add_argument("--stored", default=DEFAULT_STORED, help=f"outputs stored before timing (default {DEFAULT_STORED})")
    p.add_argument("--commits", type=int, default=200, help="commits timed per size (default 200)")

    args = ap.parse_args(argv)
    try:
        if getattr(args, "memory", None) is not None:
            LearnedMemory.of(args.memory)
        args.func(args)
    except (DatastoreError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
