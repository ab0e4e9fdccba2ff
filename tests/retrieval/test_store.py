"""The persistent datastore: real LMDB and Arrow under tmp_path, the real default tokenizer."""

import fcntl
import json
import os
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest

from conftest import ROOT
from retrodraft.index import suffix_array
from retrodraft.retrieval import (
    CorruptDatastoreError,
    Datastore,
    Document,
    EmptyCorpusError,
    FormatVersionError,
    IncompleteDatastoreError,
    ReadOnlyDatastoreError,
    StaleDatastoreError,
    TokenizerMismatchError,
    tokenizer_fingerprint,
)


DOCS_A = [
    Document("/src/a.py", 0, "def add(a, b):\n    return a + b\n"),
    Document("/src/q.jsonl", 0, "What is 2 + 2?\n\n2 + 2 = 4"),
    Document("/src/q.jsonl", 1, "What is 3 + 3?\n\n3 + 3 = 6"),
]
DOCS_B = [
    Document("/src/b.md", 0, "# Notes\n\nadd(a, b) returns the sum of a and b."),
    Document("/src/q.jsonl", 2, "What is 4 + 4?\n\n4 + 4 = 8"),
]

# Run in this process and in children, so both sides hash a datastore the same way.
DIGEST = """
import hashlib, json
def digest(ds):
    h = lambda a: hashlib.sha256(a.tobytes()).hexdigest()
    return json.dumps({"tokens": h(ds.tokens), "offsets": h(ds.doc_offsets), "sa": h(ds.suffix_array),
                       "docs": [list(ds.document(i)) for i in range(ds.num_documents)],
                       "fingerprint": ds.fingerprint, "num_tokens": ds.num_tokens})
"""
_ns: dict = {}
exec(DIGEST, _ns)
digest = _ns["digest"]


