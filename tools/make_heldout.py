"""Write a held-out benchmark question file from the Python standard library's own sources.

usage: python tools/make_heldout.py [--out tools/heldout_questions.jsonl] [--per-group 10]

Three groups, one turn each, in Spec-Bench's question.jsonl schema (question_id, category,
turns), so `python tools/bench.py run --questions FILE` takes the file as it is:
  code_edit     a short stdlib function and an edit to make (type hints, a rename, a
                docstring rewrite, early returns); the answer restates most of the code
  doc_question  a module's docstring and one of its functions, and a question about them
  records       a table of stdlib modules with the first line of each docstring, to
                reformat (Markdown, JSON lines, CSV, a numbered list)
None of it comes from the shared traces or Spec-Bench: the text is this interpreter's
stdlib, picked deterministically (sorted module list, first fitting function), so the file
is the same for the same Python version. The committed file was made with Python 3.11.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent / "heldout_questions.jsonl"
# modules whose top-level functions are short and self-contained (ordered: edits first, then questions)
MODULES = ("textwrap", "shlex", "fnmatch", "posixpath", "glob", "bisect", "heapq", "colorsys", "calendar",
           "string", "difflib", "base64", "quopri", "uu", "gettext", "locale", "tokenize", "keyword",
           "linecache", "filecmp", "ntpath", "genericpath", "copy", "html", "ipaddress", "mimetypes",
           "netrc", "operator", "pprint", "reprlib")
RECORD_MODULES = ("abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys",
                  "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "enum",
                  "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
                  "heapq", "hmac", "html", "imaplib", "inspect", "ipaddress", "json", "keyword", "linecache",
                  "locale", "logging", "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse",
                  "pathlib", "pickle", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
                  "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "statistics", "string",
                  "struct", "subprocess", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
                  "traceback", "types", "typing", "uuid", "warnings", "wave", "weakref", "zipfile")
EDITS = (
    "Add type hints to every parameter and to the return value of this Python function. Keep everything "
    "else as it is and output the complete edited function.",
    "Rename the function `{name}` to `{name}_checked` and its first parameter `{param}` to `{param}_in` "
    "everywhere in the body. Output the complete edited function and nothing else.",
    "Rewrite the docstring of this function in Google style with an Args: section and a Returns: section. "
    "Keep the code unchanged and output the complete function.",
    "Add a one-line comment above every `if`, `for` and `while` statement of this function saying what it "
    "checks or loops over. Output the complete function with the comments.",
)
QUESTIONS = (
    "Using the module documentation and the source below, explain what `{name}` does, then list each of "
    "its parameters with a one-line description.",
    "Read the module documentation and the function below. Write three example calls of `{name}` with the "
    "value each one returns, and explain why.",
)
FORMATS = (
    "Reformat this table as a Markdown table with the columns `module` and `summary`, one row per module, "
    "in the same order.",
    "Turn each row of this table into one JSON object per line with the keys \"module\" and \"summary\".",
    "Rewrite this table as CSV with a header line `module,summary`, quoting every summary.",
    "Write these modules as a numbered list, each line `N. module: summary`, sorted alphabetically by module.",
)
MAX_LINES = (6, 30)  # a function's length in lines, so prompt + answer fit a small model's context


def stdlib_source(module: str) -> str | None:
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def first_function(source: str) -> tuple[str, str, str] | None:
    """(name, first parameter, source text) of the first top-level function with a docstring,
    at least one parameter and MAX_LINES lines."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and node.args.args:
            lines = node.end_lineno - node.lineno + 1
            if MAX_LINES[0] <= lines <= MAX_LINES[1] and not node.name.startswith("_"):
                return node.name, node.args.args[0].arg, ast.get_source_segment(source, node)
    return None


def summary_line(module: str) -> str | None:
    source = stdlib_source(module)
    doc = ast.get_docstring(ast.parse(source)) if source else None
    return doc.strip().splitlines()[0].strip() if doc else None


def questions(per_group: int) -> list[dict]:
    """The held-out questions: ``per_group`` of each group, deterministic for a Python version."""
    functions = []
    for module in MODULES:
        source = stdlib_source(module)
        found = first_function(source) if source else None
        if found:
            functions.append((module, source, *found))
    if len(functions) < 2 * per_group:
        raise SystemExit(f"only {len(functions)} stdlib modules with a fitting function, need {2 * per_group}: "
                         "lower --per-group")
    out: list[dict] = []
    for i, (module, _, name, param, code) in enumerate(functions[:per_group]):
        task = EDITS[i % len(EDITS)].format(name=name, param=param)
        out.append({"category": "code_edit", "turns": [f"{task}\n\n```python\n{code}\n```"]})
    for i, (module, source, name, _, code) in enumerate(functions[per_group: 2 * per_group]):
        doc = (ast.get_docstring(ast.parse(source)) or "")[:800]
        task = QUESTIONS[i % len(QUESTIONS)].format(name=name)
        out.append({"category": "doc_question",
                    "turns": [f"{task}\n\nModule `{module}`:\n{doc}\n\n```python\n{code}\n```"]})
    rows = [(m, s) for m in RECORD_MODULES if (s := summary_line(m))]
    for i in range(per_group):
        chunk = [rows[(i * 8 + j) % len(rows)] for j in range(8)]
        table = "\n".join(f"{m} | {s}" for m, s in chunk)
        out.append({"category": "records", "turns": [f"{FORMATS[i % len(FORMATS)]}\n\nmodule | summary\n{table}"]})
    return [{"question_id": 1001 + i, **q} for i, q in enumerate(out)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, default=OUT, help=f"question file to write (default {OUT.name} beside this tool)")
    ap.add_argument("--per-group", type=int, default=10, help="questions per group (default 10)")
    args = ap.parse_args(argv)
    if args.per_group < 1:
        ap.error(f"--per-group must be at least 1, got {args.per_group}")
    qs = questions(args.per_group)
    args.out.write_text("".join(json.dumps(q) + "\n" for q in qs))
    print(f"wrote {len(qs)} questions ({args.per_group} per group: code_edit, doc_question, records) to {args.out}")


if __name__ == "__main__":
    main()
