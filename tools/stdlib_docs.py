"""Write the NEST workload: a corpus of this Python's standard-library docstrings and
questions that ask the model to explain those functions without quoting them.

usage: python tools/stdlib_docs.py --out DIR [--functions N]

DIR/corpus.jsonl holds one document per public function of a fixed list of modules
("module.name(signature)" then its docstring, from this interpreter's own stdlib, so any
machine can rebuild it); DIR/questions.jsonl holds one Spec-Bench-style question per
function among the first N, category "stdlib_docs", e.g. "In Python, what does
textwrap.dedent do? Explain briefly." The answers may restate a docstring in other words:
the case where the context's last tokens differ from the corpus's wording and a hidden-state
neighbour can still point at the right place. Then:

    python tools/build_index.py DIR/corpus.jsonl --keys --out DIR/docs.rdstore
    python tools/bench.py record --questions DIR/questions.jsonl --out DIR/traces.jsonl
    python tools/bench.py replay DIR/traces.jsonl --datastore DIR/docs.rdstore --hidden
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path

MODULES = ("textwrap", "heapq", "bisect", "shlex", "fnmatch", "base64", "difflib", "statistics", "string", "glob")


def documents() -> list[tuple[str, str]]:
    """(qualified name, document text) for each public function with a docstring, module order."""
    out = []
    for name in MODULES:
        module = importlib.import_module(name)
        for fname, f in vars(module).items():
            if fname.startswith("_") or not inspect.isfunction(f) or f.__module__ != name or not f.__doc__:
                continue
            try:
                sig = str(inspect.signature(f))
            except (TypeError, ValueError):
                sig = "(...)"
            out.append((f"{name}.{fname}", f"{name}.{fname}{sig}\n\n{inspect.cleandoc(f.__doc__)}"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for corpus.jsonl and questions.jsonl")
    ap.add_argument("--functions", type=int, default=8, help="questions to write, one per function (default 8)")
    args = ap.parse_args(argv)
    if args.functions < 1:
        ap.error(f"--functions must be >= 1, got {args.functions}")
    docs = documents()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "corpus.jsonl", "w") as f:
        for name, text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    # every k-th function, so the questions spread over the modules
    step = max(1, len(docs) // args.functions)
    with open(args.out / "questions.jsonl", "w") as f:
        for i, (name, _) in enumerate(docs[::step][: args.functions]):
            f.write(json.dumps({"question_id": i, "category": "stdlib_docs",
                                "turns": [f"In Python, what does {name} do? Explain briefly."]}) + "\n")
    print(f"wrote {len(docs)} documents and {min(args.functions, len(docs[::step]))} questions to {args.out}")


if __name__ == "__main__":
    main()