def child(code: str, *args) -> str:
    """Run ``code`` in a fresh Python process (argv[1:] = args); return its stdout."""
    src = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{DIGEST}\n{textwrap.dedent(code)}"
    p = subprocess.run([sys.executable, "-c", src, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def tok():
    from retrodraft.decode import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_tok():
    """A second real tokenizer: word-level, trained on the test documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator([d.text for d in DOCS_A + DOCS_B], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", name_or_path="tiny-wordlevel")


def build(path, tok, docs=DOCS_A) -> Datastore:
    return Datastore.build(path, docs, tok, progress=False)


def test_second_process_reads_identical_datastore(tmp_path, tok):
    with build(tmp_path / "ds", tok) as ds:
        mine = digest(ds)
        ids = [tok(d.text, add_special_tokens=False)["input_ids"] for d in DOCS_A]
        expect = np.concatenate([np.array(i + [-1], np.int32) for i in ids])
        assert np.array_equal(ds.tokens, expect) and ds.tokens.dtype == np.int32
        assert ds.num_tokens == sum(map(len, ids)) and ds.num_documents == 3
        assert ds.doc_offsets.tolist() == np.cumsum([0] + [len(i) + 1 for i in ids]).tolist()
        assert np.array_equal(ds.suffix_array, suffix_array.build(expect))
        assert not ds.tokens.flags.writeable
        assert ds.stats.documents == 3 and set(ds.stats.seconds) == {"read", "tokenize", "suffix_array", "write"}
    theirs = child("""
        from retrodraft.retrieval import Datastore
        with Datastore.open(sys.argv[1]) as ds:
            print(digest(ds))
    """, tmp_path / "ds")
    assert json.loads(theirs) == json.loads(mine)


def test_locate_and_document_table(tmp_path, tok):
    with build(tmp_path / "ds", tok) as ds:
        o = ds.doc_offsets
        assert ds.document(2) == ("/src/q.jsonl", 1, int(o[2]), int(o[3] - o[2] - 1))
        assert ds.locate(int(o[1]) + 3) == ("/src/q.jsonl", 0, 3)
        assert ds.locate(0) == ("/src/a.py", 0, 0)
        for bad in (int(o[1]) - 1, -1, len(ds.tokens)):  # a separator, and outside the stream
            with pytest.raises(ValueError):
                ds.locate(bad)
        with pytest.raises(ValueError):
            ds.document(3)


def test_state_saved_by_one_process_is_there_for_the_next(tmp_path, tok):
    build(tmp_path / "ds", tok).close()
    nodes = np.arange(12, dtype=np.int32).reshape(4, 3)
    with Datastore.open(tmp_path / "ds", readonly=False) as ds:
        ds.save_state("suffix_tree", {"nodes": nodes, "meta": np.array([7], np.int64)})
        ds.save_state("empty", {})
    out = child("""
        import numpy as np
        from retrodraft.retrieval import Datastore
        with Datastore.open(sys.argv[1], readonly=False) as ds:
            s = ds.load_state("suffix_tree")
            print(sorted(s), s["nodes"].dtype, s["nodes"].tolist(), s["meta"].tolist(), ds.load_state("empty"))
            ds.save_state("suffix_tree", {"nodes": s["nodes"] * 2})
            ds.save_state("recycling", {"matrix": np.ones((2, 2), np.float16)})
    """, tmp_path / "ds")
    assert out.split("\n")[0] == f"['meta', 'nodes'] int32 {nodes.tolist()} [7] {{}}"
    with Datastore.open(tmp_path / "ds") as ds:
        s = ds.load_state("suffix_tree")
        assert list(s) == ["nodes"] and np.array_equal(s["nodes"], nodes * 2)  # replaced, not merged
        assert ds.load_state("recycling")["matrix"].dtype == np.float16
        assert ds.load_state("never") is None


def test_reader_sees_state_committed_by_a_writer_process(tmp_path, tok):
    with build(tmp_path / "ds", tok) as ds:
        assert ds.load_state("x") is None
        with pytest.raises(ReadOnlyDatastoreError):
            ds.save_state("x", {"a": np.zeros(1)})
        child("""
            import numpy as np
            from retrodraft.retrieval import Datastore
            with Datastore.open(sys.argv[1], readonly=False) as w:
                w.save_state("x", {"a": np.arange(3)})
        """, tmp_path / "ds")
        assert ds.load_state("x")["a"].tolist() == [0, 1, 2]


def test_bad_state_is_refused_before_writing(tmp_path, tok):
    build(tmp_path / "ds", tok).close()
    with Datastore.open(tmp_path / "ds", readonly=False) as ds:
        ds.save_state("s", {"a": np.zeros(2)})
        for name, arrays in [("s", {"a": np.array([object()])}), ("s", {"a": [1, 2]}), ("", {}), ("a\0b", {})]:
            with pytest.raises(ValueError):
                ds.save_state(name, arrays)
        assert ds.load_state("s")["a"].tolist() == [0.0, 0.0]


def test_other_tokenizer_is_refused_naming_both(tmp_path, tok, tiny_tok):
    build(tmp_path / "ds", tiny_tok).close()
    with pytest.raises(TokenizerMismatchError) as e:
        Datastore.open(tmp_path / "ds", tokenizer=tok)
    msg = str(e.value)
    assert "tiny-wordlevel" in msg and tokenizer_fingerprint(tiny_tok) in msg
    assert tok.name_or_path in msg and tokenizer_fingerprint(tok) in msg and "build_index.py" in msg
    with Datastore.open(tmp_path / "ds", tokenizer=tiny_tok, readonly=False) as ds:
        with pytest.raises(TokenizerMismatchError):
            ds.append(DOCS_B, tok, progress=False)
        assert ds.num_documents == 3


@pytest.mark.parametrize("damage", ["truncate tokens", "flip a byte of the suffix array", "flip a byte of doc offsets"])
def test_damaged_arrow_file_says_rebuild(tmp_path, tok, damage):
    build(tmp_path / "ds", tok).close()
    name = {"truncate tokens": "tokens", "flip a byte of the suffix array": "suffix_array"}.get(damage, "doc_offsets")
    f = tmp_path / "ds" / f"{name}.arrow"
    data = bytearray(f.read_bytes())
    if damage.startswith("truncate"):
        data = data[:-1]
    else:
        data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptDatastoreError, match=rf"{name}\.arrow.*rebuild it with: python tools/build_index\.py"):
        Datastore.open(tmp_path / "ds")


def test_incomplete_or_missing_datastore(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="build_index.py"):
        Datastore.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(IncompleteDatastoreError, match="build_index.py"):
        Datastore.open(tmp_path / "plain")
    build(tmp_path / "half", tok).close()  # a datastore without its meta record
    env = lmdb.open(str(tmp_path / "half" / "meta.lmdb"), max_dbs=4, map_size=1 << 36)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.delete(b"meta")
    env.close()
    with pytest.raises(IncompleteDatastoreError, match="no completed metadata"):
        Datastore.open(tmp_path / "half")
    (tmp_path / "half" / "meta.lmdb" / "data.mdb").unlink()
    with pytest.raises(CorruptDatastoreError, match=r"meta\.lmdb/data\.mdb is missing"):
        Datastore.open(tmp_path / "half")


def test_other_format_version_is_refused(tmp_path, tok):
    build(tmp_path / "ds", tok).close()
    marker = tmp_path / "ds" / "retrodraft-datastore.json"
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), format_version=99)))
    with pytest.raises(FormatVersionError, match="version 99"):
        Datastore.open(tmp_path / "ds")
    marker.unlink()  # as a datastore of format 1 had none
    with pytest.raises(FormatVersionError, match="format version 1.*build_index.py"):
        Datastore.open(tmp_path / "ds")


def test_append_equals_building_both_and_keeps_state(tmp_path, tok):
    build(tmp_path / "ds", tok).close()
    with Datastore.open(tmp_path / "ds", readonly=False) as ds:
        ds.save_state("s", {"a": np.arange(4)})
        stats = ds.append(DOCS_B, tok, progress=False)
        assert (stats.documents, stats.total_documents) == (2, 5) and ds.num_documents == 5
        appended = digest(ds)
        assert ds.load_state("s")["a"].tolist() == [0, 1, 2, 3]
        ds.save_state("s", {"a": np.arange(2)})  # the reopened version is writable and current
    with build(tmp_path / "both", tok, DOCS_A + DOCS_B) as ds:
        assert json.loads(appended) == json.loads(digest(ds))
    with Datastore.open(tmp_path / "ds") as ds:
        assert ds.document(4) == ("/src/q.jsonl", 2, int(ds.doc_offsets[4]), ds.document(4).length)
        assert [h["op"] for h in ds.meta["history"]] == ["build", "append"]


def test_writer_of_a_replaced_datastore_gets_stale_error(tmp_path, tok):
    build(tmp_path / "ds", tok).close()
    with Datastore.open(tmp_path / "ds", readonly=False) as old:
        build(tmp_path / "ds", tok, DOCS_B).close()
        with pytest.raises(StaleDatastoreError, match="open it again"):
            old.save_state("s", {"a": np.zeros(1)})
        with pytest.raises(StaleDatastoreError):
            old.append(DOCS_A, tok, progress=False)
        assert old.num_documents == 3 and old.tokens.shape[0] > 0  # still reads its version
    with Datastore.open(tmp_path / "ds") as ds:
        assert ds.num_documents == 2 and ds.load_state("s") is None


def test_build_replaces_only_datastores_and_removes_dead_builds(tmp_path, tok):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a datastore"):
        build(tmp_path / "mine", tok)
    assert (tmp_path / "mine" / "keep.txt").exists()
    dead, live = tmp_path / "ds.incomplete-dead", tmp_path / "ds.incomplete-live"
    for d in (dead, live):
        d.mkdir()
        (d / "build.lock").touch()
    fd = os.open(live / "build.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds it
    try:
        build(tmp_path / "ds", tok).close()
        build(tmp_path / "ds", tok, DOCS_B).close()
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.incomplete-live", "ds.lock", "mine"]
    with Datastore.open(tmp_path / "ds") as ds:
        assert ds.num_documents == 2


def test_no_documents_is_an_error(tmp_path, tok):
    with pytest.raises(EmptyCorpusError):
        build(tmp_path / "ds", tok, [])
    assert [p.name for p in tmp_path.iterdir()] == ["ds.lock"]  # the writers' lock, nothing else


def test_closed_datastore_refuses_reads(tmp_path, tok):
    ds = build(tmp_path / "ds", tok)
    tokens = ds.tokens
    ds.close()
    assert tokens.sum() != 0  # views outlive the object
    with pytest.raises(ValueError, match="closed"):
        ds.tokens
