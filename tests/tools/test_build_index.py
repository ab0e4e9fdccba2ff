"""tools/build_index.py as a user runs it: a subprocess, real tokenizer, real files."""

import json
import os
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from retrodraft.retrieval import Datastore, Document

TOOL = ROOT / "tools" / "build_index.py"


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def tok():
    from retrodraft.decode import load_tokenizer

    return load_tokenizer()


def test_no_arguments_says_what_to_pass():
    p = run()
    assert p.returncode != 0 and "pass the corpus" in p.stderr and "--help" in p.stderr


def test_build_beside_a_read_only_corpus_then_append(tmp_path, tok):
    shared = tmp_path / "shared"  # read-only, like ../shared
    corpus = shared / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2 + 2?", "answer": "4", "id": 1},
        {"question": "What is 3 + 3?", "answer": "6", "id": 2},
    ]))
    (corpus / "empty.txt").write_text("")
    shared.chmod(stat.S_IRUSR | stat.S_IXUSR)
    work = tmp_path / "work"
    work.mkdir()
    try:
        p = run(corpus, "--field", "answer", "--quiet", cwd=work)
    finally:
        shared.chmod(0o755)
    assert p.returncode == 0, p.stderr
    out = work / "corpus.rdstore"
    assert f"wrote {out}" in p.stdout and "1 empty" in p.stdout and "tok/s" in p.stdout
    with Datastore.open(out, tokenizer=tok) as ds:
        assert ds.num_documents == 2
        first = ds.tokens.copy()
        assert tok.decode(first[: ds.doc_offsets[1] - 1]) == "4"

    more = tmp_path / "more.md"
    more.write_text("# More\n\nsix is 3 + 3")
    p = run(more, "--append", "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    assert "1 documents, " in p.stdout and "now 3 documents" in p.stdout
    with Datastore.open(out) as ds:
        assert ds.num_documents == 3 and np.array_equal(ds.tokens[: first.shape[0]], first)
        assert ds.locate(int(ds.doc_offsets[2])).path == str(more)

    p = run(more, "--append", "--out", tmp_path / "none", "--quiet")
    assert p.returncode != 0 and "build it first" in p.stderr


def test_kill_during_build_leaves_previous_datastore(tmp_path, tok):
    path = tmp_path / "big.rdstore"
    with Datastore.build(path, [Document("/old.txt", 0, "the previous datastore")], tok, progress=False) as ds:
        before = ds.tokens.copy()
    # Big enough to still be tokenizing a second after the build directory appears.
    corpus = Path(sysconfig.get_paths()["stdlib"])
    proc = subprocess.Popen([sys.executable, str(TOOL), str(corpus), "--out", str(path), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("big.rdstore.incomplete-*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        time.sleep(1.0)
        assert proc.poll() is None, "the build finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "big.rdstore" and all(n.startswith("big.rdstore.incomplete-") for n in names[1:])
    with Datastore.open(path, tokenizer=tok) as ds:
        assert np.array_equal(ds.tokens, before)
    # The next build clears the dead one's debris.
    Datastore.build(path, [Document("/new.txt", 0, "new")], tok, progress=False).close()
    assert [p.name for p in tmp_path.iterdir()] == ["big.rdstore"]
