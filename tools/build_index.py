"""Build a retrodraft datastore from a corpus, or append a corpus to one.

usage: python tools/build_index.py CORPUS [--out DIR] [--model PATH] [--field NAME ...]
                                   [--append] [--exclude NAME ...] [--no-default-excludes]
                                   [--workers N] [--shards N [--ray-address ADDR]] [--quiet]

CORPUS is a directory (walked recursively) or one file: .txt .md .rst and source files are
one document each; .jsonl lines, .json records and .parquet rows are one document each, their
text taken from --field columns. Tokens come from the target model's tokenizer, so build with
the model you will generate with (--model). The datastore goes to --out, by default
CORPUS.rdstore beside the corpus (./NAME.rdstore if that directory is read-only). Example, on
a corpus every machine has:

    python tools/build_index.py "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"

Sharded (pip install -e ".[scale]" for Ray): --shards N splits the documents into N shards by
a hash of their source path, builds each as an ordinary datastore in a Ray task and writes a
manifest; the result opens as one datastore, with drafts equal to an unsharded build's. Ray
starts on this machine with --workers CPUs, or the build runs on the cluster at
--ray-address, whose nodes must all reach --out (a shared file system) and have retrodraft
installed. --append on a sharded datastore adds each document to the shard its path hashes to:

    python tools/build_index.py CORPUS --out corpus.rdstore --shards 4 --workers 2
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path



def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def default_out(corpus: Path) -> Path:
    """CORPUS.rdstore beside the corpus (a file loses its suffix), or in the current directory if that is read-only."""
    name = (corpus.stem if corpus.is_file() else corpus.name) + ".rdstore"
    parent = corpus.parent
    # root passes access() everywhere, so a directory with no write bit counts as read-only too.
    writable = os.access(parent, os.W_OK) and stat.S_IMODE(parent.stat().st_mode) & 0o222
    return parent / name if writable else Path.cwd() / name


def summary(ds, out: Path) -> str:
    s = ds.stats
    lines = [
        f"wrote {out}",
        f"  {s.documents} documents, {s.tokens} tokens added; now {s.total_documents} documents, "
        f"{s.total_tokens} tokens, {s.bytes_on_disk / 1e6:.1f} MB on disk",
    ]
    rates = s.tokens_per_second()
    for phase, seconds in s.seconds.items():
        lines.append(f"  {phase:<13} {seconds:8.2f} s  {rates[phase]:12,.0f} tok/s")
    skipped = ", ".join(f"{n} {reason}" for reason, n in s.skipped.as_dict().items() if n)
    lines.append(f"  skipped: {skipped or 'nothing'}")
    return "\n".join(lines)


def sharded_summary(s, out: Path) -> str:
    lines = [
        f"wrote {out} ({len(s.shards)} shards built or appended to)",
        f"  {s.documents} documents, {s.tokens} tokens added; now {s.total_documents} documents, "
        f"{s.total_tokens} tokens",
        f"  {s.seconds:.2f} s, {s.tokens_per_second():,.0f} tok/s",
    ]
    for r in sorted(s.shards, key=lambda r: r.name):
        lines.append(f"  {r.name}  {r.documents:8} docs {r.tokens:12,} tok  {r.seconds:7.2f} s  "
                     f"worker peak memory {r.peak_rss / 2**20:,.0f} MiB")
    skipped = ", ".join(f"{n} {reason}" for reason, n in s.skipped.as_dict().items() if n)
    lines.append(f"  skipped: {skipped or 'nothing'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="directory or file to index")
    ap.add_argument("--out", type=Path, default=None,
                    help="datastore directory (default: CORPUS.rdstore beside the corpus, or ./NAME.rdstore "
                         "if that directory is read-only); an existing datastore there is replaced atomically")
    ap.add_argument("--model", default=None,
                    help="local Hugging Face model directory whose tokenizer to use (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--field", "--fields", dest="fields", action="append", default=None, metavar="NAME",
                    help="JSON/Parquet field holding text (repeatable or comma-separated; default: text, content, "
                         "question, answer, instruction, input, output, prompt, response, completion, "
                         "conversations, messages, those present, joined by a blank line)")
    ap.add_argument("--append", action="store_true",
                    help="add the corpus's documents to the existing datastore at --out instead of replacing it")
    ap.add_argument("--exclude", action="append", default=[], metavar="NAME",
                    help="directory name to leave out of the walk (repeatable), besides the defaults")
    ap.add_argument("--no-default-excludes", action="store_true",
                    help="also walk site-packages, dist-packages, node_modules and __pycache__ (hidden entries "
                         "are always left out)")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help="tokenizer threads (default: all cores); with --shards, the CPUs of the local Ray "
                         "instance, one shard build each")
    ap.add_argument("--shards", type=int, default=None, metavar="N",
                    help="build a sharded datastore of N shards, each shard a Ray task (needs Ray: "
                         "pip install -e \".[scale]\"); a sharded datastore's --append keeps its count")
    ap.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="run the shard builds on this Ray cluster (auto, HOST:6379, ray://HOST:10001); "
                         "--out must be a path every node reaches (default: a local Ray on this machine)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    if not argv:
        ap.print_usage(sys.stderr)
        die("pass the corpus to index: a directory or a .txt/.md/.py/.jsonl/.json/.parquet file "
            "(python tools/build_index.py --help explains every option)")
    args = ap.parse_args(argv)
    if args.workers is not None:
        if args.workers < 1:
            die(f"--workers must be >= 1, got {args.workers}")
        if args.shards is None:
            # Read once, when the Rust tokenizer first starts its thread pool (below).
            os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    if args.shards is not None and args.shards < 1:
        die(f"--shards must be >= 1, got {args.shards}")
    if args.ray_address is not None and args.shards is None and not args.append:
        die("--ray-address runs a sharded build: add --shards N")

    # Imported after parsing: the packages take seconds (decode: torch), --help and mistakes should not.
    from retrodraft.retrieval import Datastore, DatastoreError
    from retrodraft.retrieval.corpus import DEFAULT_EXCLUDE, EmptyCorpusError, SkipCounts, iter_documents

    corpus = args.corpus.expanduser()
    if not corpus.exists():
        die(f"no corpus at {corpus.absolute()}")
    out = (args.out.expanduser() if args.out else default_out(corpus.absolute())).absolute()
    if args.out is None and out.parent != corpus.absolute().parent:
        print(f"{corpus.absolute().parent} is read-only: the datastore goes to {out}", file=sys.stderr)
    if args.append and not out.exists():
        die(f"nothing to append to at {out}: build it first (without --append)")
    fields = [f for group in args.fields for f in group.split(",") if f] if args.fields else None
    exclude = set(args.exclude) | (set() if args.no_default_excludes else DEFAULT_EXCLUDE)
    skipped = SkipCounts()
    try:
        from retrodraft.retrieval.manifest import is_sharded

        if args.shards is not None or (args.append and is_sharded(out)):
            build_sharded_cli(args, corpus, out, fields, exclude, skipped)
            return
        from retrodraft.decode import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        documents = iter_documents(corpus, fields, skipped, exclude)
        if args.append:
            with Datastore.open(out, readonly=False) as ds:
                ds.append(documents, tokenizer, progress=not args.quiet, skipped=skipped)
                print(summary(ds, out))
        else:
            with Datastore.build(out, documents, tokenizer, progress=not args.quiet, skipped=skipped) as ds:
                print(summary(ds, out))
    except (DatastoreError, EmptyCorpusError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as e:
        die(str(e))


def build_sharded_cli(args, corpus: Path, out: Path, fields, exclude, skipped) -> None:
    """The --shards / sharded --append branch: shard builds as Ray tasks."""
    from retrodraft.retrieval.manifest import is_sharded, read_manifest
    from retrodraft.retrieval.shard_build import append_sharded, build_sharded, ray_runner

    if args.append:
        if not is_sharded(out):
            die(f"{out} is not a sharded datastore: append without --shards, or rebuild it with --shards")
        have = len(read_manifest(out)["shards"])
        if args.shards not in (None, have):
            die(f"{out} has {have} shards; an append keeps them: drop --shards or pass --shards {have}")
    runner = ray_runner(args.ray_address, args.workers)  # ModuleNotFoundError with the install hint
    from retrodraft.decode import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    common = dict(corpus=corpus, fields=fields, exclude=exclude, runner=runner, progress=not args.quiet,
                  skipped=skipped)
    try:
        if args.append:
            stats = append_sharded(out, tokenizer, **common)
        else:
            stats = build_sharded(out, tokenizer, args.shards, **common)
    except ConnectionError as e:
        die(f"could not reach the Ray cluster at {args.ray_address}: {e}. Is it running (ray status --address "
            f"{args.ray_address})? A cluster with token authentication (Ray's default) also needs "
            "RAY_AUTH_MODE=token here and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    print(sharded_summary(stats, out))


if __name__ == "__main__":
    main()
