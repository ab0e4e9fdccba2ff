"""Build a retrodraft datastore from a corpus, or append a corpus to one.

usage: python tools/build_index.py CORPUS [--out DIR] [--model PATH] [--field NAME ...]
                                   [--append] [--keys [all|lazy]] [--exclude NAME ...]
                                   [--no-default-excludes] [--workers N] [--quiet]

CORPUS is a directory (walked recursively) or one file: .txt .md .rst and source files are
one document each; .jsonl lines, .json records and .parquet rows are one document each, their
text taken from --field columns. Tokens come from the target model's tokenizer, so build with
the model you will generate with (--model). The datastore goes to --out, by default
CORPUS.rdstore beside the corpus (./NAME.rdstore if that directory is read-only). Example, on
a corpus every machine has:

    python tools/build_index.py "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"

--keys adds what NEST drafts from: the model's final hidden state at every corpus token,
projected to 128 dims (PCA) and stored as float16 (256 bytes per token), plus a BM25 index
of the documents. It runs the model over the whole corpus (on 2 CPU cores a few hundred
tokens/s: keep such corpora small); --keys lazy stores only the projection and the BM25
index, and encodes each document the first time NEST retrieves it.
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
    keys = ds.array("keys")
    if keys is not None:
        lines.append(f"  NEST keys: {keys.nbytes / max(s.total_tokens, 1):.0f} bytes/token on disk "
                     f"({ds.meta['keys']['dims']} dims, float16, model {ds.meta['keys']['model']['name']})")
    skipped = ", ".join(f"{n} {reason}" for reason, n in s.skipped.as_dict().items() if n)
    lines.append(f"  skipped: {skipped or 'nothing'}")
    return "\n".join(lines)


def key_builder(model_path: str | None, mode: str):
    """A KeyBuilder over the model at ``model_path`` (None: the default model)."""
    from retrodraft.decode import load_model
    from retrodraft.decode.keys import ModelEncoder
    from retrodraft.retrieval.keys_store import KeyBuilder

    return KeyBuilder(ModelEncoder(load_model(model_path)[0]), mode)


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
    ap.add_argument("--keys", nargs="?", const="all", default=None, choices=("all", "lazy"),
                    help="also store NEST keys made by --model: 'all' (the default when given) encodes every "
                         "document now, 'lazy' when NEST first retrieves it; an --append to a datastore with "
                         "keys always extends them")
    ap.add_argument("--exclude", action="append", default=[], metavar="NAME",
                    help="directory name to leave out of the walk (repeatable), besides the defaults")
    ap.add_argument("--no-default-excludes", action="store_true",
                    help="also walk site-packages, dist-packages, node_modules and __pycache__ (hidden entries "
                         "are always left out)")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help="tokenizer threads (default: all cores)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    if not argv:
        ap.print_usage(sys.stderr)
        die("pass the corpus to index: a directory or a .txt/.md/.py/.jsonl/.json/.parquet file "
            "(python tools/build_index.py --help explains every option)")
    args = ap.parse_args(argv)
    if args.workers is not None:
        if args.workers < 1:
            die(f"--workers must be >= 1, got {args.workers}")
        # Read once, when the Rust tokenizer first starts its thread pool (below).
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)

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
        from retrodraft.decode import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        documents = iter_documents(corpus, fields, skipped, exclude)
        if args.append:
            with Datastore.open(out, readonly=False) as ds:
                if args.keys and "keys" not in ds.meta:
                    die(f"the datastore at {out} has no NEST keys to extend: build it with --keys (without --append)")
                keys = key_builder(args.model, args.keys or "all") if "keys" in ds.meta else None
                ds.append(documents, tokenizer, progress=not args.quiet, skipped=skipped, keys=keys)
                print(summary(ds, out))
        else:
            keys = key_builder(args.model, args.keys) if args.keys else None
            with Datastore.build(out, documents, tokenizer, progress=not args.quiet, skipped=skipped, keys=keys) as ds:
                print(summary(ds, out))
    except (DatastoreError, EmptyCorpusError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
